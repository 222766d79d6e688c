"""S3BlobStore against a real S3-compatible server (moto in server mode on loopback)."""

from __future__ import annotations

import secrets

import pytest
import scaleout_support
from aeic.receiver.storage import BlobNotFoundError, BlobStore
from aeic.receiver.storage.blobs import bitstream_key, thumbnail_key

pytest.importorskip("boto3", reason="boto3 is not installed (scale extra)")

from aeic.receiver.storage.s3 import BlobStoreUnavailableError, S3BlobStore

s3_server = scaleout_support.s3_server


@pytest.fixture()
def s3(s3_server: str) -> S3BlobStore:
    store = S3BlobStore.from_url(f"s3://aeic-{secrets.token_hex(4)}/blobs", endpoint_url=s3_server)
    assert store.ensure_bucket() is True
    return store


def test_round_trip_overwrite_and_delete(s3: S3BlobStore) -> None:
    key = bitstream_key("ab" * 16)
    assert isinstance(s3, BlobStore)
    assert not s3.exists(key)
    s3.put(key, b"\x00first")
    s3.put(key, b"\x00second")
    assert s3.exists(key) and s3.get(key) == b"\x00second"
    assert s3.delete(key) is True
    assert s3.delete(key) is False
    with pytest.raises(BlobNotFoundError):
        s3.get(key)


def test_objects_live_under_the_prefix(s3: S3BlobStore) -> None:
    key = thumbnail_key("cd" * 16)
    s3.put(key, b"jpeg")
    listed = s3.client.list_objects_v2(Bucket=s3.bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"blobs/{key}"]
    assert s3.ensure_bucket() is False


def test_rejects_keys_outside_the_layout(s3: S3BlobStore) -> None:
    for bad in ("../etc/passwd", "a/../b.png", "UPPER.png", "noext"):
        with pytest.raises(ValueError):
            s3.put(bad, b"x")


def test_missing_bucket_and_unreachable_server_are_typed_errors(s3_server: str) -> None:
    missing = S3BlobStore.from_url("s3://no-such-bucket-aeic", endpoint_url=s3_server)
    with pytest.raises(BlobNotFoundError):
        missing.get(bitstream_key("ef" * 16))
    from receiver_support import free_port

    down = S3BlobStore.from_url("s3://bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BlobStoreUnavailableError) as info:
        down.put(bitstream_key("ef" * 16), b"x")
    assert isinstance(info.value, OSError)  # the API answers OSError with 503 storage_unavailable


def test_bad_urls_are_rejected() -> None:
    for url in ("file:///tmp/x", "s3://", "http://bucket/x"):
        with pytest.raises(ValueError):
            S3BlobStore.from_url(url)


def test_a_bucket_another_replica_creates_meanwhile_is_not_an_error() -> None:
    """Two API replicas starting together both see no bucket; the slower one's create gets 'already yours'."""
    from botocore.exceptions import ClientError

    class RacedClient:
        """No bucket at the check; the create then fails with `create_error`."""

        def __init__(self, create_error: str) -> None:
            self.create_error = create_error

        def head_bucket(self, Bucket: str) -> None:
            raise ClientError({"Error": {"Code": "404"}}, "HeadBucket")

        def create_bucket(self, Bucket: str) -> None:
            raise ClientError({"Error": {"Code": self.create_error}}, "CreateBucket")

    assert S3BlobStore(RacedClient("BucketAlreadyOwnedByYou"), "aeic").ensure_bucket() is False
    with pytest.raises(BlobStoreUnavailableError):
        S3BlobStore(RacedClient("AccessDenied"), "aeic").ensure_bucket()
