"""The analysis transform in bounded memory: the stem in horizontal strips, the trunk whole.

At 1080p the first analysis stages hold hundreds of megabytes of activations (stage 1 expands
32 channels to 128 at half resolution). The stem graph (image -> features at 1/``factor``) is
therefore run on strips of ``strip_rows`` image rows plus ``halo`` rows above and below, the halo
covering the stem's receptive field, and only each strip's interior is kept. Strips start on
multiples of ``factor`` so the pixel-unshuffle phases line up with the whole image's: the result
equals the whole-image stem up to float rounding. The trunk (the small later stages) then runs
once on the assembled features.

Peak memory is then the largest of the phases (a strip, the trunk, the entropy model) only if
freed tensors really go back to the system: :func:`limit_heap_retention` sees to that.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import onnxruntime as ort

DEFAULT_STRIP_ROWS = 192  # 1080p: ~110 MB of stem activations per strip, the halos add ~1.3x stem work
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class TiledAnalysis:
    """Image (H, W, 3) uint8, H and W multiples of 32 -> latent (1, C, H/32, W/32) float32."""

    def __init__(self, stem: ort.InferenceSession, trunk: ort.InferenceSession, factor: int, halo: int,
                 strip_rows: int = DEFAULT_STRIP_ROWS) -> None:
        if strip_rows <= 0 or strip_rows % factor or halo % factor:
            raise ValueError(f"strip rows ({strip_rows}) and halo ({halo}) must be positive multiples of {factor}")
        self.stem, self.trunk = stem, trunk
        self.factor, self.halo, self.strip_rows = factor, halo, strip_rows

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        (latent,) = self.trunk.run(["latent"], {"features": self.features(rgb)})
        return latent

    def strips(self, height: int) -> list[tuple[int, int, int, int]]:
        """``(top, bottom, start, stop)`` per strip: the rows kept, and the rows run with the halo."""
        bounds = []
        for top in range(0, height, self.strip_rows):
            bottom = min(top + self.strip_rows, height)
            bounds.append((top, bottom, max(top - self.halo, 0), min(bottom + self.halo, height)))
        return bounds

    def features(self, rgb: np.ndarray) -> np.ndarray:
        """The stem's output for the whole image (the trunk's input), assembled strip by strip."""
        height = rgb.shape[0]
        features: np.ndarray | None = None
        for top, bottom, start, stop in self.strips(height):
            (strip,) = self.stem.run(["features"], {"image": to_float(rgb[start:stop])})
            if features is None:
                features = np.empty((1, strip.shape[1], height // self.factor, strip.shape[3]), np.float32)
            skip = (top - start) // self.factor
            features[:, :, top // self.factor : bottom // self.factor] = strip[:, :, skip : skip + (bottom - top) // self.factor]
            del strip  # before the next strip's activations
        if features is None:
            raise ValueError("an image of no rows has no features")
        return features


def to_float(rgb: np.ndarray) -> np.ndarray:
    """(h, W, 3) uint8 -> (1, 3, h, W) float32 in [0, 1], one strip at a time."""
    image = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)
    image /= 255.0
    return image


def limit_heap_retention() -> None:
    """Serve allocations above 1 MiB from their own mappings, returned to the system when freed.

    glibc raises its mmap threshold up to 32 MB after large frees and then serves tensors of a
    few megabytes from the heap, which it keeps: strip after strip the process would grow by
    what earlier phases freed (measured: about 400 MB at 1080p instead of about 260 MB). Setting
    the threshold fixes it (and stops the adjustment). Process-wide, once; a no-op without glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
