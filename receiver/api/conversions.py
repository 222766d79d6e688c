"""JPEG and WebP downloads: the reconstruction converted from its PNG once, under a budget, and kept."""

from __future__ import annotations

import logging
import threading

from aeic.receiver.errors import ApiError
from aeic.receiver.images import transcode
from aeic.receiver.storage import BlobNotFoundError, BlobStore, ImageRecord, SqlMetadataStore
from aeic.receiver.storage.blobs import reconstruction_key
from aeic.shared import decode_limits

__all__ = ["ConversionBudget", "convert_and_keep"]

log = logging.getLogger(__name__)


class ConversionBudget:
    """Output pixels being converted to JPEG or WebP for download at once: at most one largest picture's
    (`decode_limits.MAX_PIXELS`), or many small ones; a picture alone always fits. A conversion holds its
    picture decoded (measured: 900 MB and 7 s for 8192x8192), so without a bound one device downloading its
    own large image 8 times at once took the server to 6.0 GB, and the thread pool runs 40 such requests."""

    def __init__(self, pixels: int = decode_limits.MAX_PIXELS) -> None:
        self._limit, self._used = pixels, 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> bool:
        """Reserve `pixels`; False when other conversions hold too much of the budget (nothing reserved)."""
        with self._lock:
            if self._used and self._used + pixels > self._limit:
                return False
            self._used += pixels
            return True

    def give_back(self, pixels: int) -> None:
        """Return what `take` reserved."""
        with self._lock:
            self._used -= pixels


def convert_and_keep(blobs: BlobStore, store: SqlMetadataStore, budget: ConversionBudget,
                     record: ImageRecord, variant: str, key: str) -> bytes:
    """The reconstruction in `variant`'s format, made from the PNG once and kept at `key`, so the next
    download streams it: converting an 8192x8192 picture took 2.5-3 s to JPEG and 45-55 s to WebP, and up
    to 1.3 GB of this process, for every download (measured). Keeping it is only a saving: a store that
    refuses it costs a warning, and one made while the image was deleted is deleted again (a delete removes
    the files, the row, then the derived files again: either that last pass sees this file or this sees the
    row gone)."""
    pixels = record.width * record.height
    # The budget before the read: a refused download then never holds the PNG (115 MB at 8192x8192).
    if not budget.take(pixels):
        raise ApiError(503, "busy", "other downloads are being converted; retry shortly, or take the PNG",
                       headers={"Retry-After": "5"})
    try:
        png = blobs.get(reconstruction_key(record.id))
        converted = transcode(png, variant)
    except BlobNotFoundError:
        raise ApiError(404, "not_found", f"{variant} of {record.id} is missing") from None
    finally:
        budget.give_back(pixels)
    try:
        blobs.put(key, converted)
    except OSError as exc:
        log.warning("could not keep the %s conversion of %s: %s", variant, record.id, exc)
    else:
        if store.get_image(record.id) is None:
            blobs.delete(key)
    return converted
