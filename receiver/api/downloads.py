"""A done image's files: the reconstruction (PNG, or JPEG/WebP by `Accept` or suffix) and the thumbnail,
streamed from the blob store, with a validator that needs no read."""

from __future__ import annotations

import logging

import anyio
from aeic.receiver.api.auth import Caller
from aeic.receiver.api.conditional import matches
from aeic.receiver.api.conversions import convert_and_keep
from aeic.receiver.api.images import quoted, visible_image
from aeic.receiver.api.state import ReceiverState, receiver_state
from aeic.receiver.errors import ApiError
from aeic.receiver.images import CONVERSIONS, FORMATS
from aeic.receiver.storage import BlobNotFoundError, ImageRecord, Status
from aeic.receiver.storage.blobs import (
    BlobReadError,
    OpenBlob,
    conversion_key,
    open_blob,
    reconstruction_key,
    thumbnail_key,
)
from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

__all__ = ["BlobDownload", "get_reconstruction", "get_reconstruction_as", "get_thumbnail"]

log = logging.getLogger(__name__)

# Seconds a download may wait for its client to take the next `SEND_SLICE_BYTES` (nginx's `send_timeout` is
# 60 s): a client that stopped reading held its connection, its open file and a chunk in the send buffer
# for good. Each chunk is sent in slices so that the limit is on progress: a whole 1 MiB chunk in 60 s would
# cut off a client reading steadily at under 17 KB/s; a slice asks about 1 KB/s.
SEND_TIMEOUT_S = 60.0
SEND_SLICE_BYTES = 64 << 10


class _ClientStalledError(Exception):
    """The client took no data for `SEND_TIMEOUT_S`."""


async def _send_within(send: Send, message: Message) -> None:
    timeout_s = SEND_TIMEOUT_S
    try:
        with anyio.fail_after(timeout_s):
            await send(message)
    except TimeoutError:
        raise _ClientStalledError(f"the client took no data for {timeout_s:g} s") from None


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


class BlobDownload(StreamingResponse):
    """A stored file sent as it is read, `CHUNK_BYTES` at a time, with its Content-Length: read whole, a
    noisy 8192x8192 PNG (115 MB) was held per download (8 at once: 1.56 GB), as long as a slow client read.
    A HEAD reads nothing. A storage failure mid-file cuts the answer short (the client sees fewer bytes
    than Content-Length) and logs one line, as does a client that takes no data for `SEND_TIMEOUT_S`; the file
    or connection is closed however the answer ends."""

    def __init__(self, blob: OpenBlob, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(blob.chunks(), media_type=media_type, headers={**headers, "Content-Length": str(blob.size)})
        self.blob = blob

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_in_time(message: Message) -> None:
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or len(body) <= SEND_SLICE_BYTES:
                await _send_within(send, message)
                return
            more = message.get("more_body", False)
            for start in range(0, len(body), SEND_SLICE_BYTES):
                last = start + SEND_SLICE_BYTES >= len(body)
                await _send_within(send, {"type": "http.response.body", "body": body[start:start + SEND_SLICE_BYTES],
                                          "more_body": more or not last})

        try:
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await super().__call__(scope, receive, send_in_time)
        except (BlobReadError, _ClientStalledError) as exc:  # returning unfinished drops the connection
            log.warning("download of %s cut short: %s", scope.get("path"), exc)
        finally:
            self.blob.close()


def _blob_response(state: ReceiverState, record: ImageRecord, request: Request, variant: str,
                   headers: dict[str, str]) -> Response:
    """A done image's file (`variant` a format suffix or `thumbnail`): 304 when the client's copy is
    current, else the bytes, never stored in a shared cache (the images are private)."""
    _require_done(record)
    headers = {**headers, "Cache-Control": "private, max-age=86400", "ETag": _etag(record, variant)}
    if matches(request, headers["ETag"]):
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
    converted_bytes = convert_and_keep(state.blobs, state.store, state.conversions, record, variant, key)
    return Response(converted_bytes, media_type=media, headers=headers)


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
        raise ApiError(404, "not_found", f"unknown format {quoted('.' + ext)}; use .png, .jpg or .webp")
    return _blob_response(state, visible_image(state, who, image_id), request, ext.lower(), {})


def get_thumbnail(image_id: str, request: Request, who: Caller) -> Response:
    """The gallery thumbnail (JPEG)."""
    state = receiver_state(request)
    return _blob_response(state, visible_image(state, who, image_id), request, "thumbnail", {})
