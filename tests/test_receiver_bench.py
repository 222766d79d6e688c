"""The receiver load benchmark runs end to end at a small scale: concurrent devices, no error, no loss."""

from __future__ import annotations

from pathlib import Path

import receiver_support

from benchmarks.receiver_bench import bench_cpu_batching, bench_load

# Fixtures shared with the other receiver tests.
tiny_package = receiver_support.tiny_package


def test_load_benchmark_accepts_everything_and_loses_nothing(tiny_package: Path) -> None:
    report = bench_load(tiny_package, uploads=40, clients=8, rate=0)
    assert report["accepted"] == 40 and report["errors"] == 0
    assert report["lost"] == 0 and report["duplicates"] == 0
    assert report["acceptance_rate_per_s"] > 0 and report["latency_ms"]["p50"] > 0


def test_cpu_batching_runs_each_configuration_in_its_own_child_each_round(tiny_package: Path) -> None:
    report = bench_cpu_batching(tiny_package, batch_sizes=[2], threads=[1, 2], rounds=2, rate=0, sizes=((96, 64),))
    assert set(report["summary"]) == {"96x64 batch 2 threads 1", "96x64 batch 2 threads 2"}
    assert report["stream_bytes"]["96x64"][0] > 0
    for name, runs in report["runs"].items():
        summary = report["summary"][name]
        assert len(runs) == 2 and len(summary["load_1min_before"]) == 2
        for run in runs:  # the child decoded the whole batch with the threads asked for
            assert run["images"] == summary["batch_size"]
            assert run["torch_threads"] == summary["torch_threads"]
            assert run["s_per_image"] > 0 and run["peak_rss_mib"] > 50
