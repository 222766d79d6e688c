"""Put each rate point at its nominal bpp by moving its gain alone, every weight frozen.

The training loop steers each rate's gains against a running mean of its bpp on random crops,
so the points end near, not at, their nominal bpp (runs made before that steered the multipliers
and ended far from it). A common offset to one rate's log-gains changes only that rate's
quantization step. Its bits fall as the step grows, but only down to a floor: with a step far
beyond what the model was trained on, every symbol rounds to zero, the hyperprior's predicted
scales no longer fit, and the bits climb again to a plateau (nano-se-internal-joint-3's 0.005
point: a plain bisection over the whole range walked onto that plateau, 0.0058 bpp). So a coarse
scan finds the cheapest offset first, and the bisection searches only the rising branch above it,
where bits and offset move together.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from aeic.codec.model import AEICModel

OFFSET_RANGE = 3.0  # log-gain offsets searched: a factor of e^3 either way
SCAN_POINTS = 25  # the coarse scan that finds the rising branch
BISECTION_STEPS = 20


def measured_bpp(model: AEICModel, y: torch.Tensor, log_gains: torch.Tensor, pixels: int) -> float:
    """Bits per pixel (the training measure) of the analysed crops ``y`` coded with ``log_gains``."""
    scaled = y * log_gains.exp()[None, :, None, None]
    _, y_bits, z_bits = model.entropy(scaled, model.hyper_analysis(scaled))
    return float((y_bits.sum() + z_bits.sum()) / pixels)


def offset_for_target(bpp_at: Callable[[float], float], target: float) -> float:
    """The log-gain offset whose bpp is ``target``, on the branch where bpp rises with the offset.

    Below the cheapest offset of the scan the bits rise again; a target under that floor gets the
    cheapest offset, the nearest the model can come."""
    grid = torch.linspace(-OFFSET_RANGE, OFFSET_RANGE, SCAN_POINTS).tolist()
    floor, cheapest = min((bpp_at(offset), offset) for offset in grid)
    if floor >= target:
        return cheapest
    low, high = cheapest, OFFSET_RANGE
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if bpp_at(middle) < target else (low, middle)
    return (low + high) / 2


@torch.no_grad()
def calibrate_log_gains(model: AEICModel, images: torch.Tensor, targets: list[float]) -> list[tuple[float, float]]:
    """Shift each rate's log-gains in place so ``images`` code at ``targets``; returns (before, after) bpp."""
    y = model.analysis(images)
    pixels = images.shape[0] * images.shape[2] * images.shape[3]
    report = []
    for rate, target in enumerate(targets):
        base = model.log_gains[rate].clone()

        def bpp_at(offset: float, base: torch.Tensor = base) -> float:
            return measured_bpp(model, y, base + offset, pixels)

        offset = offset_for_target(bpp_at, target)
        before = measured_bpp(model, y, base, pixels)
        model.log_gains[rate] = base + offset
        report.append((before, measured_bpp(model, y, model.log_gains[rate], pixels)))
    return report
