"""Several embedded receivers (`aeic-receiver serve`, each on a data directory of its own) sharing one
PostgreSQL database. Was: every start requeued every image in `decoding`, the live batch of a peer
included, which was then decoded twice, charged an attempt (failed on its last one while still being
decoded) and had its files overwritten by the first decoder. Now claims are owned (the token starts with
the data directory's id) and leased (`claimed_at`, renewed while a batch decodes): a start requeues its
own previous life's claims and expired ones only, a receiver killed with SIGKILL mid-batch has its claim
taken over once the lease runs out, and a worker that lost its claim writes nothing. One SQLite file
serves one receiver: a second refuses to start.

Blobs are one folder every receiver shares, standing for the object store such receivers need."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import receiver_support
import sqlalchemy as sa
from aeic.receiver.api import create_app
from aeic.receiver.data_dir import ID_NAME, DatabaseInUseError, owner_id
from aeic.receiver.images import make_thumbnail
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import FilesystemBlobStore, NewImage, SqlMetadataStore, schema
from aeic.receiver.storage.blobs import bitstream_key, reconstruction_key, thumbnail_key
from aeic.receiver.worker import DecodeWorker, WorkerConfig
from aeic.shared.bitstream import peek_header
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from receiver_support import BlockingCodec, FakeCodec, free_port, make_bitstream, new_image

# Fixtures shared with the other receiver tests.
database_url = receiver_support.database_url
postgres_server = receiver_support.postgres_server
postgres_url = receiver_support.postgres_url

LEASE_S = 1.0
ADMIN = "shared-database-admin-token-0123456789"
_IMG = schema.images


@pytest.fixture()
def meta(database_url: str) -> Iterator[SqlMetadataStore]:
    """The test's own view of the database (no owner: it claims nothing)."""
    with receiver_support.migrated_store(database_url) as store:
        yield store


@pytest.fixture()
def pg_meta(postgres_url: str) -> Iterator[SqlMetadataStore]:
    with receiver_support.migrated_store(postgres_url) as store:
        yield store


def _app(data: Path, url: str, codec: FakeCodec, blobs: Path, lease_s: float = LEASE_S,
         worker: bool = True) -> FastAPI:
    settings = ReceiverSettings(data_dir=data, database_url=url, admin_token=ADMIN, poll_interval_s=0.05,
                                retry_delay_s=0.0, reclaim_after_s=lease_s, worker=worker)
    return create_app(settings, registry=CodecRegistry.from_codecs([codec]), blobs=FilesystemBlobStore(blobs))


