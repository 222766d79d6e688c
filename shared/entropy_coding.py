"""rANS coding of integer symbols with frozen integer frequency tables (constriction).

The tables are the contract between sender and receiver: every table is a vector of integer
frequencies summing to ``2**PRECISION``, frozen into the model package. Both sides hand the
same exact float64 probabilities (``counts / 2**PRECISION``) to constriction, so they build
bit-identical models on any machine. Each table covers ``[-offset, length - 2 - offset]``;
its last entry is an escape: values outside that range are coded as the escape followed by an
Exp-Golomb style code, so no value is ever clipped.

Symbols are coded in *groups* (one call per group): within a group, symbols are ordered by
table index, then by position, and escaped values follow the group. The decoder recomputes
the same table indices, so the grouping costs no side information.

The decoder is strict: it accepts only the bytes the encoder writes for the values it decodes
(no trailing zero bytes, no escape for a value its table codes directly, no over-long escape,
nothing left over), so a set of values has exactly one payload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import constriction
import numpy as np

PRECISION = 16
ESCAPE_BITS_LIMIT = 32  # escaped magnitudes are zigzag-coded into at most 32 bits
_UNIFORM = constriction.stream.model.Uniform()  # the uniform family: each symbol's size is a parameter
_CHUNK_BITS = 16
# constriction's AnsCoder (docs/bitstream.md, "The rANS coder"), for the escape codes' uniform models
_CODER_BITS = 24  # its models' precision: 2**24 states
_STATE_MASK = (1 << _CODER_BITS) - 1
_WORD = 1 << 32
_LENGTH_SPAN = (1 << _CODER_BITS) // (ESCAPE_BITS_LIMIT + 1)  # Uniform(33): F[n] = n * this for n < 33
_LAST_LENGTH_SPAN = (1 << _CODER_BITS) - ESCAPE_BITS_LIMIT * _LENGTH_SPAN  # its last symbol takes the rest
# Every model's first symbol spans at least 2**(24 - PRECISION) = 256 states (a table's F[1] = floor(c_0 (2**24 - L)
# / 2**16) + 1 with c_0 >= 1 and L <= 2**16; Uniform(n <= 2**16) gives floor(2**24 / n)): a state below it decodes
# as that symbol and stays as it is.
_STUCK_STATE_LIMIT = 1 << (24 - PRECISION)


class EntropyDecodeError(ValueError):
    """The payload does not decode to a consistent set of symbols."""


@dataclass(frozen=True, eq=False)
class CdfTables:
    """A set of integer frequency tables: row ``k`` models symbols whose table index is ``k``.

    ``counts[k, :lengths[k]]`` are the frequencies (the last one is the escape), summing to
    ``2**PRECISION``; entry ``i`` stands for the value ``i - offsets[k]``. ``skip_index``, when
    set, names a table whose symbols are not coded at all: both sides take them to be 0.
    """

    counts: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    skip_index: int | None = None
    _models: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts, dtype=np.int64)
        if counts.ndim != 2 or len(self.lengths) != counts.shape[0] or len(self.offsets) != counts.shape[0]:
            raise ValueError("counts must be (K, L) with K lengths and K offsets")
        for k, length in enumerate(self.lengths):
            row = counts[k, :length]
            if length < 2 or row.sum() != 1 << PRECISION or row.min() < 1:
                raise ValueError(f"table {k} is not a valid frequency table of precision {PRECISION}")

    @property
    def num_tables(self) -> int:
        return int(self.counts.shape[0])

    def model(self, index: int) -> constriction.stream.model.Categorical:
        """The constriction model of table ``index``, built once from the exact integer counts."""
        if index not in self._models:
            probabilities = self.counts[index, : self.lengths[index]].astype(np.float64) / (1 << PRECISION)
            self._models[index] = constriction.stream.model.Categorical(probabilities, perfect=False)
        return self._models[index]

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The tables as named integer arrays, for storage in a model package."""
        skip = -1 if self.skip_index is None else self.skip_index
        return {
            f"{prefix}.counts": np.asarray(self.counts, dtype=np.int32),
            f"{prefix}.lengths": np.asarray(self.lengths, dtype=np.int32),
            f"{prefix}.offsets": np.asarray(self.offsets, dtype=np.int32),
            f"{prefix}.skip_index": np.asarray([skip], dtype=np.int32),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> CdfTables:
        skip = int(arrays[f"{prefix}.skip_index"][0])
        return cls(
            counts=np.asarray(arrays[f"{prefix}.counts"], dtype=np.int32),
            lengths=np.asarray(arrays[f"{prefix}.lengths"], dtype=np.int32),
            offsets=np.asarray(arrays[f"{prefix}.offsets"], dtype=np.int32),
            skip_index=None if skip < 0 else skip,
        )


def quantize_pmf(pmf: np.ndarray, precision: int = PRECISION) -> np.ndarray:
    """Integer frequencies, each >= 1, summing to ``2**precision``, close to ``pmf``."""
    pmf = np.asarray(pmf, dtype=np.float64)
    pmf = pmf / pmf.sum()
    total = 1 << precision
    if len(pmf) > total:
        raise ValueError("more symbols than the precision can represent")
    counts = np.maximum(1, np.floor(pmf * (total - len(pmf))).astype(np.int64))
    deficit = total - int(counts.sum())
    # hand the remainder to the largest fractional parts, deterministically
    order = np.argsort(-(pmf * (total - len(pmf)) - np.floor(pmf * (total - len(pmf)))), kind="stable")
    counts[order[: deficit % len(pmf)]] += 1
    counts += deficit // len(pmf)
    return counts


def _pack_rows(rows: list[np.ndarray], offsets: list[int], skip_index: int | None) -> CdfTables:
    width = max(len(r) for r in rows)
    counts = np.zeros((len(rows), width), dtype=np.int32)
    for k, row in enumerate(rows):
        counts[k, : len(row)] = row
    return CdfTables(
        counts=counts,
        lengths=np.array([len(r) for r in rows], dtype=np.int32),
        offsets=np.array(offsets, dtype=np.int32),
        skip_index=skip_index,
    )


def _normal_cdf(x: np.ndarray | float) -> np.ndarray:
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(x, dtype=np.float64) / math.sqrt(2.0))


