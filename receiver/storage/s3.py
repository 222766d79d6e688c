"""`BlobStore` on an S3-compatible object store (AWS S3, MinIO, Ceph RGW) through boto3.

Why an object store: API replicas and decode workers on different machines need one shared place for
bitstreams and reconstructions. A single PUT is atomic on S3 (readers see the old object or the whole new
one) and durable when it returns 200, which is the `BlobStore.put` contract. Credentials and region come
from boto3's usual sources (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, instance
roles); MinIO needs the endpoint URL and path-style addressing, which is used whenever an endpoint is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from aeic.receiver.storage.blobs import _KEY, BlobNotFoundError, OpenBlob

__all__ = ["BlobStoreUnavailableError", "S3BlobStore"]

_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


class BlobStoreUnavailableError(OSError):
    """The object store could not be reached or refused the request (the API answers 503)."""


def _code(exc: BaseException | None) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class S3BlobStore:
    """Blobs as objects `<prefix><key>` in one bucket."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        if not bucket:
            raise ValueError("an S3 bucket name is required")
        self.client, self.bucket = client, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None) -> S3BlobStore:
        """`s3://bucket/optional/prefix`; `endpoint_url` points at MinIO or another S3-compatible server."""
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"blob URL must look like s3://bucket/prefix, got {url!r}")
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                        s3={"addressing_style": "path"} if endpoint_url else None)
        client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        return cls(client, parsed.netloc, parsed.path)

    def _key(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"invalid blob key {key!r}")
        return self.prefix + key

    def _call(self, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            if _code(exc) in _MISSING and method != "put_object":
                raise BlobNotFoundError(kwargs.get("Key", self.bucket)) from None
            raise BlobStoreUnavailableError(f"S3 {method} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreUnavailableError(f"S3 {method} failed: {exc}") from exc

    def ensure_bucket(self) -> bool:
        """Create the bucket when it does not exist yet; returns whether it was created."""
        try:
            self._call("head_bucket")
            return False
        except BlobNotFoundError:
            try:
                self._call("create_bucket")
            except BlobStoreUnavailableError as exc:
                if _code(exc.__cause__) != "BucketAlreadyOwnedByYou":
                    raise
                return False  # a replica starting beside this one created it between the two calls
            return True

    def put(self, key: str, data: bytes) -> None:
        """Store `data` at `key` (one PUT: atomic, durable when it returns)."""
        self._call("put_object", Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        """The object's bytes; raises `BlobNotFoundError` when absent."""
        body = self._call("get_object", Key=self._key(key))["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def open(self, key: str) -> OpenBlob:
        """The object's body, streamed: read in chunks as a download sends them, not fetched whole first."""
        answer = self._call("get_object", Key=self._key(key))
        return OpenBlob(key, int(answer["ContentLength"]), answer["Body"])

    def delete(self, key: str) -> bool:
        """Remove the object; returns whether it existed."""
        existed = self.exists(key)
        if existed:
            self._call("delete_object", Key=self._key(key))
        return existed

    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key`."""
        try:
            self._call("head_object", Key=self._key(key))
        except BlobNotFoundError:
            return False
        return True

    def keys_written_before(self, kind: str, before: float) -> Iterator[str]:
        """Keys of the objects under `kind` (e.g. "bitstreams") last written before `before` (epoch seconds),
        from the bucket's listing: the candidates of the orphan sweep. An object whose name is no blob's (an
        operator's `notes.txt`) is left out, as in the filesystem store."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=f"{self.prefix}{kind}/")
        for page in pages:
            for listed in page.get("Contents", []):
                key = listed["Key"][len(self.prefix):]
                if _KEY.match(key) and key.count("/") == 2 and listed["LastModified"].timestamp() < before:
                    yield key

    def ping(self) -> None:
        """Raise `BlobStoreUnavailableError` (or `BlobNotFoundError` without a bucket) when unusable."""
        self._call("head_bucket")
