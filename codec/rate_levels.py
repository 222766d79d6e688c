"""Rate levels: the trained rate points and the gain-interpolated levels between them.

A byte budget is met by the highest level that fits, so the spacing of levels is bytes left unused:
with 8 levels per step (each trained point doubles the bpp; levels 2^(1/8) = 9 % apart) a stream
filled about 95-96 % of its budget, with 16 (4.4 % apart) about 98 % (package 3cda5bf9 and its
16-level copy e37c321a on the non-Kodak photos), for one more step of the sender's binary search.
Levels only change the gain table and the manifest, so ``relevel_package`` re-spaces a package
without training; the levels it shares with the old table code the same streams byte for byte.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
from aeic.shared import model_package as pkg

LEVELS_PER_RATE_STEP = 16
MAX_LEVELS = 256  # the bitstream's rate index is one byte


def level_positions(num_rates: int, per_step: int = LEVELS_PER_RATE_STEP) -> np.ndarray:
    """Positions (0 .. num_rates - 1) of the trained points and ``per_step - 1`` evenly spaced levels between."""
    count = (num_rates - 1) * per_step + 1
    if per_step < 1:
        raise ValueError(f"levels per step must be at least 1 (the trained rate points alone), got {per_step}")
    if count > MAX_LEVELS:
        raise ValueError(f"{per_step} levels per step gives {count} levels; a bitstream indexes at most {MAX_LEVELS}")
    return np.linspace(0, num_rates - 1, count)


def interpolated_log_gains(log_gains: np.ndarray, position: float) -> np.ndarray:
    """Per-channel log gains at ``position``, linear between the neighbouring trained points."""
    low = min(math.floor(position), len(log_gains) - 2)
    frac = position - low
    return (1 - frac) * log_gains[low] + frac * log_gains[low + 1]


def level_gains(log_gains: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The float32 gain table of a package: one row of per-channel gains per level."""
    return np.stack([np.exp(interpolated_log_gains(log_gains, p)) for p in positions]).astype(np.float32)


def rate_level_entries(rates_bpp: list[float], positions: np.ndarray) -> list[dict]:
    """The manifest's ``rate_levels``: index, position and nominal bpp (log-linear between points)."""
    log_rates = np.log(np.asarray(rates_bpp, dtype=np.float64))
    return [
        {"index": i, "position": float(p), "nominal_bpp": float(np.exp(np.interp(p, np.arange(len(log_rates)), log_rates)))}
        for i, p in enumerate(positions)
    ]


def relevel_package(package: Path, out: Path, per_step: int) -> Path:
    """``package`` with ``per_step`` levels per step between its trained points, written to ``out``.

    Only ``entropy.npz`` (the gains) and the manifest change; a level at a position the old table
    had keeps its exact gains, so its streams stay byte for byte. ``out`` may be ``package``."""
    manifest = pkg.ModelPackage.load(package).manifest
    arrays = dict(np.load(package / "entropy.npz"))
    old_positions = np.array([level["position"] for level in manifest["rate_levels"]])
    old_gains = arrays["levels.gains"]
    trained = np.isclose(old_positions, np.round(old_positions))
    positions = level_positions(int(trained.sum()), per_step)
    gains = level_gains(np.log(old_gains[trained].astype(np.float64)), positions)
    for row, position in enumerate(positions):
        same = np.flatnonzero(np.isclose(old_positions, position, rtol=0, atol=1e-9))
        if same.size:
            gains[row] = old_gains[same[0]]
    arrays["levels.gains"] = gains
    rates = [level["nominal_bpp"] for level, is_point in zip(manifest["rate_levels"], trained, strict=True) if is_point]
    out.mkdir(parents=True, exist_ok=True)
    for name in pkg.PACKAGE_FILES:
        if name != "entropy.npz" and (out / name).resolve() != (package / name).resolve():
            shutil.copyfile(package / name, out / name)
    np.savez(out / "entropy.npz", **arrays)
    pkg.write_manifest(out, {**manifest, "rate_levels": rate_level_entries(rates, positions)})
    return out