def discretized_gaussian_pmf(scale: float, radius: int) -> np.ndarray:
    """P(n) for n in [-radius, radius] of a zero-mean Gaussian rounded to integers, plus the tail."""
    n = np.arange(-radius, radius + 1, dtype=np.float64)
    pmf = _normal_cdf((n + 0.5) / scale) - _normal_cdf((n - 0.5) / scale)
    tail = 2.0 * float(_normal_cdf(-(radius + 0.5) / scale))
    return np.append(pmf, max(tail, 0.0))


def gaussian_scale_table(scales: np.ndarray, tail_sigmas: float = 6.0, skip_first: bool = True) -> CdfTables:
    """One table per scale: the Gaussian-conditional model of the latent ``y``."""
    rows, offsets = [], []
    for scale in scales:
        radius = max(1, math.ceil(tail_sigmas * float(scale)))
        rows.append(quantize_pmf(discretized_gaussian_pmf(float(scale), radius)))
        offsets.append(radius)
    return _pack_rows(rows, offsets, 0 if skip_first else None)


def factorized_tables(pmfs: list[np.ndarray], offsets: list[int]) -> CdfTables:
    """Per-channel tables of the hyper-latent ``z`` (each pmf ends with its escape mass)."""
    return _pack_rows([quantize_pmf(p) for p in pmfs], offsets, None)


def _zigzag(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.int64)
    return np.where(v >= 0, 2 * v, -2 * v - 1)


