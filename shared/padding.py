"""Geometry and colour helpers both sides agree on: padding to the latent grid, colour statistics."""

from __future__ import annotations

import numpy as np


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_to_multiple(rgb: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-replicate to the next multiple (no hard edge for the encoder to spend bits on)."""
    height, width = rgb.shape[:2]
    target_h, target_w = padded_size(height, width, multiple)
    return np.pad(rgb, ((0, target_h - height), (0, target_w - width), (0, 0)), mode="edge")


def colour_statistics(rgb: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """Per-channel mean and standard deviation of the original, as bytes (for colour correction)."""
    pixels = rgb.reshape(-1, 3).astype(np.float64)
    means = np.clip(np.round(pixels.mean(0)), 0, 255).astype(int)
    stds = np.clip(np.round(pixels.std(0)), 0, 255).astype(int)
    return (*(int(v) for v in means), *(int(v) for v in stds))


def correct_colours(rgb: np.ndarray, stats: tuple[int, ...], max_gain: float = 1.25) -> np.ndarray:
    """Move the reconstruction's per-channel mean and spread towards the original's.

    The mean is matched exactly; the spread only within ``1/max_gain .. max_gain`` so a
    reconstruction is never flattened or its noise amplified by a large factor.
    """
    pixels = rgb.astype(np.float64)
    means = pixels.reshape(-1, 3).mean(0)
    stds = pixels.reshape(-1, 3).std(0)
    target_mean, target_std = np.asarray(stats[:3], float), np.asarray(stats[3:], float)
    gain = np.clip(target_std / np.maximum(stds, 1e-6), 1 / max_gain, max_gain)
    corrected = (pixels - means) * gain + target_mean
    return np.clip(np.round(corrected), 0, 255).astype(np.uint8)
