"""Redis Streams decode queue on a real Redis server, with the metadata store on SQLite and PostgreSQL
and a decoder double: delivery, redelivery of done images, takeover of a dead consumer's entries,
dead-lettering after the last attempt, reconciliation, the API's enqueue, and turns by device (the
database's fair order) however the stream is ordered."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import receiver_support
import scaleout_support
from aeic.receiver.storage import FilesystemBlobStore, NewImage, SqlMetadataStore, Status
from aeic.receiver.storage.blobs import bitstream_key, reconstruction_key
from aeic.receiver.worker import DecodeWorker, WorkerConfig
from aeic.shared.bitstream import peek_header
from receiver_support import TEST_MODEL_ID, FakeCodec, make_bitstream, stored

pytest.importorskip("redis", reason="redis is not installed (scale extra)")

from aeic.receiver.queue import Job, JobQueue
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.stream_worker import StreamWorker, StreamWorkerConfig

redis_server, redis_url = scaleout_support.redis_server, scaleout_support.redis_url
postgres_server, postgres_url = receiver_support.postgres_server, receiver_support.postgres_url
database_url, store = receiver_support.database_url, receiver_support.store


class Node:
    """One consumer wired like `aeic-receiver worker`, with a counting decoder double."""

    def __init__(self, store: SqlMetadataStore, blobs: FilesystemBlobStore, url: str, name: str,
                 reclaim_after_s: float = 30.0, max_attempts: int = 3, codec: FakeCodec | None = None) -> None:
        self.codec = codec or FakeCodec()
        self.queue = JobQueue.from_url(url)
        self.queue.ensure_group()
        decoder = DecodeWorker(store, blobs, CodecRegistry.from_codecs([self.codec]),
                               WorkerConfig(batch_size=4, max_attempts=max_attempts, retry_delay_s=0.0))
        self.worker = StreamWorker(store, self.queue, decoder, StreamWorkerConfig(
            consumer=name, batch_size=4, max_attempts=max_attempts, reclaim_after_s=reclaim_after_s,
            block_ms=50, reconcile_every_s=0.2))
        self.carried: list[Job] = []

    def step(self) -> None:
        """One iteration of `StreamWorker.run` without its reclaim and reconcile: read, handle, and carry
        the unsettled entries into the next delivery."""
        room = 4 - len(self.carried)
        jobs = self.queue.read(self.worker.config.consumer, room, 50) if room > 0 else []
        if jobs or self.carried:
            self.carried = self.worker.handle(self.carried + jobs)


def _upload(store: SqlMetadataStore, blobs: FilesystemBlobStore, payload: bytes = b"\x07\x08",
            device: str = "cam") -> str:
    data = make_bitstream(payload=payload)
    image_id = secrets.token_hex(16)
    blobs.put(bitstream_key(image_id), data)
    store.insert_image(NewImage(id=image_id, device=device, idempotency_key=None, model_id=TEST_MODEL_ID.hex(),
                                width=48, height=32, rate_index=0, bytes=len(data),
                                sha256=hashlib.sha256(data).hexdigest()))
    return image_id


@pytest.fixture()
def blobs(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs")


def test_entries_are_decoded_once_and_redelivery_is_only_acknowledged(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    node = Node(store, blobs, redis_url, "w1")
    ids = [_upload(store, blobs, bytes([i])) for i in range(6)]
    for image_id in ids:
        node.queue.publish(image_id)
    assert node.queue.backlog().lag == 6
    node.step()
    node.step()
    assert all(stored(store, i).status is Status.DONE for i in ids)
    assert all(blobs.exists(reconstruction_key(i)) for i in ids)
    assert sum(node.codec.batches) == 6
    # The same jobs delivered again (a producer retry, a reclaimed entry): no second decode.
    for image_id in ids:
        node.queue.publish(image_id)
    node.step()
    node.step()
    assert sum(node.codec.batches) == 6
    assert [stored(store, i).decodes for i in ids] == [1] * 6
    backlog = node.queue.backlog()
    assert (backlog.lag, backlog.pending) == (0, 0)
    assert node.queue.client.xlen(node.queue.stream) == 0  # acknowledged entries are deleted


def test_a_dead_consumers_entries_are_reclaimed_after_the_timeout(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    image_id = _upload(store, blobs)
    dead = Node(store, blobs, redis_url, "dead", reclaim_after_s=0.3)
    alive = Node(store, blobs, redis_url, "alive", reclaim_after_s=0.3)
    dead.queue.publish(image_id)
    # The dead consumer received the entry and claimed the image, then vanished without acknowledging.
    jobs = dead.queue.read("dead", 4, 50)
    from aeic.receiver.storage.claims import claim_ids

    assert claim_ids(store, [image_id], stale_before=0, max_attempts=3) is not None
    assert alive.queue.reclaim("alive", 300, 10) == []  # not idle long enough yet
    alive.worker.handle(alive.queue.read("alive", 4, 50))  # nothing new for the live consumer
    assert stored(store, image_id).status is Status.DECODING
    time.sleep(0.4)
    reclaimed = alive.queue.reclaim("alive", 300, 10)
    assert [j.entry_id for j in reclaimed] == [j.entry_id for j in jobs]
    alive.worker.handle(reclaimed)
    record = stored(store, image_id)
    assert (record.status, record.attempts, record.decodes) == (Status.DONE, 2, 1)
    assert alive.queue.backlog().pending == 0


def test_an_image_that_keeps_failing_is_dead_lettered_with_its_reason(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    image_id = _upload(store, blobs, b"FAIL-corrupt")
    node = Node(store, blobs, redis_url, "w1", reclaim_after_s=0.1, max_attempts=3)
    node.queue.publish(image_id)
    node.step()
    for _ in range(2):  # each failure leaves the entry pending; it comes back after the idle timeout
        assert stored(store, image_id).status is Status.PENDING
        time.sleep(0.15)
        node.worker.handle(node.queue.reclaim("w1", 100, 10))
    record = stored(store, image_id)
    assert (record.status, record.attempts) == (Status.FAILED, 3)
    assert record.error is not None and "rANS stream ended early" in record.error
    [dead] = node.queue.dead_letters()
    assert dead["image"] == image_id and dead["attempts"] == "3" and "rANS" in dead["reason"]
    assert node.queue.backlog().pending == 0


def test_a_worker_that_died_on_the_last_attempt_fails_the_image(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    from aeic.receiver.storage.claims import claim_ids

    image_id = _upload(store, blobs)
    node = Node(store, blobs, redis_url, "w1", reclaim_after_s=0.1, max_attempts=1)
    node.queue.publish(image_id)
    jobs = node.queue.read("crashed", 4, 50)
    assert claim_ids(store, [image_id], stale_before=0, max_attempts=1) is not None  # then the process died
    time.sleep(0.15)
    node.worker.handle(node.queue.reclaim("w1", 100, 10))
    record = stored(store, image_id)
    assert record.status is Status.FAILED and record.error is not None and "stopped while decoding" in record.error
    assert node.queue.dead_letters()[0]["entry"] == jobs[0].entry_id
    assert node.codec.batches == []


def test_reconcile_enqueues_stored_images_that_have_no_entry(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    node = Node(store, blobs, redis_url, "w1")
    image_id = _upload(store, blobs)  # stored, but the enqueue never happened (Redis was down)
    time.sleep(0.25)
    assert node.worker.reconcile() == 1
    assert node.worker.reconcile() == 0  # locked for reconcile_every_s: one worker at a time
    node.step()
    assert stored(store, image_id).status is Status.DONE


def _wait_done(store: SqlMetadataStore, image_id: str) -> None:
    deadline = time.monotonic() + 20
    while stored(store, image_id).status is not Status.DONE and time.monotonic() < deadline:
        time.sleep(0.05)


def test_worker_loop_survives_a_redis_that_lost_its_data_and_stops_on_request(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    node = Node(store, blobs, redis_url, "w1")
    image_id = _upload(store, blobs)
    node.queue.publish(image_id)
    stop = threading.Event()
    thread = threading.Thread(target=node.worker.run, args=(stop,))
    thread.start()
    _wait_done(store, image_id)
    node.queue.client.flushdb()  # stream and consumer group gone, as after a restart without persistence
    second = _upload(store, blobs, b"\x05")
    node.queue.publish(second)
    _wait_done(store, second)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert stored(store, second).status is Status.DONE


def test_api_enqueues_after_storing_and_accepts_while_redis_is_down(tmp_path: Path, redis_url: str) -> None:
    from aeic.receiver.api import create_app
    from aeic.receiver.auth import create_device_token
    from aeic.receiver.settings import ReceiverSettings

    settings = ReceiverSettings(data_dir=tmp_path, queue=redis_url, admin_token="adm")
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))
    state = app.state.receiver
    assert state.worker is None  # decoding belongs to the worker processes
    with receiver_support.ServerThread(app) as server:
        token = create_device_token(state.store, "cam-1")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        first = httpx.post(f"{server.url}/v1/images", content=make_bitstream(), headers=headers)
        assert first.status_code == 202
        [job] = state.queue.read("probe", 10, 50)
        assert job.image_id == first.json()["id"]
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["checks"]["queue"] == "ok" and "worker" not in ready["checks"]
        import redis

        state.queue.client = redis.Redis(host="127.0.0.1", port=receiver_support.free_port(),
                                         socket_connect_timeout=1)  # Redis is gone
        second = httpx.post(f"{server.url}/v1/images", content=make_bitstream(payload=b"\x09"), headers=headers)
        assert second.status_code == 202  # durable in the database; reconciliation enqueues it later
        assert state.store.get_image(second.json()["id"]).status is Status.PENDING
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        assert 'aeic_uploads_total{outcome="enqueue_failed"} 1.0' in httpx.get(f"{server.url}/metrics").text


def test_worker_command_needs_a_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aeic.receiver.cli import main

    assert main(["worker", "--data", str(tmp_path)]) == 2
    assert "needs a queue" in capsys.readouterr().err


class SlowCodec(FakeCodec):
    delay_s = 1.0

    def decode_batch(self, items: list[bytes]) -> list:
        time.sleep(self.delay_s)
        return super().decode_batch(items)


def test_a_live_worker_with_a_long_batch_keeps_its_jobs(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    busy = Node(store, blobs, redis_url, "busy", reclaim_after_s=0.3)
    busy.codec = SlowCodec()
    busy.worker.decoder.registry = CodecRegistry.from_codecs([busy.codec])
    other = Node(store, blobs, redis_url, "other", reclaim_after_s=0.3)
    image_id = _upload(store, blobs)
    busy.queue.publish(image_id)
    thread = threading.Thread(target=busy.step)
    thread.start()
    time.sleep(0.6)  # twice the reclaim timeout, while the batch is still decoding
    stolen = other.queue.reclaim("other", 300, 10)
    other.worker.handle(stolen)
    thread.join(10)
    assert stolen == [] and other.codec.batches == []
    record = stored(store, image_id)
    assert (record.status, record.attempts, record.decodes) == (Status.DONE, 1, 1)


class OrderCodec(FakeCodec):
    """Records the payloads it is given, in order (those of a batch retried one by one appear twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.payloads: list[bytes] = []

    def decode_batch(self, items: list[bytes]) -> list[np.ndarray]:
        self.payloads.extend(item[peek_header(item).size:-4] for item in items)
        return super().decode_batch(items)


def test_a_burst_from_one_device_does_not_hold_up_another_devices_images(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    """Device a's 20 entries are ahead of device b's 3 in the stream; the worker still decodes in turns by
    device (the database's fair order), so b's images are in the first two batches of 4, not the last."""
    codec = OrderCodec()
    node = Node(store, blobs, redis_url, "w1", codec=codec)
    burst = [_upload(store, blobs, b"a" + bytes([i]), device="a") for i in range(20)]
    late = [_upload(store, blobs, b"b" + bytes([i]), device="b") for i in range(3)]
    for image_id in burst + late:
        node.queue.publish(image_id)
    for _ in range(8):
        node.step()
    assert [stored(store, i).decodes for i in burst + late] == [1] * 23
    assert len(codec.payloads) == 23
    assert [n for n, payload in enumerate(codec.payloads, 1) if payload.startswith(b"b")] == [3, 4, 8]
    backlog = node.queue.backlog()
    assert (backlog.lag, backlog.pending) == (0, 0)
    assert node.queue.client.xlen(node.queue.stream) == 0


def test_turns_by_device_keep_the_stream_guarantees(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    """Decoding in the database's order, a worker still leaves a dead consumer's images alone until the
    timeout and then takes them over (an attempt counted), acknowledges without decoding the entries of
    images it decoded in turns, dead-letters an image after its last attempt, and ends with every entry
    acknowledged and every other image decoded once."""
    from aeic.receiver.storage.claims import claim_ids

    dead = Node(store, blobs, redis_url, "dead", reclaim_after_s=0.3)
    alive = Node(store, blobs, redis_url, "alive", reclaim_after_s=0.3)
    held = [_upload(store, blobs, b"a" + bytes([i]), device="a") for i in range(4)]
    burst = [_upload(store, blobs, b"a" + bytes([i]), device="a") for i in range(4, 12)]
    bad = _upload(store, blobs, b"FAIL-b", device="b")
    late = [_upload(store, blobs, b"b" + bytes([i]), device="b") for i in range(2)]
    for image_id in held + burst + [bad] + late:
        alive.queue.publish(image_id)
    jobs = dead.queue.read("dead", 4, 50)  # the dead consumer read the first four and claimed their images
    assert claim_ids(store, held, stale_before=0, max_attempts=3) is not None
    for _ in range(20):  # until every entry is delivered and none is carried
        alive.step()
        if alive.queue.backlog().lag == 0 and not alive.carried:
            break
    assert all(stored(store, i).status is Status.DONE for i in burst + late)
    assert all(stored(store, i).status is Status.DECODING for i in held)
    time.sleep(0.35)
    reclaimed = alive.queue.reclaim("alive", 300, 16)
    assert {j.entry_id for j in jobs} <= {j.entry_id for j in reclaimed}
    alive.worker.handle(reclaimed)
    for _ in range(3):  # the failing image's entry comes back after each idle timeout until it is failed
        if stored(store, bad).status is Status.FAILED:
            break
        time.sleep(0.35)
        alive.worker.handle(alive.queue.reclaim("alive", 300, 16))
    assert [(stored(store, i).status, stored(store, i).attempts) for i in held] == [(Status.DONE, 2)] * 4
    assert [stored(store, i).decodes for i in held + burst + late] == [1] * 14
    record = stored(store, bad)
    assert (record.status, record.attempts, record.decodes) == (Status.FAILED, 3, 0)
    assert [d["image"] for d in alive.queue.dead_letters()] == [bad]
    assert dead.codec.batches == []
    backlog = alive.queue.backlog()
    assert (backlog.lag, backlog.pending) == (0, 0)
    assert alive.queue.client.xlen(alive.queue.stream) == 0


def test_two_workers_taking_turns_decode_everything_once(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    """Two consumer loops, each claiming the database's next batches while it holds entries: no image is
    decoded twice or left behind, and the stream ends empty."""
    nodes = [Node(store, blobs, redis_url, name) for name in ("w1", "w2")]
    ids = [_upload(store, blobs, bytes([device, i]), device=f"d{device}") for device in range(3) for i in range(8)]
    for image_id in ids:
        nodes[0].queue.publish(image_id)
    stop = threading.Event()
    threads = [threading.Thread(target=node.worker.run, args=(stop,)) for node in nodes]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and nodes[0].queue.client.xlen(nodes[0].queue.stream):
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert [stored(store, i).decodes for i in ids] == [1] * len(ids)
    assert sum(sum(node.codec.batches) for node in nodes) == len(ids)
    assert nodes[0].queue.backlog().pending == 0


def test_turns_stop_at_their_time_budget_and_hand_back_the_unsettled_entries(
        store: SqlMetadataStore, blobs: FilesystemBlobStore, redis_url: str) -> None:
    """A delivery whose image is far down the fair order does not keep the worker in turns until it is
    reached: after `reclaim_after_s / 4` the turns stop (so `run` takes over dead workers' entries and
    reconciles on time) and the entry comes back for `run` to carry into its next delivery."""
    codec = SlowCodec()
    codec.delay_s = 0.05
    node = Node(store, blobs, redis_url, "w1", reclaim_after_s=0.4, codec=codec)
    far = [_upload(store, blobs, b"a" + bytes([i]), device="a") for i in range(8)][-1]
    others = [_upload(store, blobs, b"b" + bytes([i]), device=f"b{i % 4}") for i in range(32)]
    node.queue.publish(far)
    [job] = node.queue.read("w1", 4, 50)
    assert node.worker.handle([job]) == [job]
    assert stored(store, far).status is Status.PENDING
    assert 0 < sum(node.codec.batches) < 32
    assert any(stored(store, i).status is Status.PENDING for i in others)
    assert node.queue.backlog().pending == 1
