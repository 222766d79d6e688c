"""Plain records the storage layer hands out, independent of the database library behind it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["DecodeTimings", "ImageRecord", "NewImage", "Page", "Status"]


class Status(str, Enum):
    """Life of an upload: stored (pending) -> claimed by a worker (decoding) -> done or failed."""

    PENDING = "pending"
    DECODING = "decoding"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class NewImage:
    """What the API knows about a validated upload before it is stored."""

    id: str
    device: str
    idempotency_key: str | None
    model_id: str
    width: int
    height: int
    rate_index: int
    bytes: int
    sha256: str
    downscale: int = 1  # the sender coded the image reduced by this factor

    @property
    def bpp(self) -> float:
        """Bits per pixel of the whole bitstream (header included) at the true image size."""
        return self.bytes * 8.0 / (self.width * self.height)


@dataclass(frozen=True)
class DecodeTimings:
    """Per-image share of a batch's decode time, in milliseconds."""

    entropy_ms: float | None
    decoder_ms: float | None
    total_ms: float
    batch_size: int


@dataclass(frozen=True)
class ImageRecord:
    """One row of image metadata."""

    seq: int
    id: str
    device: str
    idempotency_key: str | None
    model_id: str
    width: int
    height: int
    rate_index: int
    bytes: int
    bpp: float
    sha256: str
    status: Status
    attempts: int
    error: str | None
    entropy_ms: float | None
    decoder_ms: float | None
    decode_ms: float | None
    batch_size: int | None
    created_at: float
    updated_at: float
    decoded_at: float | None
    decodes: int = 0
    downscale: int = 1


@dataclass(frozen=True)
class Page:
    """One page of a listing, newest first; `next` is the opaque cursor of the following page."""

    items: list[ImageRecord]
    next: str | None
