"""Synthesis transform: quantized latent (1/32) -> decoder latent (1/8), split for the one-step UNet.

The output has two halves of ``latent_channels`` each: the UNet's input and a residual that the
UNet's output is added to, so the UNet only has to supply what the latent regression cannot
(texture), as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SynthesisTransform(nn.Module):
    """Two pixel-shuffle upsamplings with residual refinement."""

    def __init__(self, channels: int, latent_channels: int, widths: tuple[int, int] = (128, 64)) -> None:
        super().__init__()
        first, second = widths
        self.layers = nn.Sequential(
            nn.Conv2d(channels, 4 * first, 3, padding=1),
            nn.PixelShuffle(2),
            ResidualBlock(first),
            nn.Conv2d(first, 4 * second, 3, padding=1),
            nn.PixelShuffle(2),
            ResidualBlock(second),
            nn.Conv2d(second, 2 * latent_channels, 3, padding=1),
        )

    def forward(self, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(UNet input, residual), both (N, latent_channels, H/8, W/8)."""
        return self.layers(y_hat).chunk(2, dim=1)
