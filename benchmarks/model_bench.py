"""Model cost: parameters and MACs per pixel of every AEIC part, the heavy encoder the paper argues
against, and the sender path's latency in onnxruntime on this CPU.

* Counts (``benchmarks.macs`` says what a MAC is here) run on torch's ``meta`` device: shapes
  only, no arithmetic, so they are exact and instant at any size. MACs per pixel are per pixel
  of the input image (``--count-size``, default 512x512; every AEIC part is convolutional, so
  its count per pixel does not depend on the size).
* Heavy encoder: the encoder of diffusers' ``AutoencoderKL`` with Stable Diffusion's VAE
  configuration (4 blocks of 128/256/512/512 channels, 2 layers each, mid-block attention;
  ``AutoencoderKL()`` with no arguments is a one-block toy, also listed), random weights; its
  encode time and peak RSS are measured once in a child process (``--heavy-size``: default
  768x512 so that ``make bench`` stays short; 1920x1080 took about 15 minutes and 6 GB on the
  shared 2-core machine, see ``results/heavy_encoder_1080p.json``). Its mid-block attention makes
  MACs per pixel grow with the size, so the counts are taken at the timed size.
* Sender path: a random-weight ``nano-se`` package exported with ``aeic.codec.export`` and run
  by ``aeic.sender.encoder.SenderCodec`` (or ``--package`` for a trained one), split into the
  analysis, the hyper-analysis and the integer entropy model with rANS and the container, at the
  full size (coding downscale 1; the sender's default ``auto`` would code 1080p at half size).

Usage: python -m benchmarks.model_bench [--count-size 512x512] [--heavy-size 768x512|1920x1080|none]
       [--sender-sizes 768x512,1920x1080] [--repeats 3] [--package DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .full_decoder_bench import SD_TURBO_VAE
from .images import photo
from .machine import write_result
from .macs import count_macs

if TYPE_CHECKING:
    from aeic.sender.encoder import SenderCodec


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def _entry(module: nn.Module, run: Callable[[], Any], pixels: int) -> dict[str, Any]:
    macs = count_macs(run)
    parameters = sum(p.numel() for p in module.parameters())
    return {"parameters": parameters, "macs_per_pixel": macs["total"] / pixels, "macs": macs}


def aeic_parts(preset_name: str, width: int, height: int) -> dict[str, Any]:
    """Parameters and MACs per image pixel of each part of an ``AEICModel`` preset."""
    from aeic.codec import taesd
    from aeic.codec.diffusion_decoder import InternalPixelDecoder
    from aeic.codec.model import AEICModel
    from aeic.codec.presets import preset

    pixels = width * height
    with torch.device("meta"):
        model = AEICModel(preset(preset_name)).eval()
        channels = model.config.analysis.latent_channels
        image = torch.zeros(1, 3, height, width)
        y = torch.zeros(1, channels, height // 32, width // 32)
        z = torch.zeros(1, model.config.z_channels, height // 128, width // 128)
        unet_in = torch.zeros(1, model.config.decoder.latent_channels + model.config.decoder.noise_channels,
                              height // 8, width // 8)
        pixel_decoder = taesd.build_decoder().eval()
        internal = InternalPixelDecoder(model.config.decoder.latent_channels,
                                        model.config.decoder.internal_pixel_width).eval()
        decoder_latent = torch.zeros(1, model.config.decoder.latent_channels, height // 8, width // 8)

        features = torch.zeros(1, model.config.hyper_features, height // 32, width // 32)

        def context() -> None:  # what the integer model runs: each of the 4 steps at full latent size
            for step in model.entropy.context:
                step(torch.cat([features, y], 1))

        return {
            "analysis": _entry(model.analysis, lambda: model.analysis(image), pixels),
            "hyper_analysis": _entry(model.hyper_analysis, lambda: model.hyper_analysis(y), pixels),
            "hyper_synthesis": _entry(model.entropy.hyper_synthesis, lambda: model.entropy.hyper_synthesis(z), pixels),
            "context_model": _entry(model.entropy.context, context, pixels),
            "synthesis": _entry(model.synthesis, lambda: model.synthesis(y), pixels),
            "unet": _entry(model.decoder.unet, lambda: model.decoder.unet(unet_in, torch.tensor([0.0])), pixels),
            "pixel_decoder_taef2": _entry(pixel_decoder, lambda: pixel_decoder(decoder_latent), pixels),
            "pixel_decoder_internal": _entry(internal, lambda: internal(decoder_latent), pixels),
        }


def heavy_encoder_counts(width: int, height: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    result = {}
    for name, config in (("sd_vae", SD_TURBO_VAE), ("diffusers_default", {})):
        with torch.device("meta"):
            vae = AutoencoderKL(**config).eval()
            image = torch.zeros(1, 3, height, width)
            encoder = nn.ModuleList([vae.encoder, vae.quant_conv])
            result[name] = _entry(encoder, partial(vae.encode, image), width * height)
            result[name]["count_size"] = f"{width}x{height}"
    return result


def _heavy_child(width: int, height: int) -> None:
    """In a child process: one SD-VAE encode at ``width x height``; prints seconds and peak RSS."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_TURBO_VAE).eval()
    image = torch.from_numpy(photo(width, height).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        start, cpu = time.perf_counter(), time.process_time()
        latent = vae.encode(image).latent_dist.mode()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak / 2**20, "latent_shape": list(latent.shape),
                      "torch_threads": torch.get_num_threads()}))


