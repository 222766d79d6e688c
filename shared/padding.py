"""Geometry and colour helpers both sides agree on: padding to the latent grid, coding downscale, colour statistics."""

from __future__ import annotations

import numpy as np
from PIL import Image

ALIGNMENT = 128  # both sides pad the coded picture to this multiple: the hyper-latent sits at 1/128 of it


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_to_multiple(rgb: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-replicate to the next multiple (no hard edge for the encoder to spend bits on)."""
    height, width = rgb.shape[:2]
    target_h, target_w = padded_size(height, width, multiple)
    return np.pad(rgb, ((0, target_h - height), (0, target_w - width), (0, 0)), mode="edge")


def downscale_image(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter reduction by ``factor`` to ``ceil(size / factor)`` (edges replicated): the sender's coding size."""
    if factor == 1:
        return rgb
    padded = pad_to_multiple(rgb, factor)
    height, width = padded.shape[0] // factor, padded.shape[1] // factor
    sums = padded.reshape(height, factor, width, factor, 3).sum((1, 3), dtype=np.uint32)
    return ((sums + factor * factor // 2) // (factor * factor)).astype(np.uint8)


def upscale_image(rgb: np.ndarray, factor: int, height: int, width: int) -> np.ndarray:
    """The receiver's inverse of :func:`downscale_image`: bicubic by ``factor``, cropped to the true size."""
    if factor == 1:
        return rgb[:height, :width]
    size = (rgb.shape[1] * factor, rgb.shape[0] * factor)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))[:height, :width]


_HISTOGRAM_BAND_PIXELS = 1 << 20  # pixels a band of `channel_histograms` counts at once (8 MB of indices)


def channel_histograms(rgb: np.ndarray) -> np.ndarray:
    """Per-channel counts of the 256 levels, (3, 256), counted in bands of rows: `np.bincount` widens its
    input to 8-byte integers (366 MB for a 48 MP photo at once, 537 MB for an 8192x8192 reconstruction)."""
    band = max(1, _HISTOGRAM_BAND_PIXELS // max(1, rgb.shape[1]))
    histograms = np.zeros((3, 256), dtype=np.int64)
    for top in range(0, rgb.shape[0], band):
        rows = rgb[top : top + band]
        for channel in range(3):
            histograms[channel] += np.bincount(rows[..., channel].reshape(-1), minlength=256)
    return histograms


def _mean_and_std(counts: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the levels a histogram counts."""
    levels = np.arange(256, dtype=np.float64)
    weights = counts.astype(np.float64)
    total = weights.sum()
    mean = float(weights @ levels) / total
    return mean, float(np.sqrt(float(weights @ (levels - mean) ** 2) / total))


def colour_statistics(rgb: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """Per-channel mean and standard deviation of the original, as bytes (for colour correction).

    From per-channel histograms: no float64 copy of the image (50 MB and as much again for the
    deviations at 1080p, the largest allocation of the whole sender path otherwise).
    """
    return statistics_of_histograms(channel_histograms(rgb))


def statistics_of_histograms(histograms: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """:func:`colour_statistics` from the (3, 256) level counts: the sender counts a photo it reads from
    its file strip by strip, never holding it whole as an array."""
    means, stds = zip(*(_mean_and_std(counts) for counts in histograms))
    means_b = np.clip(np.round(means), 0, 255).astype(int)
    stds_b = np.clip(np.round(stds), 0, 255).astype(int)
    m0, m1, m2 = (int(v) for v in means_b)
    s0, s1, s2 = (int(v) for v in stds_b)
    return m0, m1, m2, s0, s1, s2


def correct_colours(rgb: np.ndarray, stats: tuple[int, ...], max_gain: float = 1.25) -> np.ndarray:
    """Move the reconstruction's per-channel mean and spread towards the original's.

    The mean is matched exactly; the spread only within ``1/max_gain .. max_gain`` so a
    reconstruction is never flattened or its noise amplified by a large factor. Per channel this is
    an affine map of the 256 levels, so it is applied as a lookup table built from a histogram: no
    float64 copy of the image (1.5 GB each at 8192x8192, the size a header may ask the receiver for).
    """
    levels = np.arange(256, dtype=np.float64)
    corrected = np.empty_like(rgb, dtype=np.uint8)
    for channel, counts in enumerate(channel_histograms(rgb)):
        values = rgb[..., channel]
        mean, std = _mean_and_std(counts)
        gain = np.clip(stats[3 + channel] / max(std, 1e-6), 1 / max_gain, max_gain)
        table = np.clip(np.round((levels - mean) * gain + stats[channel]), 0, 255).astype(np.uint8)
        corrected[..., channel] = table[values]
    return corrected
