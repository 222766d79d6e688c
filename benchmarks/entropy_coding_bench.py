"""Throughput of the shared rANS coder on a 1080p-sized latent, and its overhead over the ideal size.

The latent (default 256 x 34 x 60: a 1920x1080 image at 1/32) is coded exactly as the entropy
model codes it: four context steps, each one ``SymbolEncoder.add`` over the Gaussian scale tables
built from the model's 64-scale table. Scale indices follow a synthetic but realistic pattern
for ultra-low rates: a tenth of the channels are active, each with its own typical index
(uniform in 10..40), the rest sit on the smallest scales (index 0 is skipped, not coded);
elements scatter around their channel's index (normal, sd 4) and values are drawn from the
discretized Gaussian each index names. The ideal size is the information content of those
values under the same integer tables (escapes included), so the ratio is the coder's overhead.

It also times an escape flood, the worst a hostile upload can ask of the escape path: one group of
the cheapest escapes these tables have (table 1 codes -1..1 and gives its escape 2 of 2**16, so -2 is
15 + log2(33) + 2 = 22 bits), as many as fit in the receiver's default upload limit of 1,000,000 bytes.

Usage: python -m benchmarks.entropy_coding_bench [--channels C --height H --width W --repeats N]
       [--escape-bytes B]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from aeic.shared.entropy_coding import (
    PRECISION,
    CdfTables,
    SymbolDecoder,
    SymbolEncoder,
    gaussian_scale_table,
)
from aeic.shared.entropy_model import scale_table, step_masks

from .machine import write_result

ACTIVE_CHANNELS = 0.1
UPLOAD_LIMIT = 1_000_000  # the receiver's default max_upload_bytes
FLOOD_TABLE, FLOOD_VALUE = 1, -2  # the cheapest escape of the Gaussian tables: see the module docstring


def synthetic_latent(channels: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(values, scale indices), both (C, H, W) int64: see the module docstring."""
    rng = np.random.default_rng(seed)
    scales = scale_table()
    active = rng.random(channels) < ACTIVE_CHANNELS
    typical = np.where(active, rng.integers(10, 41, size=channels), 0)[:, None, None]
    indices = np.clip(typical + np.rint(rng.normal(0, 4, size=(channels, height, width))), 0, len(scales) - 1)
    indices = indices.astype(np.int64)
    values = np.rint(rng.normal(0.0, scales[indices])).astype(np.int64)
    return values, indices


def _escape_bits(value: int) -> float:
    zigzag = 2 * value if value >= 0 else -2 * value - 1
    return np.log2(33) + zigzag.bit_length()  # the coder's length symbol (uniform over 33) + payload bits


def ideal_bits(values: np.ndarray, indices: np.ndarray, tables: CdfTables) -> float:
    """Information content of ``values`` under the integer tables (skipped table: 0 bits)."""
    total = 0.0
    for k in np.unique(indices):
        if k == tables.skip_index:
            continue
        v = values[indices == k] + int(tables.offsets[k])
        escape = int(tables.lengths[k]) - 1
        outside = (v < 0) | (v >= escape)
        v = np.where(outside, escape, v)
        counts = tables.counts[k, : tables.lengths[k]].astype(np.float64)
        total += float(np.sum(PRECISION - np.log2(counts[v])))
        total += sum(_escape_bits(int(x)) for x in values[indices == k][outside])
    return total


def _encode(values: np.ndarray, indices: np.ndarray, masks: np.ndarray, tables: CdfTables) -> bytes:
    encoder = SymbolEncoder()
    for mask in masks:
        encoder.add(values[mask], indices[mask], tables)
    return encoder.finish()


def _decode(payload: bytes, indices: np.ndarray, masks: np.ndarray, tables: CdfTables) -> np.ndarray:
    decoder = SymbolDecoder(payload)
    out = np.zeros(indices.shape, dtype=np.int64)
    for mask in masks:
        out[mask] = decoder.read(indices[mask], tables)
    decoder.finish()
    return out


def _timed(function: Callable[[], Any], repeats: int) -> tuple[Any, list[float]]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, times


