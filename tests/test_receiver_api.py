"""Receiver HTTP API over a real app (TestClient), real storage and the in-process worker, with a
decoder double that satisfies the ReceiverCodec contract."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import receiver_support
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import FilesystemBlobStore, Status
from aeic.receiver.storage.blobs import bitstream_key, conversion_key, reconstruction_key, thumbnail_key
from aeic.receiver.storage.s3 import BlobStoreUnavailableError
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image
from receiver_support import FakeCodec, make_bitstream, make_tokens

# Fixtures shared with the other receiver tests.
postgres_server = receiver_support.postgres_server
postgres_url = receiver_support.postgres_url

ADMIN = "admin-secret-token"
OCTET = {"Content-Type": "application/octet-stream"}


class Env:
    """A running app plus tokens for two devices."""

    def __init__(self, client: TestClient, data: Path, tokens: dict[str, str], codec: FakeCodec) -> None:
        self.client, self.data, self.tokens, self.codec = client, data, tokens, codec

    def headers(self, who: str, **extra: str) -> dict[str, str]:
        token = ADMIN if who == "admin" else self.tokens[who]
        return {"Authorization": f"Bearer {token}", **OCTET, **extra}

    def upload(
        self, who: str = "cam1", data: bytes | None = None, key: str | None = None, **extra: str
    ) -> Any:
        """POST ``data`` (a valid stream by default) as ``who``, with ``key`` as its Idempotency-Key."""
        if key is not None:
            extra["Idempotency-Key"] = key
        body = make_bitstream() if data is None else data
        return self.client.post("/v1/images", content=body, headers=self.headers(who, **extra))

    def wait(self, image_id: str, who: str = "cam1", until: tuple[str, ...] = ("done", "failed")) -> dict:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            body = self.client.get(f"/v1/images/{image_id}", headers=self.headers(who)).json()
            if body["status"] in until:
                return body
            time.sleep(0.02)
        raise AssertionError(f"{image_id} stuck in {body['status']}")


def make_settings(data: Path, **overrides: Any) -> ReceiverSettings:
    values: dict[str, Any] = {"data_dir": data, "admin_token": ADMIN, "poll_interval_s": 0.05,
                              "retry_delay_s": 0.0, "max_dimension": 2048, "max_upload_bytes": 4096}
    values.update(overrides)
    return ReceiverSettings(**values)


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Env]:
    settings = make_settings(tmp_path / "data")
    tokens = make_tokens(settings, "cam1", "cam2")
    codec = FakeCodec()
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([codec]))) as client:
        yield Env(client, tmp_path / "data", tokens, codec)


def error_code(response: Any) -> str:
    return str(response.json()["error"]["code"])


def test_coding_downscale_is_stored_and_reported(env: Env) -> None:
    response = env.upload(data=make_bitstream(96, 64, payload=b"\x33", downscale=2))
    assert response.status_code == 202
    assert env.wait(response.json()["id"])["downscale"] == 2


def test_upload_decode_and_fetch_in_every_format(env: Env) -> None:
    response = env.upload(data=make_bitstream(48, 32, payload=b"\x10\x20"))
    assert response.status_code == 202
    image_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/images/{image_id}"
    body = env.wait(image_id)
    assert body["status"] == "done" and body["device"] == "cam1" and body["model_id"] == "54535431"
    assert (body["width"], body["height"], body["downscale"]) == (48, 32, 1)
    assert body["bpp"] == pytest.approx(len(make_bitstream(48, 32, payload=b"\x10\x20")) * 8 / (48 * 32))
    assert body["timings"]["decode_ms"] > 0 and body["timings"]["batch_size"] >= 1
    base = f"/v1/images/{image_id}/reconstruction"
    png = env.client.get(base, headers=env.headers("cam1"))
    assert png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        assert image.size == (48, 32) and image.getpixel((40, 5)) == (0x30, 0x30, 0x30)
    for accept, media in [("image/webp", "image/webp"), ("image/jpeg;q=0.9, image/png;q=0.5", "image/jpeg")]:
        assert env.client.get(base, headers=env.headers("cam1", Accept=accept)).headers["content-type"] == media
    assert env.client.get(base, headers=env.headers("cam1", Accept="image/gif")).status_code == 406
    for suffix, fmt in [(".jpg", "JPEG"), (".webp", "WEBP"), (".png", "PNG")]:
        reply = env.client.get(base + suffix, headers=env.headers("cam1"))
        with Image.open(io.BytesIO(reply.content)) as image:
            assert image.format == fmt and image.size == (48, 32)
    thumb = env.client.get(f"/v1/images/{image_id}/thumbnail", headers=env.headers("cam1"))
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_idempotency_key_returns_the_same_id(env: Env) -> None:
    first = env.upload(key="shot-1")
    again = env.upload(key="shot-1")
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other_device = env.upload("cam2", key="shot-1")
    assert other_device.json()["id"] != first.json()["id"]
    conflict = env.upload(data=make_bitstream(payload=b"other"), key="shot-1")
    assert conflict.status_code == 409 and error_code(conflict) == "idempotency_conflict"
    assert env.upload(key="bad key with spaces").status_code == 400
    listing = env.client.get("/v1/images", headers=env.headers("admin")).json()
    assert len(listing["items"]) == 2


def _valid() -> bytes:
    return make_bitstream()


def _recrc(stream: bytes, offset: int, field: bytes) -> bytes:
    """`stream` with `field` written at `offset` and its CRC made right again: only the field check can refuse it."""
    body = stream[:offset] + field + stream[offset + len(field) : -4]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "empty_body"),
        (b"\x00" * 40, 400, "bad_magic"),
        (_valid()[:10], 400, "truncated_bitstream"),
        (_valid()[:-1] + bytes([_valid()[-1] ^ 1]), 400, "crc_mismatch"),
        (make_bitstream(model_id=b"ZZZZ"), 422, "unknown_model"),
        (make_bitstream(width=4000, height=8), 422, "dimensions_too_large"),
        (b"\xae\x1c\x07" + _valid()[3:], 422, "unsupported_version"),
        (_recrc(_valid(), 3, b"\x81"), 422, "invalid_header"),  # a reserved flag bit
        (_recrc(_valid(), 3, b"\x0d"), 422, "invalid_header"),  # the reserved downscale code
        (_recrc(_valid(), 8, struct.pack("<H", 0)), 422, "invalid_header"),
        (_recrc(_valid(), 8, struct.pack("<HH", 65535, 65535)), 422, "invalid_header"),
        (_recrc(_valid()[:20], 3, b"\x01"), 400, "truncated_bitstream"),  # statistics flagged, no room for them
        (b"x" * 5000, 413, "payload_too_large"),
    ],
)
def test_invalid_uploads_are_rejected_before_storing(env: Env, body: bytes, status: int, code: str) -> None:
    response = env.upload(data=body)
    assert response.status_code == status, response.text
    assert error_code(response) == code and response.json()["error"]["message"]
    assert env.client.get("/v1/images", headers=env.headers("admin")).json()["items"] == []
    assert not list((env.data / "blobs").rglob("*.aeic"))


def test_a_picture_the_decoder_would_refuse_is_refused_at_upload(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the per-side limit but over the decoder's coded-pixel bound: 422 before storing, naming the way out."""
    from aeic.shared import decode_limits

    monkeypatch.setattr(decode_limits, "MAX_CODED_PIXELS", 512 * 512)
    refused = env.upload(data=make_bitstream(width=640, height=640))
    assert refused.status_code == 422 and error_code(refused) == "dimensions_too_large"
    assert "coding downscale" in refused.json()["error"]["message"]
    assert not list((env.data / "blobs").rglob("*.aeic"))
    assert env.upload(data=make_bitstream(width=640, height=640, downscale=2)).status_code == 202


