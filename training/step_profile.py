"""Where a training step's time goes: ``aeic-train CONFIG --profile N`` writes ``OUT/profile.json``.

A GPU run of this loop was host-bound (the GPU 10-25 % busy), so before spending device time the
question is how many tensor operations a step launches, how often the host waits for the GPU
(stream or device synchronisations, as ``.item()`` on a CUDA tensor causes), how busy the GPU is, and
which operations cost most on the host and on the device. The profiled steps are real steps of the
stage, but nothing is saved: the run's checkpoint is untouched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd.profiler_util import FunctionEventAvg
from torch.profiler import ProfilerActivity, profile

SYNCHRONISATIONS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
WARMUP_STEPS = 2  # the first steps allocate and pick kernels
TOP = 25


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(step: Callable[[], object], steps: int, device: torch.device) -> dict:
    """Run ``WARMUP_STEPS`` then ``steps`` steps under the profiler; a summary per step."""
    for _ in range(WARMUP_STEPS):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        _synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    everything = profiler.key_averages()
    events = [e for e in everything if e.key.startswith("aten::")]
    syncs = sum(e.count for e in everything if e.key in SYNCHRONISATIONS)
    device_ms = sum(e.self_device_time_total for e in events) / 1000 / steps
    top = sorted(events, key=lambda e: e.self_cpu_time_total + e.self_device_time_total, reverse=True)[:TOP]
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "seconds_per_step": round(seconds, 4),
        "aten_ops_per_step": round(sum(e.count for e in events) / steps, 1),
        "device_syncs_per_step": round(syncs / steps, 1) if device.type == "cuda" else None,
        "device_ms_per_step": round(device_ms, 2),
        "device_busy_fraction": round(device_ms / 1000 / seconds, 3) if device.type == "cuda" else None,
        "top": [_per_step(e, steps) for e in top],
    }


def _per_step(event: FunctionEventAvg, steps: int) -> dict:
    return {"op": event.key, "calls_per_step": round(event.count / steps, 1),
            "self_cpu_ms_per_step": round(event.self_cpu_time_total / 1000 / steps, 2),
            "self_device_ms_per_step": round(event.self_device_time_total / 1000 / steps, 2)}  # fmt: skip


def write_profile(step: Callable[[], object], steps: int, device: torch.device, out: Path, facts: dict) -> Path:
    """Profile and write ``out/profile.json`` with the run's ``facts`` (config, batch, crop)."""
    summary = {**facts, **profile_steps(step, steps, device)}
    path = out / "profile.json"
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path
