"""The largest picture a stream may ask a receiver to decode: a limit both sides keep.

A receiver decodes an image whole, and its memory grows with the pixels: about 0.7 KB per padded
coded pixel in synthesis (float32 on a CPU) and about 80 bytes per output pixel for the scale-back
and colour correction. A 17-byte header may claim 16384 x 16384 (about 190 GB to decode), so the
sender codes no picture over these bounds (its automatic downscale stays under them), and the
receiver refuses such a stream at upload, before storing it, and again before decoding it.
"""

from __future__ import annotations

from aeic.shared.bitstream import Header
from aeic.shared.padding import ALIGNMENT, padded_size

MAX_CODED_PIXELS = 4096 * 4096  # padded coded pixels of one image (and of one synthesis pass)
MAX_PIXELS = 8192 * 8192  # output pixels of one image


def padded_coded_pixels(height: int, width: int, downscale: int) -> int:
    """Pixels the synthesis holds for a ``height`` x ``width`` picture coded at 1/``downscale``."""
    coded_height, coded_width = padded_size(-(-height // downscale), -(-width // downscale), ALIGNMENT)
    return coded_height * coded_width


def oversize_reason(height: int, width: int, downscale: int) -> str | None:
    """Why a receiver would refuse this picture, or ``None`` when it is within both limits."""
    if height * width > MAX_PIXELS:
        return f"{width}x{height} is over the receiver's limit of {MAX_PIXELS:,} output pixels"
    if padded_coded_pixels(height, width, downscale) > MAX_CODED_PIXELS:
        return (f"{width}x{height} coded at 1/{downscale} is over the receiver's limit of {MAX_CODED_PIXELS:,} "
                f"coded pixels (padded to {ALIGNMENT}); a larger coding downscale makes it smaller")
    return None


def header_oversize_reason(header: Header) -> str | None:
    """:func:`oversize_reason` for the picture a stream's header describes."""
    return oversize_reason(header.height, header.width, header.downscale)
