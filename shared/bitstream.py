"""AEIC bitstream container, format v1.

The container wraps the entropy-coded payload with just enough metadata for the receiver to pick the right
model and rate and to reject corrupted or foreign data before it reaches the decoder. Every byte counts at
0.005 bpp, so the header is fixed-width and small (17 bytes, 23 with colour statistics). See docs/bitstream.md
for the byte-by-byte layout.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "COLOUR_STATS_SIZE",
    "CRC_SIZE",
    "DOWNSCALES",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_DIMENSION",
    "BadMagicError",
    "Bitstream",
    "BitstreamError",
    "CrcMismatchError",
    "Header",
    "InvalidHeaderError",
    "TruncatedError",
    "UnsupportedVersionError",
    "pack",
    "peek_header",
    "unpack",
]

MAGIC = b"\xae\x1c"
FORMAT_VERSION = 1
HEADER_SIZE = 13
COLOUR_STATS_SIZE = 6
CRC_SIZE = 4
MAX_DIMENSION = 16384
MODEL_ID_SIZE = 4

FLAG_COLOUR_STATS = 0x01
FLAG_HALF_PRECISION = 0x02
SCALE_SHIFT = 2  # flags bits 2-3: log2 of the coding downscale (0, 1, 2: the sender coded 1/1, 1/2, 1/4)
SCALE_MASK = 0x03 << SCALE_SHIFT
DOWNSCALES = (1, 2, 4)
FLAG_GREY = 0x10  # the source picture is grey (R == G == B everywhere): the receiver outputs grey
_KNOWN_FLAGS = FLAG_COLOUR_STATS | FLAG_HALF_PRECISION | SCALE_MASK | FLAG_GREY

# magic, version, flags, model id, width, height, rate index
_HEADER = struct.Struct("<2sBB4sHHB")
_STATS = struct.Struct("<6B")
_CRC = struct.Struct("<I")
assert _HEADER.size == HEADER_SIZE and _STATS.size == COLOUR_STATS_SIZE and _CRC.size == CRC_SIZE

BytesLike = bytes | bytearray | memoryview
ColourStats = tuple[int, int, int, int, int, int]


class BitstreamError(ValueError):
    """Base class: the data is not a valid AEIC v1 bitstream."""


class BadMagicError(BitstreamError):
    """The first two bytes are not the AEIC magic: not our data at all."""


class UnsupportedVersionError(BitstreamError):
    """The stream was written in a format version this code does not read."""


class TruncatedError(BitstreamError):
    """The data is shorter than the header it announces."""


class InvalidHeaderError(BitstreamError):
    """A header field is out of range (reserved flags, dimensions, statistics, model id)."""


class CrcMismatchError(BitstreamError):
    """The stored CRC32 does not match the data: the stream was corrupted in transit or storage."""


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidHeaderError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidHeaderError(f"{name} must be in {low}..{high}, got {value}")


@dataclass(frozen=True)
class Header:
    """What the receiver needs to know before decoding the payload.

    `width`/`height` are the true image size before any padding the encoder applies. `colour_stats` holds the
    per-channel mean (R, G, B) then standard deviation (R, G, B) of the original image, each 0..255.
    `downscale` (1, 2 or 4): the payload codes the image reduced by that factor (`coded_size`), and the
    receiver scales the reconstruction back to the true size. `grey`: the source picture had three equal
    channels everywhere, so the receiver outputs grey (the model alone decodes colour, a tint at low rates).
    """

    model_id: bytes
    width: int
    height: int
    rate_index: int
    colour_stats: ColourStats | None = None
    half_precision: bool = False
    downscale: int = 1
    grey: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, (bytes, bytearray, memoryview)):
            raise InvalidHeaderError(f"model_id must be bytes, got {type(self.model_id).__name__}")
        model_id = bytes(self.model_id)
        if len(model_id) != MODEL_ID_SIZE:
            raise InvalidHeaderError(f"model_id must be {MODEL_ID_SIZE} bytes, got {len(model_id)}")
        object.__setattr__(self, "model_id", model_id)
        _check_int("width", self.width, 1, MAX_DIMENSION)
        _check_int("height", self.height, 1, MAX_DIMENSION)
        _check_int("rate_index", self.rate_index, 0, 255)
        if isinstance(self.downscale, bool) or self.downscale not in DOWNSCALES:
            raise InvalidHeaderError(f"downscale must be one of {DOWNSCALES}, got {self.downscale!r}")
        if not isinstance(self.half_precision, bool):
            raise InvalidHeaderError(
                f"half_precision must be a bool, got {type(self.half_precision).__name__}"
            )
        if not isinstance(self.grey, bool):
            raise InvalidHeaderError(f"grey must be a bool, got {type(self.grey).__name__}")
        if self.colour_stats is not None:
            stats = tuple(self.colour_stats)
            if len(stats) != COLOUR_STATS_SIZE:
                raise InvalidHeaderError(
                    f"colour_stats must have {COLOUR_STATS_SIZE} values, got {len(stats)}"
                )
            for name, value in zip(("mean R", "mean G", "mean B", "std R", "std G", "std B"), stats):
                _check_int(f"colour_stats {name}", value, 0, 255)
            object.__setattr__(self, "colour_stats", stats)

    @property
    def size(self) -> int:
        """Bytes this header occupies in the stream (without the trailing CRC)."""
        return HEADER_SIZE + (COLOUR_STATS_SIZE if self.colour_stats is not None else 0)

    @property
    def flags(self) -> int:
        """The flags byte as written to the stream."""
        return (
            (FLAG_COLOUR_STATS if self.colour_stats is not None else 0)
            | (FLAG_HALF_PRECISION if self.half_precision else 0)
            | (DOWNSCALES.index(self.downscale) << SCALE_SHIFT)
            | (FLAG_GREY if self.grey else 0)
        )

    @property
    def coded_size(self) -> tuple[int, int]:
        """(height, width) of the image the payload codes: the true size divided by `downscale`, rounded up."""
        return -(-self.height // self.downscale), -(-self.width // self.downscale)


@dataclass(frozen=True)
class Bitstream:
    """A header plus the opaque entropy-coded payload (may be empty)."""

    header: Header
    payload: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.header, Header):
            raise TypeError(f"header must be a Header, got {type(self.header).__name__}")
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, got {type(self.payload).__name__}")
        object.__setattr__(self, "payload", bytes(self.payload))


def pack(stream: Bitstream) -> bytes:
    """Serialise a bitstream: header, optional colour statistics, payload, CRC32 of all preceding bytes."""
    h = stream.header
    parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, h.flags, h.model_id, h.width, h.height, h.rate_index)]
    if h.colour_stats is not None:
        parts.append(_STATS.pack(*h.colour_stats))
    parts.append(stream.payload)
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def _as_bytes_view(data: BytesLike) -> memoryview:
    """A flat unsigned-byte view of `data` without copying when possible."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"bitstream must be bytes, bytearray or memoryview, got {type(data).__name__}")
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _parse(data: BytesLike) -> tuple[Header, memoryview]:
    """Validate `data` in the documented order and return the header and a view of the payload."""
    view = _as_bytes_view(data)
    n = len(view)
    minimal = HEADER_SIZE + CRC_SIZE
    if n < minimal:
        raise TruncatedError(f"truncated: {n} bytes, the header needs {minimal}")
    magic, version, flags, model_id, width, height, rate_index = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise BadMagicError(f"bad magic: {magic.hex()}, expected {MAGIC.hex()}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"unsupported format version {version}, this reader knows {FORMAT_VERSION}"
        )
    (stored,) = _CRC.unpack_from(view, n - CRC_SIZE)
    computed = zlib.crc32(view[: n - CRC_SIZE])
    if stored != computed:
        raise CrcMismatchError(
            f"CRC mismatch: stored 0x{stored:08x}, computed 0x{computed:08x} over {n - 4} bytes"
        )
    if flags & ~_KNOWN_FLAGS:
        raise InvalidHeaderError(f"reserved flag bits set: flags=0x{flags:02x}")
    scale_code = (flags & SCALE_MASK) >> SCALE_SHIFT
    if scale_code >= len(DOWNSCALES):
        raise InvalidHeaderError(f"reserved downscale code {scale_code}: flags=0x{flags:02x}")
    stats = None
    start = HEADER_SIZE
    if flags & FLAG_COLOUR_STATS:
        needed = HEADER_SIZE + COLOUR_STATS_SIZE + CRC_SIZE
        if n < needed:
            raise TruncatedError(f"truncated: {n} bytes, a header with colour statistics needs {needed}")
        stats = _STATS.unpack_from(view, HEADER_SIZE)
        start += COLOUR_STATS_SIZE
    for name, value in (("width", width), ("height", height)):
        if not 1 <= value <= MAX_DIMENSION:
            raise InvalidHeaderError(f"invalid {name} {value}, must be in 1..{MAX_DIMENSION}")
    header = Header(model_id, width, height, rate_index, stats, bool(flags & FLAG_HALF_PRECISION),
                    DOWNSCALES[scale_code], bool(flags & FLAG_GREY))
    return header, view[start : n - CRC_SIZE]


def unpack(data: BytesLike) -> Bitstream:
    """Parse and fully validate a bitstream; raises a `BitstreamError` subclass for any invalid input."""
    header, payload = _parse(data)
    return Bitstream(header, payload.tobytes())


def peek_header(data: BytesLike) -> Header:
    """Validate a bitstream exactly like `unpack` but return only the header (no payload copy)."""
    return _parse(data)[0]
