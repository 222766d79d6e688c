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
import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

# Temporary files start with this prefix; readers skip them and recovery deletes them.
TMP_PREFIX = ".tmp-"
# Before this, no temporary file can be this process's own: one with its pid is an earlier process's
# (a container's agent is pid 1 on every start, so a crash's leftovers would otherwise stay forever).
_PROCESS_STARTED = time.time()
# How old a temporary file written where its pid cannot be checked (another container or host sharing the
# folder) must be before it counts as a crash's leftover. A write's file is modified until its last byte is
# handed to the kernel and renamed within its fsync, which writes at most the whole file: the largest blob,
# a reconstruction PNG of the largest allowed picture (8192 x 8192 of noise, 201 MB), takes 3.4 minutes at
# 1 MB/s and took 0.3-1.3 s on a cloud VM's disk. 30 minutes is room for a disk of 112 KB/s, and for minutes
# of disagreement between the clock of a shared file server and ours. A dead writer's file waits that long
# and then for the next start-up sweep.
FOREIGN_TMP_AGE_S = 30 * 60


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=3).hexdigest()


def _read_id(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> tuple[int, int]:
    try:
        ns = os.stat("/proc/self/ns/pid")
    except OSError:
        return 0, 0  # not Linux: one pid space per machine
    return ns.st_dev, ns.st_ino


# Who writes a temporary file, in its name. A pid names a process only in one pid namespace of one running
# kernel: containers sharing a folder each count their own (pid 1 is alive in every one) and another host's
# pids say nothing here. The machine is what stays across a reboot: its host name, machine id and pid
# namespace number, the same on every boot outside containers (a container gets a new one, and containers
# on two hosts with the host's network and no machine id of their own can share a host name).
_NS_DEVICE, _NS_NUMBER = _pid_namespace()
_MACHINE = _digest(f"{socket.gethostname()}\0{_read_id('/etc/machine-id')}\0{_NS_NUMBER}")
_BOOT = _digest(_read_id("/proc/sys/kernel/random/boot_id"))
_PID_SPACE = _digest(f"{_NS_DEVICE}:{_NS_NUMBER}")
_WRITER = re.compile(r"(\d+)-([0-9a-f]{6})([0-9a-f]{6})([0-9a-f]{6})")


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
    tmp = directory / f"{TMP_PREFIX}{path.name}.{os.getpid()}-{_MACHINE}{_BOOT}{_PID_SPACE}.{secrets.token_hex(4)}"
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

    A file another live process is still writing (the service, while an operator runs ``aeic-send spool``;
    an API container beside a worker container on one volume) is left alone: deleting it fails that write.
    """
    removed = 0
    for entry in directory.glob(f"{TMP_PREFIX}*"):
        if _stale(entry):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _stale(path: Path) -> bool:
    """Whether the temporary file's writer is gone: by its pid where that can be checked, else by age."""
    parts = path.name.rsplit(".", 2)
    writer = _WRITER.fullmatch(parts[-2]) if len(parts) == 3 else None
    if writer is None:
        try:  # written before the name said where: its pid is checked here, where it may not belong
            pid = int(parts[-2])
        except (IndexError, ValueError):
            return True  # not our naming scheme: nobody is writing it
        return not _pid_alive(path, pid) or _older_than(path, FOREIGN_TMP_AGE_S)
    machine, boot, pid_space = writer.group(2, 3, 4)
    if (boot, pid_space) == (_BOOT, _PID_SPACE):
        return not _pid_alive(path, int(writer[1]))
    if machine == _MACHINE and boot != _BOOT:
        return True  # written before this machine last started: every process of then is gone
    return _older_than(path, FOREIGN_TMP_AGE_S)  # another container or host: its pid says nothing here


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return False  # renamed or deleted meanwhile: nothing to remove


def _pid_alive(path: Path, pid: int) -> bool:
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
