"""The receiver's HTTP API (FastAPI app factory): uploads, status, reconstructions, listing, deletion,
health and metrics, plus the gallery.

Why validate everything before storing: a 202 is a promise that the image will be decoded, so only
bitstreams this receiver can actually decode (size, header, CRC, model, dimensions) are accepted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any

from aeic.receiver import schemas
from aeic.receiver.api_docs import install_api_docs
from aeic.receiver.auth import DEVICE_NAME, Authenticator, Limiter, Principal, RateLimiter
from aeic.receiver.backends import open_blob_store, open_queue, prepare_backends
from aeic.receiver.data_dir import (
    lock_data_dir,
    lock_sqlite_database,
    owner_id,
    prepare_data_dir,
    unlock_data_dir,
)
from aeic.receiver.errors import ApiError, install_error_handlers
from aeic.receiver.images import CONVERSIONS, FORMATS, transcode
from aeic.receiver.log_redaction import install_log_redaction
from aeic.receiver.metrics import ReceiverMetrics
from aeic.receiver.queue import JobQueue
from aeic.receiver.redis_limiter import RedisRateLimiter
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.security_headers import HardenedFastAPI
from aeic.receiver.sessions import GallerySessions, session_cookie
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import (
    BlobNotFoundError,
    BlobStore,
    FilesystemBlobStore,
    IdempotencyConflictError,
    ImageFilter,
    ImageRecord,
    InvalidCursorError,
    NewImage,
    SqlMetadataStore,
    Status,
)
from aeic.receiver.storage.blobs import (
    BlobReadError,
    OpenBlob,
    bitstream_key,
    conversion_key,
    open_blob,
    reconstruction_key,
    thumbnail_key,
)
from aeic.receiver.storage.metadata import decode_cursor
from aeic.receiver.storage.orphans import remove_orphan_blobs
from aeic.receiver.worker import DecodeWorker, WorkerConfig
from aeic.shared import bitstream as bs
from aeic.shared import decode_limits
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, Security
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from aeic import __version__

if sys.version_info >= (3, 11):
    read_iso8601 = datetime.fromisoformat
else:  # 3.10's fromisoformat reads only what isoformat() writes: no `+0100`, `.5`, `20261206T0900`, week dates
    from dateutil.parser import isoparse as read_iso8601

__all__ = [
    "BlobDownload",
    "ConversionBudget",
    "ReceiverState",
    "create_app",
    "image_json",
    "optional_principal",
    "principal",
    "read_body",
    "receiver_state",
    "visible_image",
]

log = logging.getLogger(__name__)

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")
# Bitstream error class -> (HTTP status, error code)
_BITSTREAM_ERRORS: list[tuple[type[Exception], int, str]] = [
    (bs.TruncatedError, 400, "truncated_bitstream"),
    (bs.BadMagicError, 400, "bad_magic"),
    (bs.UnsupportedVersionError, 422, "unsupported_version"),
    (bs.CrcMismatchError, 400, "crc_mismatch"),
    (bs.InvalidHeaderError, 422, "invalid_header"),
    (bs.BitstreamError, 400, "invalid_bitstream"),
]


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


@dataclass
class ReceiverState:
    """Everything a request handler needs, built once per app."""

    settings: ReceiverSettings
    store: SqlMetadataStore
    blobs: BlobStore
    registry: CodecRegistry
    auth: Authenticator
    limiter: Limiter  # uploads' decode cost per device
    metrics: ReceiverMetrics
    worker: DecodeWorker | None
    sessions: GallerySessions
    login_limiter: Limiter  # failed gallery sign-ins per client address
    queue: JobQueue | None = None  # scale-out: decodes go to `aeic-receiver worker` processes
    # Held while the embedded worker runs: the data directory's, and a SQLite database's (`data_dir`).
    worker_locks: list[int] = field(default_factory=list)
    conversions: ConversionBudget = field(default_factory=ConversionBudget)  # JPEG/WebP downloads
    blob_failure_logged: str | None = None  # the readiness probe's last blob-store failure, logged once


def receiver_state(request: Request) -> ReceiverState:
    """The wiring of the app that serves `request`."""
    state: ReceiverState = request.app.state.receiver
    return state


# -- authentication ------------------------------------------------------------------------------


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def client_address(request: Request) -> str:
    """The key failed sign-ins are counted under (the proxy's client address when it forwards one)."""
    return request.client.host if request.client else "unknown"


def optional_principal(request: Request) -> Principal | None:
    """The caller, or None when anonymous. A bearer token wins; otherwise the gallery's session cookie,
    which is honoured for reads only, so a cross-site form can never make it write."""
    state = receiver_state(request)
    token = _bearer(request)
    if token is not None:
        return _bearer_principal(state, client_address(request), token)
    if request.method in ("GET", "HEAD"):
        cookie = session_cookie(request, state.settings.cookie_secure)
        return state.sessions.principal(request.cookies.get(cookie.name))
    return None


def _bearer_principal(state: ReceiverState, address: str, token: str) -> Principal | None:
    """A wrong bearer token costs its address one of the gallery's sign-in attempts, and an address out of
    them is refused before any check (429), so no /v1 route is a way round the sign-in limit. A valid
    token costs nothing: a fleet behind one address is slowed only while wrong tokens come from it.

    The wrong token takes its attempt after the check, atomically, and is answered 429 when none is left:
    guesses sent at once all pass the gate before the first of them has failed, and each was answered
    401 (40 of 200 at once with a limit of 3). A right token sent then is 429 too, so a 429 tells nothing."""
    wait = state.login_limiter.wait(address)
    if wait <= 0:
        who = state.auth.authenticate(token)
        if who is not None:
            return who
        wait = state.login_limiter.acquire(address)
        if wait <= 0:
            return None
    seconds = str(max(1, math.ceil(wait)))
    raise ApiError(429, "too_many_failed_tokens", f"too many wrong tokens from this address; retry in {seconds} s",
                   headers={"Retry-After": seconds})


def principal(request: Request) -> Principal:
    """The caller; 401 when the token is missing or invalid."""
    who = optional_principal(request)
    if who is None:
        raise ApiError(401, "unauthorized", "a valid bearer token is required",
                       headers={"WWW-Authenticate": 'Bearer realm="aeic"'})
    return who


Caller = Annotated[Principal, Depends(principal)]


# -- JSON shapes ---------------------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def image_json(record: ImageRecord) -> dict[str, Any]:
    """The public description of an image."""
    base = f"/v1/images/{record.id}"
    return {
        "id": record.id,
        "status": record.status.value,
        "device": record.device,
        "model_id": record.model_id,
        "width": record.width,
        "height": record.height,
        "rate_index": record.rate_index,
        "downscale": record.downscale,
        "bytes": record.bytes,
        "bpp": record.bpp,
        "attempts": record.attempts,
        "error": record.error,
        "timings": {
            "entropy_ms": record.entropy_ms,
            "decoder_ms": record.decoder_ms,
            "decode_ms": record.decode_ms,
            "batch_size": record.batch_size,
        },
        "created_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "decoded_at": _iso(record.decoded_at),
        "links": {"self": base, "reconstruction": f"{base}/reconstruction", "thumbnail": f"{base}/thumbnail"},
    }


def _quoted(value: str) -> str:
    """`value` for an error message, at most 40 characters of it: what a client sent is echoed on our origin,
    so a link must not be able to make an answer carry a message of its own (as with the cursor)."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def visible_image(state: ReceiverState, who: Principal, image_id: str) -> ImageRecord:
    """The record if it exists and the caller may see it; 404 otherwise (no existence leak). Only an id's
    shape is quoted back: anything else in its place is a link's text, not an id."""
    well_formed = _IMAGE_ID.match(image_id) is not None
    record = state.store.get_image(image_id) if well_formed else None
    if record is None or not who.can_see(record):
        raise ApiError(404, "not_found", f"no image {image_id}" if well_formed else "no such image")
    return record


# -- upload --------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, or 413 as soon as it is known to exceed `limit` (before reading it all), or 408 when it
    has not fully arrived within `timeout_s` (a client trickling a body must not hold a connection and
    its buffer forever; the server itself has no such deadline). The upload's and the sign-in form's."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"bitstream of {declared} bytes exceeds the {limit}-byte limit")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "payload_too_large", f"bitstream exceeds the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "upload_timeout", f"the body did not arrive within {timeout_s:g} s",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:  # a device that lost its network mid-upload: its spool retries; no traceback
        raise ApiError(400, "incomplete_body", "the client went away before the body was complete") from None


def _parse_header(state: ReceiverState, data: bytes) -> bs.Header:
    """Full container validation plus this receiver's own limits."""
    if not data:
        raise ApiError(400, "empty_body", "the request body is empty; send the bitstream")
    try:
        header = bs.peek_header(data)
    except bs.BitstreamError as exc:
        status, code = next((s, c) for cls, s, c in _BITSTREAM_ERRORS if isinstance(exc, cls))
        raise ApiError(status, code, str(exc)) from None
    if not state.registry.knows(header.model_id):
        known = ", ".join(sorted(m.hex() for m in state.registry.model_ids())) or "none"
        raise ApiError(422, "unknown_model", f"model id {header.model_id.hex()} is not served here (known: {known})")
    levels = state.registry.num_levels(header.model_id)
    if levels is not None and header.rate_index >= levels:
        raise ApiError(422, "unknown_rate", f"rate index {header.rate_index} is outside 0..{levels - 1} "
                                            f"for model {header.model_id.hex()}")
    limit = state.settings.max_dimension
    if header.width > limit or header.height > limit:
        raise ApiError(422, "dimensions_too_large",
                       f"{header.width}x{header.height} exceeds the {limit}-pixel limit per side")
    too_large = decode_limits.header_oversize_reason(header)
    if too_large is not None:  # the decoder would refuse it: say so now, before storing it
        raise ApiError(422, "dimensions_too_large", too_large)
    return header


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(key):
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 visible ASCII characters")
    return key


def _accepted(record: ImageRecord, replayed: bool) -> JSONResponse:
    body = {"id": record.id, "status": record.status.value, "links": image_json(record)["links"]}
    headers = {"Location": f"/v1/images/{record.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, status_code=202, headers=headers)


def _store_upload(state: ReceiverState, image: NewImage, data: bytes) -> tuple[ImageRecord, bool]:
    """Blob first, then the row: a row never points at a missing bitstream."""
    if image.idempotency_key is not None:
        existing = state.store.find_by_idempotency_key(image.device, image.idempotency_key)
        if existing is not None:
            if existing.sha256 != image.sha256:
                raise IdempotencyConflictError(existing)
            return existing, False
    state.blobs.put(bitstream_key(image.id), data)
    try:
        record, created = state.store.insert_image(image)
    except BaseException:
        state.blobs.delete(bitstream_key(image.id))
        raise
    if not created:  # lost a race with a concurrent retry of the same key
        state.blobs.delete(bitstream_key(image.id))
    return record, created


def _enqueue(state: ReceiverState, queue: JobQueue, image_id: str) -> None:
    """Tell the workers; the upload is already durable, so a failure here only delays the decode until a
    worker's reconciliation finds the image (the 202 stays true)."""
    try:
        queue.publish(image_id)
    except Exception:  # any queue failure is logged and counted, never a lost upload
        log.exception("could not enqueue image %s; a worker will find it by reconciliation", image_id)
        state.metrics.uploads.labels("enqueue_failed").inc()


def _rate_limit(state: ReceiverState, device: str, wait: float, cost: float) -> None:
    """429 with the whole seconds until the device's bucket holds this upload's cost, when it does not now:
    the bucket counts decode cost (`decode_limits.decode_cost`), as the header, not the stream's length,
    sets how long a decode takes, so headers that claim large pictures cannot queue hours of work."""
    if wait <= 0:
        return
    state.metrics.uploads.labels("rate_limited").inc()
    retry_after = max(1, math.ceil(wait))  # whole seconds, as the header says it
    what = (f"too many uploads from {device}" if cost <= 1.0 else
            f"uploads from {device} are over their decode budget (this one costs {cost:.1f} units)")
    raise ApiError(429, "rate_limited", f"{what}; retry in {retry_after} s", headers={"Retry-After": str(retry_after)})


async def upload_image(request: Request, who: Caller) -> JSONResponse:
    """Accept one bitstream: 202 with its id once it is durably stored."""
    state = receiver_state(request)
    if who.device is None:
        raise ApiError(403, "device_token_required", "uploads must use a device token")
    # One unit before the body is read (its cost is not known yet), the rest of its decode cost after.
    _rate_limit(state, who.device, await run_in_threadpool(state.limiter.acquire, who.device), 1.0)
    try:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/octet-stream":
            raise ApiError(415, "unsupported_media_type", "send the bitstream as application/octet-stream")
        key = _idempotency_key(request)
        data = await read_body(request, state.settings.max_upload_bytes, state.settings.upload_timeout_s)
        header = _parse_header(state, data)
        # The token again: the body may take upload_timeout_s, and a device revoked meanwhile stores nothing.
        if await run_in_threadpool(state.auth.authenticate, _bearer(request)) != who:
            raise ApiError(401, "unauthorized", "the token was revoked while the upload arrived",
                           headers={"WWW-Authenticate": 'Bearer realm="aeic"'})
    except ApiError as exc:
        state.metrics.uploads.labels(exc.code).inc()
        raise
    cost = decode_limits.header_decode_cost(header)
    if cost > 1.0:
        wait = await run_in_threadpool(state.limiter.acquire, who.device, cost=cost, paid=1.0)
        _rate_limit(state, who.device, wait, cost)
    image = NewImage(
        id=secrets.token_hex(16), device=who.device, idempotency_key=key, model_id=header.model_id.hex(),
        width=header.width, height=header.height, rate_index=header.rate_index, bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), downscale=header.downscale,
    )
    try:
        record, created = await run_in_threadpool(_store_upload, state, image, data)
    except IdempotencyConflictError as exc:
        state.metrics.uploads.labels("idempotency_conflict").inc()
        raise ApiError(409, "idempotency_conflict",
                       f"Idempotency-Key {key!r} was used for image {exc.existing.id} with other content") from None
    except (OSError, SQLAlchemyError):  # 503 from the error handlers; counted, so that an outage shows here too
        state.metrics.uploads.labels("storage_unavailable").inc()
        raise
    state.metrics.uploads.labels("accepted" if created else "replayed").inc()
    if created:
        state.metrics.upload_bytes.observe(len(data))
        if state.worker is not None:
            state.worker.wake()
        if state.queue is not None:
            await run_in_threadpool(_enqueue, state, state.queue, record.id)
    return _accepted(record, replayed=not created)


# -- reads ---------------------------------------------------------------------------------------


_NO_STORE = {"Cache-Control": "no-store"}  # private and changing: no cache may keep or reuse it


def get_image(image_id: str, request: Request, who: Caller) -> JSONResponse:
    """Status and metadata of one image."""
    return JSONResponse(image_json(visible_image(receiver_state(request), who, image_id)), headers=_NO_STORE)


def _parse_time(value: str | None, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):  # nan, inf, 1e400: float() takes them but they name no instant
            raise ApiError(422, "invalid_request", f"{name} must be a finite time, got {_quoted(value)}")
        return number
    try:
        parsed = read_iso8601(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, "invalid_request",
                       f"{name} must be ISO 8601 or epoch seconds, got {_quoted(value)}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


_TIME_HELP = "images received {} this time: Unix seconds or ISO 8601 (`2026-12-06T09:00:00Z`)"


def list_images(
    request: Request,
    who: Caller,
    device: Annotated[str | None, Query(description="only this device's images (admin token only)")] = None,
    since: Annotated[str | None, Query(description=_TIME_HELP.format("at or after"))] = None,
    until: Annotated[str | None, Query(description=_TIME_HELP.format("before"))] = None,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(description="the `next` value of the previous page, as given")] = None,
) -> Response:
    """Newest first, with an opaque `next` cursor; a device only ever lists its own images.

    A strong ETag, and 304 to an `If-None-Match` naming it: the gallery polls its first page every 1.5 s
    (39 KB at 60 images), nearly always unchanged, and receives headers only. The tag is a hash of what
    the body is made from, not of the body, so a 304 runs no listing query: the catalogue's change token
    (`SqlMetadataStore.catalogue_token`, replaced by every write to the images, whichever replica or
    worker made it), the query as understood, and this release. Still `no-store`: Chromium shows a stored
    copy on Back without asking, after sign-out too (measured with `private, no-cache`), so the gallery's
    script keeps the tag itself (docs/receiver.md, Security)."""
    if not who.admin:
        if device is not None and device != who.device:
            raise ApiError(403, "forbidden", "a device token lists only its own images")
        device = who.device
    if device is not None and not DEVICE_NAME.match(device):  # PostgreSQL fails on a NUL byte: 503, not 422
        raise ApiError(422, "invalid_request", "device must be 1-128 of A-Z a-z 0-9 . _ -")
    flt = ImageFilter(device=device, since=_parse_time(since, "since"), until=_parse_time(until, "until"),
                      status=status)
    store = receiver_state(request).store
    try:
        if cursor:
            decode_cursor(cursor)  # a malformed one is a 400 before any 304 as well
        # The token first: a change committed before the rows are read then makes the tag stale, not the body.
        made_of = f"{__version__}\n{store.catalogue_token()}\n{flt!r}\n{limit}\n{cursor}"
        headers = {**_NO_STORE, "ETag": f'"{hashlib.sha256(made_of.encode()).hexdigest()[:32]}"'}  # 128 bits
        if _matches(request, headers["ETag"]):
            return Response(status_code=304, headers=headers)
        page = store.list_images(flt, limit, cursor)
    except InvalidCursorError as exc:
        raise ApiError(400, "invalid_cursor", str(exc)) from None
    return JSONResponse({"items": [image_json(r) for r in page.items], "next": page.next}, headers=headers)


def _negotiate(accept: str | None) -> str:
    """Pick png/jpg/webp from an Accept header (PNG unless another format is preferred)."""
    if not accept:
        return "png"
    offers = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
    best, best_q = None, 0.0
    for position, part in enumerate(accept.split(",")):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        choice = offers.get(media.lower()) or ("png" if media in ("*/*", "image/*") else None)
        # Equal quality: the earlier entry wins, wildcards lose to explicit types.
        score = q - (0.0001 if media in ("*/*", "image/*") else 0.0) - position * 1e-6
        if choice and q > 0 and score > best_q:
            best, best_q = choice, score
    if best is None:
        raise ApiError(406, "not_acceptable", "available formats: image/png, image/jpeg, image/webp")
    return best


def _require_done(record: ImageRecord) -> None:
    """409 `not_ready` while pending or decoding, 409 `decode_failed` (with the reason) once failed."""
    if record.status is not Status.DONE:
        reason = f": {record.error}" if record.status is Status.FAILED and record.error else ""
        raise ApiError(409, "not_ready" if record.status is not Status.FAILED else "decode_failed",
                       f"image {record.id} is {record.status.value}{reason}")


def _etag(record: ImageRecord, variant: str) -> str:
    """A validator that needs no blob read: a done image's files are written once, when it is decoded.
    Weak, since a JPEG or WebP transcode is equivalent but not promised byte for byte across Pillow versions."""
    return f'W/"{record.id}-{round((record.decoded_at or 0.0) * 1e6)}-{variant}"'


def _matches(request: Request, etag: str) -> bool:
    """If-None-Match by weak comparison (RFC 9110 13.1.2): a list of tags, or `*`."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


class BlobDownload(StreamingResponse):
    """A stored file sent as it is read, `CHUNK_BYTES` at a time, with its Content-Length: read whole, a
    noisy 8192x8192 PNG (115 MB) was held per download (8 at once: 1.56 GB), as long as a slow client read.
    A HEAD reads nothing. A storage failure mid-file cuts the answer short (the client sees fewer bytes
    than Content-Length) and logs one line; the file or connection is closed however the answer ends."""

    def __init__(self, blob: OpenBlob, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(blob.chunks(), media_type=media_type, headers={**headers, "Content-Length": str(blob.size)})
        self.blob = blob

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await super().__call__(scope, receive, send)
        except BlobReadError as exc:  # returning unfinished makes the server drop the connection
            log.warning("download of %s cut short: %s", scope.get("path"), exc)
        finally:
            self.blob.close()


def _blob_response(state: ReceiverState, record: ImageRecord, request: Request, variant: str,
                   headers: dict[str, str]) -> Response:
    """A done image's file (`variant` a format suffix or `thumbnail`): 304 when the client's copy is
    current, else the bytes, never stored in a shared cache (the images are private)."""
    _require_done(record)
    headers = {**headers, "Cache-Control": "private, max-age=86400", "ETag": _etag(record, variant)}
    if _matches(request, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    if variant == "thumbnail":
        key, media, converted = thumbnail_key(record.id), "image/jpeg", False
    else:
        fmt, media = FORMATS[variant]
        converted = fmt != "PNG"
        key = conversion_key(record.id, CONVERSIONS[fmt]) if converted else reconstruction_key(record.id)
    try:
        return BlobDownload(open_blob(state.blobs, key), media, headers)
    except BlobNotFoundError:
        if not converted:
            raise ApiError(404, "not_found", f"{variant} of {record.id} is missing") from None
    return Response(_convert(state, record, variant, key), media_type=media, headers=headers)


def _convert(state: ReceiverState, record: ImageRecord, variant: str, key: str) -> bytes:
    """The reconstruction in `variant`'s format, made from the PNG once and kept at `key`, so the next
    download streams it: converting an 8192x8192 picture took 2.5-3 s to JPEG and 45-55 s to WebP, and up
    to 1.3 GB of this process, for every download (measured). Keeping it is only a saving: a store that
    refuses it costs a warning, and one made while the image was deleted is deleted again (a delete removes
    the row, then the files, so either it sees this file or this sees the row gone)."""
    try:
        png = state.blobs.get(reconstruction_key(record.id))
    except BlobNotFoundError:
        raise ApiError(404, "not_found", f"{variant} of {record.id} is missing") from None
    pixels = record.width * record.height
    if not state.conversions.take(pixels):
        raise ApiError(503, "busy", "other downloads are being converted; retry shortly, or take the PNG",
                       headers={"Retry-After": "5"})
    try:
        converted = transcode(png, variant)
    finally:
        state.conversions.give_back(pixels)
    try:
        state.blobs.put(key, converted)
    except OSError as exc:
        log.warning("could not keep the %s conversion of %s: %s", variant, record.id, exc)
    else:
        if state.store.get_image(record.id) is None:
            state.blobs.delete(key)
    return converted


def get_reconstruction(image_id: str, request: Request, who: Caller) -> Response:
    """The reconstruction: PNG, or JPEG/WebP when the Accept header prefers it."""
    state = receiver_state(request)
    record = visible_image(state, who, image_id)
    suffix = _negotiate(request.headers.get("accept"))
    return _blob_response(state, record, request, suffix, {"Vary": "Accept"})


def get_reconstruction_as(image_id: str, ext: str, request: Request, who: Caller) -> Response:
    """The reconstruction in the format named by the suffix (.png, .jpg, .jpeg, .webp)."""
    state = receiver_state(request)
    if ext.lower() not in FORMATS:
        raise ApiError(404, "not_found", f"unknown format {_quoted('.' + ext)}; use .png, .jpg or .webp")
    return _blob_response(state, visible_image(state, who, image_id), request, ext.lower(), {})


def get_thumbnail(image_id: str, request: Request, who: Caller) -> Response:
    """The gallery thumbnail (JPEG)."""
    state = receiver_state(request)
    return _blob_response(state, visible_image(state, who, image_id), request, "thumbnail", {})


def delete_image(image_id: str, request: Request, who: Caller) -> Response:
    """Remove an image and its files (row first, so nothing points at a deleted file)."""
    state = receiver_state(request)
    record = visible_image(state, who, image_id)
    state.store.delete_image(record.id)
    conversions = [conversion_key(record.id, suffix) for suffix in CONVERSIONS.values()]
    for key in (bitstream_key(record.id), reconstruction_key(record.id), thumbnail_key(record.id), *conversions):
        state.blobs.delete(key)
    return Response(status_code=204)


# -- operations ----------------------------------------------------------------------------------


def healthz(request: Request) -> JSONResponse:
    """Liveness: the process answers, and its decode worker is not hung past a batch's deadline (a stuck
    decoder call or a deadlock, which only a restart clears: the 503 has the orchestrator do it)."""
    state = receiver_state(request)
    stuck = state.worker.stuck() if state.worker is not None else None
    if stuck is not None:
        return JSONResponse({"status": "stuck", "version": __version__, "reason": stuck}, status_code=503)
    return JSONResponse({"status": "ok", "version": __version__})


def _log_blob_failure(state: ReceiverState, line: str | None) -> None:
    """Log a blob-store failure the readiness probe found once, and once when it clears: a probe every 10 s
    through a day of full disk logged the same warning 8,640 times."""
    if line is not None and line != state.blob_failure_logged:
        log.warning("%s (logged again only when it changes)", line)
    elif line is None and state.blob_failure_logged is not None:
        log.warning("readiness: the blob store is usable again")
    state.blob_failure_logged = line


def readyz(request: Request) -> JSONResponse:
    """Readiness: database reachable, blob store usable, worker running, at least one model served."""
    state = receiver_state(request)
    checks: dict[str, str] = {}
    try:
        state.store.ping()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        state.blobs.ping()
        checks["blobs"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a read-only or full disk, an unreachable bucket
        # The detail (paths, bucket names) goes to the log only: /readyz answers anonymous callers.
        _log_blob_failure(state, f"readiness: blob store check failed: {exc}")
        reason = f": {os.strerror(exc.errno)}" if isinstance(exc, OSError) and exc.errno else ""
        checks["blobs"] = f"error: {type(exc).__name__}{reason}"
    else:
        _log_blob_failure(state, None)
    checks["models"] = "ok" if state.registry.model_ids() else "error: no model package loaded"
    if state.queue is not None:
        try:
            state.queue.ping()
            checks["queue"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["queue"] = f"error: {type(exc).__name__}"
    elif state.settings.worker:
        checks["worker"] = "ok" if state.worker is not None and state.worker.is_alive() else "error: not running"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


def metrics(request: Request) -> Response:
    """Prometheus exposition."""
    return Response(generate_latest(receiver_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


_BEARER = HTTPBearer(auto_error=False, description="a device token or the admin token")
_V1 = [Security(_BEARER)]  # declares the bearer scheme in the OpenAPI document; `principal` checks it
_READ = (401, 404, 422, 503)
_FILE = (*_READ, 304, 409)
_PNG_JPEG_WEBP = ("image/png", "image/jpeg", "image/webp")


def _add_read(router: APIRouter, path: str, endpoint: Callable[..., Any], summary: str,
              responses: dict[int | str, dict[str, Any]]) -> None:
    """GET and HEAD (RFC 9110: a GET resource answers HEAD with the same headers and no body; uvicorn drops
    the body). HEAD stays out of the OpenAPI document, where it would repeat the GET's operation id."""
    router.add_api_route(path, endpoint, methods=["GET"], summary=summary, responses=responses,
                         dependencies=_V1, response_class=Response)
    router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)