def test_streamed_body_over_the_limit_is_413(env: Env) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"\xae" * 1000

    response = env.client.post("/v1/images", content=chunks(), headers=env.headers("cam1"))
    assert response.status_code == 413 and error_code(response) == "payload_too_large"


def test_wrong_content_type_is_415(env: Env) -> None:
    headers = {**env.headers("cam1"), "Content-Type": "image/png"}
    response = env.client.post("/v1/images", content=make_bitstream(), headers=headers)
    assert response.status_code == 415


def test_auth_and_device_isolation(env: Env) -> None:
    assert env.client.post("/v1/images", content=make_bitstream(), headers=OCTET).status_code == 401
    bad = env.client.get("/v1/images", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"].startswith("Bearer")
    mine = env.upload("cam1").json()["id"]
    theirs = env.upload("cam2").json()["id"]
    assert env.client.get(f"/v1/images/{theirs}", headers=env.headers("cam1")).status_code == 404
    assert env.client.delete(f"/v1/images/{theirs}", headers=env.headers("cam1")).status_code == 404
    own_list = env.client.get("/v1/images", headers=env.headers("cam1")).json()["items"]
    assert [i["id"] for i in own_list] == [mine]
    assert env.client.get("/v1/images?device=cam2", headers=env.headers("cam1")).status_code == 403
    admin_list = env.client.get("/v1/images", headers=env.headers("admin")).json()["items"]
    assert [i["id"] for i in admin_list] == [theirs, mine]
    only_cam2 = env.client.get("/v1/images?device=cam2", headers=env.headers("admin")).json()["items"]
    assert [i["id"] for i in only_cam2] == [theirs]
    assert env.upload("admin").status_code == 403


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, rate_limit_burst=2, rate_limit_per_minute=6, worker=False)
    tokens = make_tokens(settings, "cam1")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", **OCTET}
        codes = [client.post("/v1/images", content=make_bitstream(), headers=headers).status_code
                 for _ in range(3)]
        assert codes == [202, 202, 429]
        limited = client.post("/v1/images", content=make_bitstream(), headers=headers)
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 10


