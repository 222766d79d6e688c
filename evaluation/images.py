"""The pictures of an evaluation: the folder's images read as the sender reads them, and the file names
their saved reconstructions get (and the way back, which the analyses of a saved run take).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from aeic.sender.images import IMAGE_SUFFIXES, ImageReadError, open_regular, read_image
from PIL import Image


def list_images(folder: Path, limit: int | None = None) -> list[Path]:
    """Image files directly in ``folder``, sorted by name, at most ``limit``: the formats the sender reads
    (``IMAGE_SUFFIXES``), so a folder of a device's WebP photos is not refused as empty. A name that is not a
    regular file (a broken link, a FIFO) is listed too, so that it gets an error row saying why instead of
    leaving the means without a word; only folders are passed over."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return found[:limit] if limit is not None else found


# What Pillow raises for a file that is not a readable image: SyntaxError for some broken PNG chunks,
# DecompressionBombError above 2 x Image.MAX_IMAGE_PIXELS (179 Mpx by default).
# ImageReadError: a pixel mode the sender cannot code.
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, ImageReadError)


def megapixels(path: Path) -> float:
    """An image's pixel count in millions from its header alone (0 for a file that cannot be read: its
    error row says why), opened as the sender opens it."""
    try:
        with open_regular(path) as file, Image.open(file) as im:
            return im.width * im.height / 1e6
    except UNREADABLE:
        return 0.0


def load_rgb(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB as the sender reads it (EXIF orientation, 16-bit greyscale scaled,
    alpha over white, an embedded colour profile to sRGB), opened as the sender opens it (a FIFO is refused,
    not waited on): the pixels are scored against what ``aeic encode`` and ``aeic-send`` code."""
    return read_image(path)


def recon_name(image: str) -> str:
    """File name of an image's saved reconstruction: ``a.png`` stays, ``a.jpg`` becomes ``a.jpg.png``.

    Distinct from every other image's, so ``a.jpg`` and ``a.png`` in one folder do not overwrite each other.
    """
    return image if image.endswith(".png") else f"{image}.png"


def original_of(images: Path, recon: Path) -> Path:
    """The original in ``images`` that a saved reconstruction file stands for (the inverse of :func:`recon_name`)."""
    stripped = images / recon.name.removesuffix(".png")
    return stripped if recon.name != stripped.name and stripped.is_file() else images / recon.name