def _api_router() -> APIRouter:
    """Every route with every status it can answer in `responses`, so the OpenAPI document tells a client
    the truth (tests/test_receiver_openapi.py holds it to that)."""
    router = APIRouter()
    router.add_api_route("/v1/images", upload_image, methods=["POST"], status_code=202,
                         summary="Upload a bitstream", dependencies=_V1, response_class=Response,
                         responses={202: {"model": schemas.Accepted, "description": "Stored; decoding follows"},
                                    **schemas.errors(400, 401, 403, 408, 409, 413, 415, 422, 429, 503)},
                         openapi_extra={"requestBody": {
                             "required": True,
                             "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}}}})
    _add_read(router, "/v1/images", list_images, "List images, newest first",
              {200: {"model": schemas.ImageList}, **schemas.errors(304, 400, 401, 403, 422, 503)})
    _add_read(router, "/v1/images/{image_id}", get_image, "Image status",
              {200: {"model": schemas.ImageOut}, **schemas.errors(*_READ)})
    router.add_api_route("/v1/images/{image_id}", delete_image, methods=["DELETE"], status_code=204,
                         summary="Delete an image", dependencies=_V1, response_class=Response,
                         responses=schemas.errors(*_READ))
    _add_read(router, "/v1/images/{image_id}/reconstruction", get_reconstruction,
              "Reconstruction (PNG; JPEG/WebP by Accept)", {**schemas.binary(*_PNG_JPEG_WEBP),
                                                            **schemas.errors(*_FILE, 406)})
    _add_read(router, "/v1/images/{image_id}/reconstruction.{ext}", get_reconstruction_as,
              "Reconstruction in the suffix's format", {**schemas.binary(*_PNG_JPEG_WEBP),
                                                        **schemas.errors(*_FILE)})
    _add_read(router, "/v1/images/{image_id}/thumbnail", get_thumbnail, "Thumbnail",
              {**schemas.binary("image/jpeg"), **schemas.errors(*_FILE)})
    router.add_api_route("/healthz", healthz, methods=["GET"], summary="Liveness", response_class=Response,
                         responses={200: {"model": schemas.Health, "description": "Alive"},
                                    503: {"model": schemas.Health, "description": "The decode worker is hung"}})
    router.add_api_route("/readyz", readyz, methods=["GET"], summary="Readiness", response_class=Response,
                         responses={200: {"model": schemas.Readiness, "description": "Ready"},
                                    503: {"model": schemas.Readiness, "description": "Not ready"}})
    router.add_api_route("/metrics", metrics, methods=["GET"], summary="Prometheus metrics",
                         response_class=Response, responses={200: {"description": "Prometheus text format",
                                                                  "content": {CONTENT_TYPE_LATEST: {
                                                                      "schema": {"type": "string"}}}}})
    return router


# -- factory -------------------------------------------------------------------------------------


def build_state(settings: ReceiverSettings, registry: CodecRegistry | None = None,
                blobs: BlobStore | None = None) -> ReceiverState:
    """Open storage and wire the components (nothing runs until the app starts)."""
    prepare_data_dir(settings.data_dir)
    store = SqlMetadataStore.from_url(settings.resolved_database_url(), owner=owner_id(settings.data_dir))
    blob_store = blobs if blobs is not None else open_blob_store(settings)
    queue = open_queue(settings)
    if registry is None:
        registry = CodecRegistry.from_packages(settings.model_packages, settings.device, settings.decode_tile_pixels)
    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    metrics_ = ReceiverMetrics()
    metrics_.watch_jobs(store.status_counts)
    worker = None
    if settings.worker and queue is None:
        config = WorkerConfig(batch_size=settings.batch_size, max_attempts=settings.max_attempts,
                              retry_delay_s=settings.retry_delay_s, poll_interval_s=settings.poll_interval_s,
                              thumbnail_px=settings.thumbnail_px, lease_s=settings.reclaim_after_s,
                              decode_deadline_s=settings.decode_deadline_s)
        worker = DecodeWorker(store, blob_store, registry, config, metrics_)
    auth = Authenticator(store, admin)
    login_burst = max(1, math.ceil(settings.login_attempts_per_minute))
    return ReceiverState(settings=settings, store=store, blobs=blob_store, registry=registry, auth=auth,
                         limiter=_limiter(settings, settings.rate_limit_per_minute, settings.rate_limit_burst,
                                          "uploads"),
                         metrics=metrics_, worker=worker, queue=queue,
                         sessions=GallerySessions(store, auth, settings.session_ttl_s),
                         login_limiter=_limiter(settings, settings.login_attempts_per_minute, login_burst,
                                                "sign-in"))


def _limiter(settings: ReceiverSettings, per_minute: float, burst: int, name: str) -> Limiter:
    """With a Redis `queue` (API replicas), buckets in that Redis, so the replicas share one budget per key
    instead of each granting the whole of it; else this process's."""
    if settings.queue:
        return RedisRateLimiter.from_url(settings.queue, per_minute, burst, prefix=f"aeic:ratelimit:{name}:")
    return RateLimiter(per_minute, burst)


def create_app(settings: ReceiverSettings, registry: CodecRegistry | None = None,
               blobs: BlobStore | None = None) -> FastAPI:
    """The ASGI app. `registry` injects decoders (default: the configured model packages)."""
    state = build_state(settings, registry, blobs)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_start, state)
        try:
            yield
        finally:
            await run_in_threadpool(_stop, state)

    # FastAPI's /docs and /redoc load their UI from a CDN: install_api_docs serves Swagger UI from here.
    app = HardenedFastAPI(title="AEIC receiver", version=__version__, lifespan=lifespan, docs_url=None,
                          redoc_url=None, swagger_ui_oauth2_redirect_url=None)  # security headers on every answer
    app.state.receiver = state
    hosts = [host.strip() for host in settings.allowed_hosts.split(",") if host.strip()]
    if hosts != ["*"]:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    install_error_handlers(app)
    app.include_router(_api_router())
    install_api_docs(app)
    from aeic.receiver.gallery import install_gallery  # imports this module: keep the import here

    install_gallery(app)
    return app


def _start(state: ReceiverState) -> None:
    install_log_redaction()  # here, after the server has set up its loggers
    if state.worker is not None:  # before requeueing: only the data directory's one worker may do that
        _lock_worker(state)
    version = state.store.migrate()
    if isinstance(state.blobs, FilesystemBlobStore):
        state.blobs.remove_stale_tmp()
    prepare_backends(state.blobs, state.queue)
    if state.worker is not None:
        _requeue_dead_claims(state)
        if isinstance(state.blobs, FilesystemBlobStore):
            orphans = remove_orphan_blobs(state.store, state.blobs)
            if orphans:
                log.warning("removed %d blob file(s) of no image, left by a previous run", orphans)
        state.worker.start()
    log.info("receiver ready: schema v%d, models %s, claims owned as %s", version,
             ", ".join(sorted(m.hex() for m in state.registry.model_ids())) or "none", state.store.owner)


def _lock_worker(state: ReceiverState) -> None:
    """Take the data directory's worker lock, then a SQLite database's; a start refused the second gives
    the first back (no `_stop` follows a failed start)."""
    data_dir_lock = lock_data_dir(state.settings.data_dir)
    try:
        sqlite_lock = lock_sqlite_database(state.settings.resolved_database_url())
    except BaseException:
        unlock_data_dir(data_dir_lock)
        raise
    state.worker_locks += [data_dir_lock] if sqlite_lock is None else [data_dir_lock, sqlite_lock]


def _requeue_dead_claims(state: ReceiverState) -> None:
    """Requeue what this data directory's previous life left `decoding` (the lock says it is dead) and the
    claims whose lease ran out; never a live peer's (receivers on other folders may share the database)."""
    lease = state.settings.reclaim_after_s
    requeued = state.store.requeue_abandoned(state.settings.max_attempts, claimed_before=time.time() - lease,
                                             owner=state.store.owner)
    if requeued:
        log.warning("requeued %d image(s) left in decoding by a previous run or a dead peer", requeued)


def _stop(state: ReceiverState) -> None:
    if state.worker is not None:
        state.worker.stop()
    if state.queue is not None:
        state.queue.close()
    for limiter in (state.limiter, state.login_limiter):
        if isinstance(limiter, RedisRateLimiter):
            limiter.close()
    state.store.close()
    while state.worker_locks:
        unlock_data_dir(state.worker_locks.pop())
