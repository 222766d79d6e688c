"""Receiver benchmarks, written as JSON (issue 6).

* decode latency per image at 768x512 and 1920x1080 (CPU here, CUDA when present),
* decode throughput with batching versus batch size 1,
* CPU batching (`--cpu-batching`): wall time per image and peak RSS for each image size x batch size x torch
  thread count, every configuration a fresh child process (so one's memory peak is its own), the rounds
  interleaved so that a change of load on a shared machine hits every configuration alike; the streams are
  made by the real sender (`aeic encode`). It decides the worker's batch size on a CPU.
* a bounded load test on loopback: N uploads from C concurrent clients (one device token each) against a
  real `aeic-receiver serve` process, with errors, latency percentiles, the acceptance rate, and a loss
  check (every accepted id is stored with its bitstream).

Usage: python -m benchmarks.receiver_bench [--model PKG] [--out benchmarks/results/receiver.json]
       nice python -m benchmarks.receiver_bench --cpu-batching [--rounds 3] [--batch-sizes 1,2,4] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

DEFAULT_OUT = Path("benchmarks/results/receiver.json")  # the file run_all and the table read
CPU_BATCHING_OUT = Path("benchmarks/results/receiver_cpu_batching.json")
SIZES = ((768, 512), (1920, 1080))


def synthetic_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic picture with smooth gradients, edges and texture (a stand-in for a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x * 0.7 + y) / 23.0)], axis=-1) * 190
    base += rng.normal(0, 12, size=base.shape)
    base[height // 3: height // 2, width // 5: width // 2] = (200, 60, 40)
    return base.clip(0, 255).astype(np.uint8)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95, p99 = (float(v) for v in np.percentile(values, [50, 95, 99]))
    return {"p50": p50, "p95": p95, "p99": p99, "max": max(values), "mean": statistics.fmean(values)}


def bench_decode(model: Path | None, repeats: int, batch_sizes: list[int], rate: int) -> dict[str, Any]:
    """Latency per image at each size and throughput per batch size at the first size."""
    from aeic.receiver.decoder import ReceiverCodec
    from aeic.sender.encoder import SenderCodec

    sender = SenderCodec.from_package(model)
    receiver = ReceiverCodec.from_package(model, device="auto")
    latency: dict[str, Any] = {}
    for width, height in SIZES:
        stream = sender.encode(synthetic_photo(width, height), rate)
        receiver.decode(stream)  # warm-up (lazy weights, kernels)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            receiver.decode(stream)
            times.append((time.perf_counter() - start) * 1000.0)
        latency[f"{width}x{height}"] = {"bytes": len(stream), "bpp": len(stream) * 8 / (width * height),
                                        "ms": _percentiles(times), "repeats": repeats}
    width, height = SIZES[0]
    streams = [sender.encode(synthetic_photo(width, height, seed), rate) for seed in range(max(batch_sizes))]
    throughput: dict[str, Any] = {}
    for size in batch_sizes:
        receiver.decode_batch(streams[:size])
        start = time.perf_counter()
        rounds = max(1, repeats // size)
        for _ in range(rounds):
            receiver.decode_batch(streams[:size])
        elapsed = time.perf_counter() - start
        throughput[str(size)] = {"images_per_s": rounds * size / elapsed, "images": rounds * size}
    return {"device": str(getattr(receiver, "device", "unknown")), "rate_index": rate,
            "latency": latency, "throughput_768x512_by_batch_size": throughput}


def encode_with_sender(model: Path | None, folder: Path, width: int, height: int, count: int,
                       rate: int) -> list[Path]:
    """`count` distinct synthetic photos of one size coded by the real sender CLI (`aeic encode`), as a device
    would send them."""
    from PIL import Image

    photos = []
    for seed in range(count):
        photo = folder / f"photo_{width}x{height}_{seed}.png"
        Image.fromarray(synthetic_photo(width, height, seed)).save(photo)
        photos.append(photo)
    command = [sys.executable, "-m", "aeic.codec.cli", "encode", "--rate", str(rate), "-o", str(folder),
               *map(str, photos)]
    if model is not None:
        command += ["--model", str(model)]
    subprocess.run(command, check=True, capture_output=True)
    return [photo.with_suffix(".aeic") for photo in photos]


def decode_child(model: Path | None, threads: int, streams: list[Path]) -> dict[str, Any]:
    """One configuration in this (fresh) process: torch on `threads` CPU threads, one warm-up decode of the
    first stream (lazy weights, allocator), then the streams decoded as one batch the way the worker does
    (`decode_each`). Peak RSS is the process's whole-life maximum, so it includes the model and the batch."""
    import torch
    from aeic.receiver.decoder import ReceiverCodec

    torch.set_num_threads(threads)
    codec = ReceiverCodec.from_package(model, device="cpu")
    data = [path.read_bytes() for path in streams]
    start = time.perf_counter()
    codec.decode(data[0])
    warm_up_s = time.perf_counter() - start
    start = time.perf_counter()
    outcomes = codec.decode_each(data)
    wall_s = time.perf_counter() - start
    failed = [repr(o) for o in outcomes if isinstance(o, Exception)]
    if failed:
        raise RuntimeError(f"decode failed: {failed}")
    return {"images": len(data), "batch_s": wall_s, "s_per_image": wall_s / len(data), "warm_up_s": warm_up_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def bench_cpu_batching(model: Path | None, batch_sizes: list[int], threads: list[int], rounds: int,
                       rate: int, sizes: tuple[tuple[int, int], ...] = SIZES) -> dict[str, Any]:
    """Every (size, batch size, threads) configuration once per round in a child process; the order of the
    configurations is shuffled within each round, so neither slow minutes nor a fixed position favour one.
    The 1-minute load average before each child is kept beside its result."""
    rng = np.random.default_rng(0)
    configs = [(f"{w}x{h}", b, t) for w, h in sizes for b in batch_sizes for t in threads]
    runs: dict[str, list[dict[str, Any]]] = {f"{s} batch {b} threads {t}": [] for s, b, t in configs}
    with tempfile.TemporaryDirectory(prefix="aeic-cpu-batching-") as tmp:
        streams = {f"{w}x{h}": encode_with_sender(model, Path(tmp), w, h, max(batch_sizes), rate)
                   for w, h in sizes}
        for _ in range(rounds):
            for index in rng.permutation(len(configs)):
                size, batch, thread_count = configs[index]
                env = {**os.environ, "OMP_NUM_THREADS": str(thread_count), "MKL_NUM_THREADS": str(thread_count)}
                command = [sys.executable, "-m", "benchmarks.receiver_bench", "--decode-child",
                           *map(str, streams[size][:batch]), "--threads", str(thread_count)]
                if model is not None:
                    command += ["--model", str(model)]
                load = os.getloadavg()[0]
                done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[f"{size} batch {batch} threads {thread_count}"].append({**result, "load_1min_before": load})
        stream_bytes = {size: [len(p.read_bytes()) for p in paths] for size, paths in streams.items()}
    summary = {}
    for (size, batch, thread_count), (name, results) in zip(configs, runs.items()):
        per_image = [r["s_per_image"] for r in results]
        summary[name] = {"size": size, "batch_size": batch, "torch_threads": thread_count,
                         "s_per_image_median": statistics.median(per_image), "s_per_image_min": min(per_image),
                         "s_per_image_max": max(per_image),
                         "peak_rss_mib_max": max(r["peak_rss_mib"] for r in results),
                         "load_1min_before": [round(r["load_1min_before"], 2) for r in results]}
    return {"device": "cpu", "rate_index": rate, "rounds": rounds, "stream_bytes": stream_bytes,
            "summary": summary, "runs": runs}


async def _client(base: str, token: str, stream: bytes, count: int, latencies: list[float],
                  accepted: list[str], errors: list[str]) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        for n in range(count):
            start = time.perf_counter()
            try:
                reply = await client.post("/v1/images", content=stream,
                                          headers={**headers, "Idempotency-Key": secrets.token_hex(16)})
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append((time.perf_counter() - start) * 1000.0)
            if reply.status_code == 202:
                accepted.append(reply.json()["id"])
            else:
                errors.append(f"HTTP {reply.status_code}: {reply.text[:200]}")


def _stored_ids(base: str, admin: str) -> set[str]:
    ids: set[str] = set()
    cursor = None
    with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {admin}"}) as client:
        while True:
            page = client.get("/v1/images", params={"limit": 200, **({"cursor": cursor} if cursor else {})}).json()
            ids |= {item["id"] for item in page["items"]}
            cursor = page["next"]
            if not cursor:
                return ids


def bench_load(model: Path | None, uploads: int, clients: int, rate: int) -> dict[str, Any]:
    """`uploads` POSTs from `clients` concurrent devices against a real server process (decoding off)."""
    from aeic.receiver.auth import create_device_token
    from aeic.receiver.storage import SqlMetadataStore
    from aeic.sender.encoder import SenderCodec

    from aeic.demo import free_port, receiver_process, wait_ready

    stream = SenderCodec.from_package(model).encode(synthetic_photo(768, 512), rate)
    with tempfile.TemporaryDirectory(prefix="aeic-bench-") as tmp:
        data = Path(tmp)
        store = SqlMetadataStore.from_url(f"sqlite:///{data / 'receiver.db'}")
        store.migrate()
        tokens = [create_device_token(store, f"bench-{n}") for n in range(clients)]
        store.close()
        admin, port = secrets.token_urlsafe(16), free_port()
        base = f"http://127.0.0.1:{port}"
        with receiver_process(data, model, port, admin, extra=["--no-worker"]) as process:
            with httpx.Client(base_url=base) as probe:
                wait_ready(probe, process, timeout=120)
            latencies: list[float] = []
            accepted: list[str] = []
            errors: list[str] = []
            per_client = [uploads // clients + (1 if n < uploads % clients else 0) for n in range(clients)]

            async def run_all() -> None:
                await asyncio.gather(*(_client(base, tokens[n], stream, per_client[n], latencies, accepted, errors)
                                       for n in range(clients)))

            start = time.perf_counter()
            asyncio.run(run_all())
            elapsed = time.perf_counter() - start
            stored = _stored_ids(base, admin)
        blobs = {p.stem for p in (data / "blobs" / "bitstreams").rglob("*.aeic")}
    lost = sorted(set(accepted) - (stored & blobs))
    return {"uploads": uploads, "clients": clients, "bitstream_bytes": len(stream), "accepted": len(accepted),
            "errors": len(errors), "error_examples": errors[:5], "lost": len(lost),
            "duplicates": len(accepted) - len(set(accepted)), "seconds": elapsed,
            "acceptance_rate_per_s": len(accepted) / elapsed, "latency_ms": _percentiles(latencies)}


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and write one JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model package (default: the shipped one)")
    parser.add_argument("--rate", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--cpu-batching", action="store_true",
                        help=f"only the CPU batching matrix (default --out {CPU_BATCHING_OUT})")
    parser.add_argument("--threads", default="1,2", help="--cpu-batching: torch thread counts")
    parser.add_argument("--rounds", type=int, default=3, help="--cpu-batching: interleaved rounds")
    parser.add_argument("--decode-child", nargs="*", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--uploads", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.decode_child is not None:
        print(json.dumps(decode_child(args.model, int(args.threads), args.decode_child)))
        return 0
    out = args.out or (CPU_BATCHING_OUT if args.cpu_batching else DEFAULT_OUT)
    from aeic.shared.model_package import ModelPackage

    package = ModelPackage.load(args.model)
    from .machine import machine_info

    report: dict[str, Any] = {"benchmark": "receiver", "machine": machine_info(),
                              "host": platform.node(), "python": platform.python_version(),
                              "cpu_count": os.cpu_count(), "model_name": package.name,
                              "model_id": package.model_id.hex(), "model_path": str(package.path),
                              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.cpu_batching:
        report["cpu_batching"] = bench_cpu_batching(args.model, [int(b) for b in args.batch_sizes.split(",")],
                                                    [int(t) for t in args.threads.split(",")], args.rounds,
                                                    args.rate)
        report["load_average_after"] = os.getloadavg()
    if not args.skip_decode and not args.cpu_batching:
        report["decode"] = bench_decode(args.model, args.repeats, [int(b) for b in args.batch_sizes.split(",")],
                                        args.rate)
    if not args.skip_load and not args.cpu_batching:
        report["load"] = bench_load(args.model, args.uploads, args.clients, args.rate)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