def test_listing_pages_and_filters(env: Env) -> None:
    ids = [env.upload().json()["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        query = "/v1/images?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = env.client.get(query, headers=env.headers("cam1")).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    everything = env.client.get("/v1/images", headers=env.headers("cam1")).json()["items"]
    pivot = everything[2]["created_at"]
    newer = env.client.get("/v1/images", params={"since": pivot}, headers=env.headers("cam1")).json()["items"]
    assert [i["id"] for i in newer] == [i["id"] for i in everything if i["created_at"] >= pivot]
    older = env.client.get("/v1/images", params={"until": pivot}, headers=env.headers("cam1")).json()["items"]
    assert [i["id"] for i in older] == [i["id"] for i in everything if i["created_at"] < pivot]
    assert len(newer) + len(older) == 5
    env.wait(ids[0])
    done = env.client.get("/v1/images", params={"status": "done"}, headers=env.headers("cam1")).json()["items"]
    assert ids[0] in [i["id"] for i in done] and {i["status"] for i in done} == {"done"}
    assert env.client.get("/v1/images?status=lost", headers=env.headers("cam1")).status_code == 422
    future = env.client.get("/v1/images", params={"since": time.time() + 60}, headers=env.headers("cam1"))
    assert future.json()["items"] == []
    assert env.client.get("/v1/images?cursor=%%%", headers=env.headers("cam1")).status_code == 400
    assert env.client.get("/v1/images?since=yesterday", headers=env.headers("cam1")).status_code == 422
    for not_a_time in ("nan", "inf", "-inf", "1e400"):  # float() takes them, but they name no instant
        reply = env.client.get(f"/v1/images?since={not_a_time}", headers=env.headers("cam1"))
        assert reply.status_code == 422 and error_code(reply) == "invalid_request", not_a_time
    assert env.client.get("/v1/images?limit=0", headers=env.headers("cam1")).status_code == 422


def test_delete_removes_row_and_files(env: Env) -> None:
    image_id = env.upload().json()["id"]
    env.wait(image_id)
    assert len(list((env.data / "blobs").rglob(f"{image_id}.*"))) == 3
    assert env.client.delete(f"/v1/images/{image_id}", headers=env.headers("cam1")).status_code == 204
    assert env.client.get(f"/v1/images/{image_id}", headers=env.headers("cam1")).status_code == 404
    assert not list((env.data / "blobs").rglob(f"{image_id}.*"))


class DeletesFailing(FilesystemBlobStore):
    """Blob files on disk whose deletes fail (an object store gone down) once `allowed` more have been made;
    `allowed=None` lets every delete through. `on_delete` runs before each delete, with its key."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.allowed: int | None = None
        self.on_delete: Callable[[str], None] = lambda key: None

    def delete(self, key: str) -> bool:
        self.on_delete(key)
        if self.allowed is not None:
            if self.allowed <= 0:
                raise BlobStoreUnavailableError("S3 delete_object failed: connection refused")
            self.allowed -= 1
        return super().delete(key)


@contextmanager
def done_image(tmp_path: Path) -> Iterator[tuple[TestClient, DeletesFailing, dict[str, str], str]]:
    """A receiver on `DeletesFailing` holding one decoded image and a converted download of it:
    (client, blobs, cam1's headers, image id)."""
    settings = make_settings(tmp_path / "data")
    tokens = make_tokens(settings, "cam1")
    blobs = DeletesFailing(tmp_path / "data" / "blobs")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]), blobs=blobs)) as client:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", **OCTET}
        image_id = client.post("/v1/images", content=make_bitstream(), headers=headers).json()["id"]
        deadline = time.monotonic() + 10
        while client.get(f"/v1/images/{image_id}", headers=headers).json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get(f"/v1/images/{image_id}/reconstruction.jpg", headers=headers).status_code == 200
        assert len(list(blobs.root.rglob(f"{image_id}.*"))) == 4
        yield client, blobs, headers, image_id


