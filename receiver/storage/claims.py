"""Claims by image id, for workers fed by a message queue (issue 8).

The embedded worker claims the oldest pending jobs (`SqlMetadataStore.claim_batch`); a queue consumer is
told *which* images to decode. Both use the same conditional UPDATE on `status` with a random claim token,
so the database, not the queue, decides who decodes: an image already `done` can never be claimed again,
which makes redelivered messages harmless. A claim whose holder stopped refreshing it (`claimed_at` older
than `stale_before`: its lease ran out) may be taken over, and one that has used its last attempt is failed
instead; the embedded worker requeues such claims with `SqlMetadataStore.requeue_abandoned`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from aeic.receiver.storage import schema
from aeic.receiver.storage.metadata import Claim, SqlMetadataStore
from aeic.receiver.storage.records import Status

__all__ = ["claim_ids", "fail_exhausted_stale", "orphaned_ids", "refresh_claim"]

_IMG = schema.images


def _stale(stale_before: float) -> sa.ColumnElement[bool]:
    return sa.and_(_IMG.c.status == Status.DECODING.value, _IMG.c.claimed_at < stale_before)


def claim_ids(store: SqlMetadataStore, ids: Sequence[str], stale_before: float, max_attempts: int,
              now: float | None = None) -> Claim | None:
    """Claim those of `ids` that are due pending, or stale `decoding` with attempts left; None if none."""
    if not ids:
        return None
    now = round(time.time(), 6) if now is None else now
    token = store.new_claim_token()  # a takeover makes the claim this store's
    due = sa.and_(_IMG.c.status == Status.PENDING.value,
                  sa.or_(_IMG.c.retry_at.is_(None), _IMG.c.retry_at <= now))
    claimable = sa.or_(due, sa.and_(_stale(stale_before), _IMG.c.attempts < max_attempts))
    with store.engine.begin() as conn:
        conn.execute(
            _IMG.update().where(_IMG.c.id.in_(list(ids)), claimable)
            .values(status=Status.DECODING.value, claim_token=token, claimed_at=now,
                    attempts=_IMG.c.attempts + 1, updated_at=now)
        )
        claimed = list(conn.execute(sa.select(_IMG.c.id).where(_IMG.c.claim_token == token)
                                    .order_by(_IMG.c.seq)).scalars())
    records = [r for r in (store.get_image(i) for i in claimed) if r is not None]
    return Claim(token=token, records=records) if records else None


def fail_exhausted_stale(store: SqlMetadataStore, ids: Sequence[str], stale_before: float,
                         max_attempts: int) -> list[str]:
    """Images among `ids` whose holder died on their last attempt become failed; returns their ids."""
    if not ids:
        return []
    now = round(time.time(), 6)
    where = sa.and_(_IMG.c.id.in_(list(ids)), _stale(stale_before), _IMG.c.attempts >= max_attempts)
    with store.engine.begin() as conn:
        failed = list(conn.execute(sa.select(_IMG.c.id).where(where)).scalars())
        if failed:
            conn.execute(_IMG.update().where(where, _IMG.c.id.in_(failed)).values(
                status=Status.FAILED.value, claim_token=None, updated_at=now,
                error="a worker stopped while decoding this image on its last attempt"))
    return failed


def refresh_claim(store: SqlMetadataStore, token: str) -> int:
    """Heartbeat: the holder of `token` is alive, so its claims are not stale; returns rows touched."""
    return store.refresh_claim(token)


def orphaned_ids(store: SqlMetadataStore, older_than: float, stale_before: float, limit: int) -> list[str]:
    """Pending images last touched before `older_than`, and stale claims, oldest first: the candidates to
    enqueue again when the queue holds no entries at all (an upload whose enqueue failed, a lost queue)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(_IMG.c.id)
            .where(sa.or_(sa.and_(_IMG.c.status == Status.PENDING.value, _IMG.c.updated_at < older_than),
                          _stale(stale_before)))
            .order_by(_IMG.c.seq).limit(limit)
        ).scalars()
        return list(rows)
