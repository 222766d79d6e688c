"""Put each rate point at its nominal bpp by moving its gain alone, every weight frozen.

The training loop steers each rate's gains against a running mean of its bpp on random crops,
so the points end near, not at, their nominal bpp (runs made before that steered the multipliers
and ended far from it). A common offset to one rate's log-gains changes only that rate's
quantization step, and its bits fall as the step grows, so a bisection over training crops finds
the offset that meets the nominal bpp.
"""

from __future__ import annotations

import torch
from aeic.codec.model import AEICModel

OFFSET_RANGE = 3.0  # log-gain offsets searched: a factor of e^3 either way
BISECTION_STEPS = 24


def measured_bpp(model: AEICModel, y: torch.Tensor, log_gains: torch.Tensor, pixels: int) -> float:
    """Bits per pixel (the training measure) of the analysed crops ``y`` coded with ``log_gains``."""
    scaled = y * log_gains.exp()[None, :, None, None]
    _, y_bits, z_bits = model.entropy(scaled, model.hyper_analysis(scaled))
    return float((y_bits.sum() + z_bits.sum()) / pixels)


@torch.no_grad()
def calibrate_log_gains(model: AEICModel, images: torch.Tensor, targets: list[float]) -> list[tuple[float, float]]:
    """Shift each rate's log-gains in place so ``images`` code at ``targets``; returns (before, after) bpp."""
    y = model.analysis(images)
    pixels = images.shape[0] * images.shape[2] * images.shape[3]
    report = []
    for rate, target in enumerate(targets):
        base = model.log_gains[rate].clone()
        low, high = -OFFSET_RANGE, OFFSET_RANGE
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            low, high = (middle, high) if measured_bpp(model, y, base + middle, pixels) < target else (low, middle)
        before = measured_bpp(model, y, base, pixels)
        model.log_gains[rate] = base + (low + high) / 2
        report.append((before, measured_bpp(model, y, model.log_gains[rate], pixels)))
    return report
