"""Blob storage for bitstreams, reconstructions and thumbnails.

`BlobStore` is the seam where an object store (S3/MinIO, issue 8) plugs in; the embedded default keeps
files under the data directory. A file write is atomic and durable: temporary file in the same
directory, fsync, `os.replace`, fsync of the directory, so a crash leaves either the old state or the
complete new file, never a torn one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from aeic.shared.durable import TMP_PREFIX, atomic_write, fsync_path
from aeic.shared.durable import remove_stale_tmp as remove_dead_writers_tmp

__all__ = [
    "BlobNotFoundError",
    "BlobStore",
    "FilesystemBlobStore",
    "bitstream_key",
    "reconstruction_key",
    "thumbnail_key",
]

_TMP_PREFIX = TMP_PREFIX
_KEY = re.compile(r"^[a-z0-9_-]+(/[a-z0-9_-]+)*\.[a-z0-9]+$")
MIN_FREE_BYTES = 64 << 20  # room for a few uploads and a full-size reconstruction: under it, not ready


class BlobNotFoundError(KeyError):
    """The key has no blob (never written, or deleted)."""


@runtime_checkable
class BlobStore(Protocol):
    """Key -> bytes storage; `put` must be atomic and durable before it returns."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> bool: ...

    def exists(self, key: str) -> bool: ...

    def ping(self) -> None:
        """Raise when new blobs cannot be stored (readiness)."""
        ...


def _sharded(kind: str, image_id: str, suffix: str) -> str:
    return f"{kind}/{image_id[:2]}/{image_id}.{suffix}"


def bitstream_key(image_id: str) -> str:
    """Where an upload's bitstream lives."""
    return _sharded("bitstreams", image_id, "aeic")


def reconstruction_key(image_id: str) -> str:
    """Where the full-size PNG reconstruction lives."""
    return _sharded("reconstructions", image_id, "png")


def thumbnail_key(image_id: str) -> str:
    """Where the gallery thumbnail (JPEG) lives."""
    return _sharded("thumbnails", image_id, "jpg")


class FilesystemBlobStore:
    """Blobs as files under `root`, one directory level of sharding by id prefix."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"invalid blob key {key!r}")
        return self.root / key

    def _ensure_dir(self, directory: Path) -> None:
        """Create missing directories and make their entries durable too."""
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            fsync_path(path.parent)

    def put(self, key: str, data: bytes) -> None:
        """Atomically replace the blob at `key` with `data`, durable on return."""
        path = self._path(key)
        self._ensure_dir(path.parent)
        atomic_write(path, data)

    def get(self, key: str) -> bytes:
        """The blob's bytes; raises `BlobNotFoundError` when absent."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(key) from None

    def delete(self, key: str) -> bool:
        """Remove the blob; returns whether it existed."""
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_path(path.parent)
        return True

    def exists(self, key: str) -> bool:
        """Whether a complete blob is stored at `key`."""
        return self._path(key).is_file()

    def ping(self) -> None:
        """Raise `OSError` when the root is not a writable folder (a read-only mount) or its disk has less
        than `MIN_FREE_BYTES` free: uploads would be refused and reconstructions could not be written."""
        if not (self.root.is_dir() and os.access(self.root, os.W_OK)):
            raise PermissionError(errno.EACCES, f"blob folder {self.root} is not writable")
        free = shutil.disk_usage(self.root).free
        if free < MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, f"blob folder {self.root} has {free} bytes free, under {MIN_FREE_BYTES}")

    def keys_written_before(self, kind: str, before: float) -> Iterator[str]:
        """Keys of the blobs under `kind` (e.g. "bitstreams") whose file was last written before `before`
        (epoch seconds): the candidates of an orphan sweep, which must never race a write in progress."""
        for shard in sorted((self.root / kind).glob("*/")):
            for entry in os.scandir(shard):
                if entry.name.startswith(_TMP_PREFIX) or not entry.is_file():
                    continue
                try:
                    written = entry.stat().st_mtime
                except FileNotFoundError:  # deleted meanwhile
                    continue
                if written < before:
                    yield f"{kind}/{shard.name}/{entry.name}"

    def remove_stale_tmp(self) -> int:
        """Delete temporary files left by a writer that crashed mid-write; returns how many. A file whose
        writer (its pid is in the name) still runs is kept: another process sharing the folder (an API
        process beside `aeic-receiver worker`s, a second receiver) is writing it, and deleting it failed
        that write."""
        folders = sorted({path.parent for path in self.root.rglob(f"{_TMP_PREFIX}*")})
        return sum(remove_dead_writers_tmp(folder) for folder in folders)
