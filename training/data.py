"""Training data: downsampled photos and their teacher latents, cached once, cropped at random.

The provided photos are mostly lossy-compressed, so each is first downsampled (short side
``short_side``) to wash out coding artefacts; the teacher's latent of the whole downsampled image
is computed once and cached, so training never runs the teacher encoder again. Crops are aligned
to the latent grid (8 px) and flipped together with their latents.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import secrets
import shutil
import struct
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from aeic.codec.checkpoint import load_data_only
from aeic.sender.images import (
    IMAGE_SUFFIXES,
    PLUGIN_ONLY_SUFFIXES,
    ImageReadError,
    identified,
    open_regular,
    upright_rgb8,
)
from PIL import Image
from tqdm import tqdm

from .schedule import StepOutOfMemory, out_of_memory_detail, progress_bar

# photos Pillow does not read (HEIC/HEIF and JPEG XL need plugins, a camera's raw files a raw converter): listed
# with the photos, so each is skipped with a warning and counted like an unreadable one instead of passed over unseen
UNREAD_PHOTO_SUFFIXES = PLUGIN_ONLY_SUFFIXES | {".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"}
LATENT_STRIDE = 8
# how a photo becomes pixels, in every cache key: caches filled before photos were read as the sender reads them
# (colour profile, alpha) are filled again rather than trained on in the colours the sender does not code, and
# a run reads the same pixels whether its cache was filled before a large JPEG was decoded reduced or after
READER = "sender, JPEG reduced to twice short_side"
MAX_LONG_SIDE = 1024  # panoramas are centre-cropped: more pixels of one photo add little
# what Pillow raises for a damaged, empty or foreign file, or one over its decompression-bomb limit, and the
# sender's reader for a pixel mode it does not convert
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError, ImageReadError)


def long_side_limit(short_side: int) -> int:
    """The longest side kept: ``MAX_LONG_SIDE``, or ``short_side`` above it (a square), never below the short side."""
    return max(MAX_LONG_SIDE, short_side)


def list_images(folder: Path) -> list[Path]:
    """Every photo under ``folder`` (those Pillow does not read too), in path order: subfolders too (LSDIR and
    CLIC nest theirs; a symlinked one is followed once), hidden names (macOS's ``._`` copies, ``.git``) left out."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [Path(root, name) for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES | UNREAD_PHOTO_SUFFIXES]  # fmt: skip
    return sorted(found)


@contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """The photo opened as the sender opens it (a FIFO named x.jpg is refused, not waited on for ever), without
    Pillow's warning between one and two times its pixel limit (100 MP photos are common); over twice it, its
    error skips the photo (``build_cache``), as does a format Pillow does not read."""
    if path.suffix.lower() in UNREAD_PHOTO_SUFFIXES:
        raise Image.UnidentifiedImageError(f"Pillow does not read {path.suffix} photos: convert them to JPEG or PNG")
    with open_regular(path) as file:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = identified(path, file)
        with image:
            yield image


def load_downsampled(path: Path, short_side: int) -> np.ndarray:
    """RGB uint8 as the sender reads the photo (``aeic.sender.images``: upright, its colour profile to sRGB, alpha over
    white, 16-bit and float grey scaled), so the codec trains on the colours it codes; short side at most
    ``short_side``, long side at most ``long_side_limit``, multiples of 8."""
    with _open(path) as image:
        reduce = 2 * short_side / min(image.size)
        if reduce < 1:  # a JPEG decodes at 1/2, 1/4 or 1/8 scale if asked (others ignore it): 6x faster at 12 MP
            image.draft(None, (math.ceil(image.width * reduce), math.ceil(image.height * reduce)))
        array = upright_rgb8(image, path)
    factor = short_side / min(array.shape[:2])
    if factor < 1:
        size = (round(array.shape[1] * factor), round(array.shape[0] * factor))
        array = np.array(Image.fromarray(array).resize(size, Image.Resampling.LANCZOS))  # writable: torch shares it
    height, width = (min(s, long_side_limit(short_side)) // LATENT_STRIDE * LATENT_STRIDE for s in array.shape[:2])
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    return np.ascontiguousarray(array[top : top + height, left : left + width])


@dataclass
class CachedImage:
    pixels: torch.Tensor  # (3, H, W) uint8
    latent: torch.Tensor  # (C, H/8, W/8) float16

    def load(self) -> CachedImage:
        """Itself: held in memory (see :class:`OnDisk`)."""
        return self


@dataclass(frozen=True)
class OnDisk:
    """A cached photo past the memory budget, read from its cache file for each crop drawn from it (mapped, so
    only the crop's pages are read): LSDIR's 85,000 photos need about 130 GB at short_side 512."""

    entry: Path
    photo: Path  # named when its cache file is gone

    def load(self) -> CachedImage:
        """The cached photo; a cache file deleted or damaged while the run trains is named, with its photo."""
        try:
            return cast(CachedImage, load_data_only(self.entry, allowed=[CachedImage], mmap=True))
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            raise OSError(f"cannot read the cache file {self.entry} of {self.photo} ({reason}): deleted or damaged "
                          "since the run started?") from exc


# a container's memory limit (cgroup v2, v1): there the machine's memory is the host's
CGROUP_MEMORY_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def memory_budget() -> int:
    """Bytes of cached photos held in memory: a quarter of the machine's, or of the container's limit (a crop
    from memory costs nothing, one from a cache file about a millisecond: a sizeable part of a GPU step)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in CGROUP_MEMORY_LIMITS:
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        total = min(total, int(text)) if text.isdigit() else total  # "max", or v1's huge "unlimited": no limit
    return total // 4


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
    """The training photos cannot make a batch: no folder, no photos, or none readable and as large as a crop."""


def _warn(message: str) -> None:
    """One line on stderr, beside the progress bar; a file name that is not UTF-8 is printed escaped."""
    tqdm.write(f"aeic-train: warning: {message}".encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


def relative_to_here(path: Path) -> str:
    """``path``, and where it is relative to: a config's paths are read from the folder aeic-train runs in, so one
    run from another folder misses them."""
    return str(path) if Path(path).is_absolute() else f"{path} (relative to {Path.cwd()}, where aeic-train runs)"


def _photos(folder: Path, cache_dir: Path) -> list[Path]:
    """The photos to cache; a missing or empty folder, or a cache that is a file, stops the run before any work."""
    if not Path(folder).is_dir():
        state = "is not a folder" if Path(folder).exists() else "does not exist"
        raise TrainingDataError(f"training photo folder {relative_to_here(folder)} {state}")
    photos = list_images(folder)
    if not photos:
        raise TrainingDataError(f"no training photos ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder} or its subfolders")
    if cache_dir.exists() and not cache_dir.is_dir():
        raise TrainingDataError(f"cache {cache_dir} is a file, not a folder")
    return photos


def _cache_entry(cache_dir: Path, folder: Path, path: Path, short_side: int, teacher: LatentTeacher) -> Path:
    """A photo's cache file, keyed by its path under the folder, size and modification time (a photo replaced
    under its name is read again), the downsampling, the teacher and the reader (``READER``)."""
    stat = path.stat()
    facts = [os.fsencode(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns, short_side, long_side_limit(short_side),
             teacher.name, READER]  # fmt: skip
    return cache_dir / f"{hashlib.sha256(repr(facts).encode()).hexdigest()[:20]}.pt"


def _read_entry(entry: Path, mapped: bool = False) -> CachedImage | None:
    """A cached photo; None when missing or unreadable (cut short by a lost machine: computed again, not fatal).
    ``mapped``: its tensors left in the file (a photo past the memory budget, only checked here)."""
    try:
        item = load_data_only(entry, allowed=[CachedImage], mmap=mapped)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # absent, or a damaged zip or pickle
        return None
    return item if isinstance(item, CachedImage) else None


def _write_entry(entry: Path, item: CachedImage) -> None:
    """Write through a temporary file of its own, then rename: a crash leaves no half-written entry. Its name
    is random and made exclusively, not the process id: containers sharing a cache volume run as the same
    pids, and two writers of one temporary truncated each other's and renamed it away."""
    tmp = entry.with_name(f"{entry.stem}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "xb") as file:
            torch.save(item, file)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk or a read-only folder as either
        tmp.unlink(missing_ok=True)
        room = shutil.disk_usage(entry.parent).free // 2**20  # what torch's 'unexpected pos N vs M' leaves unsaid
        raise OSError(f"cannot write the cache {entry.parent} ({room} MiB free on its disk): {str(exc).splitlines()[0]}") from exc
    try:
        tmp.replace(entry)
    except FileNotFoundError:  # removed as stale by a run sharing the cache while this one stood still (Ctrl-Z)
        pass  # only this entry is not kept: the photo is cached again by the next run


# A cache write takes seconds: a temporary untouched for this long is a killed run's, whichever machine or container
# ran it (a process id says nothing there: a container's training run is often pid 1, alive in every container).
STALE_TEMPORARY_SECONDS = 600
_TEMPORARY = re.compile(r"[0-9a-f]{20}\.[0-9a-f]{1,16}\.tmp")  # _write_entry's; older releases put a pid in its place


def _clear_stale_temporaries(cache_dir: Path) -> None:
    """Remove the temporary files of runs killed while writing a cache file (``kill -9``, a lost machine): untouched
    for ``STALE_TEMPORARY_SECONDS``; nothing else would ever remove them. A fresh one (a run sharing the cache may be
    writing it) is kept, as is one that cannot be removed (a read-only cache)."""
    now = time.time()
    with os.scandir(cache_dir) as entries:
        for entry in entries:
            if _TEMPORARY.fullmatch(entry.name) is None:
                continue
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMPORARY_SECONDS:
                    os.unlink(entry.path)
            except OSError:  # another run removed it first, or the cache is read-only: left as it is
                continue


def _read_photo(path: Path, folder: Path, cache_dir: Path, short_side: int, teacher: LatentTeacher,
                mapped: bool) -> tuple[Path, CachedImage | torch.Tensor] | None:
    """The photo's cache file and its entry there, else its downsampled pixels (3, H, W); None, with a
    warning, when the photo cannot be read (a broken link too). Nothing of an unreadable photo is cached."""
    try:
        entry = _cache_entry(cache_dir, folder, path, short_side, teacher)
        found = _read_entry(entry, mapped) or torch.from_numpy(load_downsampled(path, short_side)).permute(2, 0, 1).contiguous()
    except _UNREADABLE as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _warn(f"skipped {path}: {detail.removeprefix(f'{path}: ')}")  # the sender's reader names the file too
        return None
    return entry, found


def _cached(found: CachedImage | torch.Tensor, entry: Path, teacher: LatentTeacher, crop: int) -> CachedImage | None:
    """A read photo as a cache item (its teacher latent computed and cached once); None when no crop fits in it."""
    pixels = found.pixels if isinstance(found, CachedImage) else found
    if min(pixels.shape[1:]) < crop:
        return None
    if isinstance(found, CachedImage):
        return found
    item = CachedImage(pixels, teacher.encode(pixels[None].float() / 255)[0].half())
    _write_entry(entry, item)
    return item


def _teacher_out_of_memory(path: Path, exc: torch.OutOfMemoryError, short_side: int) -> StepOutOfMemory:
    """One line for a teacher latent (computed on the training device) that did not fit in its memory: a large
    photo through the SD VAE on a small GPU gave torch's traceback."""
    return StepOutOfMemory(f"out of memory computing the teacher latent of {path} ({out_of_memory_detail(exc)}); the "
                           f"photos cached before it are kept: lower short_side ({short_side} now) and run the same "
                           "command again")


def build_cache(folder: Path, cache_dir: Path, short_side: int, teacher: LatentTeacher,
                crop: int) -> list[CachedImage | OnDisk]:
    """Load or compute (and keep, one file per photo, so an interrupted run resumes) the cache; the photos past
    ``memory_budget`` stay in their cache files.

    A photo that cannot be read (damaged, empty, not an image, over Pillow's size limit) is skipped with a
    warning, so one bad file among thousands does not stop a run; so are photos smaller than a crop."""
    photos = _photos(folder, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(cache_dir)
    items: list[CachedImage | OnDisk] = []
    unreadable, held, budget = 0, 0, memory_budget()
    with torch.no_grad():
        # what is made for each photo: a model with its own pixel decoder has no teacher latent to compute
        desc = "photos" if teacher is NO_TEACHER else f"photos and {teacher.name} latents"
        for path in progress_bar(iterable=photos, desc=desc):
            read = _read_photo(path, Path(folder), cache_dir, short_side, teacher, mapped=held >= budget)
            unreadable += read is None
            try:
                item = None if read is None else _cached(read[1], read[0], teacher, crop)
            except torch.OutOfMemoryError as exc:
                raise _teacher_out_of_memory(path, exc, short_side) from None
            except OSError as exc:  # its cache file could not be written (a full disk)
                raise OSError(f"{exc}, caching {path}; the {len(items)} photos cached before it are kept: make room, "
                              "or set `cache` elsewhere, and run the same command again") from exc
            if read is None or item is None:
                continue
            held += item.pixels.nbytes + item.latent.nbytes
            items.append(item if held <= budget else OnDisk(read[0], path))
    small = len(photos) - unreadable - len(items)
    counts = f"{unreadable} unreadable, {small} smaller than a {crop} px crop after downsampling to short_side {short_side}"
    if not items:
        raise TrainingDataError(f"none of the {len(photos)} photos in {folder} is usable ({counts})")
    if len(items) == 1:  # most likely `data` names the wrong folder: said, not refused (a one-photo smoke test)
        others = f" (of {len(photos)}: {counts})" if len(photos) > 1 else ""
        _warn(f"only one usable photo in {folder}{others}: every crop is cut from it; is this the folder meant?")
    elif unreadable or small:
        _warn(f"training on {len(items)} of the {len(photos)} photos in {folder} ({counts})")
    return items


class CropSampler:
    """Random aligned crops (and horizontal flips) of cached images, with their latents.

    ``seed`` may be a generator the caller keeps (its state goes into a checkpoint, so a resumed run
    draws the crops an uninterrupted one would)."""

    def __init__(self, items: list[CachedImage | OnDisk], crop: int, seed: int | np.random.Generator) -> None:
        self.items = items
        self.crop = crop
        self.rng = np.random.default_rng(seed)  # a Generator is used as it is

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, latents = [], []
        cells = self.crop // LATENT_STRIDE
        for index in self.rng.integers(0, len(self.items), size):
            item = self.items[index].load()
            rows, cols = item.latent.shape[1] - cells, item.latent.shape[2] - cells
            top, left = int(self.rng.integers(0, rows + 1)), int(self.rng.integers(0, cols + 1))
            y, x = top * LATENT_STRIDE, left * LATENT_STRIDE
            pixels = item.pixels[:, y : y + self.crop, x : x + self.crop]
            latent = item.latent[:, top : top + cells, left : left + cells]
            if self.rng.random() < 0.5:
                pixels, latent = pixels.flip(-1), latent.flip(-1)
            images.append(pixels.float() / 255)
            latents.append(latent.float())
        return torch.stack(images), torch.stack(latents)
