"""The sender's spool and uploader against the real receiver app (FastAPI + uvicorn on loopback,
real SQLite storage, real auth), decoding with the receiver tests' decoder double so no model is
needed. The full path with the real codecs is tests/test_sender_e2e.py.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from aeic.sender.backoff import Backoff
from aeic.sender.forward import Forwarder
from aeic.sender.spool import Spool
from aeic.sender.uploader import Outcome, Uploader
from sender_support import RealReceiver, make_bitstream

pytest.importorskip("aeic.receiver.api")
pytest.importorskip("uvicorn")
receiver_support = pytest.importorskip("receiver_support")


@pytest.fixture()
def receiver(tmp_path: Path) -> RealReceiver:
    return RealReceiver(tmp_path / "receiver-data", [receiver_support.FakeCodec(model_id=b"TEST")])


def test_receiver_down_then_up_every_image_arrives_exactly_once(
    tmp_path: Path, receiver: RealReceiver
) -> None:
    spool = Spool(tmp_path / "spool")
    keys = [spool.put(make_bitstream(i), source=f"img{i}.jpg").key for i in range(8)]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the receiver comes back after two backoff periods
        sleeps.append(seconds)
        if len(sleeps) == 2:
            receiver.start()

    try:
        with Uploader(receiver.url, receiver.token, timeout=10) as uploader:
            forwarder = Forwarder(spool, uploader, backoff=Backoff(rng=random.Random(2)), sleep=sleep)
            report = forwarder.flush(max_wait=600)
            # The same bitstreams again (e.g. re-sent after a crash): recognised, not stored twice.
            for i in range(8):
                spool.put(make_bitstream(i), source=f"img{i}.jpg")
            again = forwarder.flush(max_wait=600)
        images = receiver.images()
    finally:
        receiver.stop()
    assert report.accepted == 8 and again.accepted == 8 and len(spool) == 0 and len(sleeps) == 2
    assert len(images) == 8 and len({image["id"] for image in images}) == 8
    assert sorted(image["bytes"] for image in images) == sorted(len(make_bitstream(i)) for i in range(8))
    assert len(keys) == 8


def test_uploads_are_decoded_by_the_receiver(tmp_path: Path, receiver: RealReceiver) -> None:
    spool = Spool(tmp_path / "spool")
    spool.put(make_bitstream(1, width=96, height=64))
    with receiver, Uploader(receiver.url, receiver.token) as uploader:
        assert Forwarder(spool, uploader).flush(max_wait=0).accepted == 1
        deadline = time.monotonic() + 20
        while (images := receiver.images())[0]["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, images
            time.sleep(0.05)
    assert images[0]["status"] == "done" and (images[0]["width"], images[0]["height"]) == (96, 64)


def test_receiver_refusals_are_classified(tmp_path: Path, receiver: RealReceiver) -> None:
    from aeic.shared.bitstream import Bitstream, Header, pack

    spool = Spool(tmp_path / "spool")
    good = spool.put(make_bitstream(3)).key
    spool.put(pack(Bitstream(Header(b"XXXX", 64, 48, 0), b"payload")), source="unknown-model.jpg")
    spool.put(make_bitstream(4)[:-3], source="truncated.jpg")
    with receiver:
        with Uploader(receiver.url, "not-a-token") as uploader:
            blocked = Forwarder(spool, uploader).flush(max_wait=0)
        with Uploader(receiver.url, receiver.admin_token) as uploader:
            admin = Forwarder(spool, uploader).flush(max_wait=0)  # uploads need a device token
        with Uploader(receiver.url, receiver.token) as uploader:
            report = Forwarder(spool, uploader).flush(max_wait=0)
        images = receiver.images()
    assert blocked.stopped is not None and blocked.stopped.outcome is Outcome.BLOCKED
    assert blocked.stopped.status == 401
    assert admin.stopped is not None and admin.stopped.status == 403
    assert report.accepted == 1 and report.rejected == 1 and report.set_aside == 1
    [rejected] = spool.rejected()
    assert rejected.source == "truncated.jpg" and rejected.extra["reason"].startswith("HTTP 4")
    [waiting] = spool.pending()  # the receiver may serve its model tomorrow: kept queued, not rejected
    assert waiting.source == "unknown-model.jpg" and waiting.last_error is not None and "unknown_model" in waiting.last_error
    assert len(images) == 1 and images[0]["bytes"] == len(make_bitstream(3)) and good


def test_a_sender_ahead_of_its_receiver_delivers_once_the_receiver_serves_the_model(tmp_path: Path) -> None:
    """A rollout that gives the senders a new model package before the receiver: the photos wait
    in the queue as in an outage, then go by themselves (they all went to rejected/ before)."""
    from aeic.shared.bitstream import Bitstream, Header, pack

    spool = Spool(tmp_path / "spool")
    keys = {spool.put(pack(Bitstream(Header(b"NEW1", 64, 48, 0), bytes([i]) * 40))).key for i in range(3)}
    old = RealReceiver(tmp_path / "receiver-data", [receiver_support.FakeCodec(model_id=b"TEST")])
    with old, Uploader(old.url, old.token) as uploader:
        waiting = Forwarder(spool, uploader, sleep=lambda s: None).flush(max_wait=0)
    assert waiting.stopped is not None and waiting.stopped.outcome is Outcome.RETRY
    assert "unknown_model" in waiting.stopped.detail and "deploy" in waiting.stopped.detail
    assert waiting.rejected == 0 and {item.key for item in spool.pending()} == keys
    upgraded = RealReceiver(
        tmp_path / "receiver-data",
        [receiver_support.FakeCodec(model_id=b"TEST"), receiver_support.FakeCodec(model_id=b"NEW1")],
        port=old.port,
    )
    upgraded.token = old.token
    with upgraded, Uploader(upgraded.url, upgraded.token) as uploader:
        delivered = Forwarder(spool, uploader, sleep=lambda s: None).flush(max_wait=60)
        images = upgraded.images()
    assert delivered.accepted == 3 and len(spool) == 0 and spool.rejected() == []
    assert len(images) == 3
