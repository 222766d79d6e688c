"""Crash safety of the embedded receiver beyond one clean kill, each case a defect found by killing real
processes: a process that dies again and again while decoding (a supervisor restarting it after an OOM
kill or a native crash), a second process started on a data directory another one serves, the start-up
sweep of temporary files, and a migration killed halfway or raced by a second start on SQLite."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import receiver_support
import scaleout_support
from aeic.receiver import cli
from aeic.receiver.api import create_app
from aeic.receiver.auth import create_device_token
from aeic.receiver.data_dir import DataDirInUseError, lock_data_dir, unlock_data_dir
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import FilesystemBlobStore, NewImage, SqlMetadataStore, Status, migrations
from aeic.receiver.storage.blobs import bitstream_key
from aeic.receiver.worker import DecodeWorker, WorkerConfig
from aeic.shared.bitstream import peek_header
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, make_bitstream, stored

# Fixtures shared with the other receiver tests.
database_url = receiver_support.database_url
postgres_server = receiver_support.postgres_server
postgres_url = receiver_support.postgres_url
store = receiver_support.store
redis_server, redis_url = scaleout_support.redis_server, scaleout_support.redis_url

MAX_ATTEMPTS = 3


class ProcessKilled(BaseException):
    """Stands for SIGKILL: nothing after it runs, so the claim stays `decoding`, as a dead process leaves it."""


class KillingCodec(FakeCodec):
    """Decoding the poison bitstream kills the process, whatever else is in its batch."""

    def __init__(self, poison: bytes) -> None:
        super().__init__()
        self.poison = poison
        self.decoded: list[bytes] = []

    def decode_batch(self, items: list[bytes]) -> list:
        if self.poison in items:
            raise ProcessKilled
        self.decoded += items
        return super().decode_batch(items)


def _upload(meta: SqlMetadataStore, blobs: FilesystemBlobStore, n: int, data: bytes) -> str:
    """What the API stores for an upload: the bitstream, then the row."""
    header = peek_header(data)
    image_id = f"{n:032x}"
    blobs.put(bitstream_key(image_id), data)
    meta.insert_image(NewImage(id=image_id, device="cam1", idempotency_key=None, model_id=header.model_id.hex(),
                               width=header.width, height=header.height, rate_index=header.rate_index,
                               bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    return image_id


def test_an_image_that_kills_the_process_fails_alone(store: SqlMetadataStore, tmp_path: Path) -> None:
    """Three images of one size and one of them kills the process whenever it is decoded, under a supervisor
    that restarts it. Was: they were claimed together after every restart, so each death charged all three
    an attempt, and all three failed without a decode; now a retry is decoded alone and only the killer
    fails (on each engine)."""
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    streams = [make_bitstream(payload=bytes([n + 1]) * 8) for n in range(3)]
    ids = [_upload(store, blobs, n, data) for n, data in enumerate(streams)]
    codec = KillingCodec(poison=streams[1])
    config = WorkerConfig(batch_size=4, max_attempts=MAX_ATTEMPTS, retry_delay_s=0.0)
    deaths = 0
    for _start in range(10):
        store.requeue_abandoned(MAX_ATTEMPTS)  # what every start of the embedded receiver does first
        worker = DecodeWorker(store, blobs, CodecRegistry.from_codecs([codec]), config)
        try:
            while worker.run_once():
                pass
            break
        except ProcessKilled:
            deaths += 1
    records = [stored(store, i) for i in ids]
    assert [r.status for r in records] == [Status.DONE, Status.FAILED, Status.DONE], [r.error for r in records]
    assert [r.decodes for r in records] == [1, 0, 1]
    error = records[1].error
    assert error is not None and "last attempt" in error and deaths == MAX_ATTEMPTS
    assert sorted(codec.decoded) == sorted([streams[0], streams[2]])


def test_first_attempts_still_batch_and_a_retry_never_joins_them(store: SqlMetadataStore) -> None:
    """Batching is kept for new uploads; a retried image of the same size waits for its own claim."""
    for n in range(4):
        store.insert_image(receiver_support.new_image(n))
    first = store.claim_batch(1)
    assert first is not None
    store.requeue_abandoned(MAX_ATTEMPTS)  # image 0 now has an attempt behind it
    alone = store.claim_batch(8)
    assert alone is not None and [r.id for r in alone.records] == [f"{0:032x}"]
    fresh = store.claim_batch(8)
    assert fresh is not None and [r.id for r in fresh.records] == [f"{n:032x}" for n in (1, 2, 3)]
    assert all(r.attempts == 1 for r in fresh.records)
    assert store.claim_batch(8) is None



def test_a_queue_worker_takes_over_a_killer_without_its_batch_mates(store: SqlMetadataStore, tmp_path: Path,
                                                                     redis_url: str) -> None:
    """The same under `aeic-receiver worker`: each death leaves the entries to a live consumer, which took
    the poison over together with the others (all three failed); now a retry is claimed alone, after the
    delivery's first attempts."""
    pytest.importorskip("redis", reason="redis is not installed (scale extra)")
    from aeic.receiver.queue import JobQueue
    from aeic.receiver.stream_worker import StreamWorker, StreamWorkerConfig

    blobs = FilesystemBlobStore(tmp_path / "blobs")
    streams = [make_bitstream(payload=bytes([n + 1]) * 8) for n in range(3)]
    ids = [_upload(store, blobs, n, data) for n, data in enumerate(streams)]
    codec = KillingCodec(poison=streams[1])
    queue = JobQueue.from_url(redis_url)
    queue.ensure_group()
    for image_id in ids:
        queue.publish(image_id)
    decoder = DecodeWorker(store, blobs, CodecRegistry.from_codecs([codec]),
                           WorkerConfig(batch_size=4, max_attempts=MAX_ATTEMPTS, retry_delay_s=0.0))
    deaths = 0
    for life in range(10):  # each life a new consumer: the one before was killed
        consumer = f"w{life}"
        worker = StreamWorker(store, queue, decoder, StreamWorkerConfig(
            consumer=consumer, batch_size=4, max_attempts=MAX_ATTEMPTS, reclaim_after_s=0.05, block_ms=50))
        time.sleep(0.1)  # the dead consumer's entries have been idle long enough
        jobs = queue.read(consumer, 4, 50) if life == 0 else queue.reclaim(consumer, 50, 10)
        if not jobs:
            break
        try:
            worker.handle(jobs)
        except ProcessKilled:
            deaths += 1
    records = [stored(store, i) for i in ids]
    assert [r.status for r in records] == [Status.DONE, Status.FAILED, Status.DONE], [r.error for r in records]
    assert [r.decodes for r in records] == [1, 0, 1] and deaths == MAX_ATTEMPTS
    assert [d["image"] for d in queue.dead_letters()] == [ids[1]] and queue.backlog().pending == 0


