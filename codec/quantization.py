"""Fake-quantized layers that train the integer entropy model of :mod:`aeic.shared.entropy_model`.

A :class:`QConv2d` computes in float during training but rounds its weights, bias and outputs
to exactly the grids the integer network uses (straight-through gradients), so the exported
integer network is the one that was trained and evaluated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from aeic.shared.entropy_model import ACTIVATION_LIMIT, FRACTION_BITS, IntConv
from torch import nn

WEIGHT_LIMIT = 127
MAX_WEIGHT_BITS = 24


_FLOAT_REFERENCE = False


@contextlib.contextmanager
def float_reference() -> Iterator[None]:
    """Run every QConv2d in plain float (no rounding of weights, bias or outputs).

    The same weights without the integer grid: the reference that measures what exactness costs.
    """
    global _FLOAT_REFERENCE
    previous, _FLOAT_REFERENCE = _FLOAT_REFERENCE, True
    try:
        yield
    finally:
        _FLOAT_REFERENCE = previous


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half up in the forward pass, identity gradient."""
    return x + (torch.floor(x + 0.5) - x).detach()


class QConv2d(nn.Conv2d):
    """A convolution on the fixed-point grid; ``out_bits``/``lo``/``hi`` may differ per channel.

    ``lo=0`` (the default) makes the clamp a ReLU.
    """

    bias: torch.Tensor  # always has one
    out_bits: torch.Tensor  # buffers
    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        in_bits: int = FRACTION_BITS,
        out_bits: int | list[int] = FRACTION_BITS,
        lo: int | list[int] = 0,
        hi: int | list[int] = ACTIVATION_LIMIT,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.in_bits = in_bits
        out_bits_t = torch.as_tensor(out_bits, dtype=torch.float32).expand(out_channels).clone()
        hi_t = torch.as_tensor(hi, dtype=torch.float32).expand(out_channels).clone()
        lo_t = torch.as_tensor(lo, dtype=torch.float32).expand(out_channels).clone()
        self.register_buffer("out_bits", out_bits_t)
        self.register_buffer("lo", lo_t)
        self.register_buffer("hi", hi_t)

    def weight_bits(self) -> torch.Tensor:
        """Per output channel, the largest power of two keeping every weight within int8."""
        peak = self.weight.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
        return torch.floor(torch.log2(WEIGHT_LIMIT / peak)).clamp(0, MAX_WEIGHT_BITS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FLOAT_REFERENCE:
            out = F.conv2d(x, self.weight, self.bias, padding=self.padding)
            oscale = torch.exp2(self.out_bits)[None, :, None, None]
            return torch.maximum(torch.minimum(out, self.hi[None, :, None, None] / oscale), self.lo[None, :, None, None] / oscale)
        wbits = self.weight_bits()
        wscale = torch.exp2(wbits)[:, None, None, None]
        weight = round_ste(self.weight * wscale) / wscale
        bscale = torch.exp2(wbits + self.in_bits)
        bias = round_ste(self.bias * bscale) / bscale
        out = F.conv2d(x, weight, bias, padding=self.padding)
        oscale = torch.exp2(self.out_bits)[None, :, None, None]
        out = round_ste(out * oscale)
        out = torch.maximum(torch.minimum(out, self.hi[None, :, None, None]), self.lo[None, :, None, None])
        return out / oscale

    def to_integer(self) -> IntConv:
        """The frozen integer layer this module computes (numpy arrays, whatever device the module is on)."""
        wbits, weight, bias, out_bits, lo, hi = (
            t.detach().cpu().double() for t in (self.weight_bits(), self.weight, self.bias, self.out_bits, self.lo, self.hi)
        )
        weight = torch.floor(weight * torch.exp2(wbits)[:, None, None, None] + 0.5)
        bias = torch.floor(bias * torch.exp2(wbits + self.in_bits) + 0.5)
        shift = wbits + self.in_bits - out_bits
        return IntConv(
            weight=weight.numpy().astype(np.int8),
            bias=bias.numpy().astype(np.int64),
            shift=shift.numpy().astype(np.int64),
            lo=lo.numpy().astype(np.int64),
            hi=hi.numpy().astype(np.int64),
        )
