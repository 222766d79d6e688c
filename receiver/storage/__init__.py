"""Durable storage for the receiver: metadata in SQL (SQLite or PostgreSQL), blobs behind `BlobStore`."""

from aeic.receiver.storage.blobs import BlobNotFoundError, BlobStore, FilesystemBlobStore
from aeic.receiver.storage.metadata import (
    Claim,
    IdempotencyConflictError,
    ImageFilter,
    InvalidCursorError,
    MetadataStore,
    SqlMetadataStore,
)
from aeic.receiver.storage.records import DecodeTimings, ImageRecord, NewImage, Page, Status

__all__ = [
    "BlobNotFoundError",
    "BlobStore",
    "Claim",
    "DecodeTimings",
    "FilesystemBlobStore",
    "IdempotencyConflictError",
    "ImageFilter",
    "ImageRecord",
    "InvalidCursorError",
    "MetadataStore",
    "NewImage",
    "Page",
    "SqlMetadataStore",
    "Status",
]
