"""Downloads (reconstruction PNG, thumbnail, gallery bitstream) stream their file from the blob store in
chunks of at most `CHUNK_BYTES`, on the filesystem and on S3: a whole-file read during a download fails
the test. Headers, 304 and 404 are as they were; a store failing mid-file cuts the answer, not the server."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import scaleout_support
from aeic.receiver.api import conversions, create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import BlobStore, FilesystemBlobStore, SqlMetadataStore
from aeic.receiver.storage.blobs import (
    CHUNK_BYTES,
    BlobReadError,
    OpenBlob,
    bitstream_key,
    conversion_key,
    reconstruction_key,
    thumbnail_key,
)
from aeic.receiver.storage.orphans import remove_orphan_blobs
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, ServerThread, make_bitstream, make_tokens, new_image

s3_server = scaleout_support.s3_server
ADMIN = "admin-secret-token"


class StreamOnlyBlobs:
    """A blob store that fails the test when a download reads a blob whole (`get` once `downloading`),
    and records the largest chunk a download read."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.downloading, self.largest_read = inner, False, 0

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        if self.downloading:  # an AssertionError, not pytest.fail: it is raised in the server's thread pool
            raise AssertionError(f"a download read {key} whole")
        return bytes(self.inner.get(key))

    def delete(self, key: str) -> bool:
        return bool(self.inner.delete(key))

    def exists(self, key: str) -> bool:
        return bool(self.inner.exists(key))

    def ping(self) -> None:
        self.inner.ping()

    def open(self, key: str) -> OpenBlob:
        blob: OpenBlob = self.inner.open(key)
        return OpenBlob(key, blob.size, _Measured(blob, self))


class _Measured:
    """The body of an open blob, noting the size of each read."""

    def __init__(self, blob: OpenBlob, owner: StreamOnlyBlobs) -> None:
        self.chunks, self.owner = blob.chunks(), owner
        self.blob, self.pending = blob, b""

    def read(self, amt: int, /) -> bytes:
        if not self.pending:
            self.pending = next(self.chunks, b"")
        chunk, self.pending = self.pending[:amt], self.pending[amt:]
        self.owner.largest_read = max(self.owner.largest_read, len(chunk))
        return chunk

    def close(self) -> None:
        self.blob.close()


@pytest.fixture(params=["filesystem", "s3"])
def inner_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "filesystem":
        return FilesystemBlobStore(tmp_path / "blobs")
    pytest.importorskip("boto3", reason="boto3 is not installed (scale extra)")
    from aeic.receiver.storage.s3 import S3BlobStore

    store = S3BlobStore.from_url(f"s3://aeic-{secrets.token_hex(4)}/blobs",
                                 endpoint_url=request.getfixturevalue("s3_server"))
    store.ensure_bucket()
    return store


def _settings(tmp_path: Path) -> ReceiverSettings:
    return ReceiverSettings(data_dir=tmp_path / "data", admin_token=ADMIN, poll_interval_s=0.05,
                            retry_delay_s=0.0, max_dimension=2048, max_upload_bytes=4096)


def _decoded(client: TestClient, token: str) -> str:
    """Upload one stream and wait for its decode; the image's id."""
    auth = {"Authorization": f"Bearer {token}"}
    reply = client.post("/v1/images", content=make_bitstream(),
                        headers={**auth, "Content-Type": "application/octet-stream"})
    image_id = str(reply.json()["id"])
    deadline = time.monotonic() + 10
    while client.get(f"/v1/images/{image_id}", headers=auth).json()["status"] != "done":
        assert time.monotonic() < deadline, "decode did not finish"
        time.sleep(0.02)
    return image_id


@contextlib.contextmanager
def _serving(tmp_path: Path, blobs: Any) -> Iterator[tuple[TestClient, str, dict[str, str]]]:
    """The receiver app on ``blobs``, with a device's token and its Authorization header."""
    settings = _settings(tmp_path)
    token = make_tokens(settings, "cam1")["cam1"]
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]), blobs=blobs)) as client:
        yield client, token, {"Authorization": f"Bearer {token}"}