def test_a_delete_the_blob_store_fails_is_503_and_its_retry_finishes_it(tmp_path: Path) -> None:
    """The store goes down after two of the files: a 503 to retry, the image still there (the row went first
    before: its retry was a 404 and the files stayed until the next start); sent again once the store is
    back, the same DELETE removes the rest, and only then is the image gone."""
    with done_image(tmp_path) as (client, blobs, headers, image_id):
        blobs.allowed = 2
        reply = client.delete(f"/v1/images/{image_id}", headers=headers)
        assert reply.status_code == 503 and error_code(reply) == "storage_unavailable"
        assert client.get(f"/v1/images/{image_id}", headers=headers).status_code == 200
        assert reply.headers["retry-after"] == "5" and "not deleted" in reply.json()["error"]["message"]
        assert client.delete(f"/v1/images/{image_id}", headers=headers).status_code == 503  # still down
        blobs.allowed = None
        assert client.delete(f"/v1/images/{image_id}", headers=headers).status_code == 204
        assert not list(blobs.root.rglob(f"{image_id}.*"))
        assert client.get(f"/v1/images/{image_id}", headers=headers).status_code == 404
        assert client.get("/v1/images", headers=headers).json()["items"] == []
        assert client.delete(f"/v1/images/{image_id}", headers=headers).status_code == 404


def test_files_a_decode_writes_while_the_image_is_deleted_are_deleted_too(tmp_path: Path) -> None:
    """A decode (or a conversion) that stores its files after the delete removed them, and before the row
    went, still finds the row and keeps them: the delete takes them after the row. One that stores later
    finds the row gone and deletes its own (test_a_worker_that_lost_its_claims_writes_no_files)."""
    with done_image(tmp_path) as (client, blobs, headers, image_id):
        written = {"reconstructions": b"png", "thumbnails": b"jpg", "conversions": b"webp"}
        keys = [reconstruction_key(image_id), thumbnail_key(image_id), conversion_key(image_id, "webp")]

        def finishing_meanwhile(key: str) -> None:
            if key == bitstream_key(image_id):  # the last file of the first pass
                for made in keys:
                    FilesystemBlobStore.put(blobs, made, written[made.split("/")[0]])

        blobs.on_delete = finishing_meanwhile
        assert client.delete(f"/v1/images/{image_id}", headers=headers).status_code == 204
        assert not list(blobs.root.rglob(f"{image_id}.*"))


def test_a_delete_whose_cleanup_after_the_row_fails_is_done(tmp_path: Path) -> None:
    """The store failing after the row went: the image is gone from every answer, so the delete is done (204,
    not a 503 whose retry could only be a 404); what it missed is an orphan the start-up sweep takes."""
    with done_image(tmp_path) as (client, blobs, headers, image_id):
        def down_after_the_last_file(key: str) -> None:
            if key == bitstream_key(image_id):
                blobs.allowed = 1  # this delete, then none
        blobs.on_delete = down_after_the_last_file
        assert client.delete(f"/v1/images/{image_id}", headers=headers).status_code == 204
        assert client.get(f"/v1/images/{image_id}", headers=headers).status_code == 404
        assert client.get(f"/v1/images/{image_id}/thumbnail", headers=headers).status_code == 404

