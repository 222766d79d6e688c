"""A second reader of the AEIC v1 bitstream, written from docs/bitstream.md alone.

Conformance in the way format specifications are checked: this module re-implements the container,
the rANS coder (in plain integers, without constriction), the group/escape layout, the integer
entropy model and the four-step partition from the text of the specification, imports none of
``aeic.shared``'s format code for its reading, and then

* parses every golden container (fields, flags, statistics, CRC computed three ways) and writes it
  back byte for byte;
* decodes every golden payload of ``tests/golden/entropy_coding_v1.json`` and encodes it back;
* regenerates the Gaussian tables from the documented recipe (MD5 of the golden file, nano-se's
  ``y_tables``) and the model id of the shipped package;
* decodes, with nano-se's ``entropy.npz``, payloads and a whole stream that the implementation writes
  (used as a black box), and requires the implementation's own latent;
* enforces the page's canonicality rules and requires the implementation to reject the same
  non-canonical payloads (trailing zero bytes, escapes of in-range values, over-long escapes, leftovers).

So it fails when the implementation drifts from the page, or the page from the implementation.
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import json
import math
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "bitstream.md"
CONTAINER_GOLDEN = json.loads((ROOT / "tests" / "golden" / "bitstream_v1.json").read_text())
CODING_GOLDEN = json.loads((ROOT / "tests" / "golden" / "entropy_coding_v1.json").read_text())
PACKAGE = ROOT / "aeic" / "models" / "nano-se"


# -- the container ------------------------------------------------------------------------------------
MAGIC = b"\xae\x1c"
HEADER_BYTES, STATS_BYTES, CRC_BYTES = 13, 6, 4
DOWNSCALE_OF_CODE = {0: 1, 1: 2, 2: 4}  # flags bits 2-3; code 3 is reserved
GREY = 0x10  # flags bit 4: the source is grey


class SpecError(Exception):
    """A stream the specification rejects; ``kind`` is the error the page names."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(f"{kind}: {why}")
        self.kind = kind


@dataclass(frozen=True)
class Container:
    version: int
    flags: int
    model_id: bytes
    width: int
    height: int
    rate_index: int
    colour_stats: tuple[int, ...] | None
    half_precision: bool
    downscale: int
    grey: bool
    payload: bytes
    crc: int

    @property
    def coded_size(self) -> tuple[int, int]:
        """(rows, columns) the payload codes."""
        return math.ceil(self.height / self.downscale), math.ceil(self.width / self.downscale)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(rows, columns) of the latent: the coded size padded to 128, at 1/32."""
        rows, cols = self.coded_size
        return 4 * math.ceil(rows / 128), 4 * math.ceil(cols / 128)


def crc32_from_parameters(data: bytes) -> int:
    """CRC-32/ISO-HDLC from its parameters (reflected 0xEDB88320, init and final XOR 0xFFFFFFFF)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def read_container(data: bytes) -> Container:
    """The page's validation, in its order, stopping at the first failure."""
    n = len(data)
    if n < HEADER_BYTES + CRC_BYTES:
        raise SpecError("TruncatedError", f"{n} bytes")
    if data[0:2] != MAGIC:
        raise SpecError("BadMagicError", data[0:2].hex())
    if data[2] != 1:
        raise SpecError("UnsupportedVersionError", str(data[2]))
    stored = int.from_bytes(data[n - 4 :], "little")
    if stored != zlib.crc32(data[: n - 4]):
        raise SpecError("CrcMismatchError", f"{stored:08x}")
    flags = data[3]
    if flags & 0xE0 or (flags >> 2) & 3 == 3:
        raise SpecError("InvalidHeaderError", f"flags {flags:02x}")
    start, stats = HEADER_BYTES, None
    if flags & 1:
        if n < HEADER_BYTES + STATS_BYTES + CRC_BYTES:
            raise SpecError("TruncatedError", f"{n} bytes with statistics")
        stats = tuple(data[HEADER_BYTES : HEADER_BYTES + STATS_BYTES])
        start += STATS_BYTES
    width = int.from_bytes(data[8:10], "little")
    height = int.from_bytes(data[10:12], "little")
    if not (1 <= width <= 16384 and 1 <= height <= 16384):
        raise SpecError("InvalidHeaderError", f"{width}x{height}")
    return Container(version=data[2], flags=flags, model_id=bytes(data[4:8]), width=width, height=height,
                     rate_index=data[12], colour_stats=stats, half_precision=bool(flags & 2),
                     downscale=DOWNSCALE_OF_CODE[(flags >> 2) & 3], grey=bool(flags & GREY),
                     payload=bytes(data[start : n - 4]),
                     crc=stored)


def write_container(c: Container) -> bytes:
    code = {1: 0, 2: 1, 4: 2}[c.downscale]
    flags = ((1 if c.colour_stats is not None else 0) | (2 if c.half_precision else 0) | code << 2
             | (GREY if c.grey else 0))
    body = MAGIC + bytes([1, flags]) + c.model_id + struct.pack("<HHB", c.width, c.height, c.rate_index)
    body += bytes(c.colour_stats or ()) + c.payload
    return body + struct.pack("<I", zlib.crc32(body))


# -- the rANS coder, in integers ----------------------------------------------------------------------
PRECISION = 24
WORD = 1 << 32


