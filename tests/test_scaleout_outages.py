"""Scale-out workers through infrastructure outages (real Redis; SQLite and PostgreSQL; decoder double):
an unreachable object store costs no decode attempt, a group that raises strands no image in `decoding`, the heartbeat keeps the database claim fresh while Redis is down, and images whose
enqueue failed are re-enqueued while the stream is busy."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import receiver_support
import scaleout_support
from aeic.receiver.storage import FilesystemBlobStore, NewImage, SqlMetadataStore, Status
from aeic.receiver.storage.blobs import bitstream_key
from aeic.receiver.worker import DecodeWorker, WorkerConfig
from receiver_support import TEST_MODEL_ID, FakeCodec, make_bitstream, stored

pytest.importorskip("redis", reason="redis is not installed (scale extra)")

from aeic.receiver.queue import JobQueue
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.storage.claims import claim_ids
from aeic.receiver.storage.s3 import BlobStoreUnavailableError
from aeic.receiver.stream_worker import StreamWorker, StreamWorkerConfig

redis_server, redis_url = scaleout_support.redis_server, scaleout_support.redis_url
postgres_server, postgres_url = receiver_support.postgres_server, receiver_support.postgres_url
database_url, store = receiver_support.database_url, receiver_support.store


class FlakyBlobs(FilesystemBlobStore):
    """Blob reads raise `error` while `failures` is above zero (an object store that is down)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failures = 0
        self.error: Exception = BlobStoreUnavailableError("S3 get_object failed: connection refused")

    def get(self, key: str) -> bytes:
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return super().get(key)


def _worker(store: SqlMetadataStore, blobs: FilesystemBlobStore, url: str, reclaim_after_s: float = 0.1,
            max_attempts: int = 1) -> tuple[StreamWorker, FakeCodec]:
    codec = FakeCodec()
    queue = JobQueue.from_url(url)
    queue.ensure_group()
    decoder = DecodeWorker(store, blobs, CodecRegistry.from_codecs([codec]),
                           WorkerConfig(batch_size=4, max_attempts=max_attempts, retry_delay_s=0.0))
    return StreamWorker(store, queue, decoder, StreamWorkerConfig(
        consumer="w1", batch_size=4, max_attempts=max_attempts, reclaim_after_s=reclaim_after_s,
        block_ms=50, reconcile_every_s=0.2)), codec


def _upload(store: SqlMetadataStore, blobs: FilesystemBlobStore, width: int = 48, height: int = 32) -> str:
    data = make_bitstream(width=width, height=height, payload=secrets.token_bytes(4))
    image_id = secrets.token_hex(16)
    blobs.put(bitstream_key(image_id), data)
    store.insert_image(NewImage(id=image_id, device="cam", idempotency_key=None, model_id=TEST_MODEL_ID.hex(),
                                width=width, height=height, rate_index=0, bytes=len(data),
                                sha256=hashlib.sha256(data).hexdigest()))
    return image_id


def test_an_unreachable_object_store_uses_up_no_attempt(store: SqlMetadataStore, tmp_path: Path,
                                                        redis_url: str) -> None:
    blobs = FlakyBlobs(tmp_path / "blobs")
    worker, _ = _worker(store, blobs, redis_url, max_attempts=1)
    image_id = _upload(store, blobs)
    worker.queue.publish(image_id)
    blobs.failures = 3
    worker.handle(worker.queue.read("w1", 4, 50))
    for _ in range(3):  # the store stays down for three tries, then comes back
        record = stored(store, image_id)
        assert record.status is Status.PENDING and record.error is not None
        assert "could not read the stored bitstream" in record.error
        time.sleep(0.15)
        worker.handle(worker.queue.reclaim("w1", 100, 10))
    record = stored(store, image_id)
    assert (record.status, record.decodes) == (Status.DONE, 1)
    assert worker.queue.dead_letters() == [] and worker.queue.backlog().pending == 0


def test_a_group_that_raises_strands_nothing(store: SqlMetadataStore, tmp_path: Path, redis_url: str) -> None:
    """The image of another size delivered with it is not claimed with it (a claim in turns holds one
    size), and both are decoded with the entries' next delivery."""
    blobs = FlakyBlobs(tmp_path / "blobs")
    blobs.error = RuntimeError("unexpected")  # escapes DecodeWorker.process
    worker, _ = _worker(store, blobs, redis_url, max_attempts=3)
    first, second = _upload(store, blobs, 48, 32), _upload(store, blobs, 64, 32)  # two sizes: two groups
    for image_id in (first, second):
        worker.queue.publish(image_id)
    blobs.failures = 1
    with pytest.raises(RuntimeError):
        worker.handle(worker.queue.read("w1", 4, 50))
    assert stored(store, first).status is Status.PENDING  # handed back, retried later
    record = stored(store, second)
    assert (record.status, record.attempts) == (Status.PENDING, 0)
    carried = worker.handle(worker.queue.reclaim("w1", 0, 10))
    for _ in range(5):  # as `run` carries them (turns stop after reclaim_after_s / 4, here 25 ms)
        carried = worker.handle(carried) if carried else carried
    assert carried == []
    assert [(stored(store, i).status, stored(store, i).decodes) for i in (first, second)] == [(Status.DONE, 1)] * 2
    assert worker.queue.backlog().pending == 0


def _claimed_at(store: SqlMetadataStore, image_id: str) -> float:
    import sqlalchemy as sa
    from aeic.receiver.storage import schema

    with store.engine.connect() as conn:
        return float(conn.execute(sa.select(schema.images.c.claimed_at)
                                  .where(schema.images.c.id == image_id)).scalar_one())


def test_the_heartbeat_refreshes_the_claim_while_redis_is_down(store: SqlMetadataStore, tmp_path: Path,
                                                               redis_url: str) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    worker, _ = _worker(store, blobs, redis_url, reclaim_after_s=0.06)
    image_id = _upload(store, blobs)
    claim = claim_ids(store, [image_id], stale_before=0, max_attempts=3)
    assert claim is not None
    claimed_at = _claimed_at(store, image_id)

    def down(*_args: Any, **_kwargs: Any) -> None:
        raise ConnectionError("redis is down")

    worker.queue.touch = down  # type: ignore[method-assign]
    with worker._heartbeat([], claim.token):
        time.sleep(0.15)
    assert _claimed_at(store, image_id) > claimed_at


def test_reconcile_enqueues_orphans_while_the_stream_is_busy(store: SqlMetadataStore, tmp_path: Path,
                                                             redis_url: str) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    worker, _ = _worker(store, blobs, redis_url)
    orphan = _upload(store, blobs)  # stored, but its enqueue failed (Redis was down)
    busy = _upload(store, blobs)
    worker.queue.publish(busy)
    worker.queue.read("w1", 4, 50)  # delivered, being decoded: the group has a pending entry
    time.sleep(0.25)
    assert worker.queue.backlog().pending == 1
    assert worker.reconcile() == 1
    assert sorted(worker.queue.queued_image_ids()) == sorted([busy, orphan])