def test_decode_failure_is_retried_then_recorded(env: Env) -> None:
    image_id = env.upload(data=make_bitstream(payload=b"FAIL-this")).json()["id"]
    body = env.wait(image_id)
    assert body["status"] == "failed" and body["attempts"] == 3
    assert "rANS stream ended early" in body["error"]
    reply = env.client.get(f"/v1/images/{image_id}/reconstruction", headers=env.headers("cam1"))
    assert reply.status_code == 409 and error_code(reply) == "decode_failed"
    reply = env.client.get(f"/v1/images/{image_id}/thumbnail", headers=env.headers("cam1"))
    assert reply.status_code == 409 and error_code(reply) == "decode_failed"  # same answer as the reconstruction


def test_batches_group_compatible_images(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, batch_size=3, worker=False)
    tokens = make_tokens(settings, "cam1")
    codec = FakeCodec()
    app = create_app(settings, registry=CodecRegistry.from_codecs([codec]))
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", **OCTET}
        for size in [(32, 32)] * 4 + [(16, 8)]:
            assert client.post("/v1/images", content=make_bitstream(*size), headers=headers).status_code == 202
        from aeic.receiver.worker import DecodeWorker, WorkerConfig

        state = app.state.receiver
        worker = DecodeWorker(state.store, state.blobs, state.registry, WorkerConfig(batch_size=3))
        while worker.run_once():
            pass
    assert codec.batches == [3, 1, 1]


def test_a_worker_config_made_without_settings_batches_as_the_settings_default() -> None:
    """A config built in code (a tool, a test) decodes as a receiver started with no settings would: both
    worker configs said 4 while the setting said 1 (a CPU's best, docs/receiver.md, Batch size)."""
    from aeic.receiver.stream_worker import StreamWorkerConfig
    from aeic.receiver.worker import WorkerConfig

    default = ReceiverSettings.model_fields["batch_size"].default
    assert WorkerConfig().batch_size == default
    assert StreamWorkerConfig(consumer="w1").batch_size == default


def test_pending_and_abandoned_jobs_resume_after_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, worker=False)
    tokens = make_tokens(settings, "cam1")
    headers = {"Authorization": f"Bearer {tokens['cam1']}", **OCTET}
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))
    with TestClient(app) as client:
        ids = [client.post("/v1/images", content=make_bitstream(), headers=headers).json()["id"] for _ in range(3)]
        # Simulate a crash mid-decode: a claim that is never reported back.
        assert app.state.receiver.store.claim_batch(2) is not None
    restarted = create_app(make_settings(tmp_path), registry=CodecRegistry.from_codecs([FakeCodec()]))
    with TestClient(restarted) as client:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            statuses = [client.get(f"/v1/images/{i}", headers=headers).json()["status"] for i in ids]
            if statuses == ["done"] * 3:
                break
            time.sleep(0.02)
        assert statuses == ["done"] * 3


def test_health_ready_metrics_and_openapi(env: Env) -> None:
    assert env.client.get("/healthz").json()["status"] == "ok"
    ready = env.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["worker"] == "ok"
    assert ready.json()["checks"]["blobs"] == "ok"
    env.wait(env.upload().json()["id"])
    env.upload(data=b"junk" * 10)
    text = env.client.get("/metrics").text
    assert 'aeic_images{status="done"} 1.0' in text
    assert 'aeic_uploads_total{outcome="accepted"} 1.0' in text
    assert 'aeic_uploads_total{outcome="bad_magic"} 1.0' in text
    assert "aeic_decode_ms_count 1.0" in text
    paths = env.client.get("/openapi.json").json()["paths"]
    assert {"/v1/images", "/v1/images/{image_id}", "/v1/images/{image_id}/reconstruction"} <= set(paths)


def test_unknown_routes_and_ids_use_the_error_shape(env: Env) -> None:
    missing = env.client.get("/v1/images/" + "0" * 32, headers=env.headers("cam1"))
    assert missing.status_code == 404 and error_code(missing) == "not_found"
    assert error_code(env.client.get("/v1/nothing")) == "not_found"
    odd = env.client.get("/v1/images/../../etc/passwd", headers=env.headers("cam1"))
    assert odd.status_code == 404


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.integers(0, 40), st.integers(0, 255)).map(
                     lambda p: bytearray(_valid())[: p[0]] + bytes([p[1]]) + _valid()[p[0] + 1:])))
def test_arbitrary_bytes_never_cause_a_server_error(env: Env, body: bytes) -> None:
    response = env.upload(data=bytes(body))
    assert response.status_code < 500
    assert response.status_code == 202 or "error" in response.json()


