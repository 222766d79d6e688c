"""Image metadata and device tokens in a SQL database (SQLite embedded, PostgreSQL by URL).

`MetadataStore` is the interface the API and the worker use; `SqlMetadataStore` implements it with
SQLAlchemy Core so the same statements run on both engines. Claiming is one conditional UPDATE keyed
by a random claim token, so two workers can never decode the same image at once.

Claims are owned and leased, so receivers sharing one database never requeue each other's live work: a
claim token starts with its store's owner id (a receiver's data directory, `data_dir.owner_id`), and
`claimed_at` is the lease, renewed by the holder while it decodes (`refresh_claim`). A claim is abandoned
when its lease ran out, or, at a receiver's start, when its own previous life made it.
"""

from __future__ import annotations

import base64
import errno
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from aeic.receiver.storage import schema
from aeic.receiver.storage.blobs import MIN_FREE_BYTES
from aeic.receiver.storage.migrations import SQLITE_BUSY_TIMEOUT_MS, migrate
from aeic.receiver.storage.records import DecodeTimings, ImageRecord, NewImage, Page, Status
from aeic.shared.decode_limits import decode_cost
from sqlalchemy.exc import IntegrityError

__all__ = [
    "Claim",
    "CursorPosition",
    "IdempotencyConflictError",
    "ImageFilter",
    "InvalidCursorError",
    "MetadataStore",
    "SqlMetadataStore",
    "create_engine",
    "decode_cursor",
    "encode_cursor",
]

_IMG = schema.images
_HALF_US = 0.5e-6
# A claim token is 32 hex digits: the owner's 16, then 16 random ones (all 32 random without an owner).
_OWNER_ID = re.compile(r"^[0-9a-f]{16}$")
_RECORD_COLUMNS = [c for c in _IMG.c if c.name not in ("claim_token", "claimed_at", "retry_at", "fair_tag")]


class IdempotencyConflictError(Exception):
    """The device reused an idempotency key for a different bitstream."""

    def __init__(self, existing: ImageRecord) -> None:
        super().__init__(f"idempotency key already used for image {existing.id} with different content")
        self.existing = existing


class InvalidCursorError(ValueError):
    """A paging cursor that this store did not produce."""


@dataclass(frozen=True)
class ImageFilter:
    """Listing filter; `None` fields do not restrict."""

    device: str | None = None
    since: float | None = None
    until: float | None = None
    status: Status | None = None


@dataclass(frozen=True)
class Claim:
    """A batch of compatible jobs (same model and size) owned by one worker until it reports back."""

    token: str
    records: list[ImageRecord]


