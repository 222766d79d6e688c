"""How the sender picks the coding downscale (``--downscale auto``): only from sizes it can see.

The shipped model learned photos with a 512-pixel short side and codes best near its top rate
levels; at 0.005-0.03 bpp a photo coded whole spreads too few bits over too many latent cells.
Two rules, measured on non-Kodak photos (six 512-768 px photos, two 1080p ones; docs/benchmarks.md):

* a fixed rate level: the largest downscale that keeps the short side at 512 or more (1080p: 2);
* a byte budget: from the largest candidate down, the first downscale whose top rate level fills
  at least ``FILL_FRACTION`` of the budget, so the bytes go to a smaller picture coded well rather
  than to a large one coded badly, and never to a picture so small it cannot use them. Candidates
  keep a coded short side of at least ``MIN_CODED_SIDE``.
"""

from __future__ import annotations

import argparse

from aeic.shared.bitstream import DOWNSCALES

AUTO = "auto"
AUTO_SHORT_SIDE = 512  # the training scale: photos with a 512-pixel short side
MIN_CODED_SIDE = 192  # no coded picture under this short side (6 latent rows)
FILL_FRACTION = 0.75


def parse_downscale(text: str) -> int | str:
    """``auto`` or a container downscale, from a command line (an argparse ``type``)."""
    if text == AUTO:
        return text
    if text.isdigit() and int(text) in DOWNSCALES:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected {AUTO}, 1, 2 or 4, got {text!r}")


def downscale_for_rate(height: int, width: int) -> int:
    """Fixed rate level: the largest downscale keeping the short side at ``AUTO_SHORT_SIDE`` or more."""
    return max(d for d in DOWNSCALES if d == 1 or min(height, width) // d >= AUTO_SHORT_SIDE)


def budget_candidates(height: int, width: int) -> list[int]:
    """Downscales to try for a byte budget, largest first (1 always last)."""
    return [d for d in reversed(DOWNSCALES) if d == 1 or min(height, width) // d >= MIN_CODED_SIDE]


def fills_budget(top_level_bytes: int, target_bytes: int) -> bool:
    """Whether a downscale whose top rate level makes ``top_level_bytes`` can use the budget well."""
    return top_level_bytes >= FILL_FRACTION * target_bytes
