"""The receiver's data directory is private to the service's user, and served by one embedded worker.

Why private: it holds every device's bitstreams and reconstructions and the SQLite database (token hashes,
session hashes); with the usual umask a new folder would be world-readable, so any local user could read
every image. A folder that already exists is left as the operator made it (it may be shared on purpose,
e.g. with a backup group), with a warning when others can read it.

Why one worker: the embedded worker's claims are owned by its data directory (`owner_id`), and a start
requeues at once the claims its own previous life left `decoding`. That is right only when no other process
decodes under the same id: a second `aeic-receiver serve` on the same folder requeued the first one's batch
in progress (charging each image an attempt, failing one on its last attempt while it was being decoded)
and decoded it again, so the worker holds `receiver.lock` while it runs. Receivers on other folders
sharing one PostgreSQL database have ids of their own, and their claims are taken over only when their
lease runs out (`storage.metadata`). A SQLite database serves one receiver (`lock_sqlite_database`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import socket
import stat
from pathlib import Path

import sqlalchemy as sa

__all__ = ["ID_NAME", "LOCK_NAME", "DataDirInUseError", "DatabaseInUseError", "lock_data_dir",
           "lock_sqlite_database", "owner_id", "prepare_data_dir", "unlock_data_dir"]

LOCK_NAME = "receiver.lock"
ID_NAME = "receiver.id"
_OWNER_ID = re.compile(r"^[0-9a-f]{16}$")

log = logging.getLogger(__name__)


def prepare_data_dir(path: Path) -> None:
    """Create `path` with mode 0700 when it is missing; warn when an existing one is open to others.
    Raises `NotADirectoryError` when `path` is a file (SQLite's "unable to open database file" named
    neither the folder nor the cause)."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the data directory is not a folder", str(path))
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir(mode=0o700)
        except OSError as exc:  # a parent that is a file, a read-only or full file system
            raise OSError(exc.errno, f"cannot create the data directory {path}: {exc.strerror}",
                          exc.filename) from None
        path.chmod(0o700)  # whatever the umask
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("data directory %s has mode %04o: other users can read the images and the database "
                    "(chmod 700 it unless that is intended)", path, mode)


class DataDirInUseError(RuntimeError):
    """Another live process runs the embedded decode worker on this data directory."""


class DatabaseInUseError(RuntimeError):
    """Another live process runs the embedded decode worker on this SQLite database."""


class _HeldError(Exception):
    """A live process holds the lock; `holder` is the pid it wrote into the file."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def _flock(file: Path) -> int:
    """Take an exclusive `flock` on `file` (the kernel drops it when the process dies, `kill -9` included,
    so a restart never waits) and write our pid into it; returns the descriptor that holds it. Raises
    `_HeldError` with the holder's pid when a live process holds it."""
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:  # a read-only data directory, one of another user's
        raise OSError(exc.errno, f"cannot take the worker lock: {exc.strerror}", str(file)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise _HeldError(holder) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:  # a full disk
        os.close(fd)
        raise OSError(exc.errno, f"cannot write the worker lock: {exc.strerror}", str(file)) from None
    return fd


def lock_data_dir(path: Path) -> int:
    """Take the data directory's worker lock; returns the descriptor that holds it. Raises
    `DataDirInUseError`, naming the holder's pid, when a live process holds it."""
    try:
        return _flock(path / LOCK_NAME)
    except _HeldError as held:
        raise DataDirInUseError(
            f"another aeic-receiver (pid {held.holder}) is serving {path} with its decode worker; stop it "
            "first (two would requeue and decode each other's images)") from None


def lock_sqlite_database(url: str) -> int | None:
    """Take the worker lock of the SQLite database file at `url` (`<file>.lock`); None for another engine.

    Two data directories may name one SQLite file (`database_url`). Sharing a database between receivers is
    PostgreSQL's job: SQLite serves one host, where one receiver does the work, and each receiver's blobs
    are files in its own data directory, so a peer claiming an upload would find no bitstream and fail it.
    Raises `DatabaseInUseError`, naming the holder's pid, instead."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    database = Path(parsed.database).resolve()
    try:
        return _flock(database.with_name(database.name + ".lock"))
    except _HeldError as held:
        raise DatabaseInUseError(
            f"another aeic-receiver (pid {held.holder}) runs its decode worker on the SQLite database "
            f"{database}; a SQLite database serves one receiver: stop that one, or share a PostgreSQL "
            "database (with blob_url for the blobs) instead") from None


def unlock_data_dir(fd: int) -> None:
    """Release a lock `lock_data_dir` or `lock_sqlite_database` returned."""
    os.close(fd)


def owner_id(path: Path) -> str:
    """The owner id of the claims this data directory's receiver makes: 16 hex digits, kept in `ID_NAME`.

    The same after a restart, so a start requeues at once what its killed previous life held (the lock says
    it is gone). A new one when the file was made for another place (host name, device and inode of the
    folder: a copied folder, a cloned machine), so a copy never takes a live original's claims for its own;
    a lost id only makes a restart wait for its old claims' lease."""
    place = _place(path)
    try:
        owner, _, made_for = (path / ID_NAME).read_text().strip().partition(" ")
    except FileNotFoundError:
        owner = made_for = ""
    if made_for == place and _OWNER_ID.match(owner):
        return owner
    owner = secrets.token_hex(8)
    temporary = path / f".{ID_NAME}.{os.getpid()}"
    temporary.write_text(f"{owner} {place}\n")
    os.replace(temporary, path / ID_NAME)
    return owner


def _place(path: Path) -> str:
    info = path.stat()
    return f"{socket.gethostname()}:{info.st_dev}:{info.st_ino}"
