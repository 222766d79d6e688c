"""rANS coding with frozen integer tables: exact round trips, near-ideal size, golden bytes, strict decoding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import constriction
import numpy as np
import pytest
from aeic.shared.entropy_coding import (
    PRECISION,
    CdfTables,
    EntropyDecodeError,
    SymbolDecoder,
    SymbolEncoder,
    _decode_escape_codes,
    factorized_tables,
    gaussian_scale_table,
    quantize_pmf,
)
from aeic.shared.entropy_model import scale_table
from hypothesis import given, settings
from hypothesis import strategies as st

GOLDEN = Path(__file__).parent / "golden" / "entropy_coding_v1.json"
TABLES = gaussian_scale_table(scale_table())
Uniform = constriction.stream.model.Uniform
Ops = list[tuple[int, object]]


def _sample(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, TABLES.num_tables, size=shape)
    values = np.round(rng.normal(size=shape) * scale_table()[indices]).astype(np.int64)
    values[indices == TABLES.skip_index] = 0
    return values, indices


def _round_trip(values: np.ndarray, indices: np.ndarray, tables: CdfTables = TABLES) -> tuple[bytes, np.ndarray]:
    encoder = SymbolEncoder()
    encoder.add(values, indices, tables)
    payload = encoder.finish()
    decoder = SymbolDecoder(payload)
    decoded = decoder.read(indices, tables)
    decoder.finish()
    return payload, decoded


def _ideal_bits(values: np.ndarray, indices: np.ndarray, tables: CdfTables) -> float:
    bits = 0.0
    for value, k in zip(values.ravel(), indices.ravel(), strict=True):
        if k == tables.skip_index:
            continue
        symbol = int(value) + int(tables.offsets[k])
        assert 0 <= symbol < tables.lengths[k] - 1, "the ideal-size test uses in-range values"
        bits -= np.log2(tables.counts[k, symbol] / (1 << PRECISION))
    return bits


@pytest.mark.parametrize("seed", range(5))
def test_random_symbols_round_trip_exactly(seed: int) -> None:
    values, indices = _sample(seed, (32, 9, 13))
    _, decoded = _round_trip(values, indices)
    np.testing.assert_array_equal(decoded, values)


def test_escapes_are_exact_never_clipped() -> None:
    values, indices = _sample(7, (4, 8, 8))
    indices[0, 0, :6] = 5
    values[0, 0, :6] = [40, -41, 1000, -70_000, 2**20, -(2**30)]
    _, decoded = _round_trip(values, indices)
    np.testing.assert_array_equal(decoded, values)


def test_size_within_one_percent_of_information_content() -> None:
    rng = np.random.default_rng(3)
    indices = rng.integers(1, TABLES.num_tables, size=(64, 20, 20))
    radius = TABLES.offsets[indices]
    values = np.clip(np.round(rng.normal(size=indices.shape) * scale_table()[indices]), -radius, radius).astype(np.int64)
    payload, _ = _round_trip(values, indices)
    ideal_bytes = _ideal_bits(values, indices, TABLES) / 8
    assert len(payload) <= ideal_bytes * 1.01 + 8


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.integers(-(2**31) + 1, 2**31 - 1), min_size=1, max_size=40), st.integers(0, 63))
def test_any_int32_value_round_trips(values: list[int], index: int) -> None:
    array = np.array(values, dtype=np.int64)
    indices = np.full(array.shape, index)
    if index == TABLES.skip_index:
        array[:] = 0
    _, decoded = _round_trip(array, indices)
    np.testing.assert_array_equal(decoded, array)


def test_factorized_tables_round_trip() -> None:
    pmfs = [np.array([1, 2, 5, 2, 1, 0.01]), np.array([3, 1, 0.5])]
    tables = factorized_tables(pmfs, [2, 1])
    rng = np.random.default_rng(0)
    indices = np.broadcast_to(np.array([0, 1])[:, None, None], (2, 5, 5))
    values = rng.integers(-3, 4, size=(2, 5, 5))
    _, decoded = _round_trip(values, indices, tables)
    np.testing.assert_array_equal(decoded, values)


def test_quantized_tables_sum_to_precision_and_never_zero() -> None:
    counts = quantize_pmf(np.array([1e-12, 0.5, 0.5 - 1e-12, 1e-9]))
    assert counts.sum() == 1 << PRECISION and counts.min() >= 1
    for k in range(TABLES.num_tables):
        row = TABLES.counts[k, : TABLES.lengths[k]]
        assert row.sum() == 1 << PRECISION and row.min() >= 1


def test_invalid_tables_are_refused() -> None:
    with pytest.raises(ValueError):
        CdfTables(counts=np.array([[1, 2, 3]]), lengths=np.array([3]), offsets=np.array([1]))


@pytest.mark.parametrize("cut", [1, 2, 5, 17])
def test_truncated_or_corrupt_payload_raises_typed_error(cut: int) -> None:
    values, indices = _sample(11, (16, 8, 8))
    payload, _ = _round_trip(values, indices)
    broken = payload[:-cut]
    with pytest.raises(EntropyDecodeError):
        decoder = SymbolDecoder(broken)
        decoder.read(indices, TABLES)
        decoder.finish()


def test_arbitrary_payload_bytes_decode_or_raise_the_typed_error_only() -> None:
    """Fuzz: random bytes, bit flips and cuts of a real payload, with the y and z tables (escapes included)."""
    rng = np.random.default_rng(5)
    values, indices = _sample(12, (8, 8, 8))
    values[0, 0, :4] = [10**6, -(10**6), 2**31 - 1, -(2**31)]  # escapes to the int32 edge
    payload, _ = _round_trip(values, indices)
    z_tables = factorized_tables([np.array([0.05, 0.2, 0.5, 0.2, 0.049, 0.001])] * 4, [2] * 4)
    z_indices = np.broadcast_to(np.arange(4)[:, None, None], (4, 3, 3))
    payloads = [rng.bytes(int(n)) for n in rng.integers(0, 80, 150)] + [payload[:cut] for cut in range(len(payload))]
    for bit in rng.choice(len(payload) * 8, 100, replace=False):
        flipped = bytearray(payload)
        flipped[bit // 8] ^= 1 << (bit % 8)
        payloads.append(bytes(flipped))
    outcomes = set()
    for data in payloads:
        try:
            decoder = SymbolDecoder(data)
            decoder.read(z_indices, z_tables)
            decoder.read(indices, TABLES)
            decoder.finish()
            outcomes.add("decoded")
        except EntropyDecodeError:
            outcomes.add("refused")
    assert outcomes == {"decoded", "refused"}


def test_a_payload_that_runs_out_stuck_is_refused_at_its_group() -> None:
    """Found by fuzzing: a state of 1..255 with no words left can never reach 0 (every model's first symbol
    spans at least 256 states), so the group that leaves it fails, not the finish after the whole image."""
    values, indices = _sample(13, (16, 8, 8))
    payload, _ = _round_trip(values, indices)
    for data in (b"\x01", b"\xff", payload[-3:]):
        decoder = SymbolDecoder(data)
        with pytest.raises(EntropyDecodeError, match="the data ran out with state"):
            decoder.read(indices, TABLES)
        assert decoder._coder.pos()[0] == 0


def test_a_state_below_256_never_moves() -> None:
    """The bound the early refusal rests on, for the tightest models: 2**16 entries of count 1, Uniform(2**16)."""
    widest = CdfTables(np.ones((1, 1 << PRECISION), np.int32), np.array([1 << PRECISION]), np.array([0]))
    for model in (widest.model(0), Uniform(1 << 16), Uniform(33), TABLES.model(63)):
        for state in (1, 255):
            coder = constriction.stream.stack.AnsCoder(np.array([state], np.uint32))
            assert coder.decode(model, 3).tolist() == [0, 0, 0] and coder.pos() == (0, state)
    coder = constriction.stream.stack.AnsCoder(np.array([256], np.uint32))
    assert coder.decode(widest.model(0), 1).tolist() == [1]  # 256 is the tight bound


def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


def _golden_tables(case: dict, golden: dict) -> CdfTables:
    if case["tables"] == "gaussian":
        return TABLES
    stored = golden["factorized_tables"]
    return CdfTables(
        counts=np.array(stored["counts"], dtype=np.int32),
        lengths=np.array(stored["lengths"], dtype=np.int32),
        offsets=np.array(stored["offsets"], dtype=np.int32),
    )


def test_golden_tables_are_frozen() -> None:
    golden = _golden()
    table_digest = hashlib.md5(TABLES.counts.tobytes() + TABLES.offsets.tobytes() + TABLES.lengths.tobytes()).hexdigest()
    assert table_digest == golden["tables_md5"], "the frozen Gaussian tables changed"
    stored = golden["factorized_tables"]
    rebuilt = factorized_tables(
        [np.array([1, 2, 5, 2, 1, 0.01]), np.array([3, 1, 0.5]), np.array([0.2, 1, 6, 1, 0.2, 0.05])], [2, 1, 2]
    )
    assert rebuilt.counts.tolist() == stored["counts"], "pmf -> integer table quantization changed"
    assert rebuilt.offsets.tolist() == stored["offsets"] and rebuilt.lengths.tolist() == stored["lengths"]


@pytest.mark.parametrize("name", [case["name"] for case in _golden()["cases"]])
def test_golden_vectors(name: str) -> None:
    """Committed (tables, symbols, indices) encode to the committed bytes, byte for byte, and back."""
    golden = _golden()
    case = next(c for c in golden["cases"] if c["name"] == name)
    tables = _golden_tables(case, golden)
    shape = tuple(case["shape"])
    values = np.array(case["values"], dtype=np.int64).reshape(shape)
    indices = np.array(case["indices"], dtype=np.int64).reshape(shape)
    payload, decoded = _round_trip(values, indices, tables)
    assert payload.hex() == case["payload"], f"the bytes of golden vector {name} changed"
    np.testing.assert_array_equal(decoded, values)
    decoder = SymbolDecoder(bytes.fromhex(case["payload"]))
    np.testing.assert_array_equal(decoder.read(indices, tables), values)
    decoder.finish()


# -- canonical payloads: the strict decoder accepts exactly the encoder's bytes ------------------------------
def _payload_of(ops: Ops) -> bytes:
    """The payload of hand-picked (symbol, model) operations in decoding order, serialised like the encoder's."""
    coder = constriction.stream.stack.AnsCoder()
    for symbol, model in reversed(ops):
        coder.encode_reverse(np.array([symbol], dtype=np.int32), model)
    return coder.get_compressed().astype("<u4").tobytes().rstrip(b"\x00")


