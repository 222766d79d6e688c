"""Trainable twin of the integer entropy model, and its export.

:class:`HyperpriorContextModel` trains with fake quantization and computes the same means and
scale indices the integer model in :mod:`aeic.shared.entropy_model` computes after
:meth:`HyperpriorContextModel.export` (which the receiver runs with :mod:`aeic.codec.torch_backend`).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from aeic.shared import entropy_model as integer
from aeic.shared.entropy_coding import discretized_gaussian_pmf, factorized_tables, gaussian_scale_table
from torch import nn

from .device_cache import DeviceCopy
from .quantization import QConv2d, round_ste

_LOG_SCALE_STEP = math.log(integer.SCALE_MAX / integer.SCALE_MIN) / (integer.NUM_SCALES - 1)
_GRID = 1 << integer.FRACTION_BITS
_LIMIT = integer.ACTIVATION_LIMIT / _GRID
Z_SCALE_MIN = 0.05  # floor on the hyper-latent's scales


def step_masks(shape: tuple[int, ...]) -> torch.Tensor:
    """The context steps' masks for a latent of ``shape`` (C, H, W), made on the host."""
    return torch.from_numpy(integer.step_masks(*shape))


def gaussian_bits(residual: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bits of integer-rounded values under a zero-mean Gaussian (differentiable).

    ``ndtr`` rather than ``torch.distributions.Normal``: the latter validates its input, a host
    synchronisation per call on a GPU."""
    upper = torch.special.ndtr((0.5 - residual.abs()) / scale)
    lower = torch.special.ndtr((-0.5 - residual.abs()) / scale)
    return -torch.log2((upper - lower).clamp_min(1e-9))


class HyperSynthesis(nn.Sequential):
    """z (integers at 1/128) -> hyper features (fixed point at 1/32)."""

    def __init__(self, z_channels: int, width: int, features: int) -> None:
        super().__init__(
            QConv2d(z_channels, 4 * width, 3, in_bits=0),
            nn.PixelShuffle(2),
            QConv2d(width, 4 * width, 3),
            nn.PixelShuffle(2),
            QConv2d(width, features, 1),
        )


class ContextStep(nn.Sequential):
    """(hyper features, decoded latent) -> per-channel mean (fixed point) and scale index."""

    def __init__(self, features: int, channels: int, width: int) -> None:
        limit = integer.ACTIVATION_LIMIT
        super().__init__(
            QConv2d(features + channels, width, 3),
            QConv2d(width, width, 1),
            QConv2d(
                width,
                2 * channels,
                1,
                out_bits=[integer.FRACTION_BITS] * channels + [0] * channels,
                lo=[-limit] * channels + [0] * channels,
                hi=[limit] * channels + [integer.NUM_SCALES - 1] * channels,
            ),
        )


class HyperpriorContextModel(nn.Module):
    """Factorized prior on z, Gaussian conditional on y with the 4-step context."""

    def __init__(self, channels: int, z_channels: int, hyper_width: int, features: int, context_width: int) -> None:
        super().__init__()
        self.channels = channels
        self.hyper_synthesis = HyperSynthesis(z_channels, hyper_width, features)
        self.context = nn.ModuleList(ContextStep(features, channels, context_width) for _ in range(integer.NUM_STEPS))
        self.z_log_scale = nn.Parameter(torch.zeros(z_channels))
        self.masks = DeviceCopy(step_masks)  # kept on the device: no host copy per pass

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ŷ in real units, bits of y per element, bits of z per element) for a training batch."""
        # Rates are measured on the rounded values (straight-through), not with additive noise:
        # at these rates most scales are tiny, and uniform noise would charge ~0.3 bit for every
        # symbol the coder sends for free, a floor far above the 0.005-0.05 bpp targets.
        z_bits = gaussian_bits(round_ste(z), self.z_log_scale.exp()[None, :, None, None].clamp_min(Z_SCALE_MIN))
        features = self.hyper_synthesis(round_ste(z))
        masks = self.masks.like(y.shape[1:], y)
        decoded = torch.zeros_like(y)
        y_bits = torch.zeros_like(y)
        for step, mask in enumerate(masks):
            out = self.context[step](torch.cat([features, decoded.clamp(-_LIMIT, _LIMIT)], 1))
            means, indices = out[:, : self.channels], out[:, self.channels :]
            scales = integer.SCALE_MIN * torch.exp(indices * _LOG_SCALE_STEP)
            # Training does not force the skip table's symbols to 0 (that would cut every gradient
            # that could lead out of it); its scale is so small that a nonzero symbol costs ~17
            # bits, so the model learns to send 0 there, which is what the integer model assumes.
            symbols = round_ste(y - means)
            y_bits = y_bits + mask * gaussian_bits(symbols, scales)
            decoded = decoded + mask * (means + symbols)
        return decoded, y_bits, z_bits

    def export(self) -> integer.EntropyModel:
        """The frozen integer model, with CDF tables, that sender and receiver run."""
        z_pmfs, z_offsets = [], []
        for scale in self.z_log_scale.detach().exp().clamp_min(Z_SCALE_MIN).double().tolist():
            radius = max(1, math.ceil(6 * scale))
            z_pmfs.append(discretized_gaussian_pmf(scale, radius))
            z_offsets.append(radius)
        return integer.EntropyModel(
            hyper_synthesis=_integer_layers(self.hyper_synthesis),
            context=[_integer_layers(cast(ContextStep, step)) for step in self.context],
            z_tables=factorized_tables(z_pmfs, z_offsets),
            y_tables=gaussian_scale_table(integer.scale_table()),
            latent_channels=self.channels,
        )


def _integer_layers(network: nn.Sequential) -> list[integer.Layer]:
    layers: list[integer.Layer] = []
    for module in network:
        if isinstance(module, QConv2d):
            layers.append(module.to_integer())
        elif isinstance(module, nn.PixelShuffle):
            layers.append(integer.PixelShuffle(module.upscale_factor))
        else:
            raise TypeError(f"{type(module).__name__} has no integer form")
    return layers
