"""Training data: downsampled photos and their teacher latents, cached once, cropped at random.

The provided photos are mostly lossy-compressed, so each is first downsampled (short side
``short_side``) to wash out coding artefacts; the teacher's latent of the whole downsampled image
is computed once and cached, so training never runs the teacher encoder again. Crops are aligned
to the latent grid (8 px) and flipped together with their latents.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
LATENT_STRIDE = 8


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_downsampled(path: Path, short_side: int) -> np.ndarray:
    """RGB uint8, short side at most ``short_side``, sides cropped to multiples of 8."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        factor = short_side / min(image.size)
        if factor < 1:
            size = (round(image.width * factor), round(image.height * factor))
            image = image.resize(size, Image.Resampling.LANCZOS)
        array = np.asarray(image)
    height, width = (array.shape[0] // LATENT_STRIDE) * LATENT_STRIDE, (array.shape[1] // LATENT_STRIDE) * LATENT_STRIDE
    return np.ascontiguousarray(array[:height, :width])


@dataclass
class CachedImage:
    pixels: torch.Tensor  # (3, H, W) uint8
    latent: torch.Tensor  # (C, H/8, W/8) float16


def build_cache(folder: Path, cache_file: Path, short_side: int, teacher: torch.nn.Module, crop: int) -> list[CachedImage]:
    """Load or compute the cache of (downsampled image, teacher latent) pairs."""
    paths = [p for p in list_images(folder)]
    key = hashlib.sha256(f"{[p.name for p in paths]}|{short_side}".encode()).hexdigest()[:16]
    if cache_file.exists():
        cached = torch.load(cache_file, weights_only=False)
        if cached.get("key") == key:
            return cached["items"]
    items = []
    with torch.no_grad():
        for path in tqdm(paths, desc="teacher latents"):
            pixels = torch.from_numpy(load_downsampled(path, short_side)).permute(2, 0, 1).contiguous()
            if min(pixels.shape[1:]) < crop:
                continue
            latent = teacher(pixels[None].float() / 255)[0].half()
            items.append(CachedImage(pixels, latent))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "items": items}, cache_file)
    return items


class CropSampler:
    """Random aligned crops (and horizontal flips) of cached images, with their latents."""

    def __init__(self, items: list[CachedImage], crop: int, seed: int) -> None:
        self.items = items
        self.crop = crop
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, latents = [], []
        cells = self.crop // LATENT_STRIDE
        for index in self.rng.integers(0, len(self.items), size):
            item = self.items[index]
            rows, cols = item.latent.shape[1] - cells, item.latent.shape[2] - cells
            top, left = int(self.rng.integers(0, rows + 1)), int(self.rng.integers(0, cols + 1))
            pixels = item.pixels[:, top * 8 : top * 8 + self.crop, left * 8 : left * 8 + self.crop]
            latent = item.latent[:, top : top + cells, left : left + cells]
            if self.rng.random() < 0.5:
                pixels, latent = pixels.flip(-1), latent.flip(-1)
            images.append(pixels.float() / 255)
            latents.append(latent.float())
        return torch.stack(images), torch.stack(latents)