class MetadataStore(Protocol):
    """What the API and the decode worker need from the metadata database."""

    def insert_image(self, image: NewImage) -> tuple[ImageRecord, bool]: ...

    def get_image(self, image_id: str) -> ImageRecord | None: ...

    def list_images(self, flt: ImageFilter, limit: int, cursor: str | None) -> Page: ...

    def catalogue_token(self) -> str: ...

    def delete_image(self, image_id: str) -> ImageRecord | None: ...

    def claim_batch(self, batch_size: int, now: float | None = None) -> Claim | None: ...

    def complete(self, image_id: str, token: str, timings: DecodeTimings) -> bool: ...

    def fail_attempt(self, image_id: str, token: str, reason: str, max_attempts: int, retry_at: float) -> bool: ...

    def requeue_abandoned(self, max_attempts: int, claimed_before: float | None = None,
                          owner: str | None = None) -> int: ...

    def refresh_claim(self, token: str, image_id: str | None = None) -> int: ...

    def release_claim(self, token: str, reason: str) -> int: ...

    def status_counts(self) -> dict[Status, int]: ...

    def add_device_token(self, device: str, token_hash: str) -> None: ...

    def device_for_token(self, token_hash: str) -> str | None: ...

    def add_session(self, session_hash: str, token_hash: str, expires_at: float) -> None: ...

    def session_token_hash(self, session_hash: str, now: float | None = None) -> str | None: ...

    def delete_session(self, session_hash: str) -> None: ...

    def ping(self) -> None: ...


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL for concurrent readers, FULL sync so a 202 means the row is on disk, waits instead of errors."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def create_engine(url: str) -> sa.Engine:
    """An engine configured for durable, multi-threaded use of `url`."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 15})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


@dataclass(frozen=True)
class CursorPosition:
    """Where a listing page ends in the listing's (created_at, seq) order; the next page starts below it.
    `created_at` is None for a cursor of an earlier version, which carried `seq` alone."""

    created_at: float | None
    seq: int


def encode_cursor(created_at: float, seq: int) -> str:
    """Opaque cursor for the page that starts below the image (`created_at`, `seq`); `repr` keeps the float
    exact, so the keyset comparison is too."""
    return base64.urlsafe_b64encode(f"t{created_at!r}:{seq}".encode()).decode().rstrip("=")


def _bad_cursor(cursor: str) -> str:
    """The error message, quoting at most 40 characters: a 100 KB query string is not echoed back."""
    shown = cursor if len(cursor) <= 40 else cursor[:40] + "..."
    return f"invalid cursor {shown!r}"


def decode_cursor(cursor: str) -> CursorPosition:
    """Inverse of `encode_cursor`, and the `s<seq>` cursors of schema v5 and before (a client paging across
    an upgrade continues); raises `InvalidCursorError` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if raw.startswith("t"):
            when_text, _, seq_text = raw[1:].partition(":")
            when = float(when_text)
            if not math.isfinite(when):
                raise ValueError(raw)
            position = CursorPosition(when, int(seq_text))
        elif raw.startswith("s"):
            position = CursorPosition(None, int(raw[1:]))
        else:
            raise ValueError(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCursorError(_bad_cursor(cursor)) from exc
    if not 0 <= position.seq < 1 << 63:  # a database integer: a larger one would fail in the query, not here
        raise InvalidCursorError(_bad_cursor(cursor))
    return position


def _now() -> float:
    """Wall-clock seconds rounded to whole microseconds (what ISO 8601 timestamps can express)."""
    return round(time.time(), 6)


def _dead(claimed_before: float | None, owner: str | None) -> sa.ColumnElement[bool]:
    """Which claims `requeue_abandoned` takes for dead: see there."""
    if claimed_before is None:
        return sa.true()
    expired = _IMG.c.claimed_at < claimed_before
    return expired if owner is None else sa.or_(expired, _IMG.c.claim_token.startswith(owner, autoescape=True))


def _fair_tag(conn: sa.Connection, device: str) -> float:
    """Where a new image of `device` goes in the decode order (start-time fair queueing): after the device's
    last pending image, by that image's decode cost, and never before the head of the queue (the lowest
    pending tag). So devices take turns by decode work: one that queued a backlog gets one unit's turn in
    each round, a device with nothing queued joins at the head, and one asking for large pictures gets
    proportionally fewer of them in. Two index probes in one statement (the head, and the device's newest
    pending image); concurrent uploads may get equal tags, which only ties them (by `seq`)."""
    pending = _IMG.c.status == Status.PENDING.value
    columns = (_IMG.c.fair_tag, _IMG.c.width, _IMG.c.height, _IMG.c.downscale)
    head = sa.select(sa.literal(0).label("mine"), *columns).where(pending).order_by(_IMG.c.fair_tag, _IMG.c.seq)
    last = (sa.select(sa.literal(1).label("mine"), *columns).where(_IMG.c.device == device, pending)
            .order_by(_IMG.c.created_at.desc(), _IMG.c.seq.desc()))
    both = sa.union_all(*(sa.select(q.limit(1).subquery()) for q in (head, last)))  # one round trip
    tag = 0.0
    for row in conn.execute(both):
        cost = decode_cost(row.height, row.width, row.downscale) if row.mine else 0.0
        tag = max(tag, float(row.fair_tag) + cost)
    return tag


def _record(row: sa.Row[Any]) -> ImageRecord:
    values = dict(row._mapping)
    values["status"] = Status(values["status"])
    return ImageRecord(**values)


class SqlMetadataStore:
    """`MetadataStore` over SQLAlchemy Core; call `migrate()` once before use. `owner` (16 hex digits)
    prefixes the tokens of the claims this store makes (a queue worker's names its consumer, for the
    record: its stale claims are taken over by lease alone); None for random tokens."""

    def __init__(self, engine: sa.Engine, owner: str | None = None) -> None:
        if owner is not None and not _OWNER_ID.match(owner):
            raise ValueError(f"owner id must be 16 lowercase hex digits, not {owner!r}")
        self.engine = engine
        self.owner = owner

    @classmethod
    def from_url(cls, url: str, owner: str | None = None) -> SqlMetadataStore:
        """Open (not yet migrate) the database at `url`."""
        return cls(create_engine(url), owner)

    def new_claim_token(self) -> str:
        """A fresh claim token; it starts with this store's owner id, so a restart knows its own claims."""
        return secrets.token_hex(16) if self.owner is None else self.owner + secrets.token_hex(8)

    def migrate(self) -> int:
        """Apply pending schema migrations; returns the schema version."""
        return migrate(self.engine)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def ping(self) -> None:
        """Raise if the database is unreachable, or is a SQLite file whose disk has under `MIN_FREE_BYTES`
        free (`OSError` ENOSPC): on its own disk it fills apart from the blobs', and every upload is refused."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        if self.engine.dialect.name == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
            folder = os.path.dirname(os.path.abspath(str(self.engine.url.database)))
            free = shutil.disk_usage(folder).free
            if free < MIN_FREE_BYTES:
                raise OSError(errno.ENOSPC, f"database folder {folder} has {free} bytes free, under {MIN_FREE_BYTES}")

    # -- uploads ---------------------------------------------------------------------------------

    def _select(self) -> sa.Select[Any]:
        return sa.select(*_RECORD_COLUMNS)

    def get_image(self, image_id: str) -> ImageRecord | None:
        """The image's metadata, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(self._select().where(_IMG.c.id == image_id)).first()
        return _record(row) if row else None

    def _by_key(self, conn: sa.Connection, device: str, key: str) -> ImageRecord | None:
        query = self._select().where(_IMG.c.device == device, _IMG.c.idempotency_key == key)
        row = conn.execute(query).first()
        return _record(row) if row else None

    def insert_image(self, image: NewImage) -> tuple[ImageRecord, bool]:
        """Store a new pending image; returns (record, created). A repeated (device, key) returns the
        existing record with created=False, or raises `IdempotencyConflictError` if the content differs."""
        now = _now()
        values = {
            "id": image.id, "device": image.device, "idempotency_key": image.idempotency_key,
            "model_id": image.model_id, "width": image.width, "height": image.height,
            "rate_index": image.rate_index, "downscale": image.downscale, "bytes": image.bytes, "bpp": image.bpp,
            "sha256": image.sha256,
            "status": Status.PENDING.value, "attempts": 0, "created_at": now, "updated_at": now,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(_IMG.insert().values(**values, fair_tag=_fair_tag(conn, image.device)))
        except IntegrityError:
            if image.idempotency_key is None:
                raise
            with self.engine.connect() as conn:
                existing = self._by_key(conn, image.device, image.idempotency_key)
            if existing is None:
                raise
            if existing.sha256 != image.sha256:
                raise IdempotencyConflictError(existing) from None
            return existing, False
        record = self.get_image(image.id)
        assert record is not None
        return record, True

    def catalogue_token(self) -> str:
        """A value that every committed change to the images replaces (the triggers of schema v8), in every
        process sharing the database: equal tokens mean nothing was written in between. Read it before the
        rows it is to vouch for, so a change committed in between makes it older than them, never newer."""
        table = schema.catalogue
        with self.engine.connect() as conn:
            return "".join(conn.execute(sa.select(table.c.token).order_by(table.c.id)).scalars())

    def find_by_idempotency_key(self, device: str, key: str) -> ImageRecord | None:
        """The image a device stored under `key`, if any."""
        with self.engine.connect() as conn:
            return self._by_key(conn, device, key)

    def list_images(self, flt: ImageFilter, limit: int, cursor: str | None) -> Page:
        """Newest first, `limit` per page; `cursor` comes from the previous page's `next`.

        The order is upload time, ties by arrival (`created_at`, `seq`), the key the time filters restrict,
        so one index range (`schema.images`, v6) serves every filter and the order: a page reads only its
        rows, and a `since` poll that finds nothing new reads none (it walked every image before)."""
        query = self._select().order_by(_IMG.c.created_at.desc(), _IMG.c.seq.desc()).limit(limit + 1)
        if flt.device is not None:
            query = query.where(_IMG.c.device == flt.device)
        if flt.status is not None:
            query = query.where(_IMG.c.status == flt.status.value)
        # Stored times are whole microseconds; half a microsecond of slack makes a bound that went through
        # an ISO 8601 string (microsecond precision) compare exactly.
        if flt.since is not None:
            query = query.where(_IMG.c.created_at >= flt.since - _HALF_US)
        if flt.until is not None:
            query = query.where(_IMG.c.created_at < flt.until - _HALF_US)
        with self.engine.connect() as conn:
            if cursor:
                position = self._resolve(conn, decode_cursor(cursor))
                if position is None:
                    return Page(items=[], next=None)
                # Below the position in (created_at, seq) order; the first term is the index range.
                query = query.where(_IMG.c.created_at <= position.created_at,
                                    sa.or_(_IMG.c.created_at < position.created_at, _IMG.c.seq < position.seq))
            rows = conn.execute(query).all()
        items = [_record(r) for r in rows[:limit]]
        following = encode_cursor(items[-1].created_at, items[-1].seq) if len(rows) > limit else None
        return Page(items=items, next=following)

    def _resolve(self, conn: sa.Connection, position: CursorPosition) -> CursorPosition | None:
        """A v5 cursor (`seq` alone: the page continued below that seq) as a position in today's order: just
        above the newest image left below that seq, by primary key. None when no image is left below it."""
        if position.created_at is not None:
            return position
        below = conn.execute(sa.select(_IMG.c.created_at, _IMG.c.seq).where(_IMG.c.seq < position.seq)
                             .order_by(_IMG.c.seq.desc()).limit(1)).first()
        return None if below is None else CursorPosition(float(below.created_at), int(below.seq) + 1)

    def delete_image(self, image_id: str) -> ImageRecord | None:
        """Remove the row; returns what was deleted (the caller removes the blobs afterwards)."""
        with self.engine.begin() as conn:
            row = conn.execute(self._select().where(_IMG.c.id == image_id)).first()
            if row is None:
                return None
            conn.execute(_IMG.delete().where(_IMG.c.id == image_id))
        return _record(row)

    # -- decode jobs -----------------------------------------------------------------------------

    def claim_batch(self, batch_size: int, now: float | None = None) -> Claim | None:
        """Atomically move up to `batch_size` due pending jobs of the next job's (model, size) group to
        `decoding` and count the attempt; None when nothing is due. The next job, and the batch, are the
        first in the decode order that is fair across devices (`fair_tag`, then arrival: `_fair_tag`).

        A retry (an image with an attempt behind it: its decode failed, or the process died while decoding
        it) is claimed alone, and a batch of first attempts takes none: an image that kills the process
        (out of memory, a native crash) used to take its batch-mates with it on every restart, until all of
        them had used their last attempt and failed without ever being decoded."""
        now = _now() if now is None else now
        due = sa.and_(
            _IMG.c.status == Status.PENDING.value,
            sa.or_(_IMG.c.retry_at.is_(None), _IMG.c.retry_at <= now),
        )
        token = self.new_claim_token()
        with self.engine.begin() as conn:
            head = conn.execute(
                sa.select(_IMG.c.seq, _IMG.c.model_id, _IMG.c.width, _IMG.c.height, _IMG.c.attempts)
                .where(due).order_by(_IMG.c.fair_tag, _IMG.c.seq).limit(1)
            ).first()
            if head is None:
                return None
            if head.attempts > 0:
                group = sa.and_(due, _IMG.c.seq == head.seq)
            else:
                group = sa.and_(due, _IMG.c.model_id == head.model_id, _IMG.c.width == head.width,
                                _IMG.c.height == head.height, _IMG.c.attempts == 0)
            chosen = (
                sa.select(_IMG.c.seq)
                .where(group)
                .order_by(_IMG.c.fair_tag, _IMG.c.seq)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            )
            # Materialise the choice first: PostgreSQL may re-run a LIMIT subquery inside UPDATE ... IN.
            seqs = list(conn.execute(chosen).scalars())
            if not seqs:
                return None
            conn.execute(
                _IMG.update()
                .where(_IMG.c.seq.in_(seqs), _IMG.c.status == Status.PENDING.value)
                .values(status=Status.DECODING.value, claim_token=token, claimed_at=now,
                        attempts=_IMG.c.attempts + 1, updated_at=now)
            )
            # By primary key: claim_token has no index, so filtering on it alone would scan every image.
            rows = conn.execute(self._select().where(_IMG.c.seq.in_(seqs), _IMG.c.claim_token == token)
                                .order_by(_IMG.c.seq)).all()
        if not rows:
            return None
        return Claim(token=token, records=[_record(r) for r in rows])

    def _owned(self, image_id: str, token: str) -> sa.ColumnElement[bool]:
        return sa.and_(_IMG.c.id == image_id, _IMG.c.claim_token == token,
                       _IMG.c.status == Status.DECODING.value)

    def complete(self, image_id: str, token: str, timings: DecodeTimings) -> bool:
        """Mark a claimed job done with its timings; False if the claim was lost (deleted or requeued)."""
        now = _now()
        with self.engine.begin() as conn:
            result = conn.execute(
                _IMG.update().where(self._owned(image_id, token)).values(
                    status=Status.DONE.value, claim_token=None, error=None, retry_at=None,
                    entropy_ms=timings.entropy_ms, decoder_ms=timings.decoder_ms, decode_ms=timings.total_ms,
                    batch_size=timings.batch_size, decoded_at=now, updated_at=now,
                    decodes=_IMG.c.decodes + 1,
                )
            )
        return result.rowcount == 1

    def fail_attempt(self, image_id: str, token: str, reason: str, max_attempts: int, retry_at: float) -> bool:
        """Record a failed attempt: back to pending (due at `retry_at`) or, after `max_attempts`, failed."""
        now = _now()
        exhausted = _IMG.c.attempts >= max_attempts
        with self.engine.begin() as conn:
            result = conn.execute(
                _IMG.update().where(self._owned(image_id, token)).values(
                    status=sa.case((exhausted, Status.FAILED.value), else_=Status.PENDING.value),
                    retry_at=sa.case((exhausted, sa.null()), else_=retry_at),
                    claim_token=None, error=reason[:2000], updated_at=now,
                )
            )
        return result.rowcount == 1

    def requeue_abandoned(self, max_attempts: int, claimed_before: float | None = None,
                          owner: str | None = None) -> int:
        """Jobs left in `decoding` by a dead worker go back to pending, or to failed once their attempts
        are used up (an image that crashes the worker must not crash it forever). Returns how many.

        Without `claimed_before` every claim counts as dead; with it, those whose lease was last renewed
        before it, and those of `owner` (a start passes its own id: its data directory's lock says the
        previous life that made them is gone), but never a live peer's."""
        now = _now()
        stuck = sa.and_(_IMG.c.status == Status.DECODING.value, _dead(claimed_before, owner))
        exhausted = _IMG.c.attempts >= max_attempts
        with self.engine.begin() as conn:
            failed = conn.execute(
                _IMG.update().where(stuck, exhausted).values(
                    status=Status.FAILED.value, claim_token=None, updated_at=now,
                    error="the worker stopped while decoding this image on its last attempt",
                )
            ).rowcount
            requeued = conn.execute(
                _IMG.update().where(stuck, sa.not_(exhausted)).values(
                    status=Status.PENDING.value, claim_token=None, retry_at=None, updated_at=now,
                    error="requeued: the worker stopped while decoding",
                )
            ).rowcount
        return int(failed) + int(requeued)

    def refresh_claim(self, token: str, image_id: str | None = None) -> int:
        """Renew the lease of a live claim (all its images, or `image_id` alone), so no peer takes it over;
        returns the rows renewed: 0 means the claim was lost (taken over, deleted, or already reported)."""
        held = sa.and_(_IMG.c.claim_token == token, _IMG.c.status == Status.DECODING.value)
        if image_id is not None:
            held = sa.and_(held, _IMG.c.id == image_id)
        with self.engine.begin() as conn:
            result = conn.execute(_IMG.update().where(held).values(claimed_at=_now()))
        return int(result.rowcount)

    def release_claim(self, token: str, reason: str) -> int:
        """Hand the unfinished jobs of a live claim back to pending, due now, without charging the attempt:
        the holder is stopping (a shutdown), which says nothing about the images. Returns how many."""
        now = _now()
        with self.engine.begin() as conn:
            result = conn.execute(
                _IMG.update().where(_IMG.c.claim_token == token, _IMG.c.status == Status.DECODING.value)
                .values(status=Status.PENDING.value, claim_token=None, retry_at=None, error=reason[:2000],
                        attempts=_IMG.c.attempts - 1, updated_at=now)
            )
        return int(result.rowcount)

    # -- gallery sessions ------------------------------------------------------------------------

    def add_session(self, session_hash: str, token_hash: str, expires_at: float) -> None:
        """Record a gallery sign-in; expired sessions are purged on the way (sign-ins are rare)."""
        table = schema.gallery_sessions
        now = _now()
        with self.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.expires_at <= now))
            conn.execute(table.insert().values(session_hash=session_hash, token_hash=token_hash,
                                               created_at=now, expires_at=expires_at))

    def session_token_hash(self, session_hash: str, now: float | None = None) -> str | None:
        """The hash of the token behind a live (not expired, not signed out) session."""
        table = schema.gallery_sessions
        now = _now() if now is None else now
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(table.c.token_hash).where(table.c.session_hash == session_hash, table.c.expires_at > now)
            ).scalar()

    def delete_session(self, session_hash: str) -> None:
        """Sign out: the session's cookie is worthless from now on, wherever it was copied to."""
        table = schema.gallery_sessions
        with self.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.session_hash == session_hash))

    def status_counts(self) -> dict[Status, int]:
        """Number of images in each status (all statuses present, zero when none)."""
        counts = {status: 0 for status in Status}
        with self.engine.connect() as conn:
            for status, count in conn.execute(sa.select(_IMG.c.status, sa.func.count()).group_by(_IMG.c.status)):
                counts[Status(status)] = int(count)
        return counts

    # -- device tokens ---------------------------------------------------------------------------

    def add_device_token(self, device: str, token_hash: str) -> None:
        """Register the hash of a new device token."""
        with self.engine.begin() as conn:
            conn.execute(schema.device_tokens.insert().values(
                device=device, token_hash=token_hash, created_at=_now()))

    def device_for_token(self, token_hash: str) -> str | None:
        """The device a (non-revoked) token hash belongs to."""
        table = schema.device_tokens
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(table.c.device).where(table.c.token_hash == token_hash, table.c.revoked_at.is_(None))
            ).scalar()

    def device_token_counts(self) -> list[tuple[str, int, int, float]]:
        """Each device that was ever given a token, by name: (device, active tokens, revoked tokens, when its
        newest token was made, epoch seconds)."""
        table = schema.device_tokens
        active = sa.func.sum(sa.case((table.c.revoked_at.is_(None), 1), else_=0))
        query = (sa.select(table.c.device, active, sa.func.count(), sa.func.max(table.c.created_at))
                 .group_by(table.c.device).order_by(table.c.device))
        with self.engine.connect() as conn:
            return [(device, int(live), int(total) - int(live), float(newest))
                    for device, live, total, newest in conn.execute(query)]

    def revoke_device_tokens(self, device: str) -> int:
        """Revoke every token of `device`; returns how many were active."""
        table = schema.device_tokens
        with self.engine.begin() as conn:
            result = conn.execute(
                table.update().where(table.c.device == device, table.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
        return int(result.rowcount)
