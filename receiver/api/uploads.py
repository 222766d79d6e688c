"""`POST /v1/images`: a device's bitstream, validated, stored durably, and queued for decoding.

Why validate everything before storing: a 202 is a promise that the image will be decoded, so only
bitstreams this receiver can actually decode (size, header, CRC, model, dimensions) are accepted."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets

from aeic.receiver.api.auth import Caller, bearer_token
from aeic.receiver.api.shapes import image_json, root_path
from aeic.receiver.api.state import ReceiverState, receiver_state
from aeic.receiver.errors import ApiError
from aeic.receiver.queue import JobQueue
from aeic.receiver.storage import IdempotencyConflictError, ImageRecord, NewImage
from aeic.receiver.storage.blobs import bitstream_key
from aeic.shared import bitstream as bs
from aeic.shared import decode_limits
from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

__all__ = ["read_body", "upload_image"]

log = logging.getLogger(__name__)


_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


# Bitstream error class -> (HTTP status, error code)
_BITSTREAM_ERRORS: list[tuple[type[Exception], int, str]] = [
    (bs.TruncatedError, 400, "truncated_bitstream"),
    (bs.BadMagicError, 400, "bad_magic"),
    (bs.UnsupportedVersionError, 422, "unsupported_version"),
    (bs.CrcMismatchError, 400, "crc_mismatch"),
    (bs.InvalidHeaderError, 422, "invalid_header"),
    (bs.BitstreamError, 400, "invalid_bitstream"),
]


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


def _accepted(record: ImageRecord, replayed: bool, root: str) -> JSONResponse:
    links = image_json(record, root)["links"]
    body = {"id": record.id, "status": record.status.value, "links": links}
    headers = {"Location": links["self"]}
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
        if await run_in_threadpool(state.auth.authenticate, bearer_token(request)) != who:
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
    return _accepted(record, replayed=not created, root=root_path(request))
