"""Tests for the AEIC bitstream container v1 (aeic.shared.bitstream)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from aeic.shared.bitstream import (
    COLOUR_STATS_SIZE,
    CRC_SIZE,
    DOWNSCALES,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    MAX_DIMENSION,
    BadMagicError,
    Bitstream,
    BitstreamError,
    ColourStats,
    CrcMismatchError,
    Header,
    InvalidHeaderError,
    TruncatedError,
    UnsupportedVersionError,
    pack,
    peek_header,
    unpack,
)
from hypothesis import given, settings
from hypothesis import strategies as st

GOLDEN = Path(__file__).parent / "golden" / "bitstream_v1.json"
FAST = settings(max_examples=200, deadline=None, derandomize=True)

dims = st.integers(1, MAX_DIMENSION)
stats = st.tuples(*[st.integers(0, 255)] * 6)
headers = st.builds(
    Header,
    model_id=st.binary(min_size=4, max_size=4),
    width=dims,
    height=dims,
    rate_index=st.integers(0, 255),
    colour_stats=st.none() | stats,
    half_precision=st.booleans(),
    downscale=st.sampled_from(DOWNSCALES),
    grey=st.booleans(),
)
streams = st.builds(Bitstream, header=headers, payload=st.binary(max_size=300))


def sample_header(colour_stats: ColourStats | None = (120, 110, 100, 60, 55, 50)) -> Header:
    return Header(b"\x01\x02\x03\x04", 768, 512, 7, colour_stats, half_precision=True)


def with_crc(body: bytes) -> bytes:
    """Append a correct CRC so that the field checks behind the CRC check are reached."""
    return body + struct.pack("<I", zlib.crc32(body))


def body_of(data: bytes) -> bytearray:
    return bytearray(data[:-CRC_SIZE])


@FAST
@given(streams)
def test_round_trip(stream: Bitstream) -> None:
    data = pack(stream)
    assert unpack(data) == stream
    assert peek_header(data) == stream.header
    assert len(data) == stream.header.size + len(stream.payload) + CRC_SIZE


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_bytes_like(kind: type) -> None:
    stream = Bitstream(sample_header(), b"payload")
    data = kind(pack(stream))
    assert unpack(data) == stream
    assert peek_header(data) == stream.header


def test_rejects_non_bytes_input() -> None:
    with pytest.raises(TypeError, match="str"):
        unpack("not bytes")  # type: ignore[arg-type]


def test_layout_offsets() -> None:
    data = pack(Bitstream(sample_header(), b"\xaa\xbb"))
    assert data[0:2] == MAGIC == b"\xae\x1c"
    assert data[2] == FORMAT_VERSION == 1
    assert data[3] == 0b11
    assert data[4:8] == b"\x01\x02\x03\x04"
    assert struct.unpack_from("<HHB", data, 8) == (768, 512, 7)
    assert tuple(data[13:19]) == (120, 110, 100, 60, 55, 50)
    assert data[19:21] == b"\xaa\xbb"
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])


def test_header_overhead() -> None:
    """Measured fixed overhead: what the container costs on top of the payload."""
    plain = len(pack(Bitstream(sample_header(None), b"")))
    with_stats = len(pack(Bitstream(sample_header(), b"")))
    assert plain == HEADER_SIZE + CRC_SIZE == 17
    assert with_stats == HEADER_SIZE + COLOUR_STATS_SIZE + CRC_SIZE == 23
    assert len(pack(Bitstream(sample_header(), b"x" * 250))) - 250 == 23


@FAST
@given(streams)
def test_every_truncation_is_rejected(stream: Bitstream) -> None:
    data = pack(stream)
    for length in range(len(data)):
        with pytest.raises((TruncatedError, CrcMismatchError)):
            unpack(data[:length])


def test_short_input_message() -> None:
    with pytest.raises(TruncatedError, match="truncated: 9 bytes, the header needs 17"):
        unpack(b"\xae\x1c\x01" + b"\x00" * 6)


def test_every_single_bit_flip_is_detected() -> None:
    stream = Bitstream(sample_header(), bytes(range(40)))
    data = pack(stream)
    for bit in range(len(data) * 8):
        corrupted = bytearray(data)
        corrupted[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BitstreamError):
            unpack(bytes(corrupted))
        with pytest.raises(BitstreamError):
            peek_header(bytes(corrupted))


@FAST
@given(stream=streams, data=st.data())
def test_random_bit_flips_are_detected(stream: Bitstream, data: st.DataObject) -> None:
    packed = pack(stream)
    nbits = len(packed) * 8
    positions = data.draw(st.sets(st.integers(0, nbits - 1), min_size=1, max_size=min(nbits, 64)))
    corrupted = bytearray(packed)
    for bit in positions:
        corrupted[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(BitstreamError):
        unpack(bytes(corrupted))


def test_flip_outside_magic_and_version_is_crc_mismatch() -> None:
    data = pack(Bitstream(sample_header(), b"abc"))
    for offset in range(3, len(data)):
        corrupted = bytearray(data)
        corrupted[offset] ^= 0x10
        with pytest.raises(CrcMismatchError, match="CRC mismatch"):
            unpack(bytes(corrupted))


def test_wrong_magic() -> None:
    body = body_of(pack(Bitstream(sample_header(), b"")))
    body[0:2] = b"\x89P"
    with pytest.raises(BadMagicError, match="8950"):
        unpack(with_crc(bytes(body)))


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version(version: int) -> None:
    body = body_of(pack(Bitstream(sample_header(), b"")))
    body[2] = version
    with pytest.raises(UnsupportedVersionError, match=f"version {version}"):
        unpack(with_crc(bytes(body)))


@pytest.mark.parametrize("flags", [0x0C, 0x20, 0x40, 0x80, 0xFF])
def test_reserved_flags(flags: int) -> None:
    body = body_of(pack(Bitstream(sample_header(), b"")))
    body[3] = flags
    with pytest.raises(InvalidHeaderError, match=f"0x{flags:02x}"):
        unpack(with_crc(bytes(body)))


@pytest.mark.parametrize("field, offset", [("width", 8), ("height", 10)])
@pytest.mark.parametrize("value", [0, MAX_DIMENSION + 1, 65535])
def test_invalid_dimensions(field: str, offset: int, value: int) -> None:
    body = body_of(pack(Bitstream(sample_header(None), b"zz")))
    struct.pack_into("<H", body, offset, value)
    data = with_crc(bytes(body))
    for parse in (unpack, peek_header):
        with pytest.raises(InvalidHeaderError, match=f"{field} {value}"):
            parse(data)


def test_colour_stats_flag_without_room_for_stats() -> None:
    body = body_of(pack(Bitstream(sample_header(None), b"")))
    body[3] |= 0x01
    with pytest.raises(TruncatedError, match="colour statistics needs 23"):
        unpack(with_crc(bytes(body)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_id": b"abc"}, "model_id must be 4 bytes"),
        ({"model_id": "abcd"}, "model_id must be bytes"),
        ({"width": 0}, "width"),
        ({"height": MAX_DIMENSION + 1}, "height"),
        ({"rate_index": 256}, "rate_index"),
        ({"rate_index": -1}, "rate_index"),
        ({"colour_stats": (1, 2, 3)}, "6 values"),
        ({"colour_stats": (1, 2, 3, 4, 5, 256)}, "std B"),
        ({"width": True}, "width must be an int"),
        ({"downscale": 3}, "downscale must be one of"),
        ({"downscale": True}, "downscale must be one of"),
        ({"grey": 1}, "grey must be a bool"),
    ],
)
def test_header_validation(kwargs: dict, message: str) -> None:
    fields = {"model_id": b"\0\0\0\0", "width": 64, "height": 64, "rate_index": 0} | kwargs
    with pytest.raises(InvalidHeaderError, match=message):
        Header(**fields)


def test_golden_vectors() -> None:
    vectors = json.loads(GOLDEN.read_text())["vectors"]
    assert len(vectors) == 5
    for vector in vectors:
        stats = vector["colour_stats"]
        header = Header(
            model_id=bytes.fromhex(vector["model_id"]),
            width=vector["width"],
            height=vector["height"],
            rate_index=vector["rate_index"],
            colour_stats=tuple(stats) if stats is not None else None,
            half_precision=vector["half_precision"],
            downscale=vector.get("downscale", 1),
            grey=vector.get("grey", False),
        )
        stream = Bitstream(header, bytes.fromhex(vector["payload"]))
        expected = bytes.fromhex(vector["stream"])
        assert pack(stream) == expected, vector["name"]
        assert unpack(expected) == stream, vector["name"]


@pytest.mark.parametrize("downscale, flags", [(1, 0x00), (2, 0x04), (4, 0x08)])
def test_downscale_flag_and_coded_size(downscale: int, flags: int) -> None:
    header = Header(b"\0\0\0\0", 1921, 1081, 0, downscale=downscale)
    assert pack(Bitstream(header, b""))[3] == flags
    assert unpack(pack(Bitstream(header, b""))).header.downscale == downscale
    assert header.coded_size == (-(-1081 // downscale), -(-1921 // downscale))


def test_grey_flag_is_bit_4() -> None:
    """The grey flag is bit 4 and nothing else: a colour header's bytes do not change."""
    colour = Header(b"\0\0\0\0", 64, 48, 0, (1, 2, 3, 4, 5, 6), downscale=2)
    grey = Header(b"\0\0\0\0", 64, 48, 0, (1, 2, 3, 4, 5, 6), downscale=2, grey=True)
    assert (colour.flags, grey.flags) == (0x05, 0x15)
    assert pack(Bitstream(grey, b"x"))[4:-4] == pack(Bitstream(colour, b"x"))[4:-4]
    assert unpack(pack(Bitstream(grey, b"x"))).header.grey


def test_every_flags_byte_is_refused_or_read_back_as_written() -> None:
    """Reserved flag bits and downscale code 3 are refused, so each accepted flags byte has one meaning."""
    body = body_of(pack(Bitstream(sample_header(), b"\x07" * 6)))
    headers = set()
    for flags in range(256):
        body[3] = flags
        data = with_crc(bytes(body))
        try:
            stream = unpack(data)
        except InvalidHeaderError:
            assert flags & 0xE0 or flags & 0x0C == 0x0C
            continue
        assert pack(stream) == data
        headers.add(stream.header)
    assert len(headers) == 24  # statistics x half precision x three downscales x grey


@FAST
@given(stream=streams, data=st.data())
def test_an_accepted_header_has_one_spelling(stream: Bitstream, data: st.DataObject) -> None:
    """A header byte after the version rewritten and the CRC made good: refused, or written back by `pack`."""
    body = body_of(pack(stream))
    body[data.draw(st.integers(3, stream.header.size - 1))] = data.draw(st.integers(0, 255))
    mutated = with_crc(bytes(body))
    try:
        parsed = unpack(mutated)
    except BitstreamError:
        return
    assert pack(parsed) == mutated
