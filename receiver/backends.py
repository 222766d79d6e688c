"""Pick the storage and queue backends a receiver process uses from its settings.

Why one place: the API replicas and the worker processes must agree on where blobs live and which queue
carries jobs; both build them here from the same `ReceiverSettings`.
"""

from __future__ import annotations

from aeic.receiver.queue import JobQueue
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import BlobStore, FilesystemBlobStore

__all__ = ["open_blob_store", "open_queue", "prepare_backends"]


def open_blob_store(settings: ReceiverSettings) -> BlobStore:
    """The S3 store for `blob_url = s3://...`, otherwise files under `data_dir/blobs` (the default)."""
    if settings.blob_url:
        from aeic.receiver.storage.s3 import S3BlobStore

        return S3BlobStore.from_url(settings.blob_url, endpoint_url=settings.s3_endpoint_url)
    return FilesystemBlobStore(settings.data_dir / "blobs")


def open_queue(settings: ReceiverSettings) -> JobQueue | None:
    """The Redis Streams job queue when `queue` is set; None means the embedded in-process worker."""
    return JobQueue.from_url(settings.queue) if settings.queue else None


def prepare_backends(blobs: BlobStore, queue: JobQueue | None) -> None:
    """Create the S3 bucket and the consumer group when missing (idempotent; every replica may call it)."""
    ensure_bucket = getattr(blobs, "ensure_bucket", None)
    if ensure_bucket is not None:
        ensure_bucket()
    if queue is not None:
        queue.ensure_group()
