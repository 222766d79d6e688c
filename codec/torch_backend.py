"""The integer entropy model's convolutions on a torch device, for the receiver.

:mod:`aeic.shared.entropy_model` runs its integer network through a backend; the sender's is numpy. This
one runs the same convolutions on any torch device (float64 ``unfold`` + ``matmul``, exact for these
integers), so a GPU receiver decodes the symbols the sender coded, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from aeic.shared import entropy_model as integer

BAND_BYTES = 64 << 20  # the most bytes of unfolded input one product holds


class TorchBackend:
    """Integer convolutions on a torch device: exact float64 products and sums.

    The unfolded input (every kernel tap of every input channel, per pixel) is 9x the input: 450 MB
    for the 384-channel context of a 4096x4096 picture. It is made in bands of rows of at most
    ``band_bytes``; every partial sum is an integer below 2**53, so bands give the same integers.
    """

    def __init__(self, device: str | torch.device = "cpu", band_bytes: int = BAND_BYTES) -> None:
        self.device = torch.device(device)
        self.band_bytes = band_bytes
        self._weights: dict[int, tuple[torch.Tensor, ...]] = {}

    def _tensors(self, layer: integer.IntConv) -> tuple[torch.Tensor, ...]:
        key = id(layer)
        if key not in self._weights:
            as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), device=self.device)
            self._weights[key] = (
                as_t(layer.weight.reshape(layer.weight.shape[0], -1)),
                as_t(layer.bias)[:, None],
                torch.ldexp(torch.ones(len(layer.shift), dtype=torch.float64, device=self.device), as_t(-layer.shift))[:, None],
                as_t(layer.lo)[:, None],
                as_t(layer.hi)[:, None],
            )
        return self._weights[key]

    def conv(self, x: np.ndarray, layer: integer.IntConv) -> np.ndarray:
        weight, bias, scale, lo, hi = self._tensors(layer)
        channels, height, width = x.shape
        kernel = layer.kernel_size
        pad = kernel // 2
        inp = F.pad(torch.as_tensor(np.asarray(x, dtype=np.float64), device=self.device)[None], (pad,) * 4)
        out = torch.empty((weight.shape[0], height * width), dtype=torch.float64, device=self.device)
        rows = max(1, self.band_bytes // (channels * kernel * kernel * width * 8))
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            cols = F.unfold(inp[:, :, top : bottom + 2 * pad], kernel)[0]
            band = torch.floor((weight @ cols + bias) * scale + 0.5)
            out[:, top * width : bottom * width] = torch.maximum(torch.minimum(band, hi), lo)
        return out.reshape(-1, height, width).cpu().numpy()
