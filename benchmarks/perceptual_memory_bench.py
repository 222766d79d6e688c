"""Peak memory and time of the weight-free perceptual metrics (HaarPSI, VIF-p, FSIM, GMSD) on large photos.

``aeic eval`` scores photos at full size, and the checker's may be 12-48 MP phone photos on a 24 GB,
2-core machine. Each measurement runs in a child process of its own: the pair of pictures (a real photo
resized to the size, and the same photo shrunk 8x and enlarged back as a low-rate reconstruction) is
made and the metric warmed up on a small crop first, then ``VmHWM`` is reset (``/proc/self/clear_refs``)
and the call's peak resident set and wall time are read. ``piq`` is piq called on the whole picture, as
``metrics.perceptual_metric_fn`` did before it worked in bands; ``aeic`` is ``perceptual_metric_fn`` now.
The load average is recorded beside each run: the numbers are from a shared machine.

Usage: python -m benchmarks.perceptual_memory_bench [--sizes 4000x3000,6000x4000] [--metrics vif,haarpsi]
       [--ways piq,aeic] [--out benchmarks/results/perceptual_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .machine import RESULTS_DIR, machine_info, proc_status_mb

DEFAULT_OUT = RESULTS_DIR / "perceptual_memory.json"
WAYS = ("piq", "aeic")


def pair(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A real photo at ``width x height`` and its 8x-shrunk-and-enlarged copy (a low-rate reconstruction)."""
    from PIL import Image

    from .images import photo

    ref = photo(width, height)
    small = Image.fromarray(ref).resize((max(1, width // 8), max(1, height // 8)), Image.Resampling.LANCZOS)
    return ref, np.asarray(small.resize((width, height), Image.Resampling.BICUBIC))


def child(metric: str, width: int, height: int, way: str) -> dict[str, Any]:
    """One metric call on one pair: peak RSS above the pictures (MB), seconds, the value."""
    from aeic.evaluation import metrics

    ref, rec = pair(width, height)
    call: Callable[[np.ndarray, np.ndarray], float]
    if way == "piq":
        module, function, _, _ = metrics.PERCEPTUAL_METRICS[metric]
        piq_function = getattr(metrics._piq_module(module), function)

        def whole(ref: np.ndarray, rec: np.ndarray) -> float:  # piq's second argument is the reference
            x, y = metrics._to_tensor(rec, 1.0 / 255.0), metrics._to_tensor(ref, 1.0 / 255.0)
            with metrics._single_thread():
                return float(piq_function(x, y, data_range=1.0))

        call = whole
    else:
        call = metrics.perceptual_metric_fn(metric)
    call(ref[:64, :64], rec[:64, :64])  # torch's start-up and lazy imports, not the metric's memory
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = proc_status_mb("VmRSS")
    start = time.perf_counter()
    value = call(ref, rec)
    seconds = time.perf_counter() - start
    return {"value": value, "seconds": seconds, "rss_before_mb": before,
            "peak_above_mb": proc_status_mb("VmHWM") - before}


def run(metric: str, width: int, height: int, way: str) -> dict[str, Any]:
    """:func:`child` in a fresh process (its peak is its own), with the load average when it started."""
    load = os.getloadavg()[0]
    command = [sys.executable, "-m", "benchmarks.perceptual_memory_bench", "--child", metric,
               "--sizes", f"{width}x{height}", "--ways", way]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"metric": metric, "size": f"{width}x{height}", "megapixels": round(width * height / 1e6, 1),
            "way": way, "load_average": round(load, 2), **result}


def main(argv: list[str] | None = None) -> int:
    """Run every metric x size x way in its own process and write one JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4000x3000,6000x4000", help="picture sizes, WxH")
    parser.add_argument("--metrics", default="haarpsi,vif,fsim,gmsd")
    parser.add_argument("--ways", default=",".join(WAYS), help="piq (whole picture, as before) and/or aeic")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [(int(w), int(h)) for w, h in (s.split("x") for s in args.sizes.split(","))]
    ways = [w for w in args.ways.split(",") if w]
    if args.child:
        print(json.dumps(child(args.child, *sizes[0], ways[0])))
        return 0
    runs = []
    for width, height in sizes:
        for metric in args.metrics.split(","):
            for way in ways:
                runs.append(run(metric, width, height, way))
                print(json.dumps(runs[-1]), file=sys.stderr)
    from .images import source_name

    report = {"benchmark": "perceptual_memory", "machine": machine_info(), "photo": source_name(), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
