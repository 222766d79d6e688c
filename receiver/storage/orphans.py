"""Blob files that no image row names: a process killed between the two halves of a write leaves them (an
upload that stored its bitstream but not yet its row, a delete that removed the row but not yet the files).

Nothing serves or counts them, so they are only wasted space; the sweep gives it back. It only takes files
older than a grace period, so a blob whose row another writer is about to insert is never touched.
"""

from __future__ import annotations

import time
from pathlib import PurePosixPath

import sqlalchemy as sa
from aeic.receiver.storage import schema
from aeic.receiver.storage.blobs import FilesystemBlobStore
from aeic.receiver.storage.metadata import SqlMetadataStore

__all__ = ["GRACE_S", "remove_orphan_blobs"]

GRACE_S = 300.0  # far beyond the longest write between a blob and its row (the database waits 15 s at most)
_KINDS = ("bitstreams", "reconstructions", "thumbnails", "conversions")
_CHUNK = 500


def _known(store: SqlMetadataStore, ids: list[str]) -> set[str]:
    """Those of `ids` that still have a row."""
    table = schema.images
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(table.c.id).where(table.c.id.in_(ids))).scalars())


def remove_orphan_blobs(store: SqlMetadataStore, blobs: FilesystemBlobStore, grace_s: float = GRACE_S) -> int:
    """Delete blob files older than `grace_s` whose image has no row; returns how many."""
    before = time.time() - grace_s
    removed = 0
    for kind in _KINDS:
        keys = list(blobs.keys_written_before(kind, before))
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            known = _known(store, [PurePosixPath(k).stem for k in chunk])
            removed += sum(blobs.delete(k) for k in chunk if PurePosixPath(k).stem not in known)
    return removed
