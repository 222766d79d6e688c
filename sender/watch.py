"""Watch a folder and hand over each new image once it is completely written.

Why polling: it works the same on every filesystem an edge device meets (SD cards, USB
sticks, SMB/NFS shares, FTP drop folders) where inotify is absent or blind to remote writes.

A file is *ready* when its size and modification time are unchanged across two consecutive
scans (a copy in progress keeps changing them); the caller then reads it, and a file that is
stable but unreadable is recorded as failed and retried only if it changes again. What was
handled is remembered in a small SQLite database (one short transaction per change), keyed by
path, size and mtime, so a restart neither re-sends old images nor misses ones that arrived while the
agent was down. Hidden files, partial-download names and non-image suffixes are ignored, and so is
anything that is not a regular file (a folder named ``x.jpg``, a FIFO, whose reading would block); a
symbolic link is followed, and one that cannot be (dangling, a loop) is reported once and skipped, so it
cannot stop the scan of the other files.

A file being encoded is marked in the state first: if the agent dies on it (a photo too large for
the service's memory cap gets it OOM-killed, and systemd restarts it), the next run knows, and after
``MAX_ENCODE_STARTS`` starts the file is recorded as failed instead of killing the agent in a loop
that would hold back every file after it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from aeic.sender.images import IMAGE_SUFFIXES, PLUGIN_ONLY_SUFFIXES
from aeic.shared.durable import fsync_path

_WATCHED_SUFFIXES = IMAGE_SUFFIXES | PLUGIN_ONLY_SUFFIXES  # once: asked for every file of every scan
_PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".filepart")

Fingerprint = tuple[int, int]  # (size in bytes, mtime in ns)
MAX_ENCODE_STARTS = 2  # a file the agent died on this often is failed, not tried again
# Most of the agent's time scans may take: the watcher never deletes what it sent, so a folder grows
# (a camera's drop folder: 8,640 photos a day at one per 10 s), and past a few thousand files a scan every
# ``poll_interval`` would keep a small device's core busy; the wait after a scan grows with its duration.
SCAN_SHARE = 0.1


class Handled(Enum):
    """What the caller did with a ready file."""

    SENT = "sent"  # spooled: never handle again (unless the file changes)
    FAILED = "failed"  # unreadable: retry only if the file changes
    LATER = "later"  # temporary obstacle (e.g. spool full): retry on a later scan


@dataclass(frozen=True)
class Candidate:
    path: Path
    name: str  # path relative to the watched folder, the state key
    fingerprint: Fingerprint


def is_candidate_name(name: str) -> bool:
    """Image suffix, not hidden, not a temporary or partial-download name. A phone's HEIC or a JPEG XL photo
    is a candidate too: reading it fails with one line naming its format, where ignoring it left a phone set
    to HEIC sending nothing, unexplained."""
    lower = name.lower()
    if lower.startswith((".", "~")) or lower.endswith(_PARTIAL_SUFFIXES):
        return False
    return os.path.splitext(lower)[1] in _WATCHED_SUFFIXES


class FolderWatcher:
    """Scans one folder; :meth:`scan` returns the files that became ready since last time.

    The state is an SQLite database (WAL, synchronous=FULL: a commit survives kill -9 and power
    loss), so a start or an outcome costs one short transaction of a few pages, not a rewrite of
    every entry. Only what the last scan listed is held in memory, with whether each was handled
    then: a file unchanged since needs no lookup, so a steady scan reads nothing from the database.
    """

    def __init__(self, directory: str | Path, state_path: str | Path, *, recursive: bool = False) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise NotADirectoryError(f"watch folder {self.directory} does not exist or is not a folder")
        self.state_path = Path(state_path)
        self.recursive = recursive
        self._previous: dict[str, tuple[Fingerprint, bool]] = {}  # last listing: fingerprint, handled
        self.unlisted: dict[str, str] = {}  # image names the last scan could not stat, and why
        self._kept_folders: list[str] = []  # sub-folders (``a/b/``) the last scan could not list or found empty
        self._unsaved: dict[str, tuple[int, int, str, str] | None] = {}  # handled rows to write; None: forget
        self._unsaved_starts: dict[str, tuple[int, int, int] | None] = {}  # start marks to write; None: clear
        with _as_os_error():
            self._db = self._open()
            self._import_legacy()
            rows = self._db.execute("SELECT name, size, mtime_ns, starts FROM started").fetchall()
        self._died_on = {name: ((size, mtime), starts) for name, size, mtime, starts in rows}  # earlier runs

    def close(self) -> None:
        """Close the state database (every outcome is already committed)."""
        self._db.close()

    def __enter__(self) -> FolderWatcher:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> sqlite3.Connection:
        """Open or create the database; a damaged one stops the agent at start with one clear line."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.state_path)
        try:
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(problem)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except sqlite3.OperationalError:  # locked, unreadable: not a reason to move it away
            db.close()
            raise
        except sqlite3.DatabaseError as exc:
            db.close()
            raise _corrupt(self.state_path, exc, " (with its -wal and -shm files)") from None
        return db

    def _import_legacy(self) -> None:
        """Take over the JSON state of earlier versions once (then set aside), so an upgrade re-sends nothing."""
        legacy = self.state_path.with_suffix(".json")
        if legacy == self.state_path or not legacy.is_file():
            return
        files, started = _read_legacy(legacy)
        with self._db:  # rows already here are newer: a crash before the rename below imports again
            self._db.executemany("INSERT OR IGNORE INTO handled VALUES (?, ?, ?, ?, ?)", files)
            self._db.executemany("INSERT OR IGNORE INTO started VALUES (?, ?, ?, ?)", started)
        legacy.rename(legacy.with_name(legacy.name + ".imported"))
        fsync_path(legacy.parent)

    def _save_state(self) -> None:
        """Write the unsaved changes in one transaction; if that fails they stay for the next write."""
        with _as_os_error(), self._db:
            _write_rows(self._db, "started", self._unsaved_starts)
            _write_rows(self._db, "handled", self._unsaved)
        self._unsaved_starts.clear()
        self._unsaved.clear()

    def _is_handled(self, name: str, fingerprint: Fingerprint) -> bool:
        """Whether this version of ``name`` was sent or failed: unsaved changes first, then the database."""
        if name in self._unsaved:
            row = self._unsaved[name]
            return row is not None and row[:2] == fingerprint
        found = self._db.execute("SELECT size, mtime_ns FROM handled WHERE name = ?", (name,)).fetchone()
        return found == fingerprint

    def _listing(self) -> dict[str, tuple[str, Fingerprint]]:
        """Image files by name relative to the folder, with their path and fingerprint.

        Streamed with ``os.scandir`` and plain strings: ``Path.glob`` made two ``Path`` objects per file,
        three quarters of a scan's time (0.74 s per scan of 10,000 files, every poll). A sub-folder that
        cannot be listed, or lists no entry at all (a mount point whose card or share is not mounted), is
        noted so that its files are not forgotten; the watched folder itself raises, so it is reported, not
        taken for empty (which would forget every file in it, and send them all again once it can be read).
        """
        found: dict[str, tuple[str, Fingerprint]] = {}
        self.unlisted = {}
        self._kept_folders = []
        folders = [("", str(self.directory))]
        while folders:
            prefix, folder = folders.pop()
            try:
                entries = os.scandir(folder)
            except OSError:
                if not prefix:
                    raise
                self._kept_folders.append(prefix)  # its files are not gone: not forgotten
                continue
            empty = True
            with entries:
                for entry in entries:
                    empty = False
                    name = entry.name
                    if self.recursive and not name.startswith(".") and _is_folder(entry):
                        folders.append((f"{prefix}{name}/", entry.path))  # not a link: as Path.glob("**")
                        continue
                    if not is_candidate_name(name):
                        continue
                    try:
                        info = os.stat(entry.path)  # through a symbolic link
                    except FileNotFoundError:
                        if entry.is_symlink():
                            self.unlisted[prefix + name] = "dangling symbolic link"
                        continue  # else deleted since the listing
                    except OSError as exc:  # a symlink loop: skip it, not the folder's other files
                        self.unlisted[prefix + name] = exc.strerror or str(exc)
                        continue
                    if stat.S_ISREG(info.st_mode):  # not a folder named x.jpg, a FIFO (reading it would hang)
                        found[prefix + name] = (entry.path, (info.st_size, info.st_mtime_ns))
            if empty and prefix:  # a mount point with nothing mounted, say (see ``_gone``)
                self._kept_folders.append(prefix)
        return found

    def scan(self) -> list[Candidate]:
        """Readable files unchanged since the previous scan and not yet handled in that exact version."""
        if not self.directory.is_dir():  # unmounted, say: forgetting its files would send them all again
            raise FileNotFoundError(f"watch folder {self.directory} is gone")
        listing = self._listing()
        ready, current = [], {}
        with _as_os_error():
            for name, (path, fingerprint) in sorted(listing.items()):
                before = self._previous.get(name)
                stable = before is not None and before[0] == fingerprint
                done = before is not None and stable and (before[1] or self._is_handled(name, fingerprint))
                current[name] = (fingerprint, done)
                if stable and not done and fingerprint[0] > 0:
                    if os.access(path, os.R_OK):
                        ready.append(Candidate(Path(path), name, fingerprint))
                    else:  # not failed: a chmod changes no fingerprint, so a failure would be for good
                        self.unlisted[name] = "permission denied; it is sent once it can be read"
            gone = self._gone(listing)
        self._previous = current
        if gone:
            self._unsaved.update(dict.fromkeys(gone))
            self._save_state()
        return ready

    def _gone(self, listing: dict) -> list[str]:
        """Remembered files no longer in the folder, to forget so the state does not grow forever: those
        the last scan listed, or after a scan that listed none (the first one), all in the database.

        A listing of no image at all forgets nothing: a card unmounted from the watched folder leaves the
        mount point empty (and the agent may start before it is mounted), and forgetting its files had every
        photo encoded and uploaded again once it was back. A folder emptied for good is pruned by the next
        listing that holds a file. In a sub-folder the rule is a listing of no entry at all (a card's mount
        point in the folder is empty while it is unmounted, the folder as a whole is not); one that holds
        anything else forgets the images deleted from it."""
        if not listing:
            return []
        unlisted = tuple(self._kept_folders)  # sub-folders not listed or listed empty: their files stay
        if self._previous:
            names: Iterable[str] = self._previous
        else:
            names = (name for (name,) in self._db.execute("SELECT name FROM handled"))
        return [name for name in names if name not in listing and not (unlisted and name.startswith(unlisted))]

    def begin(self, candidate: Candidate) -> bool:
        """Mark ``candidate`` as being encoded (durably); False, and recorded as failed, when earlier
        runs died on this version of it ``MAX_ENCODE_STARTS`` times."""
        fingerprint, starts = self._died_on.get(candidate.name, (None, 0))
        starts = starts if fingerprint == candidate.fingerprint else 0
        if starts >= MAX_ENCODE_STARTS:
            self.record(candidate, Handled.FAILED, f"the agent stopped {starts} times while encoding it "
                                                   "(out of memory?); not tried again unless it changes")  # fmt: skip
            return False
        self._unsaved_starts[candidate.name] = (*candidate.fingerprint, starts + 1)
        try:
            self._save_state()
        except OSError:
            pass  # a full disk costs this attempt its guard, not the file its chance (record reports it)
        return True

    def release(self, candidate: Candidate) -> None:
        """Clear ``candidate``'s start mark (durably): the agent is stopping on request while encoding it,
        so being killed before the encode ends (systemd's stop timeout) is not the file's doing."""
        self._unsaved_starts[candidate.name] = None
        self._save_state()

    def record(self, candidate: Candidate, outcome: Handled, detail: str = "") -> None:
        """Remember a SENT or FAILED file (durably); LATER leaves no trace but clears the start mark."""
        self._died_on.pop(candidate.name, None)
        self._unsaved_starts[candidate.name] = None
        if outcome is not Handled.LATER:
            self._unsaved[candidate.name] = (*candidate.fingerprint, outcome.value, detail)
        self._save_state()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS handled (
    name TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, status TEXT NOT NULL, detail TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS started (
    name TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, starts INTEGER NOT NULL
) WITHOUT ROWID;
"""


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """A real sub-folder (not a link to one); one that vanished or cannot be checked is not."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _write_rows(db: sqlite3.Connection, table: str, rows: Mapping[str, tuple | None]) -> None:
    """Replace the rows of ``table`` named in ``rows``, or delete those given as None."""
    db.executemany(f"DELETE FROM {table} WHERE name = ?", [(name,) for name, row in rows.items() if row is None])
    values = [(name, *row) for name, row in rows.items() if row is not None]
    if values:
        db.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({', '.join('?' * len(values[0]))})", values)


@contextmanager
def _as_os_error() -> Iterator[None]:
    """A database that cannot be written or read mid-run (disk full, I/O error) is an OSError to the
    caller, which reports it and goes on, as for any other storage failure."""
    try:
        yield
    except sqlite3.Error as exc:
        raise OSError(f"watch state: {exc}") from None


def _corrupt(path: Path, reason: object, companions: str = "") -> ValueError:
    """The one line that tells the operator what to do: a rescan sends the folder's images again."""
    return ValueError(f"watch state {path} is corrupt ({reason}); move it away{companions} to rescan")


def _read_legacy(path: Path) -> tuple[list[tuple], list[tuple]]:
    """The rows of an earlier version's JSON state: handled files and start marks."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        handled = data.get("files", {}).items()
        files = [(name, *e["fingerprint"], e["status"], e.get("detail", "")) for name, e in handled]
        started = [(name, *e["fingerprint"], e["starts"]) for name, e in data.get("started", {}).items()]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(path, exc) from None
    return files, started


def run_watch(
    watcher: FolderWatcher,
    handle: Callable[[Candidate], tuple[Handled, str]],
    stop: threading.Event,
    poll_interval: float,
    on_error: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    ready: Callable[[], bool] = lambda: True,
) -> None:
    """Scan every ``poll_interval`` seconds until ``stop``; ``handle`` processes each ready file.

    A scan that takes long waits longer, so scans take at most :data:`SCAN_SHARE` of the time. A
    state file that cannot be written (full or read-only disk) or a folder that cannot be listed
    (gone, unmounted) is reported through ``on_error`` once, and once more when scans work again,
    and the loop goes on: what was handled stays remembered in memory and is saved with the next
    write that succeeds. A file handled LATER ends the scan's turn: the other ready files wait for
    the next scan instead of each being encoded and refused by the same full spool (a Pi's CPU and
    log, every scan, while the link is down); ``ready`` False (the caller's spool is still full) leaves
    the ready files of a scan for a later one without touching them or the state.
    """
    report = on_error or (lambda line: print(line, file=sys.stderr, flush=True))
    reported: dict[str, str] = {}
    failing: str | None = None  # the scan failure last reported: said once, not every poll while it lasts
    while not stop.is_set():
        started = clock()
        try:
            candidates = watcher.scan()
        except OSError as exc:
            line = f"watch: cannot scan {watcher.directory} or save its state: {exc}"
            if line != failing:
                report(f"{line} (tried again every scan; said again only when it changes)")
            failing, candidates = line, []
        else:
            if failing is not None:
                report(f"watch: {watcher.directory} is scanned again")
            failing = None
        took = clock() - started
        reported = _report_unlisted(watcher, reported, report)
        for candidate in candidates:
            if stop.is_set():
                return
            if not ready():
                break
            if not watcher.begin(candidate):
                report(f"watch: {candidate.path}: the agent stopped while encoding it before; skipped")
                continue
            outcome, detail = _handle_stoppably(watcher, handle, candidate, stop, report)
            try:
                watcher.record(candidate, outcome, detail)
            except OSError as exc:
                report(f"watch: cannot save the state {watcher.state_path}: {exc}")
            if outcome is Handled.LATER:
                break  # a full or unwritable spool stops the files after it too: encoding them would be waste
        stop.wait(max(poll_interval, took * (1 / SCAN_SHARE - 1)))


def _handle_stoppably(
    watcher: FolderWatcher, handle: Callable[[Candidate], tuple[Handled, str]], candidate: Candidate,
    stop: threading.Event, report: Callable[[str], None],
) -> tuple[Handled, str]:
    """``handle(candidate)`` in a worker thread, while this one waits where a stop request reaches it.

    A stop asked for mid-encode (systemd's SIGTERM) clears the file's start mark at once: an encode that
    outlasts the unit's stop timeout ends in a SIGKILL, which must not count as the file killing the
    agent, or two restarts during a large photo's encode on a slow device failed it for good. The wait
    is here because Python runs signal handlers only in the main thread, and never inside a call into
    onnxruntime, so the thread that encodes cannot notice the stop.
    """
    done: list[tuple[Handled, str]] = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            done.append(handle(candidate))
        except BaseException as exc:  # noqa: BLE001 - raised again below, in the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=work, name="aeic-encode", daemon=True)
    worker.start()
    released = False
    while worker.is_alive():
        worker.join(0.2)  # a signal interrupts the wait, so its handler runs now
        if stop.is_set() and not released:
            released = True
            report(f"watch: stopping after the encode of {candidate.path} (if the agent is killed first, the "
                   "next start encodes it again)")  # fmt: skip
            try:
                watcher.release(candidate)
            except OSError:
                pass  # a state that cannot be written keeps the mark: as before, a kill now counts
    if failed:
        raise failed[0]
    return done[0]


def _report_unlisted(watcher: FolderWatcher, reported: dict[str, str], report: Callable[[str], None]) -> dict[str, str]:
    """Say once (not every scan) which image names cannot be read as files; returns what is now said."""
    for name, reason in sorted(watcher.unlisted.items()):
        if reported.get(name) != reason:
            report(f"watch: {watcher.directory / name}: skipped: {reason}")
    return dict(watcher.unlisted)