def _zigzag(value: int) -> int:
    return 2 * value if value >= 0 else -2 * value - 1


def _escape_code(value: int, extra_bits: int = 0) -> Ops:
    """The escape code of ``value`` (zigzag, length, 16-bit chunks), ``extra_bits`` longer than minimal."""
    u = _zigzag(value)
    nbits = u.bit_length() + extra_bits
    ops: Ops = [(nbits, Uniform(33))]
    for shift in range(0, nbits, 16):
        take = min(16, nbits - shift)
        ops.append(((u >> shift) & ((1 << take) - 1), Uniform(1 << take)))
    return ops


def _in_range(value: int, k: int) -> bool:
    return 0 <= value + int(TABLES.offsets[k]) <= int(TABLES.lengths[k]) - 2


def _escaped(value: int, k: int, extra_bits: int = 0) -> bytes:
    """One element of table ``k`` coded as the escape, whatever its value."""
    return _payload_of([(int(TABLES.lengths[k]) - 1, TABLES.model(k)), *_escape_code(value, extra_bits)])


def _decode(payload: bytes, indices: np.ndarray) -> np.ndarray:
    decoder = SymbolDecoder(payload)
    values = decoder.read(indices, TABLES)
    decoder.finish()
    return values


@pytest.mark.parametrize("value", [int(TABLES.offsets[5]) + 1, -(2**31), 2**31 - 1])
def test_hand_coded_escapes_are_the_encoders(value: int) -> None:
    """The helpers below write what the encoder writes when their choices are the encoder's."""
    assert not _in_range(value, 5)
    assert _escaped(value, 5) == _round_trip(np.array([value]), np.array([5]))[0]


