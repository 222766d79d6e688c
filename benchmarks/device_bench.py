"""The sender as a Raspberry Pi or a Jetson runs it: held to few CPUs, cold starts, phone-sized photos, many photos.

Every case runs in its own child process pinned to ``--cpus`` CPUs (``os.sched_setaffinity`` before
onnxruntime loads, as ``taskset``, systemd's ``CPUAffinity=`` or ``docker --cpuset-cpus`` would), so its peak
RSS (VmHWM) and its CPU seconds are its own:

* ``cold``: what one ``aeic-send photo.jpg`` pays before and during its only photo: import, model load, the
  first encode, then a second one (what a long-running agent pays per photo);
* ``threads``: the sessions as the sender made them before 2026-12-07 (onnxruntime's own thread count, one
  per physical core whatever the affinity, and its idle threads spinning) against today's (as many threads
  as CPUs it may use, sleeping when idle), interleaved in one process on the 1080p budget encode: wall and
  CPU seconds (0 threads: onnxruntime's choice), whether the streams are the same, and the CPUs the
  process' threads may run on (onnxruntime's own count pins its workers to cores outside the mask);
* ``peak:<photo>:<control>``: one photo opened from its JPEG as the commands open it (``open_image``: read
  strip by strip as it is coded) and encoded once: peak RSS, wall and CPU seconds
  (user and system: the system share is the kernel faulting in fresh pages, ``sender/tiled_analysis.py``),
  the level chosen and the stream's bytes;
* ``steady``: ``--steady`` encodes alternating 1080p and 12 MP photos, rate levels and budgets: RSS after
  each, so growth over many photos (a leak, a cache) shows.

Photos are training photos (``benchmarks.images``) cut to 1920x1080, 4000x3000 (12 MP) and 8000x6000 (48 MP)
and saved as JPEG at quality 92; ``48mp_portrait`` is the 48 MP one stored as a phone stores a portrait photo,
sideways with EXIF orientation 6 (upright 6000x8000). Controls: ``budget:N`` bytes or ``rate:L``; ``budget:1500`` is
``deploy/sender/sender.toml``'s. The machine may be shared: each case records the load average around it.

Usage: python -m benchmarks.device_bench [--cpus 1] [--cases cold,threads,peak,steady] [--large] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .machine import proc_status_mb, write_result

PHOTOS = {"1080p": (1920, 1080), "12mp": (4000, 3000), "48mp": (8000, 6000), "48mp_portrait": (8000, 6000)}
ROTATED = {"48mp_portrait": 6}  # EXIF orientation: stored sideways, as phones store portrait photos
# (photo, control): the deploy default budget everywhere, a rate level, and budgets of about 0.02 / 0.01 bpp
PEAKS = [("1080p", "budget:1500"), ("1080p", "budget:5184"), ("12mp", "budget:1500"), ("12mp", "rate:20"),
         ("48mp", "budget:1500"), ("48mp", "rate:20"), ("48mp_portrait", "budget:1500")]
LARGE_PEAKS = [("12mp", "budget:15000"), ("48mp", "budget:60000")]  # coded whole / at half size: minutes per photo
THREADS_ROUNDS = 4
STEADY_WORK = [("1080p", "budget:1500"), ("12mp", "rate:20"), ("1080p", "rate:20"), ("12mp", "budget:1500")]


class _Clock:
    """Wall, user and system seconds and minor page faults since it was made."""

    def __init__(self) -> None:
        self.wall, self.usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)

    def read(self) -> dict[str, float]:
        now = resource.getrusage(resource.RUSAGE_SELF)
        return {"wall_s": round(time.perf_counter() - self.wall, 3), "user_s": round(now.ru_utime - self.usage.ru_utime, 3),
                "system_s": round(now.ru_stime - self.usage.ru_stime, 3), "minor_faults": now.ru_minflt - self.usage.ru_minflt}


# ---------------------------------------------------------------- child side

def _encode(codec: Any, rgb: Any, control: str) -> tuple[bytes, int]:
    kind, value = control.split(":")
    if kind == "budget":
        stream, level = codec.encode_to_budget(rgb, int(value))
        return stream, level
    return codec.encode(rgb, int(value)), int(value)


def _child_cold(photos: Path) -> dict[str, Any]:
    clock = _Clock()
    import aeic.sender.cli  # noqa: F401  # what aeic-send loads before its first photo
    from aeic.sender.encoder import SenderCodec
    from aeic.sender.images import open_image

    result: dict[str, Any] = {"import": clock.read()}
    clock = _Clock()
    codec = SenderCodec.from_package()
    result["load"], result["rss_after_load_mb"] = clock.read(), proc_status_mb("VmRSS")
    for name in ("first_encode", "second_encode"):
        clock = _Clock()
        _encode(codec, open_image(photos / "1080p.jpg"), "budget:1500")
        result[name] = clock.read()
    return result


def _child_threads(photos: Path) -> dict[str, Any]:
    import onnxruntime as ort
    from aeic.sender import encoder
    from aeic.sender.images import read_image

    allowed, options = encoder.allowed_cpus, encoder.session_options

    def spinning(threads: int | None, memory_pattern: bool = True) -> ort.SessionOptions:
        made = options(threads, memory_pattern)
        made.add_session_config_entry(encoder.SPINNING, "1")  # onnxruntime's default
        return made

    # this process only: the sender's sessions as they were made before 2026-12-07
    encoder.allowed_cpus, encoder.session_options = (lambda: None), spinning
    codecs = {"before": encoder.SenderCodec.from_package()}
    encoder.allowed_cpus, encoder.session_options = allowed, options
    codecs["after"] = encoder.SenderCodec.from_package()
    rgb = read_image(photos / "1080p.jpg")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in codecs}
    streams: dict[str, bytes] = {}
    for round_ in range(THREADS_ROUNDS):  # interleaved, alternating which goes first: load drifts alike
        for name in sorted(codecs, reverse=bool(round_ % 2)):
            clock = _Clock()
            streams[name], _ = _encode(codecs[name], rgb, "budget:5184")
            runs[name].append(clock.read())
    result: dict[str, Any] = {"control": "budget:5184", "identical_streams": len(set(streams.values())) == 1,
                              "process_cpus": sorted(os.sched_getaffinity(0)), "thread_cpus": _thread_cpus()}
    for name, rows in runs.items():
        result[name] = {"intra_op_threads": codecs[name].hyper.get_session_options().intra_op_num_threads,
                        "runs": rows, **{f"median_{key}": statistics.median([row[key] for row in rows]) for key in ("wall_s", "user_s", "system_s")}}
    return result


def _thread_cpus() -> list[str]:
    """The CPU lists the process' threads may run on: onnxruntime's own workers pin themselves outside the mask."""
    lists = set()
    for task in Path("/proc/self/task").iterdir():
        lists |= {line.split()[1] for line in (task / "status").read_text().splitlines() if line.startswith("Cpus_allowed_list")}
    return sorted(lists)


def _child_peak(photos: Path, photo: str, control: str) -> dict[str, Any]:
    from aeic.sender.encoder import SenderCodec
    from aeic.sender.images import open_image

    codec = SenderCodec.from_package()
    clock = _Clock()
    stream, level = _encode(codec, open_image(photos / f"{photo}.jpg"), control)
    return {**clock.read(), "peak_rss_mb": proc_status_mb("VmHWM"), "level": level, "bytes": len(stream),
            "sha256": hashlib.sha256(stream).hexdigest()[:16]}


def _child_steady(photos: Path, count: int) -> dict[str, Any]:
    from aeic.sender.encoder import SenderCodec
    from aeic.sender.images import open_image

    codec = SenderCodec.from_package()
    rss = []
    for n in range(count):
        photo, control = STEADY_WORK[n % len(STEADY_WORK)]
        _encode(codec, open_image(photos / f"{photo}.jpg"), control)
        rss.append(round(proc_status_mb("VmRSS"), 1))
    settled = rss[len(STEADY_WORK):]  # after each kind of work has run once
    half = len(settled) // 2  # a leak shows as a higher ceiling in the second half than in the first
    return {"encodes": count, "rss_mb_after_each": rss, "peak_rss_mb": proc_status_mb("VmHWM"),
            "max_rss_mb_first_half": max(settled[:half], default=None), "max_rss_mb_second_half": max(settled[half:], default=None)}


def run_child(case: str, photos: Path, cpus: int, steady: int) -> dict[str, Any]:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])  # before onnxruntime is imported
    if case == "cold":
        return _child_cold(photos)
    if case == "threads":
        return _child_threads(photos)
    if case == "steady":
        return _child_steady(photos, steady)
    _, photo, control = case.split(":", 2)
    return _child_peak(photos, photo, control)


# ---------------------------------------------------------------- parent side

def _make_photos(folder: Path, names: set[str]) -> None:
    from PIL import Image

    from .images import photo

    for name in names:
        image, path = Image.fromarray(photo(*PHOTOS[name])), folder / f"{name}.jpg"
        if name in ROTATED:
            exif = Image.Exif()
            exif[0x0112] = ROTATED[name]
            image.save(path, quality=92, exif=exif.tobytes())
        else:
            image.save(path, quality=92)


def spawn(case: str, photos: Path, cpus: int, steady: int, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.device_bench", "--child", case, "--photos", str(photos),
               "--cpus", str(cpus), "--steady", str(steady)]
    load_before = list(os.getloadavg())
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s", "load_before": load_before}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}", "load_before": load_before}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load_before, "load_after": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the sender held to few CPUs: cold start, threads, peak RSS, steady state")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs each case may run on (a Pi Zero 2 W class device: 1)")
    parser.add_argument("--cases", default="cold,threads,peak,steady")
    parser.add_argument("--large", action="store_true", help="also the budgets that code a 12 / 48 MP photo whole / at half size")
    parser.add_argument("--steady", type=int, default=24, help="encodes in the steady-state case")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per child process")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--photos", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.photos, args.cpus, args.steady)))
        return 0
    groups = [c for c in args.cases.split(",") if c]
    cases = [c for c in groups if c != "peak"]
    if "peak" in groups:
        cases += [f"peak:{photo}:{control}" for photo, control in PEAKS + (LARGE_PEAKS if args.large else [])]
    needed = {"1080p"} | {c.split(":")[1] for c in cases if c.startswith("peak:")} | ({"12mp"} if "steady" in cases else set())
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="aeic-device-bench-") as tmp:
        photos = Path(tmp)
        _make_photos(photos, needed)
        for case in cases:
            results[case] = spawn(case, photos, args.cpus, args.steady, args.timeout)
            print(case, json.dumps(results[case])[:300], flush=True)
    print(write_result("device", {"cpus": args.cpus, "photos": {k: f"{w}x{h}" for k, (w, h) in PHOTOS.items()},
                                  "cases": results}, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