def test_downloads_stream_in_bounded_chunks_with_headers_as_before(tmp_path: Path, inner_store: Any) -> None:
    blobs = StreamOnlyBlobs(inner_store)
    with _serving(tmp_path, blobs) as (client, token, auth):
        image_id = _decoded(client, token)
        large = secrets.token_bytes(3 * CHUNK_BYTES + 12345)  # a stand-in for a large PNG: several chunks
        blobs.put(reconstruction_key(image_id), large)
        thumbnail = bytes(inner_store.get(thumbnail_key(image_id)))
        bitstream = bytes(inner_store.get(bitstream_key(image_id)))
        blobs.downloading = True
        base = f"/v1/images/{image_id}"
        for path in (f"{base}/reconstruction", f"{base}/reconstruction.png"):
            reply = client.get(path, headers=auth)
            assert reply.status_code == 200 and reply.content == large
            assert reply.headers["content-type"] == "image/png"
            assert reply.headers["content-length"] == str(len(large))
            assert reply.headers["cache-control"] == "private, max-age=86400"
            assert reply.headers["etag"].startswith(f'W/"{image_id}-') and reply.headers["etag"].endswith('-png"')
            assert reply.headers["x-content-type-options"] == "nosniff"
            again = client.get(path, headers={**auth, "If-None-Match": reply.headers["etag"]})
            assert again.status_code == 304 and again.content == b""
        assert client.get(f"{base}/reconstruction", headers=auth).headers["vary"] == "Accept"
        head = client.head(f"{base}/reconstruction", headers=auth)
        assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(large))
        thumb = client.get(f"{base}/thumbnail", headers=auth)
        assert thumb.content == thumbnail and thumb.headers["content-type"] == "image/jpeg"
        assert thumb.headers["etag"].endswith('-thumbnail"')
        stream = client.get(f"/images/{image_id}/bitstream", headers=auth)
        assert stream.status_code == 200 and stream.content == bitstream
        assert stream.headers["content-type"] == "application/octet-stream"
        assert stream.headers["content-disposition"] == f'attachment; filename="{image_id}.aeic"'
        assert stream.headers["cache-control"] == "private, max-age=86400"
        assert 0 < blobs.largest_read <= CHUNK_BYTES
        for key in (reconstruction_key(image_id), thumbnail_key(image_id), bitstream_key(image_id)):
            blobs.delete(key)
        assert client.get(f"{base}/reconstruction", headers=auth).status_code == 404
        assert client.get(f"{base}/thumbnail", headers=auth).status_code == 404
        assert client.get(f"/images/{image_id}/bitstream", headers=auth).status_code == 404
        assert client.get(f"/images/{image_id}/bitstream").status_code == 401


def test_an_open_blob_reads_at_most_one_chunk_at_a_time(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    data = secrets.token_bytes(2 * CHUNK_BYTES + 7)
    store.put(reconstruction_key("ab" * 16), data)
    chunks = list(store.open(reconstruction_key("ab" * 16)).chunks())
    assert [len(c) for c in chunks] == [CHUNK_BYTES, CHUNK_BYTES, 7] and b"".join(chunks) == data


class _Outage(io.BytesIO):
    """A body whose storage goes away after the first chunk."""

    def read(self, amt: int | None = -1, /) -> bytes:
        if self.tell():
            raise ConnectionResetError("the object store went away")
        return super().read(amt)


class FailingMidFile(FilesystemBlobStore):
    """Reconstructions that fail after their first chunk is sent (a storage outage mid-download)."""

    def open(self, key: str) -> OpenBlob:
        blob = super().open(key)
        if not key.startswith("reconstructions/"):
            return blob
        blob.close()
        return OpenBlob(key, 2 * CHUNK_BYTES, _Outage(bytes(2 * CHUNK_BYTES)))


def test_a_storage_failure_mid_download_cuts_the_answer_and_the_server_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = ReceiverSettings(data_dir=tmp_path / "data", admin_token=ADMIN, poll_interval_s=0.05,
                                retry_delay_s=0.0, rate_limit_burst=1000)
    token = make_tokens(settings, "cam1")["cam1"]
    auth = {"Authorization": f"Bearer {token}"}
    blobs: BlobStore = FailingMidFile(tmp_path / "blobs")
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]), blobs=blobs)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, headers=auth, timeout=10) as client:
        reply = client.post("/v1/images", content=make_bitstream(),
                            headers={"Content-Type": "application/octet-stream"})
        image_id = reply.json()["id"]
        deadline = time.monotonic() + 10
        while client.get(f"/v1/images/{image_id}").json()["status"] != "done":
            assert time.monotonic() < deadline, "decode did not finish"
            time.sleep(0.02)
        with caplog.at_level(logging.WARNING), pytest.raises(httpx.RemoteProtocolError):
            client.get(f"/v1/images/{image_id}/reconstruction")
        cut = [r for r in caplog.records if "cut short" in r.getMessage()]
        assert len(cut) == 1 and "ConnectionResetError" in cut[0].getMessage() and cut[0].exc_info is None
        assert client.get(f"/v1/images/{image_id}/thumbnail").status_code == 200  # the server goes on


