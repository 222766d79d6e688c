"""Today's receiver changes on the scale-out path (real PostgreSQL and Redis): a gallery session opened on
one API replica works on another and signing out on either ends it on both; a stream the decoder refuses
for good (a picture over the decode limits, stored before the API checked them; a corrupt payload) is
failed on its first attempt and dead-lettered once, with nothing left to come back."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import receiver_support
import scaleout_support
from aeic.receiver.storage import FilesystemBlobStore, NewImage, SqlMetadataStore, Status
from aeic.receiver.storage.blobs import bitstream_key
from receiver_support import FakeCodec, ServerThread, stored

pytest.importorskip("redis", reason="redis is not installed (scale extra)")

from aeic.receiver.api import create_app
from aeic.receiver.auth import create_device_token
from aeic.receiver.queue import JobQueue
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.stream_worker import StreamWorker, StreamWorkerConfig
from aeic.receiver.worker import DecodeWorker, WorkerConfig

redis_server, redis_url = scaleout_support.redis_server, scaleout_support.redis_url
postgres_server, postgres_url = receiver_support.postgres_server, receiver_support.postgres_url
tiny_package = receiver_support.tiny_package

ADMIN = "replicas-admin-token-0123456789"


def test_a_session_opened_on_one_replica_works_and_ends_on_every_replica(
        tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    apps = [create_app(ReceiverSettings(data_dir=tmp_path / f"api{i}", database_url=postgres_url, queue=redis_url,
                                        admin_token=ADMIN), registry=CodecRegistry.from_codecs([FakeCodec()]))
            for i in (1, 2)]
    with ServerThread(apps[0]) as one, ServerThread(apps[1]) as two:
        token = create_device_token(apps[0].state.receiver.store, "cam-1")
        for who in (ADMIN, token):
            signed_in = httpx.post(f"{one.url}/login", data={"token": who}, headers={"Origin": one.url})
            assert signed_in.status_code == 303, signed_in.text
            cookie = {"aeic_session": signed_in.cookies["aeic_session"]}
            assert [httpx.get(f"{u}/v1/images", cookies=cookie).status_code for u in (one.url, two.url)] == [200, 200]
            signed_out = httpx.post(f"{two.url}/logout", cookies=cookie, headers={"Origin": two.url})
            assert signed_out.status_code == 303
            assert [httpx.get(f"{u}/v1/images", cookies=cookie).status_code for u in (one.url, two.url)] == [401, 401]


def _store_stream(store: SqlMetadataStore, blobs: FilesystemBlobStore, data: bytes) -> str:
    """An upload as an API stores it (directly: the API would refuse the oversize one today)."""
    from aeic.shared.bitstream import peek_header

    header = peek_header(data)
    image_id = secrets.token_hex(16)
    blobs.put(bitstream_key(image_id), data)
    store.insert_image(NewImage(id=image_id, device="cam", idempotency_key=None, model_id=header.model_id.hex(),
                                width=header.width, height=header.height, rate_index=header.rate_index,
                                bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                downscale=header.downscale))
    return image_id


def test_a_stream_the_decoder_refuses_is_dead_lettered_once(
        tmp_path: Path, tiny_package: Path, postgres_url: str, redis_url: str) -> None:
    from aeic.sender.encoder import SenderCodec
    from aeic.shared.bitstream import Bitstream, pack, unpack

    store = SqlMetadataStore.from_url(postgres_url)
    store.migrate()
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    good = SenderCodec.from_package(tiny_package).encode(receiver_support.natural_photo(64, 64, 0), 0)
    parsed = unpack(good)
    oversize = pack(Bitstream(dataclasses.replace(parsed.header, width=8192, height=8192), parsed.payload))
    corrupt = pack(Bitstream(parsed.header, secrets.token_bytes(len(parsed.payload))))
    ids = {name: _store_stream(store, blobs, data)
           for name, data in (("good", good), ("oversize", oversize), ("corrupt", corrupt))}
    queue = JobQueue.from_url(redis_url)
    queue.ensure_group()
    decoder = DecodeWorker(store, blobs, CodecRegistry.from_packages([tiny_package], "cpu"),
                           WorkerConfig(batch_size=4, max_attempts=3, retry_delay_s=0.0))
    worker = StreamWorker(store, queue, decoder, StreamWorkerConfig(
        consumer="w1", batch_size=4, max_attempts=3, reclaim_after_s=0.2, block_ms=50, reconcile_every_s=0.2))
    try:
        for image_id in ids.values():
            queue.publish(image_id)
        carried = worker.handle(queue.read("w1", 10, 50))
        for _ in range(10):  # into the next delivery, as `run` carries them (turns stop after 50 ms here)
            carried = worker.handle(carried) if carried else carried
        assert carried == []
        time.sleep(0.3)
        assert queue.reclaim("w1", 200, 10) == []  # settled at once: nothing left to come back
        assert worker.reconcile() == 0  # nothing failed is ever re-enqueued
        records = {name: stored(store, image_id) for name, image_id in ids.items()}
        assert (records["good"].status, records["good"].decodes) == (Status.DONE, 1)
        for name in ("oversize", "corrupt"):
            assert (records[name].status, records[name].attempts, records[name].decodes) == (Status.FAILED, 1, 0)
        too_large, undecodable = records["oversize"].error, records["corrupt"].error
        assert too_large is not None and "ImageTooLargeError" in too_large
        assert undecodable is not None and "EntropyDecodeError" in undecodable
        dead = Counter(d["image"] for d in queue.dead_letters())
        assert dead == {ids["oversize"]: 1, ids["corrupt"]: 1}
        backlog = queue.backlog()
        assert (backlog.lag, backlog.pending) == (0, 0)
    finally:
        queue.close()
        store.close()