def heavy_encoder_timing(width: int, height: int, timeout: float) -> dict[str, Any]:
    """Run the child; on failure (memory, time) report why instead of a number."""
    command = [sys.executable, "-m", "benchmarks.model_bench", "--heavy-child", f"{width}x{height}"]
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"size": f"{width}x{height}", "error": f"did not finish within {timeout:.0f} s"}
    if done.returncode != 0:
        return {"size": f"{width}x{height}", "error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return {"size": f"{width}x{height}", **json.loads(done.stdout.strip().splitlines()[-1])}


def _random_package(directory: Path) -> Path:
    from aeic.codec.export import export_package
    from aeic.codec.model import AEICModel
    from aeic.codec.presets import preset

    torch.manual_seed(0)
    return export_package(AEICModel(preset("nano-se")), directory)


def _sender_split(codec: SenderCodec, rgb: np.ndarray, level: int) -> dict[str, float]:
    from aeic.shared import bitstream
    from aeic.shared.padding import colour_statistics

    t0 = time.perf_counter()
    analysed = codec.analyse(rgb)
    t1 = time.perf_counter()
    scaled, z = codec.hyper.run(["scaled", "z"], {"latent": analysed.latent, "gain": codec.package.level_gains[level]})
    t2 = time.perf_counter()
    payload, _ = codec.package.entropy_model.encode(scaled[0], z[0])
    header = bitstream.Header(model_id=codec.model_id, width=rgb.shape[1], height=rgb.shape[0],
                              rate_index=level, colour_stats=colour_statistics(rgb))
    stream = bitstream.pack(bitstream.Bitstream(header, payload))
    t3 = time.perf_counter()
    return {"analysis_ms": (t1 - t0) * 1e3, "hyper_ms": (t2 - t1) * 1e3, "entropy_rans_ms": (t3 - t2) * 1e3,
            "total_ms": (t3 - t0) * 1e3, "bytes": len(stream)}


def sender_latency(package: Path | None, sizes: list[tuple[int, int]], repeats: int, bpp: float) -> dict[str, Any]:
    from aeic.sender.encoder import SenderCodec

    with tempfile.TemporaryDirectory(prefix="aeic-model-bench-") as tmp:
        path = package or _random_package(Path(tmp))
        codec = SenderCodec.from_package(path, downscale=1)  # the transforms at the full size, not auto-reduced
        level = codec.package.level_for_bpp(bpp)
        result: dict[str, Any] = {"package": str(package) if package else "random-weight nano-se (export_package)",
                                  "provider": codec.provider, "rate_level": level,
                                  "nominal_bpp": codec.package.rates[level], "downscale": 1, "sizes": {}}
        for width, height in sizes:
            rgb = photo(width, height)
            _sender_split(codec, rgb, level)  # warm-up
            runs = [_sender_split(codec, rgb, level) for _ in range(repeats)]
            result["sizes"][f"{width}x{height}"] = {
                key: statistics.median(r[key] for r in runs) for key in runs[0]} | {"repeats": repeats}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="parameters, MACs per pixel and sender latency")
    parser.add_argument("--count-size", default="512x512")
    parser.add_argument("--heavy-size", default="768x512", help="'none' skips the timing; 1920x1080 takes ~15 min here")
    parser.add_argument("--heavy-timeout", type=float, default=420.0)
    parser.add_argument("--sender-sizes", default="768x512,1920x1080", help="'none' skips the sender latency")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bpp", type=float, default=0.02, help="nominal bpp of the sender path's rate level")
    parser.add_argument("--package", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--heavy-only", default=None, metavar="WxH",
                        help="only time the SD-VAE encoder at this size (results/heavy_encoder_<H>p.json)")
    parser.add_argument("--heavy-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.heavy_child:
        _heavy_child(*parse_size(args.heavy_child))
        return 0
    if args.heavy_only:
        size = parse_size(args.heavy_only)
        heavy = heavy_encoder_counts(*size)["sd_vae"] | {"encode": heavy_encoder_timing(*size, args.heavy_timeout)}
        print(write_result(f"heavy_encoder_{size[1]}p", {"sd_vae": heavy}, args.out))
        return 0
    width, height = parse_size(args.count_size)
    result: dict[str, Any] = {
        "count_size": args.count_size,
        "macs_counted": "Conv2d/ConvTranspose2d/Linear and attention products; see benchmarks/macs.py",
        "parts": {name: aeic_parts(name, width, height) for name in ("nano-se", "nano-me")},
    }
    heavy_size = None if args.heavy_size == "none" else parse_size(args.heavy_size)
    result["heavy_encoder"] = heavy_encoder_counts(*(heavy_size or (width, height)))
    if heavy_size:
        result["heavy_encoder"]["sd_vae"]["encode"] = heavy_encoder_timing(*heavy_size, args.heavy_timeout)
    if args.sender_sizes != "none":
        sizes = [parse_size(s) for s in args.sender_sizes.split(",")]
        result["sender_latency"] = sender_latency(args.package, sizes, args.repeats, args.bpp)
    path = write_result("model", result, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
