"""Spool benchmark: the cost of ``Spool.put`` at a backlog of 1,000 to 100,000 queued items.

A put used to count ``pending/`` (two listings and a stat per item) before every item; it now decides
from a tally counted again every ``recount_seconds``. For each backlog this fills a spool folder with
items written directly (bitstream and sidecar, like the tests; the page cache is warm), then times

* ``count``: one count of ``pending/`` as a put does it now (one listing, a stat per item), and the
  check the put before made (``len`` and ``pending_bytes``), best of three each;
* ``put``: ``--puts`` puts of new items, with the spool module of git revision ``--before`` (the last
  one whose put counted every time, loaded from ``git show``) and with the current one, each put with
  its fsyncs. The current spool's first put counts the backlog; ``--puts`` 30 puts at a frame a second
  are one recount interval, so their mean is the put's amortised cost at that rate.

Usage: python -m benchmarks.spool_bench [--backlogs 1000,20000,100000] [--puts 30] [--item-bytes 2500]
       [--before cf182ad] [--dir DIR] [--out benchmarks/results/spool.json]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from aeic.sender import spool as current

from .machine import RESULTS_DIR, machine_info

ROOT = Path(__file__).resolve().parents[1]
# The last revision of sender/spool.py whose put counted pending/ before every item.
BEFORE = "cf182ad"


def _module_at(revision: str, scratch: Path) -> ModuleType:
    """``sender/spool.py`` as it was at ``revision``, imported under a name of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:sender/spool.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = scratch / "spool_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("spool_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["spool_before"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _payload(seed: int, size: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "little")).digest(size)


def fill(pending: Path, count: int, size: int) -> None:
    """``count`` items written straight into ``pending/`` (no fsync: the bench is about put, not filling)."""
    for i in range(count):
        data = _payload(i, size)
        key = current.idempotency_key(data)
        (pending / f"{key}.aeic").write_bytes(data)
        sidecar = {"key": key, "size": size, "source": f"/srv/camera/img{i:06d}.jpg", "created": 1.7e9 + i}
        (pending / f"{key}.json").write_text(json.dumps(sidecar))


def _best_of(call: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def _time_puts(spool: Any, first_seed: int, puts: int, size: int) -> dict[str, float]:
    ms = []
    for i in range(puts):
        data = _payload(first_seed + i, size)
        start = time.perf_counter()
        spool.put(data, source=f"bench{i}")
        ms.append((time.perf_counter() - start) * 1000)
    return {
        "first_ms": ms[0],
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "max_ms": max(ms),
    }


def measure(root: Path, backlog: int, puts: int, size: int, before: ModuleType) -> dict[str, Any]:
    max_items = 10 * (backlog + 2 * puts)  # far from full: the bench times the accepted put
    max_bytes = max_items * size
    start = time.perf_counter()
    fill(current.Spool(root, max_items=max_items, max_bytes=max_bytes).pending_dir, backlog, size)
    filled_s = time.perf_counter() - start
    old = before.Spool(root, max_items=max_items, max_bytes=max_bytes)
    count_before_s = _best_of(lambda: (len(old), old.pending_bytes()))
    count_now_s = _best_of(lambda: current._count(old.pending_dir))
    put_before = _time_puts(old, 10**9, puts, size)
    put_now = _time_puts(current.Spool(root, max_items=max_items, max_bytes=max_bytes), 2 * 10**9, puts, size)
    result = {
        "backlog": backlog,
        "fill_s": round(filled_s, 1),
        "count_before_ms": round(count_before_s * 1000, 1),
        "count_now_ms": round(count_now_s * 1000, 1),
        "put_before": {k: round(v, 2) for k, v in put_before.items()},
        "put_now": {k: round(v, 2) for k, v in put_now.items()},
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="time Spool.put at large backlogs, before and now")
    parser.add_argument("--backlogs", default="1000,20000,100000")
    parser.add_argument("--puts", type=int, default=30)
    parser.add_argument("--item-bytes", type=int, default=2500, help="a 1080p frame at about 0.01 bpp")
    parser.add_argument("--before", default=BEFORE, help="git revision of the spool to compare with")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to build the spools (a disk, not tmpfs)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "spool.json")
    args = parser.parse_args(argv)
    machine = machine_info()  # the load before the run, not after it
    results = []
    with tempfile.TemporaryDirectory(prefix="aeic-spool-bench-", dir=args.dir) as tmp:
        before = _module_at(args.before, Path(tmp))
        for backlog in (int(b) for b in args.backlogs.split(",") if b):
            folder = Path(tmp) / f"spool-{backlog}"
            results.append(measure(folder, backlog, args.puts, args.item_bytes, before))
            shutil.rmtree(folder)  # minutes at 100,000 items where the disk discards what is freed
    report = {
        "benchmark": "spool",
        "machine": machine,
        "filesystem_dir": str(args.dir or tempfile.gettempdir()),
        "before_revision": args.before,
        "recount_seconds": current.DEFAULT_RECOUNT_SECONDS,
        "puts": args.puts,
        "item_bytes": args.item_bytes,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
