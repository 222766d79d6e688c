"""Orphan objects in a scale-out S3 bucket (a process killed between a blob and its row, or a delete between
its row and its objects) are swept as the embedded receiver's orphan files are."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import scaleout_support
from aeic.receiver.storage import SqlMetadataStore
from aeic.receiver.storage.blobs import bitstream_key, reconstruction_key, thumbnail_key
from aeic.receiver.storage.orphans import BlobSweeper, remove_orphan_blobs
from receiver_support import new_image

pytest.importorskip("boto3", reason="boto3 is not installed (scale extra)")

from aeic.receiver.storage.s3 import S3BlobStore

s3_server = scaleout_support.s3_server


@pytest.fixture()
def s3(s3_server: str) -> S3BlobStore:
    store = S3BlobStore.from_url(f"s3://aeic-{secrets.token_hex(4)}/blobs", endpoint_url=s3_server)
    store.ensure_bucket()
    return store


@pytest.fixture()
def store(tmp_path: Path) -> SqlMetadataStore:
    store = SqlMetadataStore.from_url(f"sqlite:///{tmp_path / 'receiver.db'}")
    store.migrate()
    return store


def test_objects_of_no_image_older_than_the_grace_are_deleted(s3: S3BlobStore, store: SqlMetadataStore) -> None:
    """Was: nothing listed the bucket, so they stayed for good (the filesystem store alone was swept)."""
    kept = store.insert_image(new_image(1))[0].id
    orphan = new_image(2).id
    for image_id in (kept, orphan):
        s3.put(bitstream_key(image_id), b"\x00aeic")
        s3.put(thumbnail_key(image_id), b"jpeg")
    s3.put(reconstruction_key(orphan), b"png")
    s3.client.put_object(Bucket=s3.bucket, Key="blobs/bitstreams/notes.txt", Body=b"an operator's")
    assert remove_orphan_blobs(store, s3) == 0  # all younger than the grace: a row may be about to come
    assert remove_orphan_blobs(store, s3, grace_s=-60) == 3
    listed = sorted(o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket)["Contents"])
    assert listed == sorted(["blobs/bitstreams/notes.txt", f"blobs/{bitstream_key(kept)}",
                             f"blobs/{thumbnail_key(kept)}"])


def test_the_sweeper_runs_over_the_bucket(s3: S3BlobStore, store: SqlMetadataStore) -> None:
    """The scale-out worker's sweeper: no temporary files to look for on S3, the orphans are."""
    s3.put(bitstream_key(new_image(3).id), b"\x00aeic")
    BlobSweeper(store, s3, orphans=True, grace_s=-60).sweep()
    assert "Contents" not in s3.client.list_objects_v2(Bucket=s3.bucket)


def test_the_scale_out_worker_sweeps_the_bucket_while_it_runs(
        tmp_path: Path, s3: S3BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """`aeic-receiver worker` runs the sweeper beside its decode loop and stops it with the loop; API
    replicas (`serve --no-worker`) do not sweep, so without this nothing did."""
    import signal
    import threading

    from aeic.receiver import stream_worker
    from aeic.receiver.settings import ReceiverSettings

    seen: list[str] = []

    def run(_worker: object, _stop: threading.Event) -> None:
        seen.extend(thread.name for thread in threading.enumerate())

    monkeypatch.setattr(stream_worker.StreamWorker, "run", run)
    settings = ReceiverSettings(data_dir=tmp_path / "data", queue="redis://127.0.0.1:9/0",
                                blob_url=f"s3://{s3.bucket}/blobs", s3_endpoint_url=s3.client.meta.endpoint_url)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert stream_worker.run_worker(settings, consumer="w1") == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # given back
    assert "aeic-blob-sweeper" in seen
    assert "aeic-blob-sweeper" not in {thread.name for thread in threading.enumerate()}


def test_serve_with_its_worker_on_a_bucket_sweeps_it_and_an_api_replica_does_not(
        tmp_path: Path, s3: S3BlobStore) -> None:
    from aeic.receiver.api import create_app
    from aeic.receiver.registry import CodecRegistry
    from aeic.receiver.settings import ReceiverSettings
    from fastapi.testclient import TestClient
    from receiver_support import FakeCodec

    for worker, swept in ((True, True), (False, False)):
        settings = ReceiverSettings(data_dir=tmp_path / f"data-{worker}", blob_url=f"s3://{s3.bucket}/blobs",
                                    s3_endpoint_url=s3.client.meta.endpoint_url, worker=worker)
        app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))
        with TestClient(app):
            sweeper = app.state.receiver.sweeper
            assert (sweeper is not None and sweeper.orphans) is swept


def test_the_sweep_deletes_as_it_lists_rather_than_holding_the_whole_listing(store: SqlMetadataStore) -> None:
    """Was: every key of a kind was listed into memory before the first lookup (a million bitstreams, some
    100 MB of strings in the worker); now a chunk of 500 at a time."""
    listed: list[str] = []
    listed_at_first_delete: list[int] = []

    class Listing:
        def keys_written_before(self, kind: str, before: float) -> Iterator[str]:
            for n in range(1200 if kind == "bitstreams" else 0):
                listed.append(key := bitstream_key(new_image(100 + n).id))
                yield key

        def delete(self, key: str) -> bool:
            if not listed_at_first_delete:
                listed_at_first_delete.append(len(listed))
            return True

    assert remove_orphan_blobs(store, Listing()) == 1200
    assert listed_at_first_delete == [500]


def test_a_stop_ends_a_long_sweep_between_chunks(store: SqlMetadataStore) -> None:
    """Was: a stop was looked at only before the sweep began, so a worker stopped during the walk of a large
    bucket closed its database under the sweep, which failed with a traceback in its last log lines."""
    deleted: list[str] = []

    class Listing:
        def keys_written_before(self, kind: str, before: float) -> Iterator[str]:
            for n in range(1200 if kind == "bitstreams" else 0):
                yield bitstream_key(new_image(100 + n).id)

        def delete(self, key: str) -> bool:
            deleted.append(key)
            if len(deleted) == 10:
                sweeper.stop()  # the worker is asked to stop while the first chunk is deleted
            return True

    sweeper = BlobSweeper(store, Listing(), orphans=True)
    sweeper.sweep()
    assert len(deleted) == 500
