"""Constants a forward pass makes on the host (a seeded noise map, the context steps' masks), kept on the
device that uses them.

Made on the host and copied to a GPU at every pass, each would be a blocking copy, after which PyTorch waits
for the CUDA stream to drain: the host would stop launching work in the middle of every forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class DeviceCopy:
    """``make(shape)``, a host tensor, copied to a device once and kept while shape, device and dtype stay."""

    def __init__(self, make: Callable[[tuple[int, ...]], torch.Tensor]) -> None:
        self.make = make
        self._kept: tuple[tuple, torch.Tensor] | None = None  # one reference, swapped whole: safe across threads

    def like(self, shape: tuple[int, ...], tensor: torch.Tensor) -> torch.Tensor:
        """The constant of ``shape`` on ``tensor``'s device, in its dtype."""
        key = (tuple(shape), tensor.device, tensor.dtype)
        kept = self._kept
        if kept is None or kept[0] != key:
            kept = (key, self.make(key[0]).to(tensor.device, tensor.dtype))
            self._kept = kept
        return kept[1]