@pytest.mark.parametrize("zeros", [1, 2, 3, 4, 5])
def test_trailing_zero_bytes_are_refused(zeros: int) -> None:
    """Zero bytes that the decoder's padding would supply anyway are a second spelling of the same words."""
    values, indices = _sample(1, (4, 4, 4))
    payload, _ = _round_trip(values, indices)
    assert len(payload) % 4 == 1  # up to 3 zero bytes stay inside the last word: the very same words
    with pytest.raises(EntropyDecodeError, match="non-canonical payload: it ends in a zero byte"):
        _decode(payload + b"\x00" * zeros, indices)


def test_a_lone_zero_byte_is_refused() -> None:
    with pytest.raises(EntropyDecodeError, match="ends in a zero byte"):
        SymbolDecoder(b"\x00")


_LOWEST, _HIGHEST = -int(TABLES.offsets[5]), int(TABLES.lengths[5] - 2 - TABLES.offsets[5])  # table 5's range


@pytest.mark.parametrize("value", [0, -1, 1, _LOWEST, _HIGHEST])
def test_escape_of_a_value_the_table_codes_directly_is_refused(value: int) -> None:
    assert _in_range(value, 5)
    message = f"non-canonical payload: escape code for {value}, .* table 5 "
    with pytest.raises(EntropyDecodeError, match=message):
        _decode(_escaped(value, 5), np.array([5]))