# -- one embedded worker per data directory ------------------------------------------------------

ADMIN = "crash-safety-admin-token-0123456789"


class BlockingCodec(FakeCodec):
    """Holds every batch until released: a worker caught in the middle of a decode."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def decode_batch(self, items: list[bytes]) -> list:
        self.entered.set()
        assert self.release.wait(30)
        return super().decode_batch(items)


def _settings(data: Path) -> ReceiverSettings:
    return ReceiverSettings(data_dir=data, admin_token=ADMIN, poll_interval_s=0.05, retry_delay_s=0.0)


def test_a_second_receiver_on_a_served_data_dir_refuses_to_start(tmp_path: Path) -> None:
    """Was: a second `aeic-receiver serve` on the folder requeued the first one's batch in progress (an
    attempt charged, the image failed if it was its last) and decoded it again; now it does not start."""
    data = tmp_path / "data"
    codec = BlockingCodec()
    with TestClient(create_app(_settings(data), registry=CodecRegistry.from_codecs([codec]))) as first:
        token = create_device_token(first.app.state.receiver.store, "cam1")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        image_id = first.post("/v1/images", content=make_bitstream(), headers=headers).json()["id"]
        assert codec.entered.wait(30)
        second = create_app(_settings(data), registry=CodecRegistry.from_codecs([FakeCodec()]))
        with pytest.raises(DataDirInUseError, match=f"pid {os.getpid()}"), TestClient(second):
            pass
        record = first.app.state.receiver.store.get_image(image_id)
        assert record.status is Status.DECODING and record.attempts == 1 and record.error is None
        codec.release.set()
        deadline = time.monotonic() + 10
        while first.get(f"/v1/images/{image_id}", headers=headers).json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    # The lock goes with the process (or, here, the app) that held it.
    with TestClient(create_app(_settings(data), registry=CodecRegistry.from_codecs([FakeCodec()]))) as again:
        record = again.app.state.receiver.store.get_image(image_id)
        assert record.status is Status.DONE and record.decodes == 1 and record.attempts == 1


def test_serve_on_a_served_data_dir_is_one_line_and_exit_2(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    held = lock_data_dir(data)
    try:
        assert cli.main(["serve", "--data", str(data), "--port", "9"]) == 2
    finally:
        unlock_data_dir(held)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"another aeic-receiver (pid {os.getpid()}) is serving {data}" in err


def test_the_start_up_sweep_keeps_temporary_files_of_live_writers(tmp_path: Path) -> None:
    """Was: every `.tmp-` file under the blob folder was deleted at start, also one another process sharing
    the folder (an API process beside `aeic-receiver worker`s) was writing: that write then failed."""
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    blobs.put(bitstream_key("ab" * 16), b"x")
    folder = tmp_path / "blobs" / "bitstreams" / "ab"
    dead = subprocess.Popen(["true"])
    dead.wait()
    with subprocess.Popen(["sleep", "30"]) as live:
        try:
            for pid in (live.pid, dead.pid):
                (folder / f".tmp-{'cd' * 16}.aeic.{pid}.0123abcd").write_bytes(b"half")
            assert blobs.remove_stale_tmp() == 1
            assert sorted(p.name.split(".")[-2] for p in folder.glob(".tmp-*")) == [str(live.pid)]
        finally:
            live.kill()
    assert blobs.remove_stale_tmp() == 1 and not list(folder.glob(".tmp-*"))
    assert blobs.get(bitstream_key("ab" * 16)) == b"x"


# -- migrations on SQLite --------------------------------------------------------------------------

V6_INDEXES = {"ix_images_created_seq": "created_at, seq", "ix_images_device_created_seq": "device, created_at, seq",
              "ix_images_status_created_seq": "status, created_at, seq",
              "ix_images_device_status_created_seq": "device, status, created_at, seq"}
TO_V5 = (*(f"DROP INDEX {name}" for name in V6_INDEXES), "CREATE INDEX ix_images_created_at ON images (created_at)",
         "CREATE INDEX ix_images_device_seq ON images (device, seq)")


def _indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}


def _version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT max(version) FROM aeic_schema_version").fetchone()[0])


def test_a_migration_killed_halfway_leaves_the_old_schema_whole(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: sqlite3 committed each DDL statement on its own, so a receiver killed in the middle of v6 (seen
    with kill -9 at 500,000 images) left some of its indexes and v5 recorded; now the steps and the version
    row are one transaction."""
    path = tmp_path / "receiver.db"
    receiver_support.store_left_at(f"sqlite:///{path}", 5, *TO_V5, image=receiver_support.new_image(1))
    v6 = next(step for step in migrations.MIGRATIONS if step.version == 6)

    def killed_after_the_ddl(conn: object) -> None:
        v6.apply(conn)  # type: ignore[arg-type]
        raise ProcessKilled

    monkeypatch.setattr(migrations, "MIGRATIONS", tuple(
        dataclasses.replace(step, apply=killed_after_the_ddl) if step is v6 else step for step in migrations.MIGRATIONS))
    meta = SqlMetadataStore.from_url(f"sqlite:///{path}")
    try:
        with pytest.raises(ProcessKilled):
            meta.migrate()
        assert _version(path) == 5
        assert not _indexes(path) & set(V6_INDEXES)
        assert {"ix_images_created_at", "ix_images_device_seq"} <= _indexes(path)
        monkeypatch.undo()
        assert meta.migrate() == migrations.MIGRATIONS[-1].version and set(V6_INDEXES) <= _indexes(path)
    finally:
        meta.close()