@cache
def table_cdf(counts: tuple[int, ...]) -> tuple[int, ...]:
    """F[i] = floor(S_i (2^24 - L) / 2^16) + i, F[L] = 2^24."""
    length, cumulative, cdf = len(counts), 0, []
    for i, count in enumerate(counts):
        cdf.append(cumulative * ((1 << PRECISION) - length) // (1 << 16) + i)
        cumulative += count
    return (*cdf, 1 << PRECISION)


@cache
def uniform_cdf(n: int) -> tuple[int, ...]:
    step = (1 << PRECISION) // n
    return (*(i * step for i in range(n)), 1 << PRECISION)


class RansDecoder:
    def __init__(self, payload: bytes) -> None:
        if payload.endswith(b"\0"):
            raise SpecError("EntropyDecodeError", "the payload ends in a zero byte")
        padded = payload + b"\0" * (-len(payload) % 4)
        self.words = [int.from_bytes(padded[i : i + 4], "little") for i in range(0, len(padded), 4)]
        self.x = 0
        if self.words:
            self.x = self.words.pop()
            while self.x < WORD and self.words:
                self.x = self.x << 32 | self.words.pop()

    def decode(self, cdf: tuple[int, ...]) -> int:
        q = self.x & ((1 << PRECISION) - 1)
        low, high = 0, len(cdf) - 1  # F[low] <= q < F[high]
        while high - low > 1:
            middle = (low + high) // 2
            if cdf[middle] <= q:
                low = middle
            else:
                high = middle
        self.x = (self.x >> PRECISION) * (cdf[low + 1] - cdf[low]) + q - cdf[low]
        if self.x < WORD and self.words:
            self.x = self.x << 32 | self.words.pop()
        return low

    def finish(self) -> None:
        if self.words or self.x != 0:
            raise SpecError("EntropyDecodeError", "data left over after the last symbol")


def rans_encode(operations: list[tuple[int, tuple[int, ...]]]) -> bytes:
    """``operations``: (symbol, cdf) in the order the decoder reads them."""
    x, words = 0, []
    for symbol, cdf in reversed(operations):
        start, frequency = cdf[symbol], cdf[symbol + 1] - cdf[symbol]
        if x >> (64 - PRECISION) >= frequency:
            words.append(x % WORD)
            x >>= 32
        x = (x // frequency) << PRECISION | (x % frequency + start)
    while x:
        words.append(x % WORD)
        x >>= 32
    payload = b"".join(w.to_bytes(4, "little") for w in words)
    trailing = len(payload) - len(payload.rstrip(b"\0"))
    assert trailing <= 3, "the final word is never 0"
    return payload[: len(payload) - trailing]


# -- tables, groups and escapes ---------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TableSet:
    counts: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    skip: int  # -1: none

    @classmethod
    def from_npz(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> TableSet:
        return cls(np.asarray(arrays[f"{prefix}.counts"]), np.asarray(arrays[f"{prefix}.lengths"]),
                   np.asarray(arrays[f"{prefix}.offsets"]), int(arrays[f"{prefix}.skip_index"][0]))

    def cdf(self, k: int) -> tuple[int, ...]:
        return table_cdf(tuple(int(c) for c in self.counts[k, : self.lengths[k]]))


def zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


def unzigzag(u: int) -> int:
    return u // 2 if u % 2 == 0 else -(u + 1) // 2


def in_range(value: int, k: int, tables: TableSet) -> bool:
    """Whether table ``k`` codes ``value`` directly (symbol 0 .. L - 2)."""
    return 0 <= value + int(tables.offsets[k]) <= int(tables.lengths[k]) - 2


def read_escape(decoder: RansDecoder) -> int:
    """One escape code: the length n, then the bits of u in 16-bit chunks; n must be u's bit length."""
    bits, u, shift = decoder.decode(uniform_cdf(33)), 0, 0
    while shift < bits:
        take = min(16, bits - shift)
        u |= decoder.decode(uniform_cdf(1 << take)) << shift
        shift += take
    if u.bit_length() != bits:
        raise SpecError("EntropyDecodeError", f"an escape of {bits} bits for a {u.bit_length()}-bit value")
    return unzigzag(u)


def read_group(decoder: RansDecoder, indices: np.ndarray, tables: TableSet) -> np.ndarray:
    """Values of one group whose elements, in position order, have the table ``indices``."""
    indices = np.asarray(indices).reshape(-1)
    values = np.zeros(indices.size, dtype=np.int64)
    escaped = []
    for k in sorted(set(indices.tolist()) - {tables.skip}):
        if not 0 <= k < len(tables.lengths):
            raise SpecError("EntropyDecodeError", f"table index {k}")
        cdf, length, offset = tables.cdf(k), int(tables.lengths[k]), int(tables.offsets[k])
        for position in np.flatnonzero(indices == k).tolist():
            symbol = decoder.decode(cdf)
            values[position] = symbol - offset
            if symbol == length - 1:
                escaped.append(position)
    for position in sorted(escaped):
        values[position] = read_escape(decoder)
        if in_range(int(values[position]), int(indices[position]), tables):
            raise SpecError("EntropyDecodeError", f"an escape for {values[position]}, which its table codes")
    return values


def escape_code(u: int, bits: int) -> list[tuple[int, tuple[int, ...]]]:
    """(symbol, cdf) operations of an escape code: the length ``bits``, then ``u`` in 16-bit chunks."""
    operations = [(bits, uniform_cdf(33))]
    for shift in range(0, bits, 16):
        take = min(16, bits - shift)
        operations.append(((u >> shift) & ((1 << take) - 1), uniform_cdf(1 << take)))
    return operations


def escaped_positions(values: np.ndarray, indices: np.ndarray, tables: TableSet) -> list[int]:
    """Positions whose value is outside its table's range (skipped elements never are), in order."""
    symbols = np.asarray(values) + tables.offsets[indices]
    outside = (symbols < 0) | (symbols > tables.lengths[indices] - 2)
    return np.flatnonzero(outside & (np.asarray(indices) != tables.skip)).tolist()


def write_group(operations: list, values: np.ndarray, indices: np.ndarray, tables: TableSet) -> list[int]:
    """Append one group's (symbol, cdf) operations; returns the escaped positions, in order."""
    values, indices = np.asarray(values).reshape(-1), np.asarray(indices).reshape(-1)
    escaped = []
    for k in sorted(set(indices.tolist()) - {tables.skip}):
        cdf, length, offset = tables.cdf(k), int(tables.lengths[k]), int(tables.offsets[k])
        for position in np.flatnonzero(indices == k).tolist():
            symbol = int(values[position]) + offset
            if not 0 <= symbol <= length - 2:
                symbol = length - 1
                escaped.append(position)
            operations.append((symbol, cdf))
    for position in sorted(escaped):
        u = zigzag(int(values[position]))
        assert u < 1 << 32
        operations += escape_code(u, u.bit_length())
    assert sorted(escaped) == escaped_positions(values, indices, tables)
    return sorted(escaped)


# -- the integer entropy model -------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Conv:
    weight: np.ndarray
    bias: np.ndarray
    shift: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def load_network(arrays: Mapping[str, np.ndarray], prefix: str) -> list:
    layers: list = []
    for i in range(int(arrays[f"{prefix}.count"][0])):
        key = f"{prefix}.{i}"
        if f"{key}.pixel_shuffle" in arrays:
            layers.append(int(arrays[f"{key}.pixel_shuffle"][0]))
        else:
            layers.append(Conv(*(np.asarray(arrays[f"{key}.{n}"], dtype=np.int64)
                                 for n in ("weight", "bias", "shift", "lo", "hi"))))
    return layers


def conv(x: np.ndarray, layer: Conv) -> np.ndarray:
    """Stride 1, zero 'same' padding, cross-correlation; round half up by 2^-shift; clamp. In int64."""
    channels, h, w = x.shape
    k = layer.weight.shape[-1]
    padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    acc = np.repeat(layer.bias[:, None], h * w, axis=1)
    for a in range(k):
        for b in range(k):
            acc += layer.weight[:, :, a, b] @ padded[:, a : a + h, b : b + w].reshape(channels, h * w)
    shift = layer.shift[:, None]
    down = np.right_shift(acc + np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 0),
                          np.maximum(shift, 0))
    out = np.where(shift < 0, np.left_shift(acc, np.maximum(-shift, 0)), down)
    return np.clip(out, layer.lo[:, None], layer.hi[:, None]).reshape(-1, h, w)


def pixel_shuffle(x: np.ndarray, f: int) -> np.ndarray:
    channels, h, w = x.shape
    out = np.empty((channels // f**2, h * f, w * f), dtype=x.dtype)
    for a in range(f):
        for b in range(f):
            out[:, a::f, b::f] = x[a * f + b :: f * f]
    return out


def run_network(layers: list, x: np.ndarray) -> np.ndarray:
    for layer in layers:
        x = pixel_shuffle(x, layer) if isinstance(layer, int) else conv(x, layer)
    return x


def step_of(channels: int, h: int, w: int) -> np.ndarray:
    """(C, h, w): the step that codes each latent element."""
    phase_of = np.array([[0, 1], [3, 2]])
    phase = phase_of[np.arange(h)[:, None] % 2, np.arange(w)[None, :] % 2]
    group = np.floor(4 * np.arange(channels) / channels).astype(np.int64)
    return (phase[None] - group[:, None, None]) % 4


@dataclass(frozen=True, eq=False)
class Model:
    hyper: list
    context: list[list]
    z_tables: TableSet
    y_tables: TableSet
    channels: int
    gains: np.ndarray


@cache
def nano_se() -> Model:
    with np.load(PACKAGE / "entropy.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return Model(load_network(arrays, "hyper_synthesis"),
                 [load_network(arrays, f"context.{t}") for t in range(int(arrays["context.count"][0]))],
                 TableSet.from_npz(arrays, "z_tables"), TableSet.from_npz(arrays, "y_tables"),
                 int(arrays["latent_channels"][0]), arrays["levels.gains"])


@dataclass
class Decoded:
    z: np.ndarray
    y_hat: np.ndarray  # units of 1/64
    values: np.ndarray  # the y values, 0 where skipped
    indices: np.ndarray  # the y table of each element
    escaped_per_step: list[list[int]]  # positions within each step's group


def decode_payload(payload: bytes, h: int, w: int, model: Model) -> Decoded:
    decoder = RansDecoder(payload)
    z_channels = len(model.z_tables.lengths)
    z_indices = np.broadcast_to(np.arange(z_channels)[:, None, None], (z_channels, h // 4, w // 4))
    z = read_group(decoder, z_indices, model.z_tables).reshape(z_indices.shape)
    features = run_network(model.hyper, z)
    shape = (model.channels, h, w)
    y_hat, values = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    all_indices, escaped = np.zeros(shape, dtype=np.int64), []
    steps = step_of(*shape)
    for t in range(4):
        out = run_network(model.context[t], np.concatenate([features, np.clip(y_hat, -32767, 32767)]))
        means, indices = out[: model.channels], out[model.channels :]
        mask = steps == t
        group = read_group(decoder, indices[mask], model.y_tables)
        values[mask], all_indices[mask] = group, indices[mask]
        y_hat[mask] = 64 * group + means[mask]
        escaped.append(escaped_positions(group, indices[mask], model.y_tables))
    decoder.finish()
    return Decoded(z, y_hat, values, all_indices, escaped)


def encode_payload(z: np.ndarray, decoded: Decoded, model: Model) -> bytes:
    """The payload of known values, per the page (the indices come from the decoder's model run)."""
    return rans_encode(payload_operations(z, decoded, model))


def payload_operations(z: np.ndarray, decoded: Decoded, model: Model) -> list:
    """The (symbol, cdf) operations of a whole payload, in the order the decoder reads them."""
    operations: list = []
    z_indices = np.broadcast_to(np.arange(z.shape[0])[:, None, None], z.shape)
    write_group(operations, z, z_indices, model.z_tables)
    steps = step_of(*decoded.values.shape)
    for t in range(4):
        mask = steps == t
        write_group(operations, decoded.values[mask], decoded.indices[mask], model.y_tables)
    return operations


# -- tests: the container --------------------------------------------------------------------------------
@pytest.mark.parametrize("vector", CONTAINER_GOLDEN["vectors"], ids=lambda v: v["name"])
def test_golden_containers_read_field_by_field(vector: dict) -> None:
    data = bytes.fromhex(vector["stream"])
    c = read_container(data)
    assert c.version == 1
    assert c.model_id.hex() == vector["model_id"]
    assert (c.width, c.height, c.rate_index) == (vector["width"], vector["height"], vector["rate_index"])
    assert c.half_precision is vector["half_precision"]
    assert c.downscale == vector.get("downscale", 1)
    assert c.grey is vector.get("grey", False)
    assert c.colour_stats == (tuple(vector["colour_stats"]) if vector["colour_stats"] is not None else None)
    assert c.payload.hex() == vector["payload"]
    assert c.flags & 0xE0 == 0
    assert len(data) == 13 + (6 if c.colour_stats else 0) + len(c.payload) + 4
    body = data[:-4]
    assert c.crc == zlib.crc32(body) == binascii.crc32(body) == crc32_from_parameters(body)
    assert write_container(c) == data


def test_golden_vectors_cover_every_flag() -> None:
    containers = [read_container(bytes.fromhex(v["stream"])) for v in CONTAINER_GOLDEN["vectors"]]
    assert {c.colour_stats is None for c in containers} == {True, False}
    assert {c.half_precision for c in containers} == {True, False}
    assert {c.downscale for c in containers} >= {1, 2}
    assert {c.grey for c in containers} == {True, False}
    assert any(not c.payload for c in containers)
    full_hd = next(c for c in containers if (c.width, c.height) == (1920, 1080))
    assert full_hd.downscale == 2 and full_hd.coded_size == (540, 960) and full_hd.latent_shape == (20, 32)


def test_the_example_on_the_page_is_its_golden_vector() -> None:
    text = SPEC.read_text()
    name = re.search(r"golden vector\s+`(\w+)`, (\d+) bytes", text)
    assert name is not None
    line = re.search(r"```\n([0-9a-f ]+)\n", text[name.end() :])
    assert line is not None
    example = bytes.fromhex(line.group(1).replace(" ", ""))
    golden = next(v for v in CONTAINER_GOLDEN["vectors"] if v["name"] == name.group(1))
    assert example.hex() == golden["stream"] and len(example) == int(name.group(2))



RESERVED_FLAGS = 0xE0  # flags bits 5-7: what read_container refuses besides downscale code 3


def test_the_page_names_the_same_reserved_flag_bits_everywhere() -> None:
    """The page names the reserved flag bits in its layout, its validation and its canonicality rules; the
    last still said 4-7 after bit 4 became the grey flag, so a reader built from it refused every grey
    photo's stream."""
    text = " ".join(SPEC.read_text().split())
    named = re.findall(r"reserved[^.;]{0,20}?bits \(?(\d)-(\d)\)?|bits (\d)-(\d) reserved", text)
    assert len(named) >= 3, named
    for match in named:
        low, high = (int(n) for n in (match[:2] if match[0] else match[2:]))
        assert sum(1 << bit for bit in range(low, high + 1)) == RESERVED_FLAGS, match


def _sealed(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _flipped(data: bytes, offset: int, bit: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1 << bit]) + data[offset + 1 :]


_BODY = MAGIC + bytes([1, 0]) + b"\x01\x02\x03\x04" + struct.pack("<HHB", 640, 480, 7)
VALIDATION_CASES = {
    "nine bytes": (_BODY[:9], "TruncatedError"),
    "sixteen bytes of something else": (b"\x00" * 16, "TruncatedError"),
    "bad magic": (_sealed(b"PK" + _BODY[2:]), "BadMagicError"),
    "bad magic before a bad version": (b"PK\x07" + _sealed(_BODY)[3:], "BadMagicError"),
    "version 2": (_sealed(_BODY[:2] + b"\x02" + _BODY[3:]), "UnsupportedVersionError"),
    "version 2 with a bad CRC": (_BODY[:2] + b"\x02" + _BODY[3:] + b"\0\0\0\0", "UnsupportedVersionError"),
    "one flipped payload bit": (_flipped(_sealed(_BODY + b"\x10"), 13, 0), "CrcMismatchError"),
    "one flipped CRC bit": (_flipped(_sealed(_BODY), 16, 7), "CrcMismatchError"),
    "one flipped width bit": (_flipped(_sealed(_BODY), 8, 3), "CrcMismatchError"),
    "reserved flag with a bad CRC": (_BODY[:3] + b"\x20" + _BODY[4:] + b"\0\0\0\0", "CrcMismatchError"),
    "reserved flag bit 5": (_sealed(_BODY[:3] + b"\x20" + _BODY[4:]), "InvalidHeaderError"),
    "reserved flag bit 7": (_sealed(_BODY[:3] + b"\x80" + _BODY[4:]), "InvalidHeaderError"),
    "downscale code 3": (_sealed(_BODY[:3] + b"\x0c" + _BODY[4:]), "InvalidHeaderError"),
    "statistics flag, 22 bytes": (_sealed(_BODY[:3] + b"\x01" + _BODY[4:] + b"\x05" * 5), "TruncatedError"),
    "statistics flag, width 0, 17 bytes": (_sealed(_BODY[:3] + b"\x01" + _BODY[4:8] + b"\0\0" + _BODY[10:]),
                                           "TruncatedError"),
    "width 0": (_sealed(_BODY[:8] + b"\0\0" + _BODY[10:]), "InvalidHeaderError"),
    "height 16385": (_sealed(_BODY[:10] + struct.pack("<H", 16385) + _BODY[12:]), "InvalidHeaderError"),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES), ids=str)
def test_validation_order_of_the_page_and_of_the_implementation(case: str) -> None:
    from aeic.shared import bitstream

    data, expected = VALIDATION_CASES[case]
    with pytest.raises(SpecError) as ours:
        read_container(data)
    assert ours.value.kind == expected
    with pytest.raises(bitstream.BitstreamError) as theirs:
        bitstream.unpack(data)
    assert type(theirs.value).__name__ == expected


def test_edge_values_are_accepted() -> None:
    from aeic.shared import bitstream

    for width, height in ((1, 1), (16384, 16384), (1, 16384)):
        for flags in (0x00, 0x01, 0x02, 0x04, 0x08, 0x0B, 0x10, 0x1B):
            body = MAGIC + bytes([1, flags]) + b"\xff" * 4 + struct.pack("<HHB", width, height, 255)
            data = _sealed(body + (b"\xff" * 6 if flags & 1 else b"") + b"\x00\x01")
            c = read_container(data)
            assert (c.width, c.height, c.payload) == (width, height, b"\x00\x01")
            header = bitstream.unpack(data).header
            assert (header.width, header.height, header.downscale, header.half_precision, header.grey) == (
                width, height, c.downscale, c.half_precision, c.grey)
            assert header.coded_size == c.coded_size


# -- tests: the coding layer ------------------------------------------------------------------------------
def _golden_tables(case: dict) -> TableSet:
    if case["tables"] == "gaussian":
        return gaussian_tables()
    t = CODING_GOLDEN["factorized_tables"]
    return TableSet(np.array(t["counts"]), np.array(t["lengths"]), np.array(t["offsets"]), -1)


def _erfc_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


@cache
def gaussian_tables() -> TableSet:
    """The page's recipe for the y tables."""
    scales = np.exp(np.linspace(np.log(0.11), np.log(64.0), 64))
    rows, offsets = [], []
    for s in scales.tolist():
        r = max(1, math.ceil(6.0 * s))
        pmf = [_erfc_cdf((n + 0.5) / s) - _erfc_cdf((n - 0.5) / s) for n in range(-r, r + 1)]
        p = np.array([*pmf, 2.0 * _erfc_cdf(-(r + 0.5) / s)])
        p, total, m = p / p.sum(), 1 << 16, len(p)
        counts = np.maximum(1, np.floor(p * (total - m))).astype(np.int64)
        deficit = total - int(counts.sum())
        fractions = p * (total - m) - np.floor(p * (total - m))
        counts[np.argsort(-fractions, kind="stable")[: deficit % m]] += 1
        rows.append(counts + deficit // m)
        offsets.append(r)
    counts = np.zeros((64, max(len(r) for r in rows)), dtype=np.int32)
    for k, row in enumerate(rows):
        counts[k, : len(row)] = row
    return TableSet(counts, np.array([len(r) for r in rows], dtype=np.int32), np.array(offsets, np.int32), 0)


def _md5(tables: TableSet) -> str:
    arrays = (tables.counts, tables.offsets, tables.lengths)
    return hashlib.md5(b"".join(np.asarray(a, dtype="<i4").tobytes() for a in arrays)).hexdigest()


def _assert_valid(tables: TableSet) -> None:
    for k, length in enumerate(tables.lengths.tolist()):
        row = tables.counts[k, :length]
        assert length >= 2 and row.min() >= 1 and row.sum() == 1 << 16
        assert not tables.counts[k, length:].any()


def test_gaussian_tables_follow_the_recipe() -> None:
    ours = gaussian_tables()
    _assert_valid(ours)
    assert _md5(ours) == CODING_GOLDEN["tables_md5"]
    package = nano_se().y_tables
    assert package.skip == 0
    for name in ("counts", "lengths", "offsets"):
        assert np.array_equal(getattr(package, name), getattr(ours, name))
    assert (ours.lengths[0], ours.offsets[0]) == (4, 1)  # scale 0.11: radius 1, values -1..1 and the escape


def test_package_and_golden_tables_are_valid() -> None:
    model = nano_se()
    _assert_valid(model.z_tables)
    assert model.z_tables.skip == -1 and len(model.z_tables.lengths) == 64
    _assert_valid(_golden_tables(CODING_GOLDEN["cases"][-1]))


def test_table_cdfs_are_not_just_counts_times_256() -> None:
    cdf = table_cdf((2, 65532, 1, 1))  # y table 0
    assert cdf == (0, 512, 16776702, 16776959, 1 << 24)  # 256 * counts would be 0, 512, 16776704, 16776960
    assert all(b > a for a, b in itertools.pairwise(cdf))
    assert uniform_cdf(33)[-2:] == (32 * (2**24 // 33), 1 << 24)


@pytest.mark.parametrize("case", CODING_GOLDEN["cases"], ids=lambda c: c["name"])
def test_golden_payloads_decode_and_encode(case: dict) -> None:
    tables = _golden_tables(case)
    indices = np.array(case["indices"])
    values = np.array(case["values"])
    payload = bytes.fromhex(case["payload"])
    assert len(indices) == len(values) == math.prod(case["shape"])
    decoder = RansDecoder(payload)
    decoded = read_group(decoder, indices, tables)
    decoder.finish()
    assert np.array_equal(decoded, values)
    if tables.skip >= 0:
        assert np.all(values[indices == tables.skip] == 0)
    operations: list = []
    write_group(operations, values, indices, tables)
    assert rans_encode(operations) == payload
    assert not payload.endswith(b"\0")


def test_golden_escapes_reach_the_int32_edge() -> None:
    case = next(c for c in CODING_GOLDEN["cases"] if c["name"] == "gaussian_escapes")
    operations: list = []
    escaped = write_group(operations, np.array(case["values"]), np.array(case["indices"]), gaussian_tables())
    escaped_values = {case["values"][p] for p in escaped}
    assert {2147483647, -2147483647, -1073741824, 1000, -70000} <= escaped_values
    assert zigzag(-(2**31)) == 2**32 - 1 and unzigzag(2**32 - 1) == -(2**31)


@pytest.mark.parametrize("case", CODING_GOLDEN["cases"], ids=lambda c: c["name"])
def test_the_constriction_calls_on_the_page_decode_the_same(case: dict) -> None:
    constriction = pytest.importorskip("constriction")
    model = constriction.stream.model
    tables = _golden_tables(case)
    indices = np.array(case["indices"])
    payload = bytes.fromhex(case["payload"])
    padded = payload + b"\0" * (-len(payload) % 4)

    def decode(perfect: bool) -> tuple[np.ndarray, bool]:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(padded, dtype="<u4").astype(np.uint32))
        values, escaped = np.zeros(indices.size, dtype=np.int64), []
        for k in sorted(set(indices.tolist()) - {tables.skip}):
            positions = np.flatnonzero(indices == k)
            probabilities = tables.counts[k, : tables.lengths[k]].astype(np.float64) / 2**16
            symbols = coder.decode(model.Categorical(probabilities, perfect=perfect), positions.size)
            values[positions] = symbols.astype(np.int64) - tables.offsets[k]
            escaped += positions[symbols == tables.lengths[k] - 1].tolist()
        for position in sorted(escaped):
            bits, u, shift = int(coder.decode(model.Uniform(33), 1)[0]), 0, 0
            while shift < bits:
                take = min(16, bits - shift)
                u |= int(coder.decode(model.Uniform(1 << take), 1)[0]) << shift
                shift += take
            values[position] = unzigzag(u)
        return values, coder.is_empty()

    values, empty = decode(perfect=False)
    assert np.array_equal(values, case["values"]) and empty
    if len(indices) > 1000:  # the page's warning: constriction's default quantization is another one
        values, empty = decode(perfect=True)
        assert not (np.array_equal(values, case["values"]) and empty)


def test_a_payload_can_carry_symbols_without_words() -> None:
    tables = gaussian_tables()
    operations: list = []
    write_group(operations, np.zeros(50, dtype=np.int64), np.full(50, 1), tables)  # value 0 is not symbol 0
    assert rans_encode(operations)
    operations = []
    write_group(operations, np.full(50, -tables.offsets[20]), np.full(50, 20), tables)  # symbol 0 each time
    assert rans_encode(operations) == b""
    decoder = RansDecoder(b"")
    assert np.array_equal(read_group(decoder, np.full(50, 20), tables), np.full(50, -tables.offsets[20]))
    decoder.finish()


# -- tests: one payload per set of values ------------------------------------------------------------------
def _golden_case(name: str) -> dict:
    return next(c for c in CODING_GOLDEN["cases"] if c["name"] == name)


def _one_escape(value: int, k: int, tables: TableSet, bits_beyond: int = 0) -> bytes:
    """A one-element group of table ``k`` coded as the escape, ``bits_beyond`` longer than minimal."""
    u = zigzag(value)
    escape = (int(tables.lengths[k]) - 1, tables.cdf(k))
    return rans_encode([escape, *escape_code(u, u.bit_length() + bits_beyond)])


def non_canonical_payloads() -> dict[str, tuple[bytes, np.ndarray, TableSet]]:
    """Payloads the page requires a decoder to reject: (payload, the group's table indices, its tables)."""
    case, gaussian = _golden_case("gaussian_seed100"), gaussian_tables()
    factorized = _golden_tables(_golden_case("factorized_z"))
    payload, indices = bytes.fromhex(case["payload"]), np.array(case["indices"])
    radius = int(gaussian.offsets[5])
    operations: list = []
    write_group(operations, np.array(case["values"]), indices, gaussian)
    one = np.array([5])
    return {
        "a zero byte appended": (payload + b"\0", indices, gaussian),
        "three zero bytes appended": (payload + b"\0" * 3, indices, gaussian),
        "a zero word appended": (payload + b"\0" * (-len(payload) % 4 + 4), indices, gaussian),
        "a lone zero byte": (b"\0", np.array([20]), gaussian),
        "a byte before the payload": (b"\x01" + payload, indices, gaussian),
        "a symbol left over": (rans_encode([*operations, (3, gaussian.cdf(40))]), indices, gaussian),
        "an escape for 0": (_one_escape(0, 5, gaussian), one, gaussian),
        "an escape for the lowest in-range value": (_one_escape(-radius, 5, gaussian), one, gaussian),
        "an escape for the highest in-range value": (_one_escape(radius, 5, gaussian), one, gaussian),
        "an escape for an in-range z value": (_one_escape(1, 0, factorized), np.array([0]), factorized),
        "an escape one bit too long": (_one_escape(radius + 1, 5, gaussian, 1), one, gaussian),
        "an escape a chunk too long": (_one_escape(-700, 5, gaussian, 16), one, gaussian),
    }


NON_CANONICAL = non_canonical_payloads()


def _implementation_reads(payload: bytes, indices: np.ndarray, tables: TableSet) -> np.ndarray:
    from aeic.shared.entropy_coding import CdfTables, SymbolDecoder

    decoder = SymbolDecoder(payload)
    values = decoder.read(indices, CdfTables(tables.counts, tables.lengths, tables.offsets,
                                             None if tables.skip < 0 else tables.skip))
    decoder.finish()
    return values


def test_the_mutations_change_only_what_they_say() -> None:
    golden = bytes.fromhex(_golden_case("gaussian_seed100")["payload"])
    assert len(golden) % 4 == 1  # up to three zero bytes stay inside its last word: the same words, padded
    gaussian = gaussian_tables()
    radius = int(gaussian.offsets[5])
    for value in (radius + 1, -radius - 1, 2**31 - 1):  # the helper writes what the page's encoder writes
        operations: list = []
        assert write_group(operations, np.array([value]), np.array([5]), gaussian) == [0]
        assert _one_escape(value, 5, gaussian) == rans_encode(operations)
        assert _implementation_reads(rans_encode(operations), np.array([5]), gaussian).tolist() == [value]


@pytest.mark.parametrize("name", NON_CANONICAL, ids=str)
def test_non_canonical_payloads_are_rejected_by_the_page_and_the_implementation(name: str) -> None:
    from aeic.shared.entropy_coding import EntropyDecodeError

    payload, indices, tables = NON_CANONICAL[name]
    with pytest.raises(SpecError) as ours:
        decoder = RansDecoder(payload)
        read_group(decoder, indices, tables)
        decoder.finish()
    assert ours.value.kind == "EntropyDecodeError"
    with pytest.raises(EntropyDecodeError):
        _implementation_reads(payload, indices, tables)


# -- tests: the integer model and whole payloads ------------------------------------------------------------
def test_the_four_steps_partition_the_latent() -> None:
    steps = step_of(256, 6, 10)
    for t in range(4):
        assert (steps == t).sum() == 256 * 60 // 4
    for g in range(4):  # channel group g, phase p: step (p - g) mod 4
        channel = 64 * g
        assert steps[channel, 0, 0] == (0 - g) % 4
        assert steps[channel, 0, 1] == (1 - g) % 4
        assert steps[channel, 1, 1] == (2 - g) % 4
        assert steps[channel, 1, 0] == (3 - g) % 4
    assert steps[63, 0, 0] == 0 and steps[64, 0, 0] == 3  # contiguous groups of C/4 channels


def test_accumulator_bound_is_as_the_page_says() -> None:
    model = nano_se()

    def bound(layers: list, limit: int) -> tuple[int, int]:
        worst = 0
        for layer in layers:
            if isinstance(layer, int):
                continue
            sums = np.abs(layer.weight).reshape(layer.weight.shape[0], -1).sum(1)
            worst = max(worst, *(abs(int(b)) + int(s) * limit for b, s in zip(layer.bias, sums)))
            limit = int(max(np.abs(layer.lo).max(), np.abs(layer.hi).max()))
        return worst, limit

    hyper, feature_limit = bound(model.hyper, 2**31)
    worst = max(hyper, *(bound(step, max(feature_limit, 32767))[0] for step in model.context))
    assert worst < 2**53
    assert round(math.log2(worst), 1) == 45.7


def test_nano_se_has_the_layers_the_page_describes() -> None:
    model = nano_se()
    shapes = [layer if isinstance(layer, int) else layer.weight.shape for layer in model.hyper]
    assert shapes == [(384, 64, 3, 3), 2, (384, 96, 3, 3), 2, (128, 96, 1, 1)]
    assert model.channels == 256 and len(model.context) == 4
    for layers in model.context:
        assert [layer.weight.shape for layer in layers] == [(128, 384, 3, 3), (128, 128, 1, 1), (512, 128, 1, 1)]
        last = layers[-1]
        assert set(last.lo[:256]) == {-32767} and set(last.hi[:256]) == {32767}
        assert set(last.lo[256:]) == {0} and set(last.hi[256:]) == {63}


def test_the_model_id_is_the_manifest_digest() -> None:
    manifest = json.loads((PACKAGE / "manifest.json").read_text())
    body = {k: v for k, v in manifest.items() if k != "model_id"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    assert hashlib.sha256(canonical).digest()[:4].hex() == manifest["model_id"]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((PACKAGE / name).read_bytes()).hexdigest() == digest


def _latent_for(seed: int, h: int, w: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(256, h, w)) * spread
    outliers = rng.random(y.shape) < 0.01
    y[outliers] = rng.choice([-1, 1], size=int(outliers.sum())) * rng.uniform(500, 5000, int(outliers.sum()))
    z = rng.normal(size=(64, h // 4, w // 4)) * 2.0
    z.reshape(-1)[:: 17] = 300.0  # beyond every z table: escapes in the z group too
    return y, z


@pytest.mark.parametrize(("seed", "h", "w", "spread"), [(1, 8, 4, 40.0), (2, 4, 12, 3.0)])
def test_payloads_the_implementation_writes_decode_per_the_page(seed: int, h: int, w: int, spread: float) -> None:
    from aeic.shared.model_package import ModelPackage

    package = ModelPackage.load(PACKAGE, needs=("entropy.npz",))
    y, z = _latent_for(seed, h, w, spread)
    payload, their_y_hat = package.entropy_model.encode(y, z)
    model = nano_se()
    ours = decode_payload(payload, h, w, model)
    assert np.array_equal(ours.z, np.floor(z + 0.5))
    assert np.array_equal(ours.y_hat, their_y_hat)
    assert (ours.indices == model.y_tables.skip).any() and np.all(ours.values[ours.indices == 0] == 0)
    assert encode_payload(ours.z, ours, model) == payload
    if spread > 10:
        # escapes from several tables interleaved in position: only the page's order (all of a
        # group's escapes by position, not table by table) decodes them
        interleaved = 0
        for t, escaped in enumerate(ours.escaped_per_step):
            tables_of = ours.indices[step_of(256, h, w) == t][escaped]
            interleaved += int(np.any(np.diff(tables_of) < 0))
        assert interleaved >= 2


def test_whole_payloads_with_a_zero_byte_or_a_symbol_more_are_rejected_by_both() -> None:
    from aeic.shared.entropy_coding import EntropyDecodeError
    from aeic.shared.model_package import ModelPackage

    package = ModelPackage.load(PACKAGE, needs=("entropy.npz",))
    y, z = _latent_for(2, 4, 12, 3.0)
    payload, _ = package.entropy_model.encode(y, z)
    model = nano_se()
    z_values = np.floor(z + 0.5).astype(np.int64)
    operations = payload_operations(z_values, decode_payload(payload, 4, 12, model), model)
    assert rans_encode(operations) == payload
    for mutated in (payload + b"\0", rans_encode([*operations, (7, uniform_cdf(33))])):
        with pytest.raises(SpecError, match="EntropyDecodeError"):
            decode_payload(mutated, 4, 12, model)
        with pytest.raises(EntropyDecodeError):
            package.entropy_model.decode(mutated, (256, 4, 12))


def test_a_whole_sender_stream_decodes_per_the_page() -> None:
    from aeic.sender.encoder import SenderCodec

    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[0:203, 0:301]
    rgb = np.stack([rows * 255 // 202, cols * 255 // 300, (rows + cols) % 256], axis=-1).astype(np.float64)
    rgb = np.clip(rgb + rng.normal(size=rgb.shape) * 12, 0, 255).astype(np.uint8)
    codec = SenderCodec.from_package(PACKAGE, downscale=2)
    analysed = codec.analyse(rgb)
    level = 40
    data = codec.encode_analysed(analysed, level)

    c = read_container(data)
    manifest = json.loads((PACKAGE / "manifest.json").read_text())
    assert c.model_id.hex() == manifest["model_id"]
    assert (c.height, c.width, c.downscale, c.rate_index, c.half_precision) == (203, 301, 2, level, False)
    pixels = rgb.reshape(-1, 3).astype(np.float64)
    stats = np.clip(np.round([*pixels.mean(0), *pixels.std(0)]), 0, 255).astype(int)
    assert c.colour_stats == tuple(stats.tolist())
    assert c.coded_size == (102, 151) and c.latent_shape == (4, 8)

    model = nano_se()
    ours = decode_payload(c.payload, *c.latent_shape, model)
    latent = ours.y_hat / 64 / model.gains[c.rate_index][:, None, None]
    theirs = codec.quantized_latent(analysed, level)
    assert theirs.shape == latent.shape
    np.testing.assert_allclose(latent, theirs, rtol=1e-6, atol=0)
    assert np.abs(ours.values).max() > 0  # the picture codes something beyond the means
