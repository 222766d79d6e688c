"""The filesystem store's sweep of orphan blobs and dead writers' temporaries runs in the background, at start
and again once the grace has passed: run only at start, a receiver restarted at once after a kill kept that
kill's orphans (all younger than the grace) until its next restart, and its start waited for the walk."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import FilesystemBlobStore, SqlMetadataStore
from aeic.receiver.storage import orphans as orphans_module
from aeic.receiver.storage.blobs import bitstream_key
from aeic.receiver.storage.orphans import BlobSweeper
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, migrated_store, new_image


def _until(condition: Callable[[], bool], within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_orphans_too_young_at_start_go_once_the_grace_has_passed(tmp_path: Path) -> None:
    """An upload's bitstream whose row a kill prevented, seconds before a restart: kept at start (another
    writer's row may be on its way), removed one grace later; a stored image's bitstream stays."""
    with migrated_store(f"sqlite:///{tmp_path / 'receiver.db'}") as store:
        blobs = FilesystemBlobStore(tmp_path / "blobs")
        orphan, living = f"{1:032x}", f"{2:032x}"
        store.insert_image(new_image(2))
        for image_id in (orphan, living):
            blobs.put(bitstream_key(image_id), b"x")
        for path in (tmp_path / "blobs").rglob("*.aeic"):
            old = time.time() - 0.3
            os.utime(path, (old, old))
        sweeper = BlobSweeper(store, blobs, orphans=True, grace_s=1.0, interval_s=3600.0)
        sweeper.start()
        try:
            time.sleep(0.3)
            assert blobs.exists(bitstream_key(orphan)), "taken before its grace"
            assert _until(lambda: not blobs.exists(bitstream_key(orphan)), within_s=5.0)
            assert blobs.exists(bitstream_key(living))
        finally:
            sweeper.stop()


def test_without_orphans_only_temporaries_are_swept(tmp_path: Path) -> None:
    with migrated_store(f"sqlite:///{tmp_path / 'receiver.db'}") as store:
        blobs = FilesystemBlobStore(tmp_path / "blobs")
        blobs.put(bitstream_key(f"{1:032x}"), b"x")
        old = time.time() - 3600
        for path in (tmp_path / "blobs").rglob("*.aeic"):
            os.utime(path, (old, old))
        sweeper = BlobSweeper(store, blobs, orphans=False, grace_s=0.0)
        sweeper.sweep()
        assert blobs.exists(bitstream_key(f"{1:032x}"))


def test_a_failing_sweep_is_logged_and_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SqlMetadataStore.from_url(f"sqlite:///{tmp_path / 'missing' / 'receiver.db'}")  # cannot be opened
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    blobs.put(bitstream_key(f"{1:032x}"), b"x")
    BlobSweeper(store, blobs, orphans=True, grace_s=-1.0).sweep()
    assert "the blob sweep failed" in caplog.text


def test_the_receiver_answers_before_the_start_sweep_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: the app's start-up walked every blob file (about 10 s per million images) before it served."""
    release, entered = threading.Event(), threading.Event()

    def slow_sweep(*_args: object, **_kwargs: object) -> int:
        entered.set()
        release.wait(10)
        return 0

    monkeypatch.setattr(orphans_module, "remove_orphan_blobs", slow_sweep)
    settings = ReceiverSettings(data_dir=tmp_path / "data", poll_interval_s=0.05)
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))
    try:
        with TestClient(app) as client:
            assert entered.wait(5), "no sweep ran at start"
            assert client.get("/healthz").status_code == 200
            release.set()
    finally:
        release.set()


def test_a_file_that_is_no_blob_is_left_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """Was: a stray file in a shard folder (`Thumbs.db`, a `.bak` copy) had its name refused as a key by
    `delete`, which raised out of the sweep: the receiver's start failed with a traceback."""
    with migrated_store(f"sqlite:///{tmp_path / 'receiver.db'}") as store:
        blobs = FilesystemBlobStore(tmp_path / "blobs")
        orphan = bitstream_key("ab" * 16)
        blobs.put(orphan, b"x")
        shard = tmp_path / "blobs" / "bitstreams" / "ab"
        strays = [shard / "Thumbs.db", shard / f"{'ab' * 16}.aeic.bak"]
        for stray in strays:
            stray.write_bytes(b"x")
        for path in shard.iterdir():
            os.utime(path, (1.0, 1.0))
        assert orphans_module.remove_orphan_blobs(store, blobs, grace_s=60) == 1
        assert not blobs.exists(orphan) and all(stray.exists() for stray in strays)
