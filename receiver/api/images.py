"""The images as a collection: one image's status, the listing (with its change-token `ETag`), and
deletion; and `visible_image`, the lookup every per-image route makes (404 for what the caller may not
see)."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import sys
from datetime import datetime, timezone
from typing import Annotated

from aeic.receiver.api.auth import Caller
from aeic.receiver.api.conditional import matches
from aeic.receiver.api.shapes import image_json, root_path
from aeic.receiver.api.state import ReceiverState, receiver_state
from aeic.receiver.auth import DEVICE_NAME, Principal
from aeic.receiver.errors import ApiError
from aeic.receiver.images import CONVERSIONS
from aeic.receiver.storage import ImageFilter, ImageRecord, InvalidCursorError, Status
from aeic.receiver.storage.blobs import bitstream_key, conversion_key, reconstruction_key, thumbnail_key
from aeic.receiver.storage.metadata import decode_cursor
from fastapi import Query, Request, Response
from fastapi.responses import JSONResponse

from aeic import __version__

if sys.version_info >= (3, 11):
    read_iso8601 = datetime.fromisoformat
else:  # 3.10's fromisoformat reads only what isoformat() writes: no `+0100`, `.5`, `20261206T0900`, week dates
    from dateutil.parser import isoparse as read_iso8601

__all__ = ["delete_image", "get_image", "list_images", "quoted", "visible_image"]

log = logging.getLogger(__name__)


_IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")


def quoted(value: str) -> str:
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


_NO_STORE = {"Cache-Control": "no-store"}  # private and changing: no cache may keep or reuse it


def get_image(image_id: str, request: Request, who: Caller) -> JSONResponse:
    """Status and metadata of one image."""
    record = visible_image(receiver_state(request), who, image_id)
    return JSONResponse(image_json(record, root_path(request)), headers=_NO_STORE)


def _parse_time(value: str | None, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):  # nan, inf, 1e400: float() takes them but they name no instant
            raise ApiError(422, "invalid_request", f"{name} must be a finite time, got {quoted(value)}")
        return number
    try:
        parsed = read_iso8601(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, "invalid_request",
                       f"{name} must be ISO 8601 or epoch seconds, got {quoted(value)}") from None
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
    worker made it), the query as understood, the prefix its links start with, and this release. Still `no-store`: Chromium shows a stored
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
        made_of = f"{__version__}\n{store.catalogue_token()}\n{flt!r}\n{limit}\n{cursor}\n{root_path(request)}"
        headers = {**_NO_STORE, "ETag": f'"{hashlib.sha256(made_of.encode()).hexdigest()[:32]}"'}  # 128 bits
        if matches(request, headers["ETag"]):
            return Response(status_code=304, headers=headers)
        page = store.list_images(flt, limit, cursor)
    except InvalidCursorError as exc:
        raise ApiError(400, "invalid_cursor", str(exc)) from None
    items = [image_json(r, root_path(request)) for r in page.items]
    return JSONResponse({"items": items, "next": page.next}, headers=headers)


def _derived_keys(image_id: str) -> list[str]:
    """The files made from an image's bitstream: what a decode or a download may still be writing."""
    derived = [thumbnail_key(image_id), reconstruction_key(image_id)]
    return derived + [conversion_key(image_id, suffix) for suffix in CONVERSIONS.values()]


def delete_image(image_id: str, request: Request, who: Caller) -> Response:
    """Remove an image's files, then its row, then its derived files again.

    Files first: while any is left the row stays, so a delete the blob store failed part way (S3 down, a
    read-only or full disk) is a 503 that the same DELETE, sent again, finishes; the row removed first left
    a retry 404 and the files until the next start's orphan sweep. The bitstream goes last, so a half-done
    delete leaves an image its worker can still decode. The pass after the row takes what a decode or a
    conversion finishing meanwhile wrote; one that writes later finds the row gone and deletes its own file
    (`worker`, `conversions`). That pass failing is only logged: the image is gone from every answer, and the
    file it missed is an orphan the embedded receiver's start-up sweep removes."""
    state = receiver_state(request)
    record = visible_image(state, who, image_id)
    try:
        for key in [*_derived_keys(record.id), bitstream_key(record.id)]:
            state.blobs.delete(key)
    except OSError as exc:
        log.error("could not delete the files of %s: %s", record.id, exc)
        raise ApiError(503, "storage_unavailable",
                       "blob storage is unavailable: the image is not deleted yet; send the DELETE again later",
                       {"Retry-After": "5"}) from None
    state.store.delete_image(record.id)
    try:
        for key in _derived_keys(record.id):
            state.blobs.delete(key)
    except OSError as exc:
        log.warning("image %s deleted, but a file written during its delete may be left: %s", record.id, exc)
    return Response(status_code=204)