def test_a_blob_ending_early_is_a_read_error_not_a_short_file() -> None:
    blob = OpenBlob(reconstruction_key("cd" * 16), 10, io.BytesIO(b"12345"))
    chunks: Iterator[bytes] = blob.chunks()
    assert next(chunks) == b"12345"
    with pytest.raises(BlobReadError, match="ended after 5 of 10 bytes"):
        next(chunks)


# -- JPEG/WebP conversions, kept --------------------------------------------------------------------


class CountedConversions:
    """`transcode` counted, and optionally held (`hold` set) until `release` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: bool = False) -> None:
        self.made, self.hold = 0, hold
        self.converting, self.release = threading.Event(), threading.Event()
        self.convert = conversions.transcode
        monkeypatch.setattr(conversions, "transcode", self)

    def __call__(self, png: bytes, suffix: str) -> bytes:
        self.made += 1
        self.converting.set()
        if self.hold:
            assert self.release.wait(30)
        converted: bytes = self.convert(png, suffix)
        return converted


def _conversions(image_id: str) -> list[str]:
    return [conversion_key(image_id, suffix) for suffix in ("jpg", "webp")]


def test_a_conversion_is_made_once_then_streamed_and_deleted_with_its_image(
        tmp_path: Path, inner_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every JPEG/WebP download decoded the whole PNG and encoded it again (8192x8192: 2.5-3 s to JPEG, 45-55 s
    to WebP, up to 1.3 GB); now the first keeps its result and the others stream it, with the same headers.
    Deleting the image deletes the conversions too."""
    conversions = CountedConversions(monkeypatch)
    blobs = StreamOnlyBlobs(inner_store)
    with _serving(tmp_path, blobs) as (client, token, auth):
        image_id = _decoded(client, token)
        base = f"/v1/images/{image_id}/reconstruction"
        first = client.get(f"{base}.jpg", headers=auth)
        assert first.status_code == 200 and first.content.startswith(b"\xff\xd8") and conversions.made == 1
        assert bytes(inner_store.get(conversion_key(image_id, "jpg"))) == first.content
        blobs.downloading = True  # from here a whole read of a blob fails the download
        for path, extra in ((f"{base}.jpg", {}), (f"{base}.jpeg", {}), (base, {"Accept": "image/jpeg"})):
            again = client.get(path, headers={**auth, **extra})
            assert again.status_code == 200 and again.content == first.content, path
            assert again.headers["content-type"] == "image/jpeg"
            assert again.headers["content-length"] == str(len(first.content))
            assert again.headers["cache-control"] == "private, max-age=86400"
        assert client.head(f"{base}.jpg", headers=auth).headers["content-length"] == str(len(first.content))
        assert conversions.made == 1
        blobs.downloading = False
        webp = client.get(f"{base}.webp", headers=auth)
        assert webp.status_code == 200 and webp.content[8:12] == b"WEBP" and conversions.made == 2
        blobs.downloading = True
        assert client.get(f"{base}.webp", headers=auth).content == webp.content and conversions.made == 2
        assert client.delete(f"/v1/images/{image_id}", headers=auth).status_code == 204
        keys = [bitstream_key(image_id), reconstruction_key(image_id), thumbnail_key(image_id), *_conversions(image_id)]
        assert not any(inner_store.exists(key) for key in keys)


