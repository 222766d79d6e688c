"""Synthetic training photos for the training-stage tests: gradients, a texture and noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_training_photos(folder: Path, count: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        rows, cols = np.mgrid[0:200, 0:300]
        image = np.stack([rows, cols, (rows * cols) % 255], -1) % 255 + rng.normal(0, 10, (200, 300, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder
