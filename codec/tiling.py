"""Pixel decoding in tiles, so a large picture's memory stays bounded.

The pixel decoder is most of a receiver's memory: its last layers hold 64-channel float32 maps at
full and half resolution, about 0.55 KB per coded pixel (9.2 GB of a 4096x4096 decode's 10.9 GB). The
decoder latent it starts from (1/8, 32 channels) is small, so synthesis and the UNet still run whole
(the UNet's group norms and mid-block attention see the whole picture, as they do today) and only
the pixel decoder runs tile by tile: each tile's latent with a halo around it, keeping the core. A
batch is split by the same bound (as many whole pictures per pass as fit), so batching does not
multiply it.

For a pixel decoder made only of local layers (convolutions, pixel shuffles, upsampling, pointwise
activations: the internal one), a halo of its receptive radius makes every core exactly what the
whole decode computes there. TAEF2's decoder is local after its first blocks, whose group norms read
the whole picture at the latent's resolution: those run whole (64 channels at 1/8, small) and the rest
in exact tiles. With real TAEF2 weights, tiles of the whole decoder blended across 16 latent pixels
were 27.6 dB from the whole decode (8 levels mean error) on training photos, so the split matters.
Decoders with normalisation or attention throughout (the SD VAE) see other statistics per tile, so
they get :data:`APPROXIMATE_HALO` of context and their tiles are blended across it, as diffusers' VAE
tiling does: close to the whole decode, not equal, and no seams.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn

APPROXIMATE_HALO = 16  # latent pixels (128 output pixels) around a tile of a decoder that is not local
_POINTWISE = (nn.GELU, nn.ReLU, nn.SiLU, nn.Identity)


def receptive_radius(module: nn.Module) -> int | None:
    """How many latent pixels around an output pixel's own a stack of local layers reads, rounded up;
    ``None`` when ``module`` holds any other layer (its output may depend on the whole picture)."""
    radius, scale = 0.0, 1.0  # radius in latent pixels; scale: output pixels per latent pixel so far
    for layer in module if isinstance(module, nn.Sequential) else [module]:
        if isinstance(layer, nn.Conv2d):
            if layer.stride != (1, 1) or layer.dilation != (1, 1) or layer.groups != 1:
                return None
            radius += max(layer.kernel_size) // 2 / scale
        elif isinstance(layer, nn.PixelShuffle):
            scale *= layer.upscale_factor
        elif isinstance(layer, nn.Upsample) and layer.mode == "nearest" and layer.scale_factor is not None:
            scale *= float(layer.scale_factor)  # type: ignore[arg-type]  # a number once the check passed
        elif callable(local_radius := getattr(layer, "local_radius", None)):
            local = local_radius()  # a block that says what it reads (and keeps the resolution)
            if local is None:
                return None
            radius += local / scale
        elif not isinstance(layer, _POINTWISE):
            return None
    return math.ceil(radius)


def _keeps_resolution(layer: nn.Module) -> bool:
    """Whether a layer's output is at its input's resolution (so a head of such layers runs whole on the
    latent cheaply)."""
    if isinstance(layer, nn.Conv2d):
        return layer.stride == (1, 1)
    return isinstance(layer, _POINTWISE) or hasattr(layer, "local_radius")


def tile_plan(pixel_decoder: nn.Module | None) -> tuple[int, int, bool]:
    """``(split, halo, exact)``: the pixel decoder's first ``split`` layers run whole on the latent (they
    read the whole picture but keep its resolution), the rest in tiles with ``halo`` latent pixels of
    context, exact when that rest is local (its receptive radius), else blended (:data:`APPROXIMATE_HALO`)."""
    if pixel_decoder is None:
        return 0, APPROXIMATE_HALO, False
    radius = receptive_radius(pixel_decoder)
    if radius is not None:
        return 0, radius, True
    if isinstance(pixel_decoder, nn.Sequential):
        layers = list(pixel_decoder)
        for split in range(1, len(layers)):
            if not _keeps_resolution(layers[split - 1]):
                break
            radius = receptive_radius(nn.Sequential(*layers[split:]))
            if radius is not None:
                return split, radius, True
    return 0, APPROXIMATE_HALO, False


def _spans(length: int, tiles: int) -> list[tuple[int, int]]:
    """``length`` split into ``tiles`` near-equal spans."""
    edges = [length * i // tiles for i in range(tiles + 1)]
    return list(pairwise(edges))


def _ramp(size: int, start: int, stop: int, first: int, last: int, halo: int, like: torch.Tensor) -> torch.Tensor:
    """Blend weights along one axis of a tile decoded over [start, stop) (output pixels) whose core is
    [first, last): rising over 2 x ``halo`` pixels centred on an edge it shares with a neighbour, flat at
    the picture's border."""
    position = torch.arange(start, stop, dtype=like.dtype, device=like.device) + 0.5
    weight = torch.ones_like(position)
    if first > 0:
        weight = weight * ((position - (first - halo)) / (2 * halo)).clamp(0, 1)
    if last < size:
        weight = weight * (((last + halo) - position) / (2 * halo)).clamp(0, 1)
    return weight