def test_gallery_login_cookie_is_read_only(env: Env) -> None:
    assert 'name="token"' in env.client.get("/").text
    assert env.client.get("/login", params={"token": "wrong"}).status_code == 401
    image_id = env.upload("cam2").json()["id"]
    env.wait(image_id, who="cam2")
    login = env.client.get("/login", params={"token": env.tokens["cam1"]}, follow_redirects=False)
    assert login.status_code == 303 and "httponly" in login.headers["set-cookie"].lower()
    # cam1's cookie: sees its (empty) gallery, not cam2's image.
    assert image_id not in env.client.get("/").text
    assert env.client.get(f"/images/{image_id}").status_code == 404
    env.client.post("/login", data={"token": ADMIN})
    assert image_id in env.client.get("/").text
    page = env.client.get(f"/images/{image_id}").text
    assert 'id="reconstruction"' in page and "48 × 32 px" in page
    assert all(f'download="{image_id}.{ext}"' in page for ext in ("webp", "jpg"))  # saved, not opened
    png = env.client.get(f"/images/{image_id}/png")  # a plain link whose answer saves the file
    assert png.status_code == 200 and f'filename="{image_id}.png"' in png.headers["content-disposition"]
    assert env.client.get(f"/v1/images/{image_id}/thumbnail").status_code == 200
    # The cookie never authorises a write.
    assert env.client.delete(f"/v1/images/{image_id}").status_code == 401
    assert env.client.post("/v1/images", content=make_bitstream(), headers=OCTET).status_code == 401
    env.client.post("/logout")
    assert 'name="token"' in env.client.get("/").text


def test_full_flow_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    settings = make_settings(tmp_path, database_url=postgres_url)
    tokens = make_tokens(settings, "cam1")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        env = Env(client, tmp_path, tokens, FakeCodec())
        ids = [env.upload(data=make_bitstream(payload=bytes([n])), key=f"k{n}").json()["id"]
               for n in range(3)]
        assert env.upload(data=make_bitstream(payload=b"\x00"), key="k0").json()["id"] == ids[0]
        assert [env.wait(i)["status"] for i in ids] == ["done"] * 3
        listed = client.get("/v1/images", headers=env.headers("cam1")).json()["items"]
        assert [i["id"] for i in listed] == list(reversed(ids))
    assert not (tmp_path / "receiver.db").exists()


def test_rate_index_outside_the_model_is_422(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, worker=False)
    tokens = make_tokens(settings, "cam1")
    codec = FakeCodec()
    registry = CodecRegistry({codec.model_id: lambda: codec}, levels={codec.model_id: 4})
    with TestClient(create_app(settings, registry=registry)) as client:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", **OCTET}
        assert client.post("/v1/images", content=make_bitstream(rate_index=3), headers=headers).status_code == 202
        reply = client.post("/v1/images", content=make_bitstream(rate_index=4), headers=headers)
        assert reply.status_code == 422 and error_code(reply) == "unknown_rate"


class BrokenBlobs:
    """A blob store whose disk fills between its readiness check and its use, with a buggy client."""

    def ping(self) -> None:
        pass

    def put(self, key: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    def get(self, key: str) -> bytes:
        raise RuntimeError("a bug in the blob client")  # not an outage: an internal error

    def delete(self, key: str) -> bool:
        return False

    def exists(self, key: str) -> bool:
        return False


def test_storage_failure_is_503_and_stores_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, worker=False)
    tokens = make_tokens(settings, "cam1")
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]), blobs=BrokenBlobs())
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", **OCTET}
        reply = client.post("/v1/images", content=make_bitstream(), headers=headers)
        assert reply.status_code == 503 and error_code(reply) == "storage_unavailable"
        assert reply.headers["retry-after"] == "5"
        assert app.state.receiver.store.status_counts()[Status.PENDING] == 0


