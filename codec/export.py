"""``aeic export``: a trained model -> a model package (ONNX sender, integer tables, receiver weights).

The sender's float graphs are split so the heavy analysis runs once per image whatever the rate
(``hyper.onnx``: latent, gain -> scaled latent, hyper-latent) and so the analysis fits a small
memory: ``analysis_stem.onnx`` (image -> features at 1/4, the first stages, where activations are
largest) runs in horizontal strips with a halo recorded in the manifest, ``analysis_trunk.onnx``
(features -> latent) on the whole image. The integer entropy model is exported as arrays, not
ONNX: numpy runs it exactly.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from aeic.shared import model_package as pkg
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.nn import functional as F

from .analysis import BAND, AnalysisConfig, AnalysisTransform, StarBlock
from .model import AEICModel, receiver_state_dict
from .rate_levels import level_gains, level_positions, rate_level_entries

OPSET = 17
STEM_STAGES = 2  # stages 1-2 (1/2 and 1/4 resolution) hold most of the analysis' activation memory
RECEIVER_FILE = "receiver.safetensors"
SENDER_FILES = tuple(name for name in pkg.PACKAGE_FILES if name != RECEIVER_FILE)


class _Hyper(nn.Module):
    def __init__(self, model: AEICModel) -> None:
        super().__init__()
        self.hyper_analysis = model.hyper_analysis

    def forward(self, latent: torch.Tensor, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = latent * gain[None, :, None, None]
        return scaled, self.hyper_analysis(scaled)


class _LeanStarBlock(nn.Module):
    """A star block's function with its expansion as two convolutions (gate, value).

    The single expansion followed by a split makes onnxruntime hold the 4x-wide tensor and both
    halves at once; two convolutions never materialise the wide tensor (about a fifth less peak
    memory in the stem, a third in the trunk, same outputs).
    """

    def __init__(self, block: StarBlock) -> None:
        super().__init__()
        hidden = block.project.in_channels
        self.mix, self.norm, self.project = block.mix, block.norm, block.project
        self.gate, self.value = (nn.Conv2d(block.expand.in_channels, hidden, 1) for _ in range(2))
        with torch.no_grad():
            for conv, part in ((self.gate, slice(0, hidden)), (self.value, slice(hidden, 2 * hidden))):
                assert conv.bias is not None and block.expand.bias is not None  # both made with a bias
                conv.weight.copy_(block.expand.weight[part])
                conv.bias.copy_(block.expand.bias[part])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.norm(self.mix(x))
        return x + self.project(F.gelu(self.gate(mixed)) * self.value(mixed))


def split_analysis(analysis: AnalysisTransform, config: AnalysisConfig,
                   stem_stages: int = STEM_STAGES) -> tuple[nn.Sequential, nn.Sequential]:
    """The first ``stem_stages`` stages and the rest (each stage: conv, unshuffle, star blocks)."""
    per_stage = 2 + config.blocks_per_stage
    layers = [_LeanStarBlock(layer) if isinstance(layer, StarBlock) else layer for layer in analysis.stages]
    return nn.Sequential(*layers[: stem_stages * per_stage]), nn.Sequential(*layers[stem_stages * per_stage :])


def stem_tiling(config: AnalysisConfig, stem_stages: int = STEM_STAGES) -> dict[str, int]:
    """Downsampling factor of the stem and the halo (input rows) a strip needs on each side.

    A stage at input scale ``s`` reaches ``s`` rows with its 3x3 convolution and, per star block,
    ``2 s * BAND // 2`` rows with the depthwise band (after the unshuffle). The halo is that
    reach rounded up to a multiple of the factor, so every strip starts on an unshuffle phase and
    the strip's interior is computed exactly as in the whole image (up to float rounding).
    """
    factor = 2**stem_stages
    reach = sum(2**s * (1 + 2 * config.blocks_per_stage * (BAND // 2)) for s in range(stem_stages))
    return {"factor": factor, "halo": -(-reach // factor) * factor}


def _export_onnx(module: nn.Module, inputs: tuple, path: Path, names: tuple[list[str], list[str]], axes: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, inputs, str(path), input_names=names[0], output_names=names[1],
            dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )


def export_package(model: AEICModel, out: Path) -> Path:
    """Write a complete, verified model package for ``model`` into ``out``."""
    model = model.eval().cpu()
    out.mkdir(parents=True, exist_ok=True)
    _export_sender_graphs(model, out)
    positions = level_positions(model.config.num_rates)
    # Any: numpy's stub of savez would read **arrays of ndarray values as a possible allow_pickle=
    arrays: dict[str, Any] = pkg.entropy_model_to_arrays(model.entropy.export())
    arrays["levels.gains"] = level_gains(model.log_gains.detach().double().numpy(), positions)
    np.savez(out / "entropy.npz", **arrays)
    receiver = {k: v.detach().half().contiguous() for k, v in receiver_state_dict(model.synthesis, model.decoder).items()}
    _save_receiver_weights(receiver, out / RECEIVER_FILE)
    _write_manifest(model, out, positions)
    return out


def _export_sender_graphs(model: AEICModel, out: Path) -> None:
    """The sender's ONNX graphs: the analysis (stem and trunk) and the hyper-analysis."""
    channels = model.config.analysis.latent_channels
    stem, trunk = split_analysis(model.analysis, model.config.analysis)
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        features = stem(image)
        _export_onnx(stem, (image,), out / "analysis_stem.onnx", (["image"], ["features"]),
                     {"image": {2: "height", 3: "width"}, "features": {2: "hf", 3: "wf"}})
        _export_onnx(trunk, (features,), out / "analysis_trunk.onnx", (["features"], ["latent"]),
                     {"features": {2: "hf", 3: "wf"}, "latent": {2: "h", 3: "w"}})
        _export_onnx(_Hyper(model), (torch.rand(1, channels, 4, 4), torch.ones(channels)), out / "hyper.onnx",
                     (["latent", "gain"], ["scaled", "z"]),
                     {"latent": {2: "h", 3: "w"}, "scaled": {2: "h", 3: "w"}, "z": {2: "hz", 3: "wz"}})


