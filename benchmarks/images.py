"""Benchmark inputs: real photos from the training set (never Kodak, which is kept for evaluation).

``AEIC_BENCH_IMAGES`` overrides the folder. Photos are resized to cover the requested size and
centre-cropped, so every benchmark sees real image statistics at exactly the size it measures.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Photographs among the training images (the folder also holds drawings and game art).
PREFERRED = (
    "lomiri-wallpapers-16.04__Bridge_by_Sander_Klootwijk.jpg",
    "libjxl-testdata__flower.png",
    "mate-backgrounds__LadyBird.jpg",
    "plasma-workspace-wallpapers__ColorfulCups.jpg",
    "lomiri-wallpapers-16.04__aitzgorri_by_Aitzol_Berasategi.jpg",
    "mate-backgrounds__Garden.jpg",
)


def image_dir() -> Path:
    return Path(os.environ.get("AEIC_BENCH_IMAGES", DEFAULT_DIR))


@lru_cache(maxsize=1)
def photo_paths() -> tuple[Path, ...]:
    """The preferred photos that exist, then every other image in the folder, sorted."""
    folder = image_dir()
    if not folder.is_dir():
        return ()
    others = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    preferred = [folder / name for name in PREFERRED if (folder / name).is_file()]
    return tuple(preferred + [p for p in others if p not in preferred])


def fit(image: Image.Image, width: int, height: int) -> np.ndarray:
    """Resize to cover ``width x height`` and centre-crop: uint8 RGB."""
    return np.asarray(ImageOps.fit(ImageOps.exif_transpose(image).convert("RGB"), (width, height),
                                   Image.Resampling.LANCZOS))


def synthetic(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Only when no photo folder exists: smooth gradients, an edge and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x * 0.7 + y) / 23.0)], axis=-1) * 190
    base += rng.normal(0, 12, size=base.shape)
    return base.clip(0, 255).astype(np.uint8)


def photo(width: int, height: int, index: int = 0) -> np.ndarray:
    """Photo number ``index`` at exactly ``width x height`` (uint8 RGB)."""
    paths = photo_paths()
    if not paths:
        return synthetic(width, height, index)
    with Image.open(paths[index % len(paths)]) as image:
        return fit(image, width, height)


def source_name(index: int = 0) -> str:
    paths = photo_paths()
    return paths[index % len(paths)].name if paths else "synthetic"
