"""On-disk store-and-forward queue of bitstreams waiting for upload.

Why: an edge device's link comes and goes and the process may be killed at any moment, yet
no image may be lost and none stored twice at the receiver. Every bitstream is therefore
written here durably (see :mod:`aeic.shared.durable`) *before* any upload is tried, and is
removed only after the receiver acknowledged it.

Layout under the spool root::

    pending/<key>.aeic    the bitstream; <key> = hex SHA-256 of its bytes (the upload's
    pending/<key>.json    Idempotency-Key), then -<capture> for a camera frame, and a sidecar:
                          source, created, attempts, ...
    rejected/<key>.aeic   items the receiver refused for good (a 4xx), items that kept failing
    rejected/<key>.json   alone, and files no bitstream could be (damaged, far too large), kept
                          with the reason for an operator; never retried automatically, never deleted

The ``.aeic`` file is the item; the sidecar is metadata. Opening a spool recovers from a
crash: leftover temporary files are deleted, a bitstream without a sidecar gets a fresh one,
a sidecar without a bitstream is dropped. Because the name is the content digest, putting
the same bitstream twice keeps one item: a photo sent again is one image at the receiver. A camera's
frames are events, not files, and those of a still scene (a dark night) can code byte-identically, so a
frame's key also names its capture: each frame is its own item and image. A sidecar also holds an item's own retry state (failures
proven its own, when to try it next; see :mod:`aeic.sender.forward`), rewritten atomically like
the rest, so a restart keeps it.

Size bound and policy when full: the *pending* items are bounded by ``max_items`` and
``max_bytes`` (bitstream bytes). When a new item would exceed either bound, :meth:`Spool.put`
raises :class:`SpoolFullError` and stores nothing: queued data is never dropped to make
room. A disk with no room left (ENOSPC, EDQUOT) or gone read-only (EROFS) is refused the same way. Callers decide what that means (the CLI reports the file as not queued; the watcher
retries the file on a later poll; the camera skips that frame).

How put knows the size without listing the folder each time: counting ``pending/`` takes a
stat per item (0.65 s at 100,000 items on the 2-core test machine, ``benchmarks/spool_bench.py``),
too slow for every frame of a camera during a long outage. Each :class:`Spool` keeps a tally, the
last count plus its own puts, removals, rejections and requeues since, and counts again when
the tally is older than ``recount_seconds`` and before refusing an item (then at most once per
twenty times the last count's duration, so a full spool costs a few percent of a core, not a
count per refused frame); a ``pending/`` it has to make again starts it from zero. What the tally cannot see is what other
processes did since the count: their removals only make it refuse later than it could, and
their puts are the bound's tolerance: with several processes queuing into one spool at once,
it holds up to what the others queued in the last ``recount_seconds`` more than the bound.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aeic.shared.durable import atomic_write, fsync_path, remove_stale_tmp

DATA_SUFFIX = ".aeic"
META_SUFFIX = ".json"
DEFAULT_MAX_ITEMS = 100_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# No stream a receiver decodes comes near this: at most 6144x4096 coded pixels (shared/decode_limits.py)
# at 5.3 bits a pixel, 33 times the top rate level. A pending file over it is something else (a file
# copied in by hand, a damaged directory entry) and is rejected unread instead of read whole each pass.
DEFAULT_MAX_ITEM_BYTES = 16 * 1024 * 1024
# How long a put trusts the tally without counting ``pending/`` again: one count per 30 s is a few
# percent of a slow core at the default bound, and the tolerance it gives the bound (what other
# processes queued meanwhile) is a few frames of a camera.
DEFAULT_RECOUNT_SECONDS = 30.0
# A full verdict is checked by a count unless the last count is younger than this many times the
# count's own duration: at most about 5% of the time goes into counting a full spool.
_COUNT_SHARE = 20
# Errors of a write that found no room: the disk is full, or the user's quota is used up.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})
# A capture's name in an item key: safe in a file name and an HTTP header, short.
_CAPTURE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class SpoolError(Exception):
    """Base class of spool errors."""


class SpoolFullError(SpoolError):
    """The spool is at its size bound; the new item was not stored."""


class StreamTooLargeError(SpoolError):
    """A new bitstream is larger than ``max_item_bytes``; it was not stored. Queued, it would have been moved
    to ``rejected/`` unread as if damaged; no room an upload makes lets it in, so it is not a full spool."""


class SpoolCorruptError(SpoolError):
    """A stored bitstream no longer matches its digest (disk corruption)."""


class SpoolItemTooLargeError(SpoolCorruptError):
    """A pending file is larger than any bitstream may be; it was not read."""


def idempotency_key(data: bytes, capture: str | None = None) -> str:
    """The item's name and the upload's Idempotency-Key: hex SHA-256 of the bitstream, then ``-capture`` when
    the bitstream is one capture of several that may be identical (a camera frame; see the module docstring)."""
    digest = hashlib.sha256(data).hexdigest()
    if capture is None:
        return digest
    if not _CAPTURE.fullmatch(capture):
        raise ValueError(f"capture name {capture!r} is not 1-64 letters, digits, '.', '_' or '-'")
    return f"{digest}-{capture}"


def _digest_of(key: str) -> str:
    """The content digest an item's key starts with."""
    return key.split("-", 1)[0]