def run(channels: int, height: int, width: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    tables = gaussian_scale_table(scale_table())
    values, indices = synthetic_latent(channels, height, width, seed)
    masks = step_masks(channels, height, width)
    _encode(values, indices, masks, tables)  # warm-up: builds the constriction models once
    payload, encode_times = _timed(lambda: _encode(values, indices, masks, tables), repeats)
    decoded, decode_times = _timed(lambda: _decode(payload, indices, masks, tables), repeats)
    skipped = values * 0 if tables.skip_index is None else (indices == tables.skip_index)
    expected = np.where(skipped, 0, values)
    if not np.array_equal(decoded, expected):
        raise AssertionError("round trip failed: decoded symbols differ")
    ideal = ideal_bits(values, indices, tables)
    coded = int(values.size - np.count_nonzero(skipped))
    encode_s, decode_s = statistics.median(encode_times), statistics.median(decode_times)
    return {
        "latent_shape": [channels, height, width],
        "elements": int(values.size),
        "coded_symbols": coded,
        "skipped_fraction": float(np.count_nonzero(skipped) / values.size),
        "payload_bytes": len(payload),
        "bpp_of_image": len(payload) * 8 / (height * 32 * width * 32),  # the image is 32x the latent
        "ideal_bytes": ideal / 8,
        "size_over_ideal": len(payload) * 8 / ideal if ideal else None,
        "repeats": repeats,
        "encode": _rates(encode_s, values.size, coded, len(payload)),
        "decode": _rates(decode_s, values.size, coded, len(payload)),
    }


def escape_flood(budget: int, repeats: int) -> dict[str, Any]:
    """Encode and decode one group of the cheapest escapes, as many as fit in ``budget`` bytes."""
    tables = gaussian_scale_table(scale_table())
    bits = ideal_bits(np.array([FLOOD_VALUE]), np.array([FLOOD_TABLE]), tables)
    count = int((budget - 8) * 8 / bits)  # rANS adds a few bytes at most
    values, indices = np.full(count, FLOOD_VALUE, dtype=np.int64), np.full(count, FLOOD_TABLE)
    masks = np.ones((1, count), dtype=bool)
    payload, encode_times = _timed(lambda: _encode(values, indices, masks, tables), repeats)
    decoded, decode_times = _timed(lambda: _decode(payload, indices, masks, tables), repeats)
    if not np.array_equal(decoded, values) or len(payload) > budget:
        raise AssertionError("escape flood: round trip failed or the payload is over its budget")
    encode_s, decode_s = statistics.median(encode_times), statistics.median(decode_times)
    return {
        "escapes": count,
        "payload_bytes": len(payload),
        "encode_ms": encode_s * 1000,
        "decode_ms": decode_s * 1000,
        "decode_us_per_escape": decode_s / count * 1e6,
    }


def _rates(seconds: float, elements: int, coded: int, payload: int) -> dict[str, float]:
    return {
        "ms": seconds * 1000,
        "symbols_per_s": coded / seconds,
        "elements_per_s": elements / seconds,
        "latent_mb_per_s": elements * 4 / seconds / 1e6,  # the latent as int32
        "compressed_mb_per_s": payload / seconds / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rANS throughput on a 1080p-sized latent")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--height", type=int, default=34)
    parser.add_argument("--width", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--escape-bytes", type=int, default=UPLOAD_LIMIT, help="escape flood's size (0: none)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.channels, args.height, args.width, args.repeats, args.seed)
    if args.escape_bytes:
        result["escape_flood"] = escape_flood(args.escape_bytes, args.repeats)
    path = write_result("entropy_coding", {"results": result}, args.out)
    flood = result.get("escape_flood")
    print(f"{path}: encode {result['encode']['symbols_per_s'] / 1e6:.2f} Msym/s, "
          f"decode {result['decode']['symbols_per_s'] / 1e6:.2f} Msym/s, "
          f"size/ideal {result['size_over_ideal']:.4f}"
          + (f"; escape flood {flood['escapes']:,} in {flood['payload_bytes']:,} B decoded in "
             f"{flood['decode_ms']:.0f} ms" if flood else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
