"""Receiver memory by picture size and tile size, stage by stage, written as JSON.

Torch allocates outside tracemalloc's view, so each decode runs in a child process of its own and
reads its peak resident set (``VmHWM``), reset between the stages through ``/proc/self/clear_refs``:
entropy decoding, synthesis, the UNet, the pixel decoder (whole or in tiles) and the finish (crop,
quantise, scale back, colours). The pictures are a real photo (a centre square, or a 16:9 crop,
resized), coded whole; each tiled decode is compared with the whole one of the same stream.

Usage: python -m benchmarks.receiver_memory_bench [--photo JPG] [--model PKG] [--sizes 1920x1080,2048x2048]
       [--out benchmarks/results/receiver_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path("benchmarks/results/receiver_memory.json")
DEFAULT_PHOTO = Path(__file__).resolve().parents[2] / "shared/data/train/lomiri-wallpapers-20.04__Kleiber_by_Lukas_Baubkus.jpg"
WHOLE = 1 << 40  # a tile size no picture reaches: the decode as it was before tiling
UNBANDED = 1 << 40  # entropy unfold in one piece, as before it was made in row bands


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def child(stream_path: Path, tile_pixels: int, band_bytes: int, model: Path | None, out: Path) -> dict[str, Any]:
    """Decode one stream with each stage's peak RSS (MB): what the parent reads as JSON."""
    import torch
    from aeic.codec.torch_backend import TorchBackend
    from aeic.receiver import decoder as receiver_decoder

    torch.set_num_threads(os.cpu_count() or 1)
    codec = receiver_decoder.ReceiverCodec.from_package(model, device="cpu", tile_pixels=tile_pixels)
    codec.backend = TorchBackend(codec.device, band_bytes=band_bytes)
    stages: dict[str, dict[str, float]] = {}

    def staged(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            _reset_peak()
            before, start = _rss_kb("VmRSS"), time.perf_counter()
            result = function(*args, **kwargs)
            stages[name] = {"rss_before_mb": before / 1024, "peak_rss_mb": _rss_kb("VmHWM") / 1024,
                            "seconds": time.perf_counter() - start}
            return result
        return run

    data = stream_path.read_bytes()
    loaded = _rss_kb("VmRSS") / 1024  # torch and the model (no warm-up: it would double a 4096x4096 run)
    decoder = codec.model.decoder
    codec._latent = staged("entropy", codec._latent)  # type: ignore[method-assign]
    codec.model.synthesis.forward = staged("synthesis", codec.model.synthesis.forward)  # type: ignore[method-assign]
    decoder.refine = staged("unet", decoder.refine)  # type: ignore[method-assign]
    receiver_decoder.decode_in_tiles = staged("pixel_decoder", receiver_decoder.decode_in_tiles)
    codec._finish = staged("finish", codec._finish)  # type: ignore[method-assign]
    start = time.perf_counter()
    rgb = codec.decode(data)
    seconds = time.perf_counter() - start
    np.save(out, rgb)
    return {"seconds": seconds, "rss_loaded_mb": loaded, "stages": stages,
            "peak_rss_mb": max(stage["peak_rss_mb"] for stage in stages.values())}


def _run_child(stream: Path, tile_pixels: int, band_bytes: int, model: Path | None, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.receiver_memory_bench", "--child", str(stream),
               "--tile-pixels", str(tile_pixels), "--band-bytes", str(band_bytes), "--decoded", str(out)]
    done = subprocess.run(command + (["--model", str(model)] if model else []), capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _picture(photo: Path, width: int, height: int) -> np.ndarray:
    """The photo's centre crop of the picture's aspect ratio, resized (Lanczos) to ``width`` x ``height``."""
    from PIL import Image

    image = Image.open(photo).convert("RGB")
    scale = min(image.width / width, image.height / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    box = (left, top, left + crop_w, top + crop_h)
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS, box=box))


def compare(tiled: np.ndarray, whole: np.ndarray) -> dict[str, float | None]:
    """Max and mean absolute difference (8-bit levels) and PSNR of a tiled decode against the whole one."""
    difference = tiled.astype(np.float64) - whole.astype(np.float64)
    mse = float(np.mean(difference**2))
    return {"max_abs": float(np.abs(difference).max()), "mean_abs": float(np.abs(difference).mean()),
            "psnr_db": None if mse == 0 else float(10 * np.log10(255**2 / mse))}  # None: identical


def bench(photo: Path, model: Path | None, sizes: list[tuple[int, int]], tiles: list[int], rate: int,
          before: bool) -> list[dict[str, Any]]:
    """Per size: a whole decode (with the old unbanded entropy stage too when ``before``) and one per tile."""
    from aeic.sender.encoder import SenderCodec

    sender = SenderCodec.from_package(model, downscale=1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="aeic-memory-") as tmp:
        for width, height in sizes:
            stream = Path(tmp) / f"{width}x{height}.aeic"
            stream.write_bytes(sender.encode(_picture(photo, width, height), rate))
            runs = [("whole, unbanded entropy", WHOLE, UNBANDED)] if before else []
            runs += [("whole", WHOLE, 1 << 26)] + [(f"tiles of {tile}", tile, 1 << 26) for tile in tiles]
            whole: np.ndarray | None = None
            for label, tile, band in runs:
                decoded = Path(tmp) / "decoded.npy"
                result = _run_child(stream, tile, band, model, decoded)
                row = {"size": f"{width}x{height}", "bytes": stream.stat().st_size, "run": label,
                       "tile_pixels": None if tile == WHOLE else tile, **result}
                rgb = np.load(decoded)
                if label == "whole":
                    whole = rgb
                elif whole is not None:
                    row["against_whole"] = compare(rgb, whole)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "stages"}), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the measurements (or, with --child, one decode) and write one JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model package (default: the shipped one)")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    parser.add_argument("--sizes", default="1920x1080,2048x2048,4096x4096", help="coded sizes, WxH")
    parser.add_argument("--tiles", default="", help="tile sizes (padded coded pixels) besides the default")
    parser.add_argument("--rate", type=int, default=40)
    parser.add_argument("--before", action="store_true", help="also the decode as before (whole, unbanded)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tile-pixels", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--band-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--decoded", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tile_pixels, args.band_bytes, args.model, args.decoded)))
        return 0
    from aeic.shared.decode_limits import TILE_PIXELS
    from aeic.shared.model_package import ModelPackage

    from .machine import machine_info

    package = ModelPackage.load(args.model)
    sizes = [(int(w), int(h)) for w, h in (s.split("x") for s in args.sizes.split(","))]
    tiles = [TILE_PIXELS] + [int(t) for t in args.tiles.split(",") if t]
    report: dict[str, Any] = {"benchmark": "receiver_memory", "machine": machine_info(), "host": platform.node(),
                              "python": platform.python_version(), "cpu_count": os.cpu_count(),
                              "model_name": package.name, "model_id": package.model_id.hex(),
                              "photo": args.photo.name, "rate_index": args.rate,
                              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "runs": bench(args.photo, args.model, sizes, tiles, args.rate, args.before)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