def test_a_start_during_another_processs_migration_waits_for_it(tmp_path: Path) -> None:
    """Was: two processes starting at once (`serve` and `token create` after an upgrade) both ran v6, and
    one failed on "index ix_images_... already exists"; now the second waits and finds nothing to do."""
    path = tmp_path / "receiver.db"
    receiver_support.store_left_at(f"sqlite:///{path}", 5, *TO_V5, image=receiver_support.new_image(1))
    other = sqlite3.connect(path, isolation_level=None)  # the other process, in the middle of its migration
    other.execute("BEGIN IMMEDIATE")
    meta = SqlMetadataStore.from_url(f"sqlite:///{path}")
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_try(meta.migrate)))
    try:
        thread.start()
        time.sleep(0.5)  # this start has read v5 by now, unless it waits for the other's transaction
        for name, columns in V6_INDEXES.items():
            other.execute(f"CREATE INDEX {name} ON images ({columns})")
        other.execute("DROP INDEX ix_images_created_at")
        other.execute("DROP INDEX ix_images_device_seq")
        other.execute("INSERT INTO aeic_schema_version VALUES (6, 'listing indexes', 0)")
        other.execute("COMMIT")
        thread.join(30)
        assert outcome == [migrations.MIGRATIONS[-1].version]  # the steps after v6, without an error
    finally:
        other.close()
        meta.close()


def _try(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the test compares the outcome
        return exc
