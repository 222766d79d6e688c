"""Crash-safe file writes: a file either has its complete new content or does not change; and one writer
at a time in a folder (``exclusive_lock``).

Why: the sender runs on devices that lose power or get killed (kill -9, OOM killer). A
bitstream, a sidecar or the watcher's state must never be seen half-written. The recipe is
the POSIX one: write a temporary file in the same directory, fsync it, rename it over the
target (atomic within one filesystem), then fsync the directory so the rename itself
survives a power cut.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

# Temporary files start with this prefix; readers skip them and recovery deletes them.
TMP_PREFIX = ".tmp-"
# Before this, no temporary file can be this process's own: one with its pid is an earlier process's
# (a container's agent is pid 1 on every start, so a crash's leftovers would otherwise stay forever).
_PROCESS_STARTED = time.time()


def fsync_path(path: Path) -> None:
    """Flush a directory's entries (renames, unlinks), or a file another library wrote, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    directory = path.parent
    tmp = directory / f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_path(directory)


def remove_stale_tmp(directory: Path) -> int:
    """Delete temporary files that crashed writers left behind; return how many.

    The writer's pid is part of the name, so a file another live process is still writing
    (e.g. the service, while an operator runs ``aeic-send spool``) is left alone.
    """
    removed = 0
    for entry in directory.glob(f"{TMP_PREFIX}*"):
        if _writer_alive(entry):
            continue
        entry.unlink(missing_ok=True)
        removed += 1
    return removed


def _writer_alive(path: Path) -> bool:
    parts = path.name.split(".")
    try:
        pid = int(parts[-2])
    except (IndexError, ValueError):
        return False  # not our naming scheme: nobody is writing it
    if pid == os.getpid():  # another thread of this process may be mid-write, unless it predates us
        try:
            return path.stat().st_mtime >= _PROCESS_STARTED
        except FileNotFoundError:
            return True  # its writer just renamed it: alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, busy: Exception) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (made if missing) for the block; raise ``busy`` at once when
    another process holds it. The kernel lets go of the lock when its process ends, however it ends; on a
    file system without locks (some NFS mounts) the block runs unguarded."""
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        except OSError:
            pass
        yield
