"""Receiver benchmarks, written as JSON (issue 6).

* decode latency per image at 768x512 and 1920x1080 (CPU here, CUDA when present),
* decode throughput with batching versus batch size 1,
* a bounded load test on loopback: N uploads from C concurrent clients (one device token each) against a
  real `aeic-receiver serve` process, with errors, latency percentiles, the acceptance rate, and a loss
  check (every accepted id is stored with its bitstream).

Usage: python -m benchmarks.receiver_bench [--model PKG] [--out benchmarks/results/receiver.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

DEFAULT_OUT = Path("benchmarks/results/receiver.json")  # the file run_all and the table read
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
    parser.add_argument("--uploads", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from aeic.shared.model_package import ModelPackage

    package = ModelPackage.load(args.model)
    from .machine import machine_info

    report: dict[str, Any] = {"benchmark": "receiver", "machine": machine_info(),
                              "host": platform.node(), "python": platform.python_version(),
                              "cpu_count": os.cpu_count(), "model_name": package.name,
                              "model_id": package.model_id.hex(), "model_path": str(package.path),
                              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not args.skip_decode:
        report["decode"] = bench_decode(args.model, args.repeats, [int(b) for b in args.batch_sizes.split(",")],
                                        args.rate)
    if not args.skip_load:
        report["load"] = bench_load(args.model, args.uploads, args.clients, args.rate)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