@contextmanager
def one_upload(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A receiver without its worker thread, holding one uploaded image: (app, image id)."""
    settings = make_settings(tmp_path, worker=False)
    tokens = make_tokens(settings, "cam1")
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", **OCTET}
        yield app, client.post("/v1/images", content=make_bitstream(), headers=headers).json()["id"]


def test_worker_releases_its_claim_after_an_internal_error(tmp_path: Path) -> None:
    with one_upload(tmp_path) as (app, image_id):
        state = app.state.receiver
        from aeic.receiver.worker import DecodeWorker, WorkerConfig

        worker = DecodeWorker(state.store, BrokenBlobs(), state.registry, WorkerConfig(retry_delay_s=0.0))
        with pytest.raises(RuntimeError):
            worker.run_once()
        record = state.store.get_image(image_id)
        assert record is not None and record.status is Status.PENDING and "internal error" in record.error


def test_a_claim_the_full_disk_kept_is_released_once_storage_is_back(tmp_path: Path) -> None:
    """Disk full for the reconstruction and for the database: the failure cannot be recorded, so the image
    is still `decoding`; once space is back the worker must record it and decode the image again, not leave
    it `decoding` until the process restarts."""
    import sqlite3

    from aeic.receiver.worker import DecodeWorker, WorkerConfig
    from sqlalchemy.exc import OperationalError

    with one_upload(tmp_path) as (app, image_id):
        state = app.state.receiver
        blobs = FillingBlobs(state.blobs)

        def database_full(*args: Any, **kwargs: Any) -> bool:
            raise OperationalError("UPDATE images", {}, sqlite3.OperationalError("database or disk is full"))

        worker = DecodeWorker(state.store, blobs, state.registry, WorkerConfig(retry_delay_s=0.0))
        state.store.fail_attempt = database_full
        with pytest.raises(OperationalError):
            worker.run_once()
        assert state.store.get_image(image_id).status is Status.DECODING
        del state.store.fail_attempt  # space is back
        blobs.full = False
        for _ in range(3):
            worker.run_once()
        record = state.store.get_image(image_id)
        assert record is not None and record.status is Status.DONE, record
        assert record.attempts == 2 and record.decodes == 1  # the failed attempt counted, then one decode


class FillingBlobs:
    """A blob store on a disk that is full until ``full`` is cleared; ``ping`` notices it only with ``noticed``."""

    def __init__(self, blobs: Any, noticed: bool = False) -> None:
        self.blobs, self.full, self.noticed = blobs, True, noticed

    def ping(self) -> None:
        if self.full and self.noticed:
            raise OSError(28, "No space left on device")

    def put(self, key: str, data: bytes) -> None:
        if self.full:
            raise OSError(28, "No space left on device")
        self.blobs.put(key, data)

    def get(self, key: str) -> bytes:
        return self.blobs.get(key)

    def delete(self, key: str) -> bool:
        return self.blobs.delete(key)

    def exists(self, key: str) -> bool:
        return self.blobs.exists(key)


def test_a_full_disk_does_not_use_up_an_images_attempts(tmp_path: Path) -> None:
    """An outage longer than max_attempts tries must not fail the image for good: it is decoded once space is back."""
    from aeic.receiver.worker import DecodeWorker, WorkerConfig

    with one_upload(tmp_path) as (app, image_id):
        state = app.state.receiver
        blobs = FillingBlobs(state.blobs)
        worker = DecodeWorker(state.store, blobs, state.registry, WorkerConfig(retry_delay_s=0.0, max_attempts=3))
        for _ in range(5):
            assert worker.run_once() == 1
        waiting = state.store.get_image(image_id)
        assert waiting is not None and waiting.status is Status.PENDING and "No space left" in (waiting.error or "")
        blobs.full = False
        worker.run_once()
        record = state.store.get_image(image_id)
        assert record is not None and record.status is Status.DONE and record.attempts == 6


def test_gallery_pages_through_older_images(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, worker=False)
    tokens = make_tokens(settings, "cam1")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", **OCTET}
        ids = [client.post("/v1/images", content=make_bitstream(), headers=headers).json()["id"]
               for _ in range(62)]
        client.get("/login", params={"token": ADMIN})
        first = client.get("/").text
        assert ids[-1] in first and ids[1] not in first and 'data-live="true"' in first
        older_link = first.split('id="older" href="')[1].split('"')[0]
        older = client.get(older_link).text
        assert ids[1] in older and ids[0] in older and ids[-1] not in older and 'data-live="false"' in older
        assert 'id="older"' not in older
        assert ids[-1] in client.get("/?cursor=garbage").text


def test_a_worker_that_lost_its_claims_writes_no_files(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, worker=False)
    tokens = make_tokens(settings, "cam1")
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", **OCTET}
        kept, deleted = (client.post("/v1/images", content=make_bitstream(), headers=headers).json()["id"]
                         for _ in range(2))
        state = app.state.receiver
        from aeic.receiver.worker import DecodeWorker, WorkerConfig

        worker = DecodeWorker(state.store, state.blobs, state.registry, WorkerConfig(batch_size=2))
        original = worker._checked

        def meanwhile(*args: Any, **kwargs: Any) -> Any:
            state.store.requeue_abandoned(max_attempts=3)  # another process took `kept` over
            client.delete(f"/v1/images/{deleted}", headers=headers)
            return original(*args, **kwargs)

        worker._checked = meanwhile  # type: ignore[method-assign]
        worker.run_once()
        assert state.store.get_image(kept).status is Status.PENDING
        blobs_dir = tmp_path / "blobs"
        assert not list(blobs_dir.rglob(f"{kept}.png"))  # the new owner writes its result, not this worker
        assert not list(blobs_dir.rglob(f"{deleted}.*"))


def test_not_ready_while_the_blob_disk_is_full(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from types import SimpleNamespace

    from aeic.receiver.storage import blobs

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10 << 30, used=10 << 30, free=1 << 20))
    ready = env.client.get("/readyz")
    # The reason, not the folder's path: /readyz answers anonymous callers.
    assert ready.status_code == 503 and ready.json()["checks"]["blobs"] == "error: OSError: No space left on device"
    assert str(env.data) not in ready.text
    assert blobs.MIN_FREE_BYTES > 1 << 20


def test_the_worker_claims_nothing_while_the_blob_store_is_unusable(tmp_path: Path) -> None:
    """An outage its readiness check sees costs no attempt and no decode: the image waits, then decodes once."""
    from aeic.receiver.worker import DecodeWorker, WorkerConfig

    with one_upload(tmp_path) as (app, image_id):
        state = app.state.receiver
        blobs = FillingBlobs(state.blobs, noticed=True)
        worker = DecodeWorker(state.store, blobs, state.registry, WorkerConfig(retry_delay_s=0.0))
        assert [worker.run_once() for _ in range(3)] == [0, 0, 0]
        waiting = state.store.get_image(image_id)
        assert waiting is not None and waiting.status is Status.PENDING and waiting.attempts == 0
        blobs.full = False
        assert worker.run_once() == 1
        record = state.store.get_image(image_id)
        assert record is not None and record.status is Status.DONE and record.attempts == 1


class BlockingCodec(FakeCodec):
    """Decodes only once `release` is set: a batch that outlasts the shutdown's wait."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.started, self.release = threading.Event(), threading.Event()

    def decode_batch(self, items: list[bytes]) -> list[Any]:
        self.started.set()
        self.release.wait(10)
        return super().decode_batch(items)


def test_a_stop_that_cannot_wait_for_the_batch_hands_its_claim_back(tmp_path: Path) -> None:
    """SIGTERM while a long batch decodes: once the wait is over, the images go back to pending with the
    interrupted attempt not counted (a restart is not the image's fault), not left `decoding` until the next
    start and charged an attempt each time; the abandoned decode then finishing records nothing."""
    from aeic.receiver.worker import DecodeWorker, WorkerConfig

    with one_upload(tmp_path) as (app, image_id):
        state = app.state.receiver
        codec = BlockingCodec()
        worker = DecodeWorker(state.store, state.blobs, CodecRegistry.from_codecs([codec]),
                              WorkerConfig(retry_delay_s=0.0, poll_interval_s=0.01))
        worker.start()
        try:
            assert codec.started.wait(10)
            worker.stop(timeout=0.05)
            record = state.store.get_image(image_id)
            assert record is not None and record.status is Status.PENDING and record.attempts == 0, record
        finally:
            codec.release.set()
            worker.stop()
        assert not worker.is_alive()
        record = state.store.get_image(image_id)
        assert record is not None and record.status is Status.PENDING and record.decodes == 0, record
        # The next start decodes it as a first attempt.
        restarted = DecodeWorker(state.store, state.blobs, state.registry, WorkerConfig(retry_delay_s=0.0))
        assert restarted.run_once() == 1
        record = state.store.get_image(image_id)
        assert record is not None and record.status is Status.DONE and record.attempts == 1, record
