"""Training data: downsampled photos and their teacher latents, cached once, cropped at random.

The provided photos are mostly lossy-compressed, so each is first downsampled (short side
``short_side``) to wash out coding artefacts; the teacher's latent of the whole downsampled image
is computed once and cached, so training never runs the teacher encoder again. Crops are aligned
to the latent grid (8 px) and flipped together with their latents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
LATENT_STRIDE = 8
MAX_LONG_SIDE = 1024  # panoramas are centre-cropped: more pixels of one photo add little


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_downsampled(path: Path, short_side: int) -> np.ndarray:
    """RGB uint8, short side at most ``short_side``, long side at most ``MAX_LONG_SIDE``, multiples of 8."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        factor = short_side / min(image.size)
        if factor < 1:
            size = (round(image.width * factor), round(image.height * factor))
            image = image.resize(size, Image.Resampling.LANCZOS)
        array = np.array(image)  # writable: torch.from_numpy shares it
    height, width = (min(s, MAX_LONG_SIDE) // LATENT_STRIDE * LATENT_STRIDE for s in array.shape[:2])
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    return np.ascontiguousarray(array[top : top + height, left : left + width])


@dataclass
class CachedImage:
    pixels: torch.Tensor  # (3, H, W) uint8
    latent: torch.Tensor  # (C, H/8, W/8) float16


@dataclass(frozen=True)
class LatentTeacher:
    """The pretrained encoder whose latents the cache holds; its name keys the cache, so a cache filled by
    one teacher (TAEF2's 32 channels, the SD VAE's 4, none) is never read as another's."""

    name: str
    encode: Callable[[torch.Tensor], torch.Tensor]  # (1, 3, H, W) in [0, 1] -> (1, C, H/8, W/8)


def _empty_latent(pixels: torch.Tensor) -> torch.Tensor:
    return torch.zeros(1, 1, pixels.shape[2] // LATENT_STRIDE, pixels.shape[3] // LATENT_STRIDE)


NO_TEACHER = LatentTeacher("none", _empty_latent)  # the cache holds an empty latent of the right grid


class TrainingDataError(ValueError):
    """The training photos cannot make a batch: no folder, no photos, or none as large as a crop."""


def build_cache(folder: Path, cache_dir: Path, short_side: int, teacher: LatentTeacher, crop: int) -> list[CachedImage]:
    """Load or compute (and keep, one file per photo, so an interrupted run resumes) the cache."""
    if not Path(folder).is_dir():
        raise TrainingDataError(f"training photo folder {folder} {'is not a folder' if Path(folder).exists() else 'does not exist'}")
    photos = list_images(folder)
    if not photos:
        raise TrainingDataError(f"no training photos ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    if cache_dir.exists() and not cache_dir.is_dir():
        raise TrainingDataError(f"cache {cache_dir} is a file, not a folder")
    cache_dir.mkdir(parents=True, exist_ok=True)
    items = []
    with torch.no_grad():
        for path in tqdm(photos, desc="teacher latents"):
            facts = f"{path.name}|{path.stat().st_size}|{short_side}|{MAX_LONG_SIDE}|{teacher.name}"
            entry = cache_dir / f"{hashlib.sha256(facts.encode()).hexdigest()[:20]}.pt"
            if entry.exists():
                item = torch.load(entry, weights_only=False)
            else:
                pixels = torch.from_numpy(load_downsampled(path, short_side)).permute(2, 0, 1).contiguous()
                latent = teacher.encode(pixels[None].float() / 255)[0].half()
                item = CachedImage(pixels, latent)
                try:
                    torch.save(item, entry.with_suffix(".tmp"))
                except (OSError, RuntimeError) as exc:  # torch reports a full disk or a read-only folder as either
                    entry.with_suffix(".tmp").unlink(missing_ok=True)
                    raise OSError(f"cannot write the cache {cache_dir}: {str(exc).splitlines()[0]}") from exc
                entry.with_suffix(".tmp").replace(entry)
            if min(item.pixels.shape[1:]) >= crop:
                items.append(item)
    if not items:
        raise TrainingDataError(f"none of the {len(photos)} photos in {folder} is at least {crop} px on its short side "
                                f"after downsampling to short_side {short_side}: no {crop} px crop fits")
    return items


class CropSampler:
    """Random aligned crops (and horizontal flips) of cached images, with their latents.

    ``seed`` may be a generator the caller keeps (its state goes into a checkpoint, so a resumed run
    draws the crops an uninterrupted one would)."""

    def __init__(self, items: list[CachedImage], crop: int, seed: int | np.random.Generator) -> None:
        self.items = items
        self.crop = crop
        self.rng = np.random.default_rng(seed)  # a Generator is used as it is

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
