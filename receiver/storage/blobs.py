"""Blob storage for bitstreams, reconstructions (and their JPEG/WebP conversions) and thumbnails.

`BlobStore` is the seam where an object store (S3/MinIO, issue 8) plugs in; the embedded default keeps
files under the data directory. A file write is atomic and durable: temporary file in the same
directory, fsync, `os.replace`, fsync of the directory, so a crash leaves either the old state or the
complete new file, never a torn one.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from aeic.shared.durable import TMP_PREFIX, atomic_write, fsync_path
from aeic.shared.durable import remove_stale_tmp as remove_dead_writers_tmp

__all__ = [
    "CHUNK_BYTES",
    "BlobNotFoundError",
    "BlobReadError",
    "BlobStore",
    "FilesystemBlobStore",
    "OpenBlob",
    "StreamingBlobStore",
    "bitstream_key",
    "conversion_key",
    "open_blob",
    "reconstruction_key",
    "thumbnail_key",
]

_TMP_PREFIX = TMP_PREFIX
_KEY = re.compile(r"^[a-z0-9_-]+(/[a-z0-9_-]+)*\.[a-z0-9]+$")
MIN_FREE_BYTES = 64 << 20  # room for a few uploads and a full-size reconstruction: under it, not ready
# What a download holds of its file at a time. Read whole, a noisy 8192x8192 PNG (115 MB) was held per
# download: 8 at once took the server to 1.56 GB, and a slow reader kept its copy for as long as it read.
CHUNK_BYTES = 1 << 20


class BlobNotFoundError(KeyError):
    """The key has no blob (never written, or deleted)."""


class BlobReadError(Exception):
    """An open blob failed part way through (the storage went away, the object came short). Not an
    `OSError`: a download has sent its headers by then, and Starlette reads an `OSError` while sending as the
    client leaving."""


class _Body(Protocol):
    def read(self, amt: int, /) -> bytes: ...

    def close(self) -> None: ...


class OpenBlob:
    """A blob opened for reading in chunks of at most `CHUNK_BYTES`, so that a download holds one chunk,
    never the file. `size` is known before the first byte is read (the download's Content-Length)."""

    def __init__(self, key: str, size: int, body: _Body) -> None:
        self.key, self.size, self._body = key, size, body

    def chunks(self) -> Iterator[bytes]:
        """The blob's bytes in order; raises `BlobReadError` when the storage fails or the blob ends before
        `size` bytes. Closes the blob when done or abandoned."""
        try:
            left = self.size
            while left > 0:
                try:
                    chunk = self._body.read(min(CHUNK_BYTES, left))
                except Exception as exc:  # botocore/urllib3 and OS errors alike: the storage failed mid-read
                    raise BlobReadError(f"reading {self.key} failed after {self.size - left} of {self.size} "
                                        f"bytes: {exc!r}") from exc
                if not chunk:
                    raise BlobReadError(f"{self.key} ended after {self.size - left} of {self.size} bytes")
                left -= len(chunk)
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        """Release the file or connection (idempotent)."""
        self._body.close()


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


@runtime_checkable
class StreamingBlobStore(BlobStore, Protocol):
    """A `BlobStore` that can also hand out a blob to read in chunks (both stores of this package)."""

    def open(self, key: str) -> OpenBlob:
        """The blob at `key`, open; raises `BlobNotFoundError` when absent (before anything is read)."""
        ...


def open_blob(blobs: BlobStore, key: str) -> OpenBlob:
    """`blobs.open(key)`, or for a store with only `get` (a wrapper or another project's store) the blob
    read whole, as every download was before."""
    if isinstance(blobs, StreamingBlobStore):
        return blobs.open(key)
    data = blobs.get(key)
    return OpenBlob(key, len(data), io.BytesIO(data))


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


def conversion_key(image_id: str, suffix: str) -> str:
    """Where the reconstruction converted to `suffix` (jpg, webp) is kept once a download has made it."""
    return _sharded("conversions", image_id, suffix)


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

    def open(self, key: str) -> OpenBlob:
        """The blob's file, open for chunked reads. A file replaced or deleted meanwhile is still read whole
        (POSIX keeps an open file's data), so a download never mixes two versions."""
        try:
            file = self._path(key).open("rb")
        except FileNotFoundError:
            raise BlobNotFoundError(key) from None
        return OpenBlob(key, os.fstat(file.fileno()).st_size, file)

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
        (epoch seconds): the candidates of an orphan sweep, which must never race a write in progress. A file
        whose name is no blob's (`Thumbs.db`, an operator's `x.aeic.bak`) is not ours to judge and is left
        out: its key was refused by `delete`, which failed the whole sweep, and a receiver's start with it."""
        for shard in sorted((self.root / kind).glob("*/")):
            for entry in os.scandir(shard):
                key = f"{kind}/{shard.name}/{entry.name}"
                if entry.name.startswith(_TMP_PREFIX) or not _KEY.match(key) or not entry.is_file():
                    continue
                try:
                    written = entry.stat().st_mtime
                except FileNotFoundError:  # deleted meanwhile
                    continue
                if written < before:
                    yield key

    def remove_stale_tmp(self) -> int:
        """Delete temporary files left by a writer that crashed mid-write; returns how many. A file whose
        writer (its pid is in the name) still runs is kept: another process sharing the folder (an API
        process beside `aeic-receiver worker`s, a second receiver) is writing it, and deleting it failed
        that write. One written in another container or on another host, where its pid says nothing, is
        kept until it is older than any write takes (`FOREIGN_TMP_AGE_S`)."""
        folders = sorted({path.parent for path in self.root.rglob(f"{_TMP_PREFIX}*")})
        return sum(remove_dead_writers_tmp(folder) for folder in folders)
