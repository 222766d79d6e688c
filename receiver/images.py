"""Encoding decoded RGB arrays for storage and for HTTP (PNG master, JPEG/WebP on request, thumbnails)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["CONVERSIONS", "FORMATS", "encode_png", "make_thumbnail", "transcode"]

# suffix -> (Pillow format, media type)
FORMATS: dict[str, tuple[str, str]] = {
    "png": ("PNG", "image/png"),
    "jpg": ("JPEG", "image/jpeg"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}
# Pillow format -> the suffix its conversion of a reconstruction is kept under (.jpg and .jpeg: one file).
CONVERSIONS: dict[str, str] = {"JPEG": "jpg", "WEBP": "webp"}


def _to_image(rgb: np.ndarray) -> Image.Image:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}")
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def encode_png(rgb: np.ndarray) -> bytes:
    """Lossless master copy of a reconstruction."""
    out = io.BytesIO()
    _to_image(rgb).save(out, format="PNG", compress_level=4)
    return out.getvalue()


def make_thumbnail(rgb: np.ndarray, longest_side: int) -> bytes:
    """A JPEG no larger than `longest_side` on either side, aspect ratio kept."""
    image = _to_image(rgb)
    image.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()


def transcode(png: bytes, suffix: str) -> bytes:
    """The stored PNG in another format (`suffix` a key of FORMATS)."""
    fmt, _media = FORMATS[suffix]
    if fmt == "PNG":
        return png
    with Image.open(io.BytesIO(png)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format=fmt, quality=90)
    return out.getvalue()
