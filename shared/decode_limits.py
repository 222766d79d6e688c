"""The largest picture a stream may ask a receiver to decode: a limit both sides keep.

A receiver's memory grows with the pixels. Decoded whole, a picture took about 0.6 KB per padded coded
pixel on a CPU, nine tenths of it in the pixel decoder, plus about 80 bytes per output pixel for the
scale-back and colour correction. A 17-byte header may claim 16384 x 16384 (about 190 GB to decode), so
the sender codes no picture over these bounds (its automatic downscale stays under them), and the
receiver refuses such a stream at upload, before storing it, and again before decoding it. Within them
the receiver renders at most :data:`TILE_PIXELS` per pixel-decoder pass (its ``decode_tile_pixels``
setting; a larger picture in tiles, exactly the whole decode's pixels with the shipped model), and
entropy-decodes in bands of rows: 4096 x 4096 coded peaks at 2.7 GB instead of 10.9 GB
(``docs/receiver.md``, "Decode memory and tiling"), and a 24 MP photo (6000 x 4000) coded whole at 3.3 GB.

The coded bound holds a 20-24 MP camera photo whole (6000 x 4000 pads to 6016 x 4096, 6048 x 4024 to the
bound itself): at 4096 x 4096 every such photo was coded at half size, and scaled back it kept little
texture (``docs/evaluation.md``). Receivers from before that change refuse such streams
(``docs/bitstream.md``): upgrade receivers before senders.

Within them, a stream's decode cost is set by its header too, not by its length: a 23-byte stream may ask
for a 6144 x 4096 coded picture, 38 times the coded pixels of a 1080p photo at the sender's automatic
downscale (on a shared 2-core CPU 4096 x 4096 took 44-81 s, against 1.2-4 s). :func:`decode_cost` prices a
stream in units of a normal photo, so the receiver can charge a device's rate limit and share its decoders
by the work a stream asks for.
"""

from __future__ import annotations

from aeic.shared.bitstream import Header
from aeic.shared.padding import ALIGNMENT, padded_size

MAX_CODED_PIXELS = 6144 * 4096  # padded coded pixels of one image (and of one synthesis pass): 24 MP whole
MAX_PIXELS = 8192 * 8192  # output pixels of one image
# Padded coded pixels the receiver's pixel decoder renders in one pass: a picture with more is rendered
# in tiles (the default keeps a 1080p photo coded whole, 1920x1152 padded, in one pass).
TILE_PIXELS = 1536 * 1536


def padded_coded_pixels(height: int, width: int, downscale: int) -> int:
    """Pixels the synthesis holds for a ``height`` x ``width`` picture coded at 1/``downscale``."""
    coded_height, coded_width = padded_size(-(-height // downscale), -(-width // downscale), ALIGNMENT)
    return coded_height * coded_width


# Output pixels (scale-back, colour correction, PNG and thumbnail) cost about 1/20-1/40 of a coded pixel's
# entropy decoding + synthesis on a CPU (8192x4096 at 1/4 against 2048x1024 whole: +3 s of about 7 s).
OUTPUT_PIXEL_WEIGHT = 1 / 16


def decode_work(height: int, width: int, downscale: int) -> float:
    """The work of decoding a picture, in coded-pixel equivalents: padded coded pixels plus the output
    pixels at :data:`OUTPUT_PIXEL_WEIGHT` (decode time follows both about linearly)."""
    return padded_coded_pixels(height, width, downscale) + height * width * OUTPUT_PIXEL_WEIGHT


# One cost unit: a 1920x1080 photo coded whole, the largest a sender's automatic downscale codes a
# 1080p photo (at a fixed rate level, and every 4K one, it codes 960x540, a third of this).
DECODE_UNIT = decode_work(1080, 1920, 1)


def decode_cost(height: int, width: int, downscale: int) -> float:
    """What decoding a picture costs, in :data:`DECODE_UNIT`, at least 1 (every upload has its fixed
    costs): 1 for a 1080p photo at any downscale, 3.8 for a 4K one coded whole, 7.6 for 4096x4096 coded
    whole, 9.0 for 8192x8192 at 1/2, 11.2 for a 24 MP photo (6000x4000) coded whole, 11.4 at most within
    the limits (6144x4096 coded whole)."""
    return max(1.0, decode_work(height, width, downscale) / DECODE_UNIT)


def oversize_reason(height: int, width: int, downscale: int) -> str | None:
    """Why a receiver would refuse this picture, or ``None`` when it is within both limits."""
    if height * width > MAX_PIXELS:
        return f"{width}x{height} is over the receiver's limit of {MAX_PIXELS:,} output pixels"
    if padded_coded_pixels(height, width, downscale) > MAX_CODED_PIXELS:
        return (f"{width}x{height} coded at 1/{downscale} is over the receiver's limit of {MAX_CODED_PIXELS:,} "
                f"coded pixels (padded to {ALIGNMENT}); a larger coding downscale makes it smaller")
    return None


def header_decode_cost(header: Header) -> float:
    """:func:`decode_cost` of the picture a stream's header describes."""
    return decode_cost(header.height, header.width, header.downscale)


def header_oversize_reason(header: Header) -> str | None:
    """:func:`oversize_reason` for the picture a stream's header describes."""
    return oversize_reason(header.height, header.width, header.downscale)