def _upload(store: SqlMetadataStore, blobs: Path, n: int) -> str:
    """What the API stores for an upload (the bitstream, then the row); each `n` decodes to other pixels."""
    data = make_bitstream(payload=bytes([n + 1]) * 8)
    header = peek_header(data)
    image_id = f"{n:032x}"
    FilesystemBlobStore(blobs).put(bitstream_key(image_id), data)
    store.insert_image(NewImage(id=image_id, device="cam1", idempotency_key=None, model_id=header.model_id.hex(),
                                width=header.width, height=header.height, rate_index=header.rate_index,
                                bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    return image_id


def _claim(store: SqlMetadataStore, image_id: str) -> tuple[str, str | None, int, int]:
    """(status, claim token, attempts, decodes) of an image."""
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(_IMG.c.status, _IMG.c.claim_token, _IMG.c.attempts, _IMG.c.decodes)
                           .where(_IMG.c.id == image_id)).one()
    return row[0], row[1], row[2], row[3]


def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _spawn(data: Path, url: str, blobs: Path, lease_s: float, codec: str) -> subprocess.Popen[bytes]:
    """A receiver process of its own (`receiver_support.serve_with_double`), its output in DATA.log."""
    command = [sys.executable, receiver_support.__file__, str(data), url, str(blobs), str(free_port()),
               str(lease_s), codec]
    with open(f"{data}.log", "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _decoding(process: subprocess.Popen[bytes], store: SqlMetadataStore, image_id: str) -> Callable[[], bool]:
    def check() -> bool:
        assert process.poll() is None, f"the receiver exited with {process.returncode}"
        return _claim(store, image_id)[0] == "decoding"
    return check


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# -- receivers on one PostgreSQL database ---------------------------------------------------------


def test_a_peer_restarting_leaves_a_live_receivers_long_batch_alone(pg_meta: SqlMetadataStore,
                                                                      postgres_url: str, tmp_path: Path) -> None:
    """B starts twice while A decodes a batch for many leases: A's claim stays A's (A renews it, B's starts
    and sweeps leave it), B decodes only its own uploads, and A's image is decoded once, on one attempt."""
    blobs = tmp_path / "blobs"
    slow, fast = BlockingCodec(), FakeCodec()
    with TestClient(_app(tmp_path / "a", postgres_url, slow, blobs)):
        held_id = _upload(pg_meta, blobs, 0)
        assert slow.entered.wait(10)
        held = _claim(pg_meta, held_id)
        assert held[0] == "decoding" and held[1].startswith(owner_id(tmp_path / "a"))  # type: ignore[union-attr]
        for life in (1, 2):
            with TestClient(_app(tmp_path / "b", postgres_url, fast, blobs)):
                own = _upload(pg_meta, blobs, life)
                _until(lambda: _claim(pg_meta, own)[0] == "done")  # noqa: B023 - called within the iteration
                time.sleep(2 * LEASE_S)
                assert _claim(pg_meta, held_id) == held
        slow.release.set()
        _until(lambda: _claim(pg_meta, held_id)[0] == "done")
    assert _claim(pg_meta, held_id)[2:] == (1, 1) and fast.batches == [1, 1]


def test_a_receiver_killed_mid_batch_is_taken_over_by_its_peer_after_the_lease(
        pg_meta: SqlMetadataStore, postgres_url: str, tmp_path: Path) -> None:
    """A real process decoding a batch: alive, its peer leaves the claim alone for several leases; killed
    with SIGKILL, the peer requeues the claim once its lease runs out and decodes the image, once."""
    blobs, lease = tmp_path / "blobs", 1.0
    image_id = _upload(pg_meta, blobs, 0)
    doomed = _spawn(tmp_path / "a", postgres_url, blobs, lease, "stuck")
    try:
        _until(_decoding(doomed, pg_meta, image_id), 60)
        held = _claim(pg_meta, image_id)
        assert held[1].startswith((tmp_path / "a" / ID_NAME).read_text()[:16])  # type: ignore[union-attr]
        peer = FakeCodec()
        with TestClient(_app(tmp_path / "b", postgres_url, peer, blobs, lease_s=lease)):
            time.sleep(2.5 * lease)
            assert _claim(pg_meta, image_id) == held and peer.batches == []
            _kill(doomed)
            _until(lambda: _claim(pg_meta, image_id)[0] == "done", 10 * lease)
    finally:
        _kill(doomed)
    assert _claim(pg_meta, image_id)[2:] == (2, 1) and peer.batches == [1]


def test_a_receiver_restarted_after_sigkill_requeues_its_own_claim_at_once(meta: SqlMetadataStore,
                                                                           database_url: str, tmp_path: Path) -> None:
    """Its own previous life's claim is requeued at start, not a lease (here a minute) later; on each
    engine."""
    data, blobs, lease = tmp_path / "data", tmp_path / "blobs", 60.0
    image_id = _upload(meta, blobs, 0)
    first = _spawn(data, database_url, blobs, lease, "stuck")
    try:
        _until(_decoding(first, meta, image_id), 60)
    finally:
        _kill(first)
    again = _spawn(data, database_url, blobs, lease, "fake")
    try:
        _until(lambda: _claim(meta, image_id)[0] == "done", lease / 2)
    finally:
        _kill(again)
    assert _claim(meta, image_id)[2:] == (2, 1)


def test_a_worker_that_lost_its_claim_leaves_the_new_owners_result_alone(pg_meta: SqlMetadataStore,
                                                                         postgres_url: str, tmp_path: Path) -> None:
    """A stalled worker (SIGSTOP, a swap storm: here one that renews too rarely for its peer's lease) whose
    claim a peer took over and completed finishes its decode later: it must not write its pixels (another
    device's may differ) over the new owner's reconstruction and thumbnail."""
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    image_id = _upload(pg_meta, tmp_path / "blobs", 0)
    stalled_codec = BlockingCodec(invert=True)
    stores = [SqlMetadataStore.from_url(postgres_url, owner=c * 16) for c in "ab"]
    stalled = DecodeWorker(stores[0], blobs, CodecRegistry.from_codecs([stalled_codec]), WorkerConfig(lease_s=3600))
    peer = DecodeWorker(stores[1], blobs, CodecRegistry.from_codecs([FakeCodec()]), WorkerConfig(lease_s=LEASE_S))
    thread = threading.Thread(target=stalled.run_once)
    try:
        thread.start()
        assert stalled_codec.entered.wait(10)
        time.sleep(1.5 * LEASE_S)
        assert peer.run_once() == 1  # requeued the expired claim, claimed it again and decoded it
        stalled_codec.release.set()
        thread.join(10)
    finally:
        stalled_codec.release.set()
        for store in stores:
            store.close()
    assert _claim(pg_meta, image_id)[0::2] == ("done", 2) and _claim(pg_meta, image_id)[3] == 1
    expected = FakeCodec().decode(blobs.get(bitstream_key(image_id)))
    stored = np.asarray(Image.open(io.BytesIO(blobs.get(reconstruction_key(image_id)))).convert("RGB"))
    assert np.array_equal(stored, expected)
    assert blobs.get(thumbnail_key(image_id)) == make_thumbnail(expected, WorkerConfig().thumbnail_px)


def test_a_claim_of_a_receiver_without_owned_claims_waits_for_its_lease(meta: SqlMetadataStore,
                                                                        database_url: str, tmp_path: Path) -> None:
    """A claim of the version before owned claims (a plain random token) may be a live peer's that still
    runs it: the first start after the upgrade leaves it to its lease, then decodes it; on each engine."""
    blobs, lease = tmp_path / "blobs", 1.0
    image_id = _upload(meta, blobs, 0)
    claimed_at = time.time()
    assert meta.claim_batch(1) is not None
    with TestClient(_app(tmp_path / "data", database_url, FakeCodec(), blobs, lease_s=lease)):
        assert _claim(meta, image_id)[0] == "decoding"
        _until(lambda: _claim(meta, image_id)[0] == "done")
    record = meta.get_image(image_id)
    assert record is not None and record.decoded_at is not None and record.decoded_at >= claimed_at + lease
    assert (record.attempts, record.decodes) == (2, 1)


def test_requeue_takes_expired_leases_and_its_own_previous_claims_only(database_url: str) -> None:
    mine, peer, old = (SqlMetadataStore.from_url(database_url, owner=o) for o in ("a" * 16, "b" * 16, None))
    try:
        mine.migrate()
        for n in range(3):  # sizes differ: one image per claim
            mine.insert_image(new_image(n, size=(64 + n, 48)))
        claims = [store.claim_batch(4) for store in (mine, peer, old)]
        assert all(c is not None for c in claims)
        assert claims[0].token.startswith("a" * 16) and claims[1].token.startswith("b" * 16)  # type: ignore[union-attr]
        assert mine.requeue_abandoned(3, claimed_before=time.time() - 60, owner=mine.owner) == 1
        assert [_claim(mine, f"{n:032x}")[0] for n in range(3)] == ["pending", "decoding", "decoding"]
        assert peer.refresh_claim(claims[1].token) == 1  # type: ignore[union-attr]
        assert mine.refresh_claim(claims[0].token) == 0  # type: ignore[union-attr]
        assert mine.requeue_abandoned(3, claimed_before=time.time() + 1) == 2
        assert [_claim(mine, f"{n:032x}")[:3] for n in range(3)] == [("pending", None, 1)] * 3
    finally:
        for store in (mine, peer, old):
            store.close()


def test_the_owner_id_survives_a_restart_but_not_a_copy_of_the_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    first = owner_id(data)
    assert re.fullmatch(r"[0-9a-f]{16}", first) and owner_id(data) == first
    shutil.copytree(data, tmp_path / "copy")
    assert owner_id(tmp_path / "copy") not in (first, owner_id(data))


# -- one SQLite file, one receiver ------------------------------------------------------------------


def test_a_second_receiver_on_one_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    """Two data directories naming one SQLite file: the second receiver with a worker does not start (a
    SQLite database serves one receiver); an API without a worker may share the file, it claims nothing."""
    database = tmp_path / "shared.db"
    url, blobs = f"sqlite:///{database}", tmp_path / "blobs"
    with TestClient(_app(tmp_path / "a", url, FakeCodec(), blobs)):
        message = f"pid {os.getpid()}) runs its decode worker on the SQLite database {database.resolve()}"
        with pytest.raises(DatabaseInUseError, match=re.escape(message)), \
                TestClient(_app(tmp_path / "b", url, FakeCodec(), blobs)):
            pass
        with TestClient(_app(tmp_path / "c", url, FakeCodec(), blobs, worker=False)) as api:
            assert api.get("/readyz").status_code == 200
    with TestClient(_app(tmp_path / "b", url, FakeCodec(), blobs)) as second:  # the lock went with the first
        assert second.get("/readyz").status_code == 200


def test_serve_on_a_sqlite_database_another_worker_holds_is_one_line_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from aeic.receiver import cli
    from aeic.receiver.data_dir import lock_sqlite_database, unlock_data_dir

    database = tmp_path / "first" / "receiver.db"
    database.parent.mkdir()
    url = f"sqlite:///{database}"
    monkeypatch.setenv("AEIC_DATABASE_URL", url)
    held = lock_sqlite_database(url)
    assert held is not None
    try:
        assert cli.main(["serve", "--data", str(tmp_path / "second"), "--port", "9"]) == 2
    finally:
        unlock_data_dir(held)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"(pid {os.getpid()}) runs its decode worker on the SQLite database" in err
