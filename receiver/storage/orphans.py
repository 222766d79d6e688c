"""Blob files that no image row names: a process killed between the two halves of a write leaves them (an
upload that stored its bitstream but not yet its row, a delete that removed the row but not yet the files).

Nothing serves or counts them, so they are only wasted space; the sweep gives it back. It only takes files
older than a grace period, so a blob whose row another writer is about to insert is never touched.

The same sweep lists an S3 bucket (`ListedBlobStore`): the scale-out workers run it there, as a killed API
replica leaves orphan objects just as a killed `serve` leaves files.

`BlobSweeper` runs it, with the sweep of dead writers' temporary files, in a thread of its own: at
start, once more when the grace has passed, then every `SWEEP_INTERVAL_S`. Run only at start, as it was,
the orphans of a process killed and restarted at once (a supervisor's restart takes a second) were all
younger than the grace and stayed until the next restart, months on a receiver that runs well; and the
start waited for the walk of every blob file before it answered (3-4 s per 100,000 files here: a minute
or more at a million images).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import PurePosixPath
from typing import Protocol, runtime_checkable

import sqlalchemy as sa
from aeic.receiver.storage import schema
from aeic.receiver.storage.blobs import FilesystemBlobStore
from aeic.receiver.storage.metadata import SqlMetadataStore

__all__ = ["GRACE_S", "SWEEP_INTERVAL_S", "BlobSweeper", "ListedBlobStore", "remove_orphan_blobs"]

log = logging.getLogger(__name__)

GRACE_S = 300.0  # far beyond the longest write between a blob and its row (the database waits 15 s at most)
SWEEP_INTERVAL_S = 24 * 3600.0  # orphans come from a killed process (or a failed delete): rare, and harmless
_KINDS = ("bitstreams", "reconstructions", "thumbnails", "conversions")
_CHUNK = 500


def _known(store: SqlMetadataStore, ids: list[str]) -> set[str]:
    """Those of `ids` that still have a row."""
    table = schema.images
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(table.c.id).where(table.c.id.in_(ids))).scalars())


@runtime_checkable
class ListedBlobStore(Protocol):
    """A blob store whose blobs can be listed by age: the files of `FilesystemBlobStore`, the objects of a
    scale-out `S3BlobStore`'s bucket."""

    def keys_written_before(self, kind: str, before: float) -> Iterator[str]: ...

    def delete(self, key: str) -> bool: ...


def remove_orphan_blobs(store: SqlMetadataStore, blobs: ListedBlobStore, grace_s: float = GRACE_S,
                        stop: threading.Event | None = None) -> int:
    """Delete blob files older than `grace_s` whose image has no row; returns how many. A `stop` set ends
    the walk after the chunk in progress (a large bucket's takes minutes; the store closes after a stop)."""
    before = time.time() - grace_s
    removed = 0
    for kind in _KINDS:
        keys = blobs.keys_written_before(kind, before)
        while chunk := list(islice(keys, _CHUNK)):  # not the whole listing: a million keys are some 100 MB
            if stop is not None and stop.is_set():
                return removed
            known = _known(store, [PurePosixPath(k).stem for k in chunk])
            removed += sum(blobs.delete(k) for k in chunk if PurePosixPath(k).stem not in known)
    return removed


class BlobSweeper:
    """Removes dead writers' temporary files and (with `orphans`) orphan blobs in a daemon thread: at
    `start`, again `grace_s` later (what a previous run left was too young at start), then every
    `interval_s`. A sweep that fails (a database outage) is logged and tried again at the next turn."""

    def __init__(self, store: SqlMetadataStore, blobs: ListedBlobStore, orphans: bool,
                 grace_s: float = GRACE_S, interval_s: float = SWEEP_INTERVAL_S) -> None:
        self.store, self.blobs, self.orphans = store, blobs, orphans
        self.grace_s, self.interval_s = grace_s, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aeic-blob-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the thread to end; a sweep in progress (a walk of the files) is waited for `timeout_s` at most."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        wait = self.grace_s + 1.0  # the next turn after the start's: past the grace of all the last run left
        while not self._stop.is_set():
            self.sweep()
            if self._stop.wait(wait):
                return
            wait = self.interval_s

    def sweep(self) -> None:
        """One turn: temporary files, then orphans; never raises."""
        try:
            temporaries = self.blobs.remove_stale_tmp() if isinstance(self.blobs, FilesystemBlobStore) else 0
            if temporaries:  # an object store's PUT leaves none
                log.warning("removed %d temporary file(s) of writes a killed process left", temporaries)
            if self.orphans and not self._stop.is_set():
                removed = remove_orphan_blobs(self.store, self.blobs, self.grace_s, self._stop)
                if removed:
                    log.warning("removed %d blob file(s) of no image, left by a killed process", removed)
        except Exception:  # the database or the disk failed: logged, tried again next turn
            log.exception("the blob sweep failed; it is tried again at its next turn")
