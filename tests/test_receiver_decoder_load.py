"""A decoder the receiver cannot load (a full-profile package whose AEIC_SD_TURBO_DIR is unset, missing, or holds
other base weights) is the receiver's configuration, not the images' fault.

Was: `serve` answered /readyz 200 ("models": "ok"), accepted every upload, and failed each image for good after
its attempts ("could not load the decoder ... FileNotFoundError"), so fixing the setting and restarting left
them failed."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry, DecoderLike
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import FilesystemBlobStore, NewImage, SqlMetadataStore, Status
from aeic.receiver.storage.blobs import bitstream_key
from aeic.receiver.worker import DecodeWorker, WorkerConfig
from fastapi.testclient import TestClient
from receiver_support import TEST_MODEL_ID, FakeCodec, make_bitstream, make_tokens

MISSING = "the full profile needs AEIC_SD_TURBO_DIR: a local SD-Turbo diffusers folder"


class Loader:
    """A decoder loader that fails, as the full profile's does without its SD-Turbo folder, until `fixed`."""

    def __init__(self) -> None:
        self.fixed = False
        self.calls = 0

    def __call__(self) -> DecoderLike:
        self.calls += 1
        if not self.fixed:
            raise FileNotFoundError(MISSING)
        return FakeCodec()


def test_an_image_waits_for_a_decoder_that_cannot_be_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It is retried (with the capped backoff) until the decoder loads; the log has the load's traceback once,
    then a line a retry, not a 30-line traceback every time."""
    store = SqlMetadataStore.from_url(f"sqlite:///{tmp_path / 'receiver.db'}")
    store.migrate()
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    loader = Loader()
    worker = DecodeWorker(store, blobs, CodecRegistry({TEST_MODEL_ID: loader}),
                          WorkerConfig(batch_size=4, max_attempts=3, retry_delay_s=0.0))
    data = make_bitstream()
    blobs.put(bitstream_key("a" * 32), data)
    store.insert_image(NewImage(id="a" * 32, device="cam", idempotency_key=None, model_id=TEST_MODEL_ID.hex(),
                                width=48, height=32, rate_index=0, bytes=len(data), sha256="0" * 64))
    with caplog.at_level(logging.WARNING, logger="aeic.receiver.worker"):
        for _ in range(5):  # more rounds than its attempts
            assert worker.run_once()
    loads = [r for r in caplog.records if r.getMessage().startswith("could not load the decoder")]
    assert [r.exc_info is not None for r in loads] == [True, False, False, False, False]
    assert loads[1].getMessage() == f"could not load the decoder for model {TEST_MODEL_ID.hex()} again: " \
                                    f"FileNotFoundError: {MISSING}"
    record = store.get_image("a" * 32)
    assert record is not None and record.status is Status.PENDING, record
    assert record.error == f"could not load the decoder for model {TEST_MODEL_ID.hex()}: FileNotFoundError"
    assert loader.calls == 5
    loader.fixed = True  # the operator sets AEIC_SD_TURBO_DIR and restarts (here: the loader now succeeds)
    assert worker.run_once()
    record = store.get_image("a" * 32)
    assert record is not None and record.status is Status.DONE, record


def test_readiness_names_a_decoder_that_cannot_be_loaded(tmp_path: Path) -> None:
    """Not ready while the worker cannot load a model's decoder, so a load balancer stops sending uploads
    there (the devices keep them); the reason is the type, not the message (it names paths)."""
    settings = ReceiverSettings(data_dir=tmp_path / "data", poll_interval_s=0.05)
    make_tokens(settings, "cam1")
    loader = Loader()
    with TestClient(create_app(settings, registry=CodecRegistry({TEST_MODEL_ID: loader}))) as client:
        deadline = time.monotonic() + 10
        while loader.calls == 0 and time.monotonic() < deadline:  # the worker's preload
            time.sleep(0.02)
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.json()
        assert ready.json()["checks"]["models"] == (
            f"error: the decoder of model {TEST_MODEL_ID.hex()} cannot be loaded (FileNotFoundError)")
        assert "AEIC_SD_TURBO_DIR" not in ready.text
        loader.fixed = True
        client.app.state.receiver.registry.get(TEST_MODEL_ID)  # loaded now (as the next job would)
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["models"] == "ok", ready.json()