_SIDECAR_FIELDS = frozenset({"key", "size", "source", "created", "attempts", "last_error", "failed_alone",
                             "failed_alone_since", "next_attempt"})  # fmt: skip


@dataclass
class SpoolItem:
    """One queued bitstream and its sidecar metadata."""

    key: str
    path: Path
    size: int
    source: str | None = None
    created: float = 0.0
    attempts: int = 0
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Failures proven the item's own (the receiver accepted other items around them), since when
    # (wall clock), and the wall-clock time before which it is not tried again.
    failed_alone: int = 0
    failed_alone_since: float | None = None
    next_attempt: float = 0.0

    def sidecar(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "size": self.size,
            "source": self.source,
            "created": self.created,
            "attempts": self.attempts,
            "last_error": self.last_error,
            **self.extra,
            "failed_alone": self.failed_alone,
            "failed_alone_since": self.failed_alone_since,
            "next_attempt": self.next_attempt,
        }


@dataclass
class _Tally:
    """``pending/`` as this process last counted it, plus its own changes since."""

    items: int
    bytes: int
    counted_at: float  # the Spool's clock when the count began
    took: float  # seconds the count took


class Spool:
    """A durable, bounded queue of bitstreams in a directory (safe across processes)."""

    def __init__(
        self,
        root: str | Path,
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
        recount_seconds: float = DEFAULT_RECOUNT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``recount_seconds``: how old a tally put may decide from (0: count on every put, as exact
        across processes as a count can be); ``clock``: monotonic seconds, replaceable in tests."""
        if max_items < 1 or max_bytes < 1 or max_item_bytes < 1:
            raise ValueError("spool bounds must be positive")
        if recount_seconds < 0:
            raise ValueError("recount_seconds must not be negative")
        self.root = Path(root)
        self.pending_dir = self.root / "pending"
        self.rejected_dir = self.root / "rejected"
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_item_bytes = max_item_bytes
        self.recount_seconds = recount_seconds
        self._clock = clock
        self._tally: _Tally | None = None  # none until the first put counts
        self._lock = threading.Lock()
        for directory in (self.root, self.pending_dir, self.rejected_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.recover()

    # ----------------------------------------------------------------- recovery
    def recover(self) -> None:
        """Repair what a crash may have left: temp files, missing or orphaned sidecars.

        Best effort: on a read-only or failing disk a repair waits for a later open. None of them is
        needed to list or deliver items (listing recovers a lost sidecar's metadata as it reads), and
        a stray temporary file must not stop ``spool`` or ``flush`` on a card gone read-only.
        """
        with self._lock:
            for directory in (self.pending_dir, self.rejected_dir):
                with suppress(OSError):
                    remove_stale_tmp(directory)
                for meta in directory.glob(f"*{META_SUFFIX}"):
                    if not meta.with_suffix(DATA_SUFFIX).exists():
                        with suppress(OSError):
                            meta.unlink(missing_ok=True)
                for data in directory.glob(f"*{DATA_SUFFIX}"):
                    if not data.with_suffix(META_SUFFIX).exists():
                        with suppress(OSError):
                            self._write_sidecar(self._recovered_item(data))

    def _recovered_item(self, data: Path) -> SpoolItem:
        stat = data.stat()
        extra: dict[str, Any] = {"recovered": True}
        if data.parent == self.rejected_dir:
            extra["reason"] = "unknown (sidecar lost in a crash)"
        return SpoolItem(data.stem, data, stat.st_size, created=stat.st_mtime, extra=extra)

    # ------------------------------------------------------------------ queries
    def items(self) -> list[SpoolItem]:
        """Pending items, oldest first."""
        return list(self.pending())

    def pending(self) -> Iterator[SpoolItem]:
        """Pending items, oldest first, each read again when its turn comes.

        Why not :meth:`items`: only the order is held for the whole spool, not every item's metadata
        (a backlog at the default bound of 100,000 items held about 140 MB as a list), and an item
        another process delivered meanwhile is skipped.
        """
        return self._iterate(self.pending_dir)

    def rejected(self) -> list[SpoolItem]:
        """Items the receiver refused, oldest first."""
        return list(self._iterate(self.rejected_dir))

    def __len__(self) -> int:
        return sum(1 for _ in _named(self.pending_dir, DATA_SUFFIX))

    def keys(self) -> set[str]:
        """The pending items' keys, without reading their sidecars."""
        return {data.stem for data in _named(self.pending_dir, DATA_SUFFIX)}

    def pending_bytes(self) -> int:
        """Bitstream bytes pending, counted now."""
        return _count(self.pending_dir)[1]

    def _iterate(self, directory: Path) -> Iterator[SpoolItem]:
        order = []
        for data in _named(directory, DATA_SUFFIX):
            item = self._load_item(data)
            if item is not None:
                order.append((item.created, item.key))
        order.sort()
        for _, key in order:
            item = self._load_item(directory / f"{key}{DATA_SUFFIX}")
            if item is not None:
                yield item

    def _load_item(self, data: Path) -> SpoolItem | None:
        """Read one item's sidecar; None when another process removed the item meanwhile."""
        try:
            size = data.stat().st_size
            meta = json.loads(data.with_suffix(META_SUFFIX).read_text(encoding="utf-8"))
        except FileNotFoundError:
            if not data.exists():
                return None
            return self._recovered_item(data)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            # Unreadable (written by root with umask 077, a bad sector) or damaged: the bitstream is
            # the item, and one bad sidecar must not stop every other item from being listed.
            return self._recovered_item(data)
        # Valid JSON of the wrong shape (``null``, a list, text where a number belongs) is as
        # damaged as invalid JSON: one bad sidecar must not stop the whole spool from draining.
        if not isinstance(meta, dict):
            return self._recovered_item(data)
        try:
            created, attempts = _timestamp(meta.get("created", 0.0)), int(meta.get("attempts", 0))
            failed_alone, next_attempt = int(meta.get("failed_alone", 0)), _timestamp(meta.get("next_attempt", 0.0))
            since = meta.get("failed_alone_since")
            since = None if since is None else _timestamp(since)
        except (TypeError, ValueError, OverflowError):
            return self._recovered_item(data)
        return SpoolItem(
            key=data.stem,
            path=data,
            size=size,
            source=meta.get("source"),
            created=created,
            attempts=attempts,
            last_error=meta.get("last_error"),
            extra={k: v for k, v in meta.items() if k not in _SIDECAR_FIELDS},
            failed_alone=failed_alone,
            failed_alone_since=since,
            next_attempt=next_attempt,
        )

    # ------------------------------------------------------------------ updates
    def put(self, data: bytes, source: str | None = None, *, capture: str | None = None, **extra: Any) -> SpoolItem:
        """Store a bitstream durably and return its item; storing it again (with the same ``capture``) is a no-op."""
        if not data:
            raise ValueError("refusing to spool an empty bitstream")
        if len(data) > self.max_item_bytes:
            raise StreamTooLargeError(f"its stream is {len(data)} bytes, over spool_max_item_bytes="
                                      f"{self.max_item_bytes}; raise that setting or code it smaller "
                                      "(target_bytes or rate)")  # fmt: skip
        key = idempotency_key(data, capture)
        path = self.pending_dir / f"{key}{DATA_SUFFIX}"
        with self._lock:
            if path.exists():
                existing = self._load_item(path)
                if existing is not None:
                    return existing
            self._make_pending_dir()
            self._check_room(len(data))
            item = SpoolItem(key, path, len(data), source=source, created=time.time(), extra=extra)
            try:
                atomic_write(path, data)
            except OSError as exc:
                # A disk without room is a bound like max_bytes, and storage gone read-only (an SD card's
                # failure mode) takes nothing either: a SpoolFullError the agent waits out (no image encoded
                # until an upload frees some, or a minute) instead of an error it retries every scan.
                if exc.errno in _NO_ROOM:
                    raise SpoolFullError(f"spool {self.root} is full: its disk is full ({exc.strerror}); new "
                                         "images are refused until uploads drain it") from exc  # fmt: skip
                if exc.errno == errno.EROFS:
                    raise SpoolFullError(f"spool {self.root} cannot take new images: its file system is read-only "
                                         "(a failing SD card, or mounted ro); remount it read-write or replace "
                                         "the card") from exc  # fmt: skip
                raise
            self._tallied(1, len(data))
            try:
                self._write_sidecar(item)
            except OSError:
                # The disk filled between the two writes: the bitstream is stored, and it is the item
                # (listing recovers its metadata); refusing now would call a queued image not queued.
                pass
        return item

    def _make_pending_dir(self) -> None:
        """Create ``pending/`` again if it was deleted while running (new images still go); made by us,
        it is known empty, so the tally starts again from nothing instead of the count before."""
        try:
            self.pending_dir.mkdir()
        except FileExistsError:
            return
        except FileNotFoundError:  # the whole spool went
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                self.pending_dir.mkdir()
            except FileExistsError:  # another process made it first: count it as usual
                return
        self._tally = _Tally(0, 0, self._clock(), 0.0)

    def _check_room(self, size: int) -> None:
        """Refuse an item that would pass a bound, deciding from the tally (see the module's docstring)."""
        tally = self._tally
        if tally is None or self._clock() - tally.counted_at >= self._trusted_for(tally, size):
            tally = self._recount()
        reason = self._full(tally, size)
        if reason is not None:
            raise SpoolFullError(reason)

    def _trusted_for(self, tally: _Tally, size: int) -> float:
        """How long after its count the tally may decide this put: ``recount_seconds`` to accept it; to
        refuse it, as other processes may have made room, no longer than ``_COUNT_SHARE`` times the
        count's own duration (a full spool is counted again, but not for every frame)."""
        if self._full(tally, size) is None:
            return self.recount_seconds
        return min(self.recount_seconds, _COUNT_SHARE * tally.took)

    def _full(self, tally: _Tally, size: int) -> str | None:
        if tally.items + 1 > self.max_items:
            return (
                f"spool {self.root} is full: {tally.items} items pending (max_items={self.max_items}); "
                "new images are refused until uploads drain it"
            )
        if tally.bytes + size > self.max_bytes:
            return (
                f"spool {self.root} is full: {tally.bytes} + {size} bytes would exceed "
                f"max_bytes={self.max_bytes}; new images are refused until uploads drain it"
            )
        return None

    def _recount(self) -> _Tally:
        started = self._clock()
        items, used = _count(self.pending_dir)
        self._tally = _Tally(items, used, started, self._clock() - started)
        return self._tally

    def _tallied(self, items: int, size: int) -> None:
        """Apply one of this process's own changes to ``pending/`` (called under the lock)."""
        if self._tally is not None:
            self._tally.items = max(0, self._tally.items + items)
            self._tally.bytes = max(0, self._tally.bytes + size)

    def read(self, item: SpoolItem) -> bytes:
        """The item's bitstream, checked against its digest; a file over ``max_item_bytes`` is refused
        unread (:class:`SpoolItemTooLargeError`): read whole on every pass, it would cost the memory a
        small device has, and it cannot be a bitstream anyway."""
        with item.path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > self.max_item_bytes:
                raise SpoolItemTooLargeError(
                    f"{item.path}: {size} bytes, over the largest a bitstream may be here "
                    f"(spool_max_item_bytes={self.max_item_bytes}); not read, not uploaded"
                )
            data = file.read(size + 1)  # bounded: a file growing meanwhile fails the digest check below
        if hashlib.sha256(data).hexdigest() != _digest_of(item.key):
            raise SpoolCorruptError(f"{item.path}: content no longer matches its SHA-256 name")
        return data

    def record_attempt(self, item: SpoolItem, error: str) -> None:
        """Count a failed upload attempt in the sidecar (for operators and backoff)."""
        with self._lock:
            if not item.path.exists():
                return
            item.attempts += 1
            item.last_error = error
            item.extra["last_attempt"] = time.time()
            try:
                self._write_sidecar(item, sync_dir=False)
            except OSError:
                # Disk full or read-only: the count is only for operators, and the bitstream is
                # safe; failing here would end `send`/`flush` without saying what stays queued.
                pass

    def set_aside(self, item: SpoolItem, error: str, *, now: float, until: float, own: bool) -> None:
        """Record a failed upload and the wall-clock time before which the item is not tried again.

        ``own``: the failure is proven the item's (the receiver accepted other items around it) and
        counts towards giving the item up. Best effort like :meth:`record_attempt`: on a read-only
        spool the forwarder keeps the time in memory, so the item still does not block the queue.
        """
        with self._lock:
            if not item.path.exists():
                return
            item.attempts += 1
            item.last_error = error
            item.extra["last_attempt"] = now
            if own:
                item.failed_alone += 1
                item.failed_alone_since = now if item.failed_alone_since is None else item.failed_alone_since
            item.next_attempt = until
            with suppress(OSError):
                self._write_sidecar(item, sync_dir=False)

    def remove(self, item: SpoolItem) -> None:
        """Forget an item the receiver acknowledged (tolerates a concurrent removal)."""
        with self._lock:
            try:
                size = item.path.stat().st_size
                item.path.unlink()
            except FileNotFoundError:  # another process removed it: its removal, not ours to tally
                pass
            else:
                self._tallied(-1, -size)
            item.path.with_suffix(META_SUFFIX).unlink(missing_ok=True)
            fsync_path(self.pending_dir)

    def reject(self, item: SpoolItem, reason: str, status: int | None = None) -> SpoolItem:
        """Move an item the receiver refused for good to ``rejected/`` with the reason."""
        target = self.rejected_dir / item.path.name
        with self._lock:
            self.rejected_dir.mkdir(parents=True, exist_ok=True)  # as in put: a deleted folder comes back
            moved = SpoolItem(
                item.key,
                target,
                item.size,
                item.source,
                item.created,
                item.attempts + 1,
                item.last_error,
                extra={**item.extra, "reason": reason, "status": status, "rejected_at": time.time()},
            )
            self._write_sidecar(moved)
            try:
                size = item.path.stat().st_size
                item.path.replace(target)
            except FileNotFoundError:
                target.with_suffix(META_SUFFIX).unlink(missing_ok=True)
                return moved
            self._tallied(-1, -size)
            item.path.with_suffix(META_SUFFIX).unlink(missing_ok=True)
            fsync_path(self.rejected_dir)
            fsync_path(self.pending_dir)
        return moved

    def requeue_rejected(self) -> int:
        """Move every rejected item back to pending (after an operator fixed the cause)."""
        count = 0
        with self._lock:
            for data in self.rejected_dir.glob(f"*{DATA_SUFFIX}"):
                meta = data.with_suffix(META_SUFFIX)
                target = self.pending_dir / data.name
                size = data.stat().st_size
                data.replace(target)
                self._tallied(1, size)
                if meta.exists():
                    meta.replace(target.with_suffix(META_SUFFIX))
                count += 1
            fsync_path(self.pending_dir)
            fsync_path(self.rejected_dir)
        return count

    def _write_sidecar(self, item: SpoolItem, *, sync_dir: bool = True) -> None:
        text = json.dumps(item.sidecar(), sort_keys=True)
        atomic_write(item.path.with_suffix(META_SUFFIX), text.encode("utf-8"), sync_dir=sync_dir)


def _named(directory: Path, suffix: str) -> Iterator[Path]:
    """The files of ``directory`` whose name ends in ``suffix``, streamed (:func:`_entries`)."""
    return (directory / entry.name for entry in _entries(directory, suffix))


def _entries(directory: Path, suffix: str) -> Iterator[os.DirEntry[str]]:
    """The directory entries of ``directory`` whose name ends in ``suffix``, streamed: ``Path.glob`` lists
    the whole folder first, a peak of a few hundred bytes per file on every pass over a large backlog."""
    try:
        listing = os.scandir(directory)
    except FileNotFoundError:  # deleted while running (put makes it again): nothing queued there
        return
    with listing as entries:
        for entry in entries:
            if entry.name.endswith(suffix):
                yield entry


def _count(directory: Path) -> tuple[int, int]:
    """The bitstreams in ``directory`` and their bytes, in one pass (one stat per bitstream)."""
    items = used = 0
    for entry in _entries(directory, DATA_SUFFIX):
        try:
            used += entry.stat().st_size
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        items += 1
    return items, used


# The latest time a sidecar may hold (9999-12-31 23:59:59 UTC), as the clock functions that show it take.
_LATEST_TIME = 253402300799.0


def _timestamp(value: Any) -> float:
    """A sidecar's time (seconds since the epoch); ``ValueError`` for one no clock shows (NaN, infinite, beyond
    year 9999 or before 1970): written by hand or damaged, such a time made ``aeic-send spool`` die showing it
    (1e300) or the item never due (NaN), where a damaged sidecar is otherwise recovered."""
    seconds = float(value)
    if not 0.0 <= seconds <= _LATEST_TIME:  # NaN fails this too
        raise ValueError(f"time {seconds} out of range")
    return seconds
