"""The full profile's decoder at SD-Turbo's real size (random weights): its work and memory at the pictures a
receiver decodes, written as JSON.

No SD-Turbo weights can be fetched here, but its shapes are public: the UNet and VAE below are built from
``stabilityai/sd-turbo``'s ``unet/config.json`` and ``vae/config.json`` (SD 2.1's architecture), then pruned,
widened and given LoRA adapters as :class:`~aeic.codec.full_profile.FullDecoder` does for a package.

* Work: multiply-accumulates of one UNet pass and one VAE decode, counted on the ``meta`` device
  (:mod:`benchmarks.macs`) at each padded coded size: nothing is computed or allocated.
* Memory: peak resident set above the loaded model (``VmHWM``, reset through ``/proc/self/clear_refs``) of a
  real float32 UNet pass and VAE decode on the CPU at two sizes, one thread; activation memory grows with
  the pixels (attention runs through torch's fused kernel, which holds no score matrix), so the line through
  the two peaks scales them to the others. A GPU holds the same tensors.
* Weights: the bytes the UNet's and the VAE's parameters and buffers take at each ``decoder_dtype`` (the
  receiver's setting), summed over the tensors once :meth:`~aeic.codec.full_profile.FullDecoder.set_dtype`
  has cast them (on the ``meta`` device: nothing is copied).

Usage: python -m benchmarks.full_decoder_bench [--out benchmarks/results/full_decoder.json]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .machine import proc_status_mb, write_result
from .macs import count_macs

# stabilityai/sd-turbo unet/config.json (the fields that set the shapes; the rest are diffusers' defaults)
SD_TURBO_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
# stabilityai/sd-turbo vae/config.json
SD_TURBO_VAE: dict[str, Any] = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
# padded coded sizes (multiples of 128): 1080p at the sender's automatic downscale, 1080p whole, a 12 MP
# photo (4032x3024) whole, the largest a receiver accepts
SIZES = {"960x540": (1024, 640), "1920x1080": (1920, 1152), "4032x3024": (4096, 3072), "4096x4096": (4096, 4096)}
MEASURED = ((512, 512), (1024, 1024))  # coded sizes decoded for real on the CPU


def _decoder() -> Any:
    from aeic.codec.full_profile import FullDecoder
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**SD_TURBO_UNET), AutoencoderKL(**SD_TURBO_VAE)
    return FullDecoder(unet, vae, num_rates=6).eval()


def _peak_mb(run: Callable[[], Any]) -> tuple[float, float]:
    """(MB the peak resident set rose by while ``run()`` ran, seconds)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = proc_status_mb("VmRSS")
    start = time.perf_counter()
    with torch.inference_mode():
        run()
    return proc_status_mb("VmHWM") - before, time.perf_counter() - start


def _bytes(module: torch.nn.Module) -> int:
    """What ``module``'s parameters and buffers hold, at their dtypes."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    decoder = _decoder()
    build_s = time.perf_counter() - start
    parameters = {name: sum(p.numel() for p in getattr(decoder, name).parameters()) for name in ("unet", "vae")}
    measured: list[dict[str, Any]] = []
    for width, height in MEASURED:
        latent = torch.randn(1, 4, height // 8, width // 8)
        unet_mb, unet_s = _peak_mb(partial(decoder.refine, latent, latent, torch.tensor([2])))
        vae_mb, vae_s = _peak_mb(partial(decoder.decode_pixels, latent))
        measured.append({"coded": f"{width}x{height}", "unet_peak_mb": unet_mb, "unet_s": unet_s,
                         "vae_peak_mb": vae_mb, "vae_s": vae_s})
    (small, large), (small_px, large_px) = measured, [width * height for width, height in MEASURED]
    per_pixel = {part: (large[f"{part}_peak_mb"] - small[f"{part}_peak_mb"]) / (large_px - small_px)
                 for part in ("unet", "vae")}  # MB per coded pixel: the slope, without the fixed part

    def scaled_gb(part: str, pixels: int) -> float:
        return (small[f"{part}_peak_mb"] + per_pixel[part] * (pixels - small_px)) / 1024
    decoder = decoder.to("meta")
    sizes = {}
    for name, (width, height) in SIZES.items():
        latent = torch.zeros(1, 4, height // 8, width // 8, device="meta")
        rate = torch.tensor([2], device="meta")
        unet = count_macs(partial(decoder.refine, latent, latent, rate))
        vae = count_macs(partial(decoder.decode_pixels, latent))
        sizes[name] = {"padded_coded": f"{width}x{height}", "unet_gmacs": unet["total"] / 1e9,
                       "unet_attention_gmacs": unet["attention_products"] / 1e9, "vae_gmacs": vae["total"] / 1e9,
                       "unet_peak_gb_scaled": scaled_gb("unet", width * height),
                       "vae_whole_peak_gb_scaled": scaled_gb("vae", width * height)}
    weights = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        decoder.set_dtype(dtype)
        weights[str(dtype).removeprefix("torch.")] = {name: _bytes(getattr(decoder, name)) for name in ("unet", "vae")}
    tile = (1536 + 2 * 128) ** 2  # the VAE's largest pass: decode_limits.TILE_PIXELS with its halo (16 latent pixels)
    result = {"parameters": parameters, "weights_bytes": weights, "build_s": build_s, "threads": 1, "measured_float32_cpu": measured,
              "per_coded_pixel_kb": {part: mb * 1024 for part, mb in per_pixel.items()},
              "vae_default_tile_peak_gb_scaled": scaled_gb("vae", tile), "sizes": sizes}
    print(write_result("full_decoder", result, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