@pytest.mark.parametrize("value, extra_bits", [(41, 1), (41, 10), (-70_000, 1), (2**29, 1)])
def test_an_escape_longer_than_its_value_is_refused(value: int, extra_bits: int) -> None:
    nbits = _zigzag(value).bit_length() + extra_bits
    with pytest.raises(EntropyDecodeError, match=f"non-canonical payload: escape code of {nbits} bits"):
        _decode(_escaped(value, 5, extra_bits), np.array([5]))


def test_symbols_left_over_are_refused() -> None:
    values, indices = _sample(1, (4, 4, 4))
    encoder = SymbolEncoder()
    encoder.add(values, indices, TABLES)
    encoder.add(np.array([3]), np.array([40]), TABLES)  # one symbol the decoder never reads
    with pytest.raises(EntropyDecodeError, match="data left over"):
        _decode(encoder.finish(), indices)


# an element: its table, its value, escaped even when in range, escape length bits beyond the minimum
_choices = st.lists(
    st.tuples(st.integers(0, 63), st.integers(-40, 40) | st.integers(-(2**31), 2**31 - 1), st.booleans(),
              st.sampled_from([0, 0, 0, 1, 3])),
    min_size=1, max_size=24)


def _hand_coded(choices: list[tuple[int, int, bool, int]]) -> tuple[bytes, bool]:
    """One group coded with the given choices in the format's order, and whether they are the encoder's."""
    coded = sorted((k, position) for position, (k, *_) in enumerate(choices) if k != TABLES.skip_index)
    ops: Ops = []
    escapes, canonical = [], True
    for k, position in coded:
        _, value, escape_anyway, _ = choices[position]
        direct = _in_range(value, k) and not escape_anyway
        symbol = value + int(TABLES.offsets[k]) if direct else int(TABLES.lengths[k]) - 1
        ops.append((symbol, TABLES.model(k)))
        escapes += [] if direct else [position]
        canonical &= direct or not _in_range(value, k)
    for position in sorted(escapes):
        _, value, _, extra = choices[position]
        extra = min(extra, 32 - _zigzag(value).bit_length())
        ops += _escape_code(value, extra)
        canonical &= extra == 0
    return _payload_of(ops), canonical


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_choices, st.integers(0, 4))
def test_the_strict_decoder_accepts_exactly_the_encoders_payloads(
        choices: list[tuple[int, int, bool, int]], zeros: int) -> None:
    """Any coding choices: decoded only when they are the encoder's, and then to the encoder's own bytes."""
    payload, canonical = _hand_coded(choices)
    indices = np.array([k for k, *_ in choices])
    values = np.array([0 if k == TABLES.skip_index else v for k, v, *_ in choices], dtype=np.int64)
    encoded, _ = _round_trip(values, indices)
    assert not encoded.endswith(b"\x00")
    if canonical and not zeros:
        assert payload == encoded
        np.testing.assert_array_equal(_decode(payload, indices), values)
    else:
        with pytest.raises(EntropyDecodeError, match="non-canonical payload"):
            _decode(payload + b"\x00" * zeros, indices)


# -- the escape codes' reader: the coder's arithmetic in plain integers ---------------------------------------
def _escapes_symbol_by_symbol(coder: constriction.stream.stack.AnsCoder, count: int) -> list[int]:
    """The escape codes read with one constriction call per symbol: the format's definition of the reader."""
    codes = []
    for _ in range(count):
        nbits = int(coder.decode(Uniform(33), 1)[0])
        code = 0
        for shift in range(0, nbits, 16):
            code |= int(coder.decode(Uniform(1 << min(16, nbits - shift)), 1)[0]) << shift
        if code.bit_length() != nbits:
            raise EntropyDecodeError(f"non-canonical payload: escape code of {nbits} bits "
                                     f"for a value whose code needs {code.bit_length()}")
        codes.append(code)
    return codes


