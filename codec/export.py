"""``aeic export``: a trained model -> a model package (ONNX sender, integer tables, receiver weights).

The sender's float graphs are split in two so the heavy analysis runs once per image whatever
the rate: ``analysis.onnx`` (image -> latent) and ``hyper.onnx`` (latent, gain -> scaled latent,
hyper-latent). The integer entropy model is exported as arrays, not ONNX: numpy runs it exactly.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from aeic.shared import model_package as pkg
from safetensors.torch import save_file
from torch import nn

from .model import AEICModel, receiver_state_dict

LEVELS_PER_RATE_STEP = 4
OPSET = 17


class _Hyper(nn.Module):
    def __init__(self, model: AEICModel) -> None:
        super().__init__()
        self.hyper_analysis = model.hyper_analysis

    def forward(self, latent: torch.Tensor, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = latent * gain[None, :, None, None]
        return scaled, self.hyper_analysis(scaled)


def level_positions(num_rates: int) -> np.ndarray:
    """Rate levels: the trained rate points and evenly spaced points between them."""
    return np.linspace(0, num_rates - 1, (num_rates - 1) * LEVELS_PER_RATE_STEP + 1)


def interpolated_log_gains(log_gains: np.ndarray, position: float) -> np.ndarray:
    low = min(math.floor(position), len(log_gains) - 2)
    frac = position - low
    return (1 - frac) * log_gains[low] + frac * log_gains[low + 1]


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
    channels = model.config.analysis.latent_channels
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        _export_onnx(model.analysis, (image,), out / "analysis.onnx", (["image"], ["latent"]),
                     {"image": {2: "height", 3: "width"}, "latent": {2: "h", 3: "w"}})
        _export_onnx(_Hyper(model), (torch.rand(1, channels, 4, 4), torch.ones(channels)), out / "hyper.onnx",
                     (["latent", "gain"], ["scaled", "z"]),
                     {"latent": {2: "h", 3: "w"}, "scaled": {2: "h", 3: "w"}, "z": {2: "hz", 3: "wz"}})
    positions = level_positions(model.config.num_rates)
    log_gains = model.log_gains.detach().double().numpy()
    gains = np.stack([np.exp(interpolated_log_gains(log_gains, p)) for p in positions]).astype(np.float32)
    arrays = pkg.entropy_model_to_arrays(model.entropy.export())
    arrays["levels.gains"] = gains
    np.savez(out / "entropy.npz", **arrays)
    receiver = {k: v.detach().half().contiguous() for k, v in receiver_state_dict(model.synthesis, model.decoder).items()}
    save_file(receiver, str(out / "receiver.safetensors"))
    _write_manifest(model, out, positions)
    return out


def _write_manifest(model: AEICModel, out: Path, positions: np.ndarray) -> None:
    rates = np.log(np.asarray(model.config.rates_bpp))
    manifest = {
        "format": pkg.FORMAT,
        "name": model.config.name,
        "profile": model.config.profile,
        "pixel_decoder": model.config.pixel_decoder,
        "config": model.config.to_dict(),
        "rate_levels": [
            {"index": i, "position": float(p), "nominal_bpp": float(np.exp(np.interp(p, np.arange(len(rates)), rates)))}
            for i, p in enumerate(positions)
        ],
        "files": {name: pkg.file_digest(out / name) for name in ("analysis.onnx", "hyper.onnx", "entropy.npz", "receiver.safetensors")},
    }
    manifest["model_id"] = pkg.compute_model_id(manifest).hex()
    (out / pkg.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def load_checkpoint_model(checkpoint: Path) -> AEICModel:
    """A model from a training checkpoint (its preset is recorded in the checkpoint)."""
    from .presets import preset

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = AEICModel(preset(state["preset"]))
    model.load_state_dict(state["model"])
    return model
