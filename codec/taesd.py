"""The tiny autoencoder TAEF2 (MIT, madebyollin/taesd): pixel decoder and latent teacher of the nano profile.

Its weights are never shipped with AEIC: they load from a configured folder (``AEIC_TAEF2_DIR``,
default ``../shared/weights/taef2`` next to a checkout) or, for users, from the Hugging Face repo
``madebyollin/taef2`` when ``huggingface_hub`` may download. The module layout mirrors the
published state dicts (plain ``nn.Sequential`` stacks) so they load with ``strict=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

LATENT_CHANNELS = 32
HF_REPO = "madebyollin/taef2"
WIDTH = 64


def _conv(cin: int, cout: int, **kwargs: Any) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3

    def local_radius(self) -> int:
        """Pointwise (see :func:`aeic.codec.tiling.receptive_radius`)."""
        return 0


class _Block(nn.Module):
    """Three-conv residual block; the deep blocks add a globally pooled channel-mixing branch."""

    def __init__(self, pooled: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(WIDTH, WIDTH), nn.ReLU(), _conv(WIDTH, WIDTH), nn.ReLU(), _conv(WIDTH, WIDTH))
        self.pool = (
            nn.Sequential(
                nn.Conv2d(WIDTH, 4 * WIDTH, 1, bias=False),
                nn.GroupNorm(4, 4 * WIDTH),
                nn.ReLU(),
                nn.Conv2d(4 * WIDTH, WIDTH, 1, bias=False),
            )
            if pooled
            else None
        )

    def local_radius(self) -> int | None:
        """Three 3x3 convolutions read 3 pixels around; the pooled branch's group norm reads the whole
        picture (see :func:`aeic.codec.tiling.receptive_radius`)."""
        return None if self.pool is not None else 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


def build_encoder() -> nn.Sequential:
    layers: list[nn.Module] = [_conv(3, WIDTH), _Block()]
    for stage in range(3):
        layers += [_conv(WIDTH, WIDTH, stride=2, bias=False)] + [_Block(pooled=stage == 2) for _ in range(3)]
    layers.append(_conv(WIDTH, LATENT_CHANNELS))
    return nn.Sequential(*layers)


def build_decoder() -> nn.Sequential:
    layers: list[nn.Module] = [_Clamp(), _conv(LATENT_CHANNELS, WIDTH), nn.ReLU()]
    for stage in range(3):
        layers += [_Block(pooled=stage == 0) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]
    layers += [_Block(), _conv(WIDTH, 3)]
    return nn.Sequential(*layers)


def default_weights_dir() -> Path | None:
    """The configured local folder, else the read-only copy beside a development checkout."""
    configured = os.environ.get("AEIC_TAEF2_DIR")
    if configured:
        return Path(configured)
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "weights" / "taef2"
    return beside_checkout if beside_checkout.is_dir() else None


def _weights_file(name: str, directory: Path | None) -> Path:
    chosen = directory or default_weights_dir()
    if chosen is not None and (chosen / name).is_file():
        return chosen / name
    configured = directory or os.environ.get("AEIC_TAEF2_DIR")
    if configured:  # a folder the user named: a wrong one is the error, not a reason to try the network
        where = str(configured) if directory else f"AEIC_TAEF2_DIR={configured}"
        raise FileNotFoundError(f"{name} is not in {where}: it needs a folder holding taef2_decoder.pth and "
                                "taef2_encoder.pth (madebyollin/taef2)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise FileNotFoundError(f"{name} not found; set AEIC_TAEF2_DIR to a folder holding it") from exc
    try:
        return Path(hf_hub_download(HF_REPO, name))
    except Exception as exc:  # network errors, offline mode
        raise FileNotFoundError(
            f"{name} not found locally and not downloadable from {HF_REPO}; set AEIC_TAEF2_DIR"
        ) from exc


def load_taef2(part: str, directory: Path | None = None) -> nn.Sequential:
    """Load the frozen ``encoder`` or ``decoder`` of TAEF2 in eval mode."""
    module = build_encoder() if part == "encoder" else build_decoder()
    state = torch.load(_weights_file(f"taef2_{part}.pth", directory), map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)
