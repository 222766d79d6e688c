"""Watch a folder and hand over each new image once it is completely written.

Why polling: it works the same on every filesystem an edge device meets (SD cards, USB
sticks, SMB/NFS shares, FTP drop folders) where inotify is absent or blind to remote writes.

A file is *ready* when its size and modification time are unchanged across two consecutive
scans (a copy in progress keeps changing them); the caller then reads it, and a file that is
stable but unreadable is recorded as failed and retried only if it changes again. What was
handled is remembered in a small JSON state file (written atomically), keyed by path, size
and mtime, so a restart neither re-sends old images nor misses ones that arrived while the
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
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from aeic.sender.images import IMAGE_SUFFIXES
from aeic.shared.durable import atomic_write

_PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".filepart")

Fingerprint = tuple[int, int]  # (size in bytes, mtime in ns)
MAX_ENCODE_STARTS = 2  # a file the agent died on this often is failed, not tried again


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
    """Image suffix, not hidden, not a temporary or partial-download name."""
    lower = name.lower()
    if lower.startswith((".", "~")) or lower.endswith(_PARTIAL_SUFFIXES):
        return False
    return Path(lower).suffix in IMAGE_SUFFIXES


class FolderWatcher:
    """Scans one folder; :meth:`scan` returns the files that became ready since last time."""

    def __init__(self, directory: str | Path, state_path: str | Path, *, recursive: bool = False) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise NotADirectoryError(f"watch folder {self.directory} does not exist or is not a folder")
        self.state_path = Path(state_path)
        self.recursive = recursive
        self._previous: dict[str, Fingerprint] = {}
        self.unlisted: dict[str, str] = {}  # image names the last scan could not stat, and why
        state = self._load_state()
        self._handled: dict[str, dict] = dict(state.get("files", {}))
        self._started: dict[str, dict] = dict(state.get("started", {}))  # being encoded: fingerprint, starts
        self._died_on = dict(self._started)  # what earlier runs started and never finished

    def _load_state(self) -> dict:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"watch state {self.state_path} is corrupt ({exc}); move it away to rescan"
            ) from None
        return data

    def _save_state(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"directory": str(self.directory.resolve()), "files": self._handled, "started": self._started}
        atomic_write(self.state_path, json.dumps(payload, sort_keys=True).encode("utf-8"))

    def _listing(self) -> dict[str, tuple[Path, Fingerprint]]:
        pattern = "**/*" if self.recursive else "*"
        found, self.unlisted = {}, {}
        for path in self.directory.glob(pattern):
            relative = path.relative_to(self.directory)
            if any(part.startswith(".") for part in relative.parts[:-1]):
                continue
            if not is_candidate_name(path.name):
                continue
            try:
                info = path.stat()
            except FileNotFoundError:
                if path.is_symlink():
                    self.unlisted[relative.as_posix()] = "dangling symbolic link"
                continue  # else deleted since the listing
            except OSError as exc:  # a symlink loop, a denied folder: skip it, not the folder's other files
                self.unlisted[relative.as_posix()] = exc.strerror or str(exc)
                continue
            if stat.S_ISREG(info.st_mode):  # not a folder named x.jpg, a FIFO (reading it would hang), a device
                found[relative.as_posix()] = (path, (info.st_size, info.st_mtime_ns))
        return found

    def scan(self) -> list[Candidate]:
        """Files unchanged since the previous scan and not yet handled in that exact version."""
        if not self.directory.is_dir():  # unmounted, say: forgetting its files would send them all again
            raise FileNotFoundError(f"watch folder {self.directory} is gone")
        listing = self._listing()
        ready = []
        for name, (path, fingerprint) in sorted(listing.items()):
            stable = self._previous.get(name) == fingerprint
            done = self._handled.get(name, {}).get("fingerprint") == list(fingerprint)
            if stable and not done and fingerprint[0] > 0:
                ready.append(Candidate(path, name, fingerprint))
        self._previous = {name: fp for name, (_, fp) in listing.items()}
        self._forget_missing(listing)
        return ready

    def _forget_missing(self, listing: dict) -> None:
        """Drop state for files that are gone, so the state file does not grow forever."""
        gone = [name for name in self._handled if name not in listing]
        for name in gone:
            del self._handled[name]
        if gone:
            self._save_state()

    def begin(self, candidate: Candidate) -> bool:
        """Mark ``candidate`` as being encoded (durably); False, and recorded as failed, when earlier
        runs died on this version of it ``MAX_ENCODE_STARTS`` times."""
        earlier = self._died_on.get(candidate.name, {})
        starts = earlier.get("starts", 0) if earlier.get("fingerprint") == list(candidate.fingerprint) else 0
        if starts >= MAX_ENCODE_STARTS:
            self.record(candidate, Handled.FAILED, f"the agent stopped {starts} times while encoding it "
                                                   "(out of memory?); not tried again unless it changes")  # fmt: skip
            return False
        self._started[candidate.name] = {"fingerprint": list(candidate.fingerprint), "starts": starts + 1}
        try:
            self._save_state()
        except OSError:
            pass  # a full disk costs this attempt its guard, not the file its chance (record reports it)
        return True

    def record(self, candidate: Candidate, outcome: Handled, detail: str = "") -> None:
        """Remember a SENT or FAILED file (durably); LATER leaves no trace."""
        self._died_on.pop(candidate.name, None)
        started = self._started.pop(candidate.name, None) is not None
        if outcome is Handled.LATER:
            if started:
                self._save_state()
            return
        entry = {"fingerprint": list(candidate.fingerprint), "status": outcome.value}
        if detail:
            entry["detail"] = detail
        self._handled[candidate.name] = entry
        self._save_state()


def run_watch(
    watcher: FolderWatcher,
    handle: Callable[[Candidate], tuple[Handled, str]],
    stop: threading.Event,
    poll_interval: float,
    on_error: Callable[[str], None] | None = None,
) -> None:
    """Scan every ``poll_interval`` seconds until ``stop``; ``handle`` processes each ready file.

    A state file that cannot be written (full or read-only disk) or a folder that cannot be
    listed is reported through ``on_error`` and the loop goes on: what was handled stays
    remembered in memory and is saved with the next write that succeeds. A file handled LATER
    ends the scan's turn: the other ready files wait for the next scan instead of each being
    encoded and refused by the same full spool (a Pi's CPU and log, every scan, while the link is down).
    """
    report = on_error or (lambda line: print(line, file=sys.stderr, flush=True))
    reported: dict[str, str] = {}
    while not stop.is_set():
        try:
            candidates = watcher.scan()
        except OSError as exc:
            report(f"watch: cannot scan {watcher.directory} or save its state: {exc}")
            candidates = []
        reported = _report_unlisted(watcher, reported, report)
        for candidate in candidates:
            if stop.is_set():
                return
            if not watcher.begin(candidate):
                report(f"watch: {candidate.path}: the agent stopped while encoding it before; skipped")
                continue
            outcome, detail = handle(candidate)
            try:
                watcher.record(candidate, outcome, detail)
            except OSError as exc:
                report(f"watch: cannot save the state {watcher.state_path}: {exc}")
            if outcome is Handled.LATER:
                break  # a full or unwritable spool stops the files after it too: encoding them would be waste
        stop.wait(poll_interval)


def _report_unlisted(watcher: FolderWatcher, reported: dict[str, str], report: Callable[[str], None]) -> dict[str, str]:
    """Say once (not every scan) which image names cannot be read as files; returns what is now said."""
    for name, reason in sorted(watcher.unlisted.items()):
        if reported.get(name) != reason:
            report(f"watch: {watcher.directory / name}: skipped: {reason}")
    return dict(watcher.unlisted)