def test_an_image_deleted_while_converting_leaves_no_conversion(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    conversions = CountedConversions(monkeypatch, hold=True)
    settings = _settings(tmp_path)
    token = make_tokens(settings, "cam1")["cam1"]
    auth = {"Authorization": f"Bearer {token}"}
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]), blobs=blobs)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, headers=auth, timeout=30) as client, \
            ThreadPoolExecutor(1) as pool:
        reply = client.post("/v1/images", content=make_bitstream(), headers={"Content-Type": "application/octet-stream"})
        image_id = reply.json()["id"]
        deadline = time.monotonic() + 10
        while client.get(f"/v1/images/{image_id}").json()["status"] != "done":
            assert time.monotonic() < deadline, "decode did not finish"
            time.sleep(0.02)
        download = pool.submit(client.get, f"/v1/images/{image_id}/reconstruction.webp")
        assert conversions.converting.wait(30)
        assert client.delete(f"/v1/images/{image_id}").status_code == 204
        conversions.release.set()
        assert download.result().status_code == 200  # it was asked for while the image existed
    assert sorted(p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()) == []


class RefusesConversions(FilesystemBlobStore):
    """A full disk, as far as conversions go."""

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("conversions/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        super().put(key, data)


def test_a_store_that_cannot_keep_a_conversion_still_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    conversions = CountedConversions(monkeypatch)
    with _serving(tmp_path, RefusesConversions(tmp_path / "blobs")) as (client, token, auth):
        image_id = _decoded(client, token)
        with caplog.at_level(logging.WARNING):
            replies = [client.get(f"/v1/images/{image_id}/reconstruction.jpg", headers=auth) for _ in range(2)]
    assert [r.status_code for r in replies] == [200, 200] and replies[0].content == replies[1].content
    assert conversions.made == 2
    kept = [r.getMessage() for r in caplog.records if "could not keep" in r.getMessage()]
    assert len(kept) == 2 and "No space left" in kept[0]


def test_the_orphan_sweep_takes_conversions_of_no_image(tmp_path: Path) -> None:
    """A process killed between a delete's row and its files leaves conversions too; the start-up sweep
    removes them with the rest, and keeps a live image's."""
    store = SqlMetadataStore.from_url(f"sqlite:///{tmp_path / 'receiver.db'}")
    store.migrate()
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    live, _ = store.insert_image(new_image(1))
    gone = f"{2:032x}"
    for key in (conversion_key(live.id, "jpg"), conversion_key(gone, "jpg"), conversion_key(gone, "webp")):
        blobs.put(key, b"converted")
    try:
        assert remove_orphan_blobs(store, blobs, grace_s=-1.0) == 2
    finally:
        store.close()
    assert blobs.exists(conversion_key(live.id, "jpg")) and not blobs.exists(conversion_key(gone, "jpg"))


def test_a_kept_bitstream_is_revalidated_with_no_read(tmp_path: Path) -> None:
    """The bitstream download had no validator, so a browser holding it could only fetch it whole again;
    the reconstruction and thumbnail answer a matching If-None-Match with a 304. It now carries a strong
    ETag (the SHA-256 of the stored bytes) and a 304 opens no blob."""
    blobs = StreamOnlyBlobs(FilesystemBlobStore(tmp_path / "blobs"))
    with _serving(tmp_path, blobs) as (client, token, auth):
        image_id = _decoded(client, token)
        stored = bytes(blobs.inner.get(bitstream_key(image_id)))
        first = client.get(f"/images/{image_id}/bitstream", headers=auth)
        assert first.status_code == 200 and first.content == stored
        assert first.headers["etag"] == f'"{hashlib.sha256(stored).hexdigest()}"'
        blobs.delete(bitstream_key(image_id))  # a 304 must not need the file
        for method in ("GET", "HEAD"):
            again = client.request(method, f"/images/{image_id}/bitstream",
                                   headers={**auth, "If-None-Match": f'W/"x", {first.headers["etag"]}'})
            assert again.status_code == 304 and again.content == b"", method
            assert again.headers["etag"] == first.headers["etag"]
            assert again.headers["cache-control"] == "private, max-age=86400"
        other = client.get(f"/images/{image_id}/bitstream", headers={**auth, "If-None-Match": '"other"'})
        assert other.status_code == 404  # not the client's copy: the file is needed, and it is gone