def decode_in_tiles(
    decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, max_pixels: int, halo: int,
    exact: bool = True,
) -> torch.Tensor:
    """``decode(latent)`` (N, C, H, W) -> (N, 3, sH, sW) in passes of at most ``max_pixels`` latent
    pixels: the batch in one call when it has no more (as without tiling), else as many whole pictures
    per call as fit, and a picture over ``max_pixels`` alone, in tiles (:func:`_decode_tiled`)."""
    count, _, height, width = latent.shape
    if count * height * width <= max_pixels:
        return decode(latent)
    if height * width <= max_pixels:
        per_pass = max_pixels // (height * width)
        return torch.cat([decode(latent[first : first + per_pass]) for first in range(0, count, per_pass)])
    tiled = [_decode_tiled(decode, latent[i : i + 1], max_pixels, halo, exact) for i in range(count)]
    return tiled[0] if count == 1 else torch.cat(tiled)


def _decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, max_pixels: int, halo: int, exact: bool
) -> torch.Tensor:
    """One picture in tiles of at most ``max_pixels`` plus ``halo`` around them: each tile's core kept
    when ``exact``, else the tiles blended across their halos (a decoder that is not local sees other
    statistics per tile; blending leaves no edge where they meet)."""
    height, width = latent.shape[2:]
    side = max(1, math.isqrt(max_pixels))
    out: torch.Tensor | None = None
    total: torch.Tensor | None = None
    for top, bottom in _spans(height, -(-height // side)):
        for left, right in _spans(width, -(-width // side)):
            top_in, left_in = max(0, top - halo), max(0, left - halo)
            bottom_in, right_in = min(height, bottom + halo), min(width, right + halo)
            pixels = decode(latent[:, :, top_in:bottom_in, left_in:right_in])
            s = pixels.shape[-1] // (right_in - left_in)  # output pixels per latent pixel
            if out is None:
                out = pixels.new_zeros((*pixels.shape[:2], height * s, width * s))
                total = None if exact else pixels.new_zeros((height * s, width * s))
            if exact:
                core = pixels[:, :, (top - top_in) * s : (bottom - top_in) * s, (left - left_in) * s : (right - left_in) * s]
                out[:, :, top * s : bottom * s, left * s : right * s] = core
                continue
            assert total is not None  # made with out when not exact
            rows = _ramp(height * s, top_in * s, bottom_in * s, top * s, bottom * s, halo * s, pixels)
            cols = _ramp(width * s, left_in * s, right_in * s, left * s, right * s, halo * s, pixels)
            weight = rows[:, None] * cols[None, :]
            out[:, :, top_in * s : bottom_in * s, left_in * s : right_in * s] += pixels * weight
            total[top_in * s : bottom_in * s, left_in * s : right_in * s] += weight
    assert out is not None  # a latent over max_pixels has at least one tile
    return out if total is None else out / total