def _unzigzag(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.int64)
    return np.where(v % 2 == 0, v // 2, -(v + 1) // 2)


def _escape_ops(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(symbols, uniform sizes) of the escape codes of ``values``, in order: for each value its bit length
    (over 33 symbols), then its bits in 16-bit chunks, least significant first (one array for one coder call:
    an escape-heavy image costs no Python per escape)."""
    codes = _zigzag(values)
    outside = (codes < 0) | (codes >= 1 << ESCAPE_BITS_LIMIT)  # below 0: the zigzag overflowed int64
    if outside.any():
        raise ValueError(f"latent value {values[int(np.argmax(outside))]} out of the codable range")
    lengths = np.frexp(codes.astype(np.float64))[1].astype(np.int64)  # bit lengths, exact below 2**53
    low_bits = np.minimum(lengths, _CHUNK_BITS)
    high_bits = np.maximum(lengths - _CHUNK_BITS, 0)
    # one row per escape: length, low chunk, high chunk; the chunks an escape does not have are left out
    symbols = np.stack([lengths, codes & ((1 << low_bits) - 1), codes >> _CHUNK_BITS], axis=1)
    sizes = np.stack([np.full_like(lengths, ESCAPE_BITS_LIMIT + 1), 1 << low_bits, 1 << high_bits], axis=1)
    present = np.stack([np.ones_like(lengths, dtype=bool), lengths > 0, lengths > _CHUNK_BITS], axis=1)
    return symbols[present].astype(np.int32), sizes[present].astype(np.int32)


def _decode_escape_codes(words: memoryview, position: int, state: int, count: int) -> tuple[list[int], int, int]:
    """Read ``count`` escape codes (zigzag values) from a coder at (``position``, ``state``) of ``words``.

    The coder's own arithmetic for the uniform models, in plain integers: the length's model (33 symbols)
    and each chunk's (``2**take``) alternate and change with every escape, so constriction would need a
    call, a model and an array per symbol (about 15 us an escape, against 1-2 here; a 1 MB upload holds
    some 330,000). Returns the codes and the coder's new (position, state); raises at the first code
    longer than its value (non-canonical).
    """
    codes = []
    x = state
    for _ in range(count):
        q = x & _STATE_MASK
        nbits = q // _LENGTH_SPAN
        if nbits >= ESCAPE_BITS_LIMIT:  # the last symbol's span is a little wider
            nbits = ESCAPE_BITS_LIMIT
            x = (x >> _CODER_BITS) * _LAST_LENGTH_SPAN + q - ESCAPE_BITS_LIMIT * _LENGTH_SPAN
        else:
            x = (x >> _CODER_BITS) * _LENGTH_SPAN + q - nbits * _LENGTH_SPAN
        if x < _WORD and position:  # refill, as after every symbol
            position -= 1
            x = x << 32 | words[position]
        code = shift = 0
        while shift < nbits:
            take = min(_CHUNK_BITS, nbits - shift)
            low = _CODER_BITS - take  # Uniform(2**take): symbol s spans s * 2**low .. (s + 1) * 2**low - 1
            q = x & _STATE_MASK
            code |= (q >> low) << shift
            x = (x >> _CODER_BITS) << low | (q & ((1 << low) - 1))
            if x < _WORD and position:
                position -= 1
                x = x << 32 | words[position]
            shift += take
        if code.bit_length() != nbits:  # a zero top bit: the same value has a shorter code
            raise EntropyDecodeError(f"non-canonical payload: escape code of {nbits} bits "
                                     f"for a value whose code needs {code.bit_length()}")
        codes.append(code)
    return codes, position, x


def _coded_directly(symbols: np.ndarray, length: np.ndarray | int) -> np.ndarray:
    """Which symbols (value + offset) a table of ``length`` entries codes directly, not as its escape."""
    return (symbols >= 0) & (symbols < length - 1)


def _refuse_direct_escapes(values: np.ndarray, table_indices: np.ndarray, tables: CdfTables) -> None:
    """An escape for a value its table codes directly is a second payload for the same values: refuse it."""
    direct = _coded_directly(values + tables.offsets[table_indices], tables.lengths[table_indices])
    if direct.any():
        first = int(np.argmax(direct))
        raise EntropyDecodeError(f"non-canonical payload: escape code for {values[first]}, "
                                 f"a value table {table_indices[first]} codes directly")


def _grouping(indices: np.ndarray, tables: CdfTables) -> list[tuple[int, np.ndarray]]:
    """(table index, flat positions) in the canonical order both sides use."""
    flat = indices.reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= tables.num_tables):
        raise ValueError("table index out of range")
    order = np.argsort(flat, kind="stable")
    sorted_idx = flat[order]
    bounds = np.flatnonzero(np.diff(sorted_idx)) + 1
    groups = []
    for positions in np.split(order, bounds):
        if positions.size:
            k = int(flat[positions[0]])
            if k != tables.skip_index:
                groups.append((k, positions))
    return groups


class SymbolEncoder:
    """Collects symbol groups in decoding order, then writes one rANS stream."""

    def __init__(self) -> None:
        self._ops: list[tuple[np.ndarray, object, tuple[np.ndarray, ...]]] = []

    def add(self, values: np.ndarray, indices: np.ndarray, tables: CdfTables) -> None:
        """Queue ``values`` (integers), each coded with the table its ``indices`` entry names."""
        values = np.asarray(values).reshape(-1)
        escaped_positions = []
        for k, positions in _grouping(np.asarray(indices), tables):
            symbols = values[positions].astype(np.int64) + int(tables.offsets[k])
            outside = ~_coded_directly(symbols, int(tables.lengths[k]))
            symbols[outside] = int(tables.lengths[k]) - 1
            self._ops.append((symbols.astype(np.int32), tables.model(k), ()))
            escaped_positions.append(positions[outside])
        escaped = np.sort(np.concatenate([np.zeros(0, dtype=np.intp), *escaped_positions]))
        if escaped.size:  # every escape code of the group, in position order, in one coder call
            symbols, sizes = _escape_ops(values[escaped])
            self._ops.append((symbols, _UNIFORM, (sizes,)))

    def finish(self) -> bytes:
        """The rANS words, little-endian, with the final word's zero high bytes removed."""
        coder = constriction.stream.stack.AnsCoder()
        for symbols, model, parameters in reversed(self._ops):
            coder.encode_reverse(symbols, model, *parameters)
        return coder.get_compressed().astype("<u4").tobytes().rstrip(b"\x00")


class SymbolDecoder:
    """Reads groups back in the order a :class:`SymbolEncoder` queued them; only its exact bytes pass."""

    def __init__(self, payload: bytes) -> None:
        payload = bytes(payload)
        if payload.endswith(b"\x00"):  # also every zero last word, which constriction would refuse itself
            raise EntropyDecodeError("non-canonical payload: it ends in a zero byte "
                                     "(the encoder drops the final word's zero high bytes)")
        padded = payload + b"\x00" * (-len(payload) % 4)
        self._words = np.frombuffer(padded, dtype="<u4").astype(np.uint32)
        self._coder = constriction.stream.stack.AnsCoder(self._words)

    def read(self, indices: np.ndarray, tables: CdfTables) -> np.ndarray:
        """Values shaped like ``indices``; skipped positions read as 0."""
        indices = np.asarray(indices)
        flat_indices = indices.reshape(-1)
        values = np.zeros(indices.size, dtype=np.int64)
        escaped_positions = []
        try:
            for k, positions in _grouping(indices, tables):
                symbols = self._coder.decode(tables.model(k), positions.size).astype(np.int64)
                values[positions] = symbols - int(tables.offsets[k])
                escaped_positions.append(positions[symbols == int(tables.lengths[k]) - 1])
            if escaped_positions:
                escaped = np.sort(np.concatenate(escaped_positions))
                values[escaped] = _unzigzag(np.array(self._read_escapes(escaped.size), dtype=np.int64))
                _refuse_direct_escapes(values[escaped], flat_indices[escaped], tables)
        except EntropyDecodeError:
            raise  # already says what is corrupt
        except (ValueError, RuntimeError, OverflowError) as exc:
            raise EntropyDecodeError(f"corrupt payload: {exc}") from exc
        self._refuse_stuck_state()
        return values.reshape(indices.shape)

    def _refuse_stuck_state(self) -> None:
        """Fail at this group, not after the whole image, when the payload can no longer end empty.

        With no words left and a state ``0 < x < 256``, every later symbol decodes as its model's first
        and leaves ``x`` unchanged, so :meth:`finish` must fail: a truncated or short corrupt payload is
        refused before the context networks of the later steps run (seconds and GBs at the decode limits).
        """
        words, state = self._coder.pos()
        if words == 0 and 0 < state < _STUCK_STATE_LIMIT:
            raise EntropyDecodeError(f"corrupt payload: the data ran out with state {state} left over, "
                                     "which no later symbol consumes")

    def _read_escapes(self, count: int) -> list[int]:
        """The next ``count`` escape codes (zigzag values), read in plain integers, then handed back to the coder."""
        position, state = self._coder.pos()
        codes, position, state = _decode_escape_codes(self._words.data, position, state, count)
        self._coder.seek(position, state)
        return codes

    def finish(self) -> None:
        """Raise unless every word of the payload was consumed (catches most corruption)."""
        if not self._coder.is_empty():
            raise EntropyDecodeError("corrupt payload: data left over after the last symbol")
