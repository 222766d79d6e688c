"""Analysis transforms of the sender: AEIC-SE (shallow) and AEIC-ME (moderate), and the hyper-analysis.

Each of the five stages is a 3x3 convolution to a quarter of the stage width, a pixel-unshuffle
(2x down, 4x channels) and gated "star" blocks. With widths 32/64/128/192/256 and one block per
stage this is AEIC-SE: about 0.94 M parameters and 9.7 K multiply-accumulates per pixel. AEIC-ME
is wider and twice as deep but ends in the same 256-channel latent: dual-side distillation matches
the two latents directly, and the student takes over the teacher's entropy model and decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class AnalysisConfig:
    widths: tuple[int, ...] = (32, 64, 128, 192, 256)
    blocks_per_stage: int = 1
    expansion: int = 2

    @property
    def latent_channels(self) -> int:
        return self.widths[-1]


BAND = 11  # length of the depthwise 1xN / Nx1 kernels

SE = AnalysisConfig()
ME = AnalysisConfig(widths=(64, 128, 192, 256, 256), blocks_per_stage=2)


class ChannelsLastLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class InceptionDepthwise(nn.Module):
    """Depthwise 3x3, 1x11 and 11x1 convolutions on channel splits; the rest passes through."""

    def __init__(self, channels: int, band: int = BAND) -> None:
        super().__init__()
        split = channels // 8
        self.sizes = (channels - 3 * split, split, split, split)
        self.square = nn.Conv2d(split, split, 3, padding=1, groups=split)
        self.wide = nn.Conv2d(split, split, (1, band), padding=(0, band // 2), groups=split)
        self.tall = nn.Conv2d(split, split, (band, 1), padding=(band // 2, 0), groups=split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity, square, wide, tall = torch.split(x, list(self.sizes), dim=1)
        return torch.cat([identity, self.square(square), self.wide(wide), self.tall(tall)], 1)


class StarBlock(nn.Module):
    """Token mixing (inception depthwise), LayerNorm, gated 1x1 expansion, projection, residual."""

    def __init__(self, channels: int, expansion: int = 2) -> None:
        super().__init__()
        hidden = expansion * channels
        self.mix = InceptionDepthwise(channels)
        self.norm = ChannelsLastLayerNorm(channels)
        self.expand = nn.Conv2d(channels, 2 * hidden, 1)
        self.project = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.expand(self.norm(self.mix(x))).chunk(2, dim=1)
        return x + self.project(F.gelu(gate) * value)


class AnalysisTransform(nn.Module):
    """Image in [0, 1] (N, 3, H, W), H and W multiples of 32 -> latent y at 1/32."""

    def __init__(self, config: AnalysisConfig = SE) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        previous = 3
        for width in config.widths:
            stages += [nn.Conv2d(previous, width // 4, 3, padding=1), nn.PixelUnshuffle(2)]
            stages += [StarBlock(width, config.expansion) for _ in range(config.blocks_per_stage)]
            previous = width
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


class HyperAnalysis(nn.Sequential):
    """Scaled latent (1/32) -> hyper-latent z (1/128)."""

    def __init__(self, channels: int, width: int, z_channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, z_channels, 3, stride=2, padding=1),
        )
