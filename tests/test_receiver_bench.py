"""The receiver load benchmark runs end to end at a small scale: concurrent devices, no error, no loss."""

from __future__ import annotations

from pathlib import Path

import receiver_support

from benchmarks.receiver_bench import bench_load

# Fixtures shared with the other receiver tests.
tiny_package = receiver_support.tiny_package


def test_load_benchmark_accepts_everything_and_loses_nothing(tiny_package: Path) -> None:
    report = bench_load(tiny_package, uploads=40, clients=8, rate=0)
    assert report["accepted"] == 40 and report["errors"] == 0
    assert report["lost"] == 0 and report["duplicates"] == 0
    assert report["acceptance_rate_per_s"] > 0 and report["latency_ms"]["p50"] > 0
