"""The receiver's data directory is private to the service's user, and served by one embedded worker.

Why private: it holds every device's bitstreams and reconstructions and the SQLite database (token hashes,
session hashes); with the usual umask a new folder would be world-readable, so any local user could read
every image. A folder that already exists is left as the operator made it (it may be shared on purpose,
e.g. with a backup group), with a warning when others can read it.

Why one worker: the embedded worker starts by requeueing every image left `decoding`, which is right only
when no other process is decoding them. A second `aeic-receiver serve` on the same folder requeued the
first one's batch in progress (charging each image an attempt, failing one on its last attempt while it was
being decoded) and decoded it again, so the worker holds `receiver.lock` while it runs.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

__all__ = ["LOCK_NAME", "DataDirInUseError", "lock_data_dir", "prepare_data_dir", "unlock_data_dir"]

LOCK_NAME = "receiver.lock"

log = logging.getLogger(__name__)


def prepare_data_dir(path: Path) -> None:
    """Create `path` with mode 0700 when it is missing; warn when an existing one is open to others."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
        path.chmod(0o700)  # whatever the umask
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("data directory %s has mode %04o: other users can read the images and the database "
                    "(chmod 700 it unless that is intended)", path, mode)


class DataDirInUseError(RuntimeError):
    """Another live process runs the embedded decode worker on this data directory."""


def lock_data_dir(path: Path) -> int:
    """Take the data directory's worker lock (an exclusive `flock`, which the kernel drops when the process
    dies, `kill -9` included, so a restart never waits); returns the descriptor that holds it. Raises
    `DataDirInUseError`, naming the holder's pid, when a live process holds it."""
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise DataDirInUseError(
            f"another aeic-receiver (pid {holder}) is serving {path} with its decode worker; stop it first "
            "(two would requeue and decode each other's images)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_data_dir(fd: int) -> None:
    """Release the lock `lock_data_dir` returned."""
    os.close(fd)
