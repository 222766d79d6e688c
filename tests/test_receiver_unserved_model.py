"""Images of a model the receiver no longer serves (its package was taken out of `model_packages`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import Status
from aeic.receiver.worker import DecodeWorker, WorkerConfig
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, make_bitstream, make_tokens


def test_an_image_of_a_model_no_longer_served_waits_with_a_reason_and_no_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Was: each retry logged a KeyError traceback and the image's error said 'could not load the decoder
    for model 54535431: KeyError'. It still waits (pending, no attempt used up) for the package to be served
    again, and says so."""
    settings = ReceiverSettings(data_dir=tmp_path / "data", worker=False)
    tokens = make_tokens(settings, "cam1")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        image_id = client.post("/v1/images", content=make_bitstream(), headers={
            "Authorization": f"Bearer {tokens['cam1']}", "Content-Type": "application/octet-stream"}).json()["id"]
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec(b"OTHR")]))
    with TestClient(app):
        state = app.state.receiver
        worker = DecodeWorker(state.store, state.blobs, state.registry, WorkerConfig(retry_delay_s=0.0))
        with caplog.at_level(logging.WARNING):
            assert [worker.run_once() for _ in range(3)] == [1, 1, 1]
        record = state.store.get_image(image_id)
    assert record is not None and record.status is Status.PENDING
    assert record.error == ("model 54535431 is not served by this receiver: the image waits until its package "
                            "is served again (model_packages, --model), or is deleted")
    assert not [r for r in caplog.records if r.exc_info], "a traceback for a configuration, not a fault"
    assert sum("model 54535431 is not served" in r.getMessage() for r in caplog.records) == 3
