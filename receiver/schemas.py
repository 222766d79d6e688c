"""The API's answers as pydantic models, for the OpenAPI document only.

Why: the handlers build their JSON (and headers) themselves, so without these the document would
promise an empty schema for every success and FastAPI's `{"detail": [...]}` for every error, and a
client generated from it would parse neither. Each route declares here every status it can answer.
"""

from __future__ import annotations

from typing import Any

from aeic.receiver.storage import Status
from pydantic import BaseModel

__all__ = ["Accepted", "ErrorBody", "Health", "ImageList", "ImageOut", "Readiness", "binary", "errors"]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


class Links(BaseModel):
    self: str
    reconstruction: str
    thumbnail: str


class Timings(BaseModel):
    entropy_ms: float | None
    decoder_ms: float | None
    decode_ms: float | None
    batch_size: int | None


class ImageOut(BaseModel):
    """One image's status and metadata (`api.image_json`)."""

    id: str
    status: Status
    device: str
    model_id: str
    width: int
    height: int
    rate_index: int
    downscale: int
    bytes: int
    bpp: float
    attempts: int
    error: str | None
    timings: Timings
    created_at: str
    updated_at: str
    decoded_at: str | None
    links: Links


class ImageList(BaseModel):
    items: list[ImageOut]
    next: str | None


class Accepted(BaseModel):
    id: str
    status: Status
    links: Links


class Health(BaseModel):
    """Liveness: `ok`, or (503) `stuck` with the `reason` the process needs a restart."""

    status: str
    version: str
    reason: str | None = None


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


_WHY = {
    304: "Not Modified: the If-None-Match tag is current", 400: "Bad request", 401: "Missing or invalid token",
    403: "Forbidden for this token", 404: "Not found (or not visible to this token)",
    406: "No acceptable image format", 408: "Body not received in time", 409: "Conflict",
    413: "Body too large", 415: "Unsupported media type", 422: "Invalid request", 429: "Rate limited",
    503: "Storage unavailable; retry later",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the error statuses a route can answer, all with the error body
    (304 has no body)."""
    return {s: {"description": _WHY[s]} if s == 304 else {"model": ErrorBody, "description": _WHY[s]}
            for s in statuses}


def binary(*media_types: str) -> dict[int | str, dict[str, Any]]:
    """A 200 whose body is a file in one of `media_types`."""
    content = {m: {"schema": {"type": "string", "format": "binary"}} for m in media_types}
    return {200: {"description": "The file", "content": content}}
