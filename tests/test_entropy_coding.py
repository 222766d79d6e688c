"""rANS coding with frozen integer tables: exact round trips, near-ideal size, golden bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from aeic.shared.entropy_coding import (
    PRECISION,
    CdfTables,
    EntropyDecodeError,
    SymbolDecoder,
    SymbolEncoder,
    factorized_tables,
    gaussian_scale_table,
    quantize_pmf,
)
from aeic.shared.entropy_model import scale_table
from hypothesis import given, settings
from hypothesis import strategies as st

GOLDEN = Path(__file__).parent / "golden" / "entropy_coding_v1.json"
TABLES = gaussian_scale_table(scale_table())


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
