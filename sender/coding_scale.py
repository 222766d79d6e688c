"""How the sender picks the coding downscale (``--downscale auto``): only from sizes it can see.

The shipped model learned photos with a 512-pixel short side; below about 0.008 bits per coded
pixel a photo coded whole spreads too few bits over too many latent cells. Two rules, measured on
non-Kodak photos (docs/benchmarks.md):

* a fixed rate level: the largest downscale that keeps the short side at 512 or more (1080p: 2);
* a byte budget: the largest coded picture the budget gives at least ``MIN_CODED_BPP``, keeping a
  coded short side of at least ``MIN_CODED_SIDE`` unless no stream fits the budget otherwise.

Both keep the coded picture within what a receiver decodes (:mod:`aeic.shared.decode_limits`): a
48-megapixel photo is never coded whole, a 20-24 MP camera photo is under a budget of 0.008 bpp or more.
With package 85aeab8e (its rate points trained
  at their nominal bpp), coding whole at 0.01 bpp kept 0.69 of the original's gradient energy
  against 0.24 at half size scaled back up, for 1.18 dB less PSNR and 0.05 less MS-SSIM: the
  detail is what this codec is for (3c92a838: 0.68 against 0.26 for 0.85 dB). The models before
  them lost 3.3 dB coded whole at 0.01 bpp.
"""

from __future__ import annotations

import argparse

from aeic.shared import decode_limits
from aeic.shared.bitstream import DOWNSCALES

AUTO = "auto"
AUTO_SHORT_SIDE = 512  # the training scale: photos with a 512-pixel short side
MIN_CODED_SIDE = 192  # no coded picture under this short side (6 latent rows)
MIN_CODED_BPP = 0.008


def parse_downscale(text: str) -> int | str:
    """``auto`` or a container downscale, from a command line (an argparse ``type``)."""
    if text == AUTO:
        return text
    if text.isdigit() and int(text) in DOWNSCALES:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected {AUTO}, 1, 2 or 4, got {text!r}")


def downscale_for_rate(height: int, width: int) -> int:
    """Fixed rate level: the largest downscale keeping the short side at ``AUTO_SHORT_SIDE`` or more."""
    factor = max(d for d in DOWNSCALES if d == 1 or min(height, width) // d >= AUTO_SHORT_SIDE)
    decodable = _decodable(height, width, [d for d in DOWNSCALES if d >= factor])
    return decodable[0] if decodable else DOWNSCALES[-1]


def downscale_for_budget(height: int, width: int, target_bytes: int) -> int:
    """The smallest downscale whose coded picture gets ``MIN_CODED_BPP`` from the budget (else the largest allowed)."""
    allowed = _allowed_downscales(height, width)
    for factor in allowed:
        if 8 * target_bytes / ((height // factor) * (width // factor)) >= MIN_CODED_BPP:
            return factor
    return allowed[-1] if allowed else DOWNSCALES[-1]


def budget_downscales(height: int, width: int, target_bytes: int) -> list[int]:
    """The rule's downscale, then the larger allowed ones: where to go when even the lowest level overflows.

    Last, the larger ones that ``MIN_CODED_SIDE`` rules out: a small coded picture beats no stream. A
    333x257 photo at 0.01 bpp (106 bytes) needed 126 coded whole and had no other factor, so the budget
    failed, while at 1/2 it fits (99 bytes, level 13).
    """
    first = downscale_for_budget(height, width, target_bytes)
    preferred = [d for d in _allowed_downscales(height, width) if d >= first] or [first]
    last_resort = [d for d in _decodable(height, width, list(DOWNSCALES)) if d > preferred[-1]]
    return preferred + last_resort


def _allowed_downscales(height: int, width: int) -> list[int]:
    return _decodable(height, width, [d for d in DOWNSCALES if d == 1 or min(height, width) // d >= MIN_CODED_SIDE])


def _decodable(height: int, width: int, factors: list[int]) -> list[int]:
    """Those of ``factors`` whose coded picture a receiver decodes (none: the image is too large for any)."""
    return [d for d in factors if decode_limits.oversize_reason(height, width, d) is None]
