"""A reference build of the paper's AEIC-SE sender path, the baseline of ``sender_bench``.

What the paper's sender computes, in float, with random weights: the same shallow SE analysis
transform as ours; a float hyperprior (hyper-analysis: conv + pixel-unshuffle, two star blocks,
conv + pixel-unshuffle to M/2 = 128 channels at 1/128; hyper-synthesis mirroring it back to M =
256 channels at 1/32); and the float 4-step spatial-channel context model: per step an input
adapter (M -> 512: 1x1, GELU, 5x5 depthwise, GELU, 1x1, plus a 1x1 shortcut), a shared context
trunk of depth 3 at 512 channels (each level an inception depthwise MLP block and a gated conv
block with LayerNorm) and an output adapter (512 -> 2M: means and scales). The whole graph (image
-> symbols, scales, hyper-latent) is one ONNX file that onnxruntime runs with default settings;
numpy maps the float scales onto the 64-scale table and constriction codes the symbols (the
shared :mod:`aeic.shared.entropy_coding`), then the container is packed.

Random weights give meaningless latent statistics (huge symbols would send most values through
the rANS escape path). Three scalar gains (latent, means, scales) are therefore calibrated once
on a photo so that symbols look like an ultra-low-rate model's (mostly 0, rare escapes). They
are multiplications by constants: the computation measured is unchanged.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from aeic.codec.analysis import SE, AnalysisTransform, ChannelsLastLayerNorm, InceptionDepthwise, StarBlock
from aeic.shared import bitstream
from aeic.shared.entropy_coding import (
    SymbolEncoder,
    discretized_gaussian_pmf,
    factorized_tables,
    gaussian_scale_table,
)
from aeic.shared.entropy_model import NUM_SCALES, SCALE_MAX, SCALE_MIN, scale_table, step_masks
from aeic.shared.padding import colour_statistics, pad_to_multiple
from torch import nn
from torch.nn import functional as F

LATENT = 256  # M of AEIC-SE
CONTEXT_WIDTH = 2 * LATENT  # the paper's context dimension for SE
CONTEXT_DEPTH = 3
ALIGNMENT = 128
MODEL_ID = b"REF0"
_LOG_STEP = math.log(SCALE_MAX / SCALE_MIN) / (NUM_SCALES - 1)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout // 4, 3, padding=1), nn.PixelUnshuffle(2))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout * 4, 3, padding=1), nn.PixelShuffle(2))


class Adapter(nn.Module):
    """1x1 / 5x5 depthwise / 1x1 branch plus a 1x1 shortcut: changes the channel count."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = (cin + cout) // 2
        self.body = nn.Sequential(nn.Conv2d(cin, mid, 1), nn.GELU(), nn.Conv2d(mid, mid, 5, padding=2, groups=mid),
                                  nn.GELU(), nn.Conv2d(mid, cout, 1))
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class InceptionMLP(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = InceptionDepthwise(channels)
        self.mlp = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.GELU(), nn.Conv2d(2 * channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.mix(x))


class GatedConv(nn.Module):
    def __init__(self, channels: int, expansion: int = 2) -> None:
        super().__init__()
        hidden = expansion * channels
        self.norm = ChannelsLastLayerNorm(channels)
        self.expand = nn.Conv2d(channels, 2 * hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.expand(self.norm(x)).chunk(2, dim=1)
        return x + self.project(F.gelu(gate) * self.depthwise(value))


class ReferenceSender(nn.Module):
    """Image (1, 3, H, W) in [0, 1], step masks (4, M, H/32, W/32) -> (symbols, scales, z_hat)."""

    gains: torch.Tensor  # a buffer

    def __init__(self) -> None:
        super().__init__()
        half = LATENT // 2
        self.analysis = AnalysisTransform(SE)
        self.hyper_analysis = nn.Sequential(_down(LATENT, half), StarBlock(half), StarBlock(half), _down(half, half))
        self.hyper_synthesis = nn.Sequential(_up(half, half), StarBlock(half), StarBlock(half), _up(half, LATENT))
        self.adapters_in = nn.ModuleList(Adapter(LATENT, CONTEXT_WIDTH) for _ in range(4))
        self.context = nn.Sequential(*[m for _ in range(CONTEXT_DEPTH)
                                       for m in (InceptionMLP(CONTEXT_WIDTH), GatedConv(CONTEXT_WIDTH))])
        self.adapters_out = nn.ModuleList(Adapter(CONTEXT_WIDTH, 2 * LATENT) for _ in range(4))
        self.register_buffer("gains", torch.ones(3))  # latent, means, scales (see the module docstring)

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = self.analysis(image) * self.gains[0]
        z_hat = torch.round(self.hyper_analysis(y))
        base = self.hyper_synthesis(z_hat)
        symbols = torch.zeros_like(y)
        scales = torch.zeros_like(y)
        for step in range(4):
            mask = masks[step][None]
            means, raw_scales = self.adapters_out[step](self.context(self.adapters_in[step](base))).chunk(2, 1)
            means = means * self.gains[1]
            q = torch.round(y - means)
            symbols = symbols + mask * q
            scales = scales + mask * raw_scales * self.gains[2]
            base = base * (1 - mask) + mask * (q + means)
        return symbols, scales, z_hat


def _masks(height: int, width: int) -> torch.Tensor:
    return torch.from_numpy(step_masks(LATENT, height // 32, width // 32).astype(np.float32))


def _image_tensor(rgb: np.ndarray) -> torch.Tensor:
    padded = pad_to_multiple(rgb, ALIGNMENT)
    return torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0)


@torch.no_grad()
def calibrate(model: ReferenceSender, rgb: np.ndarray) -> None:
    """Set the three gains: latent std 0.25, mean std 0.1, median scale 0.3 on this photo."""
    image = _image_tensor(rgb)
    model.gains.fill_(1.0)
    y = model.analysis(image)
    model.gains[0] = 0.25 / y.std().clamp_min(1e-6)
    model.gains[1] = 0.0  # measure raw outputs first
    model.gains[2] = 1.0
    _, scales, _ = model(image, _masks(*image.shape[2:]))
    means_raw = model.adapters_out[0](model.context(model.adapters_in[0](
        model.hyper_synthesis(torch.round(model.hyper_analysis(y * model.gains[0]))))))[:, :LATENT]
    model.gains[1] = 0.1 / means_raw.std().clamp_min(1e-6)
    model.gains[2] = 0.3 / scales.abs().median().clamp_min(1e-6)


def build(rgb_for_calibration: np.ndarray, seed: int = 0) -> ReferenceSender:
    torch.manual_seed(seed)
    model = ReferenceSender().eval()
    calibrate(model, rgb_for_calibration)
    return model


def export(model: ReferenceSender, path: Path) -> Path:
    """ONNX with dynamic image size (opset 17)."""
    image = torch.rand(1, 3, 256, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (image, _masks(256, 256)), str(path), input_names=["image", "masks"],
                          output_names=["symbols", "scales", "z_hat"], opset_version=17, dynamo=False,
                          dynamic_axes={"image": {2: "H", 3: "W"}, "masks": {2: "h", 3: "w"},
                                        "symbols": {2: "h", 3: "w"}, "scales": {2: "h", 3: "w"},
                                        "z_hat": {2: "hz", 3: "wz"}})
    return path


class ReferenceCodec:
    """Runs the exported reference in onnxruntime (default session settings) and codes its output."""

    def __init__(self, onnx_path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.y_tables = gaussian_scale_table(scale_table())
        self.z_tables = factorized_tables([discretized_gaussian_pmf(1.0, 6)] * (LATENT // 2), [6] * (LATENT // 2))

    def encode(self, rgb: np.ndarray) -> bytes:
        padded = pad_to_multiple(rgb, ALIGNMENT)
        image = np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32) / np.float32(255.0)
        masks = step_masks(LATENT, padded.shape[0] // 32, padded.shape[1] // 32)
        symbols, scales, z_hat = self.session.run(None, {"image": image, "masks": masks.astype(np.float32)})
        encoder = SymbolEncoder()
        z = z_hat[0].astype(np.int64)
        encoder.add(z, np.broadcast_to(np.arange(z.shape[0])[:, None, None], z.shape), self.z_tables)
        indices = np.clip(np.rint((np.log(np.maximum(np.abs(scales[0]), 1e-5)) - math.log(SCALE_MIN)) / _LOG_STEP),
                          0, NUM_SCALES - 1).astype(np.int64)
        values = symbols[0].astype(np.int64)
        for mask in masks:
            encoder.add(values[mask], indices[mask], self.y_tables)
        header = bitstream.Header(model_id=MODEL_ID, width=rgb.shape[1], height=rgb.shape[0], rate_index=0,
                                  colour_stats=colour_statistics(rgb))
        return bitstream.pack(bitstream.Bitstream(header, encoder.finish()))


def parameters() -> dict[str, int]:
    model = ReferenceSender()

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {"analysis": count(model.analysis), "hyper_analysis": count(model.hyper_analysis),
            "hyper_synthesis": count(model.hyper_synthesis),
            "context": count(model.adapters_in) + count(model.context) + count(model.adapters_out),
            "total": count(model)}
