"""Receiver storage on SQLite and on a real PostgreSQL server: migrations, idempotency, claiming,
retries, crash recovery, paging; plus atomic blob files."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import receiver_support
import sqlalchemy as sa
from aeic.receiver.storage import (
    BlobNotFoundError,
    DecodeTimings,
    FilesystemBlobStore,
    IdempotencyConflictError,
    ImageFilter,
    InvalidCursorError,
    SqlMetadataStore,
    Status,
)
from aeic.receiver.storage.migrations import MIGRATIONS, current_version
from receiver_support import new_image, store_left_at, stored

# Fixtures shared with the other receiver tests.
database_url = receiver_support.database_url
postgres_server = receiver_support.postgres_server
postgres_url = receiver_support.postgres_url
store = receiver_support.store


TIMINGS = DecodeTimings(entropy_ms=1.5, decoder_ms=20.0, total_ms=21.5, batch_size=2)


def test_migrate_is_idempotent_and_versioned(store: SqlMetadataStore) -> None:
    assert store.migrate() == MIGRATIONS[-1].version
    with store.engine.connect() as conn:
        assert current_version(conn) == MIGRATIONS[-1].version
        assert {"images", "device_tokens"} <= set(sa.inspect(conn).get_table_names())


def test_a_v2_database_gains_the_coding_downscale(tmp_path: Path) -> None:
    """Rows stored before the container carried a downscale read back as coded whole."""
    record = store_left_at(f"sqlite:///{tmp_path / 'v2.db'}", 2, "ALTER TABLE images DROP COLUMN downscale",
                           image=new_image(7))
    store = SqlMetadataStore.from_url(f"sqlite:///{tmp_path / 'v2.db'}")
    assert store.migrate() == MIGRATIONS[-1].version
    assert stored(store, record.id).downscale == 1
    halved, _ = store.insert_image(dataclasses.replace(new_image(8), downscale=2))
    assert stored(store, halved.id).downscale == 2


def test_insert_get_and_bpp(store: SqlMetadataStore) -> None:
    record, created = store.insert_image(new_image(1))
    assert created and record.status is Status.PENDING and record.attempts == 0
    assert record.bpp == pytest.approx(101 * 8 / (64 * 48))
    assert store.get_image(record.id) == record
    assert store.get_image("f" * 32) is None


def test_idempotency_key_is_per_device(store: SqlMetadataStore) -> None:
    first, created = store.insert_image(new_image(1, key="k1"))
    again, created_again = store.insert_image(new_image(2, key="k1"))
    assert created and not created_again and again.id == first.id
    other, other_created = store.insert_image(new_image(3, device="cam2", key="k1"))
    assert other_created and other.id != first.id
    with pytest.raises(IdempotencyConflictError) as info:
        store.insert_image(new_image(4, key="k1", sha="b" * 64))
    assert info.value.existing.id == first.id


def test_claim_batches_same_model_and_size_oldest_first(store: SqlMetadataStore) -> None:
    store.insert_image(new_image(1, size=(64, 48)))
    store.insert_image(new_image(2, size=(32, 32)))
    store.insert_image(new_image(3, size=(64, 48)))
    store.insert_image(new_image(4, size=(64, 48)))
    claim = store.claim_batch(batch_size=2)
    assert claim is not None
    assert [r.id for r in claim.records] == [f"{1:032x}", f"{3:032x}"]
    assert all(r.status is Status.DECODING and r.attempts == 1 for r in claim.records)
    second = store.claim_batch(batch_size=8)
    assert second is not None and [r.id for r in second.records] == [f"{2:032x}"]
    third = store.claim_batch(batch_size=8)
    assert third is not None and [r.id for r in third.records] == [f"{4:032x}"]
    assert store.claim_batch(batch_size=8) is None


def test_complete_records_timings_and_requires_the_claim(store: SqlMetadataStore) -> None:
    store.insert_image(new_image(1))
    claim = store.claim_batch(4)
    assert claim is not None
    image_id = claim.records[0].id
    assert not store.complete(image_id, "wrong-token", TIMINGS)
    assert store.complete(image_id, claim.token, TIMINGS)
    done = store.get_image(image_id)
    assert done is not None and done.status is Status.DONE
    assert (done.entropy_ms, done.decoder_ms, done.decode_ms, done.batch_size) == (1.5, 20.0, 21.5, 2)
    assert done.decoded_at is not None
    assert not store.complete(image_id, claim.token, TIMINGS)


def test_failures_retry_after_delay_then_fail_with_reason(store: SqlMetadataStore) -> None:
    store.insert_image(new_image(1))
    now = time.time()
    for attempt in (1, 2):
        claim = store.claim_batch(4, now=now)
        assert claim is not None and claim.records[0].attempts == attempt
        assert store.fail_attempt(claim.records[0].id, claim.token, f"boom {attempt}", 3, retry_at=now + 10)
        record = store.get_image(claim.records[0].id)
        assert record is not None and record.status is Status.PENDING and record.error == f"boom {attempt}"
        assert store.claim_batch(4, now=now) is None  # not due yet
        now += 11
    claim = store.claim_batch(4, now=now)
    assert claim is not None
    store.fail_attempt(claim.records[0].id, claim.token, "boom 3", 3, retry_at=now + 10)
    record = store.get_image(claim.records[0].id)
    assert record is not None and record.status is Status.FAILED and record.error == "boom 3"
    assert record.attempts == 3
    assert store.claim_batch(4, now=now + 1000) is None


def test_requeue_after_crash_is_bounded(store: SqlMetadataStore) -> None:
    store.insert_image(new_image(1))
    store.insert_image(new_image(2, size=(8, 8)))
    first = store.claim_batch(4)
    assert first is not None
    assert store.requeue_abandoned(max_attempts=3) == 1
    assert store.get_image(first.records[0].id).status is Status.PENDING  # type: ignore[union-attr]
    # The claim of the dead worker is void.
    assert not store.complete(first.records[0].id, first.token, TIMINGS)
    # An image that kills the worker on its last attempt ends failed, not in a crash loop.
    claim = store.claim_batch(4)
    assert claim is not None
    assert store.requeue_abandoned(max_attempts=1) == 1
    failed = store.get_image(claim.records[0].id)
    assert failed is not None and failed.status is Status.FAILED and "worker stopped" in (failed.error or "")


def test_a_released_claim_is_pending_again_without_the_attempt(store: SqlMetadataStore) -> None:
    store.insert_image(new_image(1))
    store.insert_image(new_image(2))
    claim = store.claim_batch(4)
    assert claim is not None and len(claim.records) == 2
    assert store.complete(claim.records[0].id, claim.token, TIMINGS)
    assert store.release_claim(claim.token, "requeued: stopping") == 1  # only the unfinished one
    record = store.get_image(claim.records[1].id)
    assert record is not None and record.status is Status.PENDING and record.attempts == 0
    assert record.error == "requeued: stopping"
    assert not store.complete(claim.records[1].id, claim.token, TIMINGS)  # the released claim is void
    assert store.get_image(claim.records[0].id).status is Status.DONE  # type: ignore[union-attr]


def test_concurrent_claims_never_share_a_job(store: SqlMetadataStore) -> None:
    for n in range(40):
        store.insert_image(new_image(n))
    seen: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while (claim := store.claim_batch(3)) is not None:
            with lock:
                seen.extend(r.id for r in claim.records)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(f"{n:032x}" for n in range(40))


def test_list_pages_newest_first_with_filters(store: SqlMetadataStore) -> None:
    for n in range(7):
        store.insert_image(new_image(n, device="cam1" if n % 2 == 0 else "cam2"))
    page = store.list_images(ImageFilter(), limit=3, cursor=None)
    ids = [r.id for r in page.items]
    while page.next:
        page = store.list_images(ImageFilter(), limit=3, cursor=page.next)
        ids += [r.id for r in page.items]
    assert ids == [f"{n:032x}" for n in reversed(range(7))]
    cam2 = store.list_images(ImageFilter(device="cam2"), limit=10, cursor=None)
    assert [r.id for r in cam2.items] == [f"{n:032x}" for n in (5, 3, 1)] and cam2.next is None
    everything = store.list_images(ImageFilter(), limit=10, cursor=None).items
    middle = everything[3].created_at
    newer = store.list_images(ImageFilter(since=middle), limit=10, cursor=None).items
    assert {r.id for r in newer} == {r.id for r in everything if r.created_at >= middle}
    older = store.list_images(ImageFilter(until=middle), limit=10, cursor=None).items
    assert {r.id for r in older} == {r.id for r in everything if r.created_at < middle}
    pending = store.list_images(ImageFilter(status=Status.DONE), limit=10, cursor=None)
    assert pending.items == []
    with pytest.raises(InvalidCursorError):
        store.list_images(ImageFilter(), limit=3, cursor="not-a-cursor")


def test_delete_and_counts(store: SqlMetadataStore) -> None:
    store.insert_image(new_image(1))
    store.insert_image(new_image(2))
    assert store.status_counts()[Status.PENDING] == 2
    deleted = store.delete_image(f"{1:032x}")
    assert deleted is not None and deleted.id == f"{1:032x}"
    assert store.delete_image(f"{1:032x}") is None
    assert store.status_counts() == {Status.PENDING: 1, Status.DECODING: 0, Status.DONE: 0, Status.FAILED: 0}


def test_device_tokens(store: SqlMetadataStore) -> None:
    store.add_device_token("cam1", "h" * 64)
    assert store.device_for_token("h" * 64) == "cam1"
    assert store.device_for_token("x" * 64) is None
    assert store.revoke_device_tokens("cam1") == 1
    assert store.device_for_token("h" * 64) is None
    store.add_device_token("cam1", "i" * 64)
    store.add_device_token("barn", "j" * 64)
    counts = store.device_token_counts()  # `aeic-receiver token list`, on both engines
    assert [(device, active, revoked) for device, active, revoked, _ in counts] == [("barn", 1, 0), ("cam1", 1, 1)]
    assert all(abs(made - time.time()) < 60 for *_, made in counts)


def test_blob_store_atomic_roundtrip(tmp_path: Path) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    key = "bitstreams/ab/abcdef.aeic"
    blobs.put(key, b"one")
    blobs.put(key, b"two")
    assert blobs.get(key) == b"two" and blobs.exists(key)
    assert [p.name for p in (tmp_path / "blobs" / "bitstreams" / "ab").iterdir()] == ["abcdef.aeic"]
    (tmp_path / "blobs" / "bitstreams" / "ab" / ".tmp-abcdef.aeic.1234").write_bytes(b"torn")
    assert blobs.remove_stale_tmp() == 1
    assert blobs.delete(key) and not blobs.delete(key)
    with pytest.raises(BlobNotFoundError):
        blobs.get(key)
    with pytest.raises(ValueError):
        blobs.put("../escape.aeic", b"x")


def test_orphan_sweep_removes_only_old_files_of_no_image(store: SqlMetadataStore, tmp_path: Path) -> None:
    """A kill between a blob and its row (upload) or between a row and its blobs (delete) leaves files of no
    image; the sweep removes them once older than the grace, never a living image's or a fresh one's."""
    import os

    from aeic.receiver.storage.blobs import bitstream_key, reconstruction_key, thumbnail_key
    from aeic.receiver.storage.orphans import remove_orphan_blobs

    blobs = FilesystemBlobStore(tmp_path / "blobs")
    living, deleted, unstored, fresh = (f"{n:032x}" for n in (1, 2, 3, 4))
    for image_id in (living, deleted):
        store.insert_image(new_image(int(image_id, 16)))
        for key in (bitstream_key(image_id), reconstruction_key(image_id), thumbnail_key(image_id)):
            blobs.put(key, b"x")
    store.delete_image(deleted)  # killed before its files went
    blobs.put(bitstream_key(unstored), b"x")  # killed before its row was inserted
    blobs.put(bitstream_key(fresh), b"x")  # another writer's upload, row not yet inserted
    old = time.time() - 3600
    for path in (tmp_path / "blobs").rglob("*.*"):
        if fresh not in path.name:
            os.utime(path, (old, old))
    assert remove_orphan_blobs(store, blobs, grace_s=60) == 4
    left = sorted(p.name for p in (tmp_path / "blobs").rglob("*.*"))
    assert left == sorted([f"{living}.aeic", f"{living}.png", f"{living}.jpg", f"{fresh}.aeic"])
    assert remove_orphan_blobs(store, blobs, grace_s=60) == 0