def _escape_stream(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Words holding escape codes (a tenth over-long), then other data; sometimes a bit flipped or words cut."""
    ops: Ops = []
    count = int(rng.integers(0, 30))
    for _ in range(count):
        value = int(rng.integers(-(2**31), 2**31)) >> int(rng.integers(0, 32))
        ops += _escape_code(value, min(int(rng.random() < 0.1), 32 - _zigzag(value).bit_length()))
    ops += [(int(rng.integers(0, 1 << 16)), Uniform(1 << 16)) for _ in range(int(rng.integers(0, 4)))]
    data = bytearray(_payload_of(ops) if rng.random() < 0.8 else rng.bytes(int(rng.integers(0, 16))))
    if data and rng.random() < 0.3:
        bit = int(rng.integers(0, len(data) * 8))
        data[bit // 8] ^= 1 << (bit % 8)
    if rng.random() < 0.2:
        data = data[int(rng.integers(0, 9)):]
    data = bytearray(bytes(data).rstrip(b"\x00"))
    data += b"\x00" * (-len(data) % 4)
    return np.frombuffer(bytes(data), dtype="<u4").astype(np.uint32), count + int(rng.integers(0, 3))


@pytest.mark.parametrize("seed", range(200))
def test_the_escape_reader_is_the_coders_arithmetic(seed: int) -> None:
    """Same codes (or the same refusal) and the same coder position and state as constriction, symbol by symbol:
    valid codes, over-long ones, flipped bits, cut words, random words, reads past the codes."""
    words, count = _escape_stream(np.random.default_rng(seed))
    reference = constriction.stream.stack.AnsCoder(words)
    position, state = reference.pos()
    try:
        expected: object = (_escapes_symbol_by_symbol(reference, count), *reference.pos())
    except EntropyDecodeError as exc:
        expected = str(exc)
    try:
        got: object = _decode_escape_codes(words.data, position, state, count)
    except EntropyDecodeError as exc:
        got = str(exc)
    assert got == expected


class _CountingCoder:
    """Passes every call to the coder, counting its ``decode`` calls."""

    def __init__(self, coder: constriction.stream.stack.AnsCoder) -> None:
        self.coder, self.decodes = coder, 0

    def decode(self, *args: object) -> np.ndarray:
        self.decodes += 1
        return self.coder.decode(*args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.coder, name)


def test_an_escape_flood_costs_no_coder_call_per_escape() -> None:
    """An upload may be nearly all escapes (some 330,000 in 1 MB): they were one constriction call per symbol,
    about 15 us an escape (5 s a megabyte); now one call per table, whatever the escapes, and the coder goes on
    reading the next group where the escape codes end."""
    rng = np.random.default_rng(4)
    indices = rng.integers(1, 4, size=3000)
    values = (TABLES.offsets[indices] + 1) * rng.choice([-1, 1], size=indices.size)  # every element escaped
    values[::7] = rng.integers(-(2**31), 2**31, size=values[::7].size)
    after_values, after_indices = _sample(9, (4, 8, 8))
    encoder = SymbolEncoder()
    encoder.add(values, indices, TABLES)
    encoder.add(after_values, after_indices, TABLES)
    decoder = SymbolDecoder(encoder.finish())
    counting = _CountingCoder(decoder._coder)
    decoder._coder = counting
    np.testing.assert_array_equal(decoder.read(indices, TABLES), values)
    assert counting.decodes == 3  # tables 1, 2 and 3
    np.testing.assert_array_equal(decoder.read(after_indices, TABLES), after_values)
    decoder.finish()


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, 2**62, -(2**63)])
def test_a_value_outside_int32_is_refused_when_it_is_added(value: int) -> None:
    """2**62 and -2**63 overflow the int64 zigzag (it turns negative): refused all the same, never mis-coded."""
    with pytest.raises(ValueError, match=f"latent value {value} out of the codable range"):
        SymbolEncoder().add(np.array([0, value], dtype=np.int64), np.array([5, 5]), TABLES)
