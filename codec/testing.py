"""Tiny random-weight model packages for tests: complete and real, just untrained and fast."""

from __future__ import annotations

from pathlib import Path

import torch

from .export import export_package
from .model import AEICModel
from .presets import preset


def make_tiny_model(name: str = "tiny-se", seed: int = 0) -> AEICModel:
    torch.manual_seed(seed)
    model = AEICModel(preset(name))
    with torch.no_grad():  # spread the gains so the rate levels really differ in size
        model.log_gains.copy_(torch.linspace(1.0, 4.0, model.config.num_rates)[:, None].expand_as(model.log_gains))
    return model.eval()


def make_tiny_package(directory: Path, name: str = "tiny-se", seed: int = 0) -> Path:
    """Export a tiny random model (internal pixel decoder, no external weights) into ``directory``."""
    return export_package(make_tiny_model(name, seed), Path(directory))