def _save_receiver_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Written as bytes, not with ``save_file``: that creates its file owner-only (0600), and a package
    is read by a receiver that may run as another user (a container)."""
    path.write_bytes(safetensors_bytes(tensors))


def _write_manifest(model: AEICModel, out: Path, positions: np.ndarray) -> None:
    manifest = {
        "format": pkg.FORMAT,
        "name": model.config.name,
        "profile": model.config.profile,
        "pixel_decoder": model.config.pixel_decoder,
        "config": model.config.to_dict(),
        "rate_levels": rate_level_entries(list(model.config.rates_bpp), positions),
        "analysis_tiling": stem_tiling(model.config.analysis),
    }
    pkg.write_manifest(out, manifest)


class ReceiverHalf(Protocol):
    """A model with the receiver's modules: ``AEICModel``, or the receiver's ``ReceiverModel``."""

    @property
    def synthesis(self) -> nn.Module: ...

    @property
    def decoder(self) -> nn.Module: ...


def export_receiver_update(package: Path, receiver: ReceiverHalf, out: Path) -> Path:
    """A package with ``package``'s sender files byte for byte and ``receiver``'s new weights.

    A decoder-only fine-tune changes what the receiver draws, never what the sender codes, so
    rates and bitstream sizes stay exactly those of ``package``; the model id still changes.
    """
    state = receiver_state_dict(receiver.synthesis, receiver.decoder)
    return write_receiver_update(package, {k: v.detach().cpu().half().contiguous() for k, v in state.items()}, out)


def export_sender_update(package: Path, model: AEICModel, out: Path) -> Path:
    """A package with ``model``'s analysis and hyper-analysis and ``package``'s entropy tables, gains,
    rate levels and receiver byte for byte: what an ``encoder``-stage fine-tune changes, and only that
    (a round trip through the trainable model would re-derive the tables, not keep them)."""
    out.mkdir(parents=True, exist_ok=True)
    _export_sender_graphs(model.eval().cpu(), out)
    for name in ("entropy.npz", RECEIVER_FILE):
        shutil.copyfile(package / name, out / name)
    pkg.write_manifest(out, json.loads((package / pkg.MANIFEST).read_text()))
    return out


def write_receiver_update(package: Path, tensors: dict[str, torch.Tensor], out: Path) -> Path:
    """``package``'s sender files byte for byte, ``tensors`` as its receiver weights, the manifest resealed."""
    out.mkdir(parents=True, exist_ok=True)
    for name in SENDER_FILES:
        shutil.copyfile(package / name, out / name)
    _save_receiver_weights(tensors, out / RECEIVER_FILE)
    pkg.write_manifest(out, json.loads((package / pkg.MANIFEST).read_text()))
    return out
