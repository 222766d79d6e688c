"""Watch a folder and hand over each new image once it is completely written.

Why polling: it works the same on every filesystem an edge device meets (SD cards, USB
sticks, SMB/NFS shares, FTP drop folders) where inotify is absent or blind to remote writes.

A file is *ready* when its size and modification time are unchanged across two consecutive
scans (a copy in progress keeps changing them); the caller then reads it, and a file that is
stable but unreadable is recorded as failed and retried only if it changes again. What was
handled is remembered in a small JSON state file (written atomically), keyed by path, size
and mtime, so a restart neither re-sends old images nor misses ones that arrived while the
agent was down. Hidden files, partial-download names and non-image suffixes are ignored.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from aeic.sender.images import IMAGE_SUFFIXES
from aeic.shared.durable import atomic_write

_PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".filepart")

Fingerprint = tuple[int, int]  # (size in bytes, mtime in ns)


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
        self._handled: dict[str, dict] = self._load_state()

    def _load_state(self) -> dict[str, dict]:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"watch state {self.state_path} is corrupt ({exc}); move it away to rescan"
            ) from None
        return dict(data.get("files", {}))

    def _save_state(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"directory": str(self.directory.resolve()), "files": self._handled}
        atomic_write(self.state_path, json.dumps(payload, sort_keys=True).encode("utf-8"))

    def _listing(self) -> dict[str, tuple[Path, Fingerprint]]:
        pattern = "**/*" if self.recursive else "*"
        found = {}
        for path in self.directory.glob(pattern):
            relative = path.relative_to(self.directory)
            if any(part.startswith(".") for part in relative.parts[:-1]):
                continue
            if not is_candidate_name(path.name):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if path.is_file():
                found[relative.as_posix()] = (path, (stat.st_size, stat.st_mtime_ns))
        return found

    def scan(self) -> list[Candidate]:
        """Files unchanged since the previous scan and not yet handled in that exact version."""
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

    def record(self, candidate: Candidate, outcome: Handled, detail: str = "") -> None:
        """Remember a SENT or FAILED file (durably); LATER leaves no trace."""
        if outcome is Handled.LATER:
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
) -> None:
    """Scan every ``poll_interval`` seconds until ``stop``; ``handle`` processes each ready file."""
    while not stop.is_set():
        for candidate in watcher.scan():
            if stop.is_set():
                return
            outcome, detail = handle(candidate)
            watcher.record(candidate, outcome, detail)
        stop.wait(poll_interval)
