"""Rate-distortion rounding: the sender picks each latent symbol for its bits as well as its error.

Nearest rounding spends bits on residuals that sit near a bin boundary, where the cheaper
neighbour (the one nearer the predicted mean) costs almost no extra error. Choosing, per element,
between ``floor`` and ``ceil`` of the residual the one with the least ``weight * error**2 + bits``
(bits from the frozen integer tables the coder uses) saves bits; a byte budget then buys a higher
rate level. Any symbols decode, so the format and the receiver are unchanged; the weight is tuned
per model (the package manifest's ``encoder.rounding_weight``), because how much a biased symbol
costs after decoding depends on the decoder.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
from aeic.shared.entropy_coding import PRECISION, CdfTables
from aeic.shared.entropy_model import Rounding, nearest_rounding


def symbol_bits(tables: CdfTables, indices: np.ndarray, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bits of each symbol under its table, whether the table covers it without an escape)."""
    columns = symbols + tables.offsets[indices]
    covered = (columns >= 0) & (columns < tables.lengths[indices] - 1)
    counts = tables.counts[indices, np.where(covered, columns, 0)]
    return PRECISION - np.log2(counts.astype(np.float64)), covered


@dataclass(frozen=True)
class RateDistortionRounding:
    """Rounds each residual to the neighbour with the least ``weight * error**2 + bits``.

    ``weight`` is in bits per squared bin; as it grows this tends to nearest rounding. Where
    either neighbour would need an escape code the residual is rounded to the nearest.
    """

    weight: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"rounding weight must be a positive finite number, got {self.weight!r}")

    def __call__(self, residual: np.ndarray, indices: np.ndarray, tables: CdfTables) -> np.ndarray:
        low = np.floor(residual).astype(np.int64)
        high = low + 1
        low_bits, low_covered = symbol_bits(tables, indices, low)
        high_bits, high_covered = symbol_bits(tables, indices, high)
        low_cost = self.weight * (residual - low) ** 2 + low_bits
        high_cost = self.weight * (high - residual) ** 2 + high_bits
        chosen = np.where(high_cost < low_cost, high, low)
        return np.where(low_covered & high_covered, chosen, nearest_rounding(residual, indices, tables))


PACKAGE = "package"  # the weight the model package names, nearest rounding if it names none
NEAREST = "nearest"


def parse_rounding(text: str) -> float | str:
    """A command-line rounding choice (an argparse ``type``): ``package``, ``nearest`` or a positive weight."""
    if text in (PACKAGE, NEAREST):
        return text
    try:
        return RateDistortionRounding(float(text)).weight
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {PACKAGE}, {NEAREST} or a positive number, got {text!r}") from None


def rounding_for(package_weight: float | None, choice: float | str = PACKAGE) -> Rounding:
    """The rounding a sender uses: ``choice``, where ``package`` defers to the package's weight."""
    weight = package_weight if choice == PACKAGE else choice
    if weight is None or weight == NEAREST:
        return nearest_rounding
    return RateDistortionRounding(float(weight))
