"""A decode that hangs (a stuck torch call, a deadlocked thread) past `decode_deadline_s`: its claim is given
up with a failed attempt and its lease no longer renewed, so another worker or the next start decodes the
image (one that hangs every time ends `failed`); liveness (`/healthz`, on the API and beside a queue
worker's metrics) answers 503 so an orchestrator restarts the process; a worker-only process still hung a
grace later exits by itself (Docker restarts only exited containers); a decode that comes back late writes
nothing; a decode within its deadline is untouched. Decoders block on a threading.Event, deadlines are
tiny or measured on a fake clock, and every wait is bounded."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import scaleout_support
import sqlalchemy as sa
import yaml
from aeic.receiver.api import create_app
from aeic.receiver.metrics import ReceiverMetrics
from aeic.receiver.queue import Job, JobQueue
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import FilesystemBlobStore, NewImage, SqlMetadataStore, Status, schema
from aeic.receiver.storage.blobs import bitstream_key, reconstruction_key
from aeic.receiver.stream_worker import StreamWorker, StreamWorkerConfig, serve_metrics_and_health
from aeic.receiver.worker import HUNG_EXIT_STATUS, DecodeWorker, WorkerConfig, decode_allowance
from aeic.shared.decode_limits import decode_cost
from fastapi.testclient import TestClient
from manual_clock import ManualClock
from receiver_support import (
    TEST_MODEL_ID,
    BlockingCodec,
    FakeCodec,
    make_bitstream,
    make_tokens,
    migrated_store,
)

from aeic import __version__
from aeic.local_servers import free_port

redis_server, redis_url = scaleout_support.redis_server, scaleout_support.redis_url

ROOT = Path(__file__).resolve().parents[1]
HUNG = "decode hung: no result within the"


@pytest.fixture()
def meta(tmp_path: Path) -> Iterator[SqlMetadataStore]:
    with migrated_store(f"sqlite:///{tmp_path / 'receiver.db'}") as store:
        yield store


def _upload(meta: SqlMetadataStore, blobs: FilesystemBlobStore, width: int = 48, height: int = 32) -> str:
    data = make_bitstream(width, height, payload=secrets.token_bytes(4))
    image_id = secrets.token_hex(16)
    blobs.put(bitstream_key(image_id), data)
    meta.insert_image(NewImage(id=image_id, device="cam", idempotency_key=None, model_id=TEST_MODEL_ID.hex(),
                               width=width, height=height, rate_index=0, bytes=len(data),
                               sha256=hashlib.sha256(data).hexdigest()))
    return image_id


def _until(condition: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _claimed_at(meta: SqlMetadataStore, image_id: str) -> float | None:
    with meta.engine.connect() as conn:
        return conn.execute(sa.select(schema.images.c.claimed_at).where(schema.images.c.id == image_id)).scalar_one()


def _hung(meta: SqlMetadataStore, image_id: str, status: Status = Status.PENDING) -> Any:
    record = meta.get_image(image_id)
    return record if record is not None and record.status is status and HUNG in (record.error or "") else None


def _in_thread(call: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def _worker(meta: SqlMetadataStore, blobs: FilesystemBlobStore, codec: FakeCodec, **config: Any) -> DecodeWorker:
    values: dict[str, Any] = {"retry_delay_s": 0.0, "lease_s": 0.3, "decode_deadline_s": 0.05, **config}
    clock = values.pop("clock", time.monotonic)
    exit_process = values.pop("exit_process", os._exit)
    return DecodeWorker(meta, blobs, CodecRegistry.from_codecs([codec]), WorkerConfig(**values), clock=clock,
                        exit_process=exit_process)


def test_a_hung_decode_is_given_up_and_fails_liveness_until_it_returns(tmp_path: Path) -> None:
    settings = ReceiverSettings(data_dir=tmp_path / "data", admin_token="a" * 32, poll_interval_s=0.02,
                                retry_delay_s=0.0, reclaim_after_s=0.3, decode_deadline_s=0.05)
    tokens = make_tokens(settings, "cam1")
    codec = BlockingCodec(hold_s=10)
    app = create_app(settings, registry=CodecRegistry.from_codecs([codec]))
    # The embedded worker never ends its process for a hang (it also serves the API, and nothing may be
    # there to restart it): this test's own process lives through the hang.
    assert app.state.receiver.worker.config.exit_when_hung_s is None
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        image_id = client.post("/v1/images", content=make_bitstream(), headers={
            "Authorization": f"Bearer {tokens['cam1']}", "Content-Type": "application/octet-stream"}).json()["id"]
        try:
            assert codec.entered.wait(5)
            store = app.state.receiver.store
            record = _until(lambda: _hung(store, image_id), "the hung batch to be given up")
            assert record.attempts == 1 and "0.05 s deadline" in record.error  # the attempt counts
            health = client.get("/healthz")
            assert health.status_code == 503, health.text
            body = health.json()
            assert body["status"] == "stuck" and "deadline" in body["reason"] and len(body["reason"]) < 100
            assert str(tmp_path) not in health.text
            assert "503" in app.openapi()["paths"]["/healthz"]["get"]["responses"]
        finally:
            codec.release.set()
        # Back from the hang, the worker writes nothing for the abandoned attempt, is alive again, and
        # decodes the image as its next attempt.
        done = _until(lambda: (r := store.get_image(image_id)) is not None and r.status is Status.DONE and r,
                      "the retry to decode")
        assert (done.attempts, done.decodes) == (2, 1)
        assert client.get("/healthz").status_code == 200


def test_an_image_that_hangs_every_time_ends_failed_after_max_attempts(meta: SqlMetadataStore,
                                                                       tmp_path: Path) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    codec = BlockingCodec(hold_s=10)
    image_id = _upload(meta, blobs)
    first, restarted = (_worker(meta, blobs, codec, max_attempts=2) for _ in range(2))
    threads = []
    try:
        threads.append(_in_thread(first.run_once))
        _until(lambda: _hung(meta, image_id), "the first attempt to be given up")
        assert first.stuck() is not None
        threads.append(_in_thread(restarted.run_once))  # another receiver, or this one restarted
        record = _until(lambda: _hung(meta, image_id, Status.FAILED), "the last attempt to fail the image")
        assert record.attempts == 2 and record.error.startswith(HUNG), record.error
    finally:
        codec.release.set()
        for thread in threads:
            thread.join(5)
    record = meta.get_image(image_id)
    assert record is not None and (record.status, record.decodes) == (Status.FAILED, 0)
    assert not blobs.exists(reconstruction_key(image_id))
    assert first.stuck() is None and restarted.stuck() is None


def test_a_decode_returning_after_its_deadline_writes_nothing(meta: SqlMetadataStore, tmp_path: Path) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    late = BlockingCodec(hold_s=10, invert=True)  # other pixels than the new owner's FakeCodec
    image_id = _upload(meta, blobs)
    hung = _worker(meta, blobs, late)
    thread = _in_thread(hung.run_once)
    try:
        _until(lambda: _hung(meta, image_id), "the batch to be given up")
        assert _worker(meta, blobs, FakeCodec()).run_once() == 1  # the new owner
        mine = blobs.get(reconstruction_key(image_id))
    finally:
        late.release.set()
        thread.join(5)
    assert not thread.is_alive()
    record = meta.get_image(image_id)
    assert record is not None and (record.status, record.attempts, record.decodes) == (Status.DONE, 2, 1)
    assert blobs.get(reconstruction_key(image_id)) == mine


def test_past_the_deadline_the_lease_is_no_longer_renewed(meta: SqlMetadataStore, tmp_path: Path) -> None:
    """Even when the give-up cannot be recorded (the database refuses it), the lease runs out, so a peer's
    sweep (or the next start) takes the images over."""
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    codec, clock = BlockingCodec(hold_s=10), ManualClock()
    image_id = _upload(meta, blobs)
    worker = _worker(meta, blobs, codec, lease_s=0.15, decode_deadline_s=30.0, clock=clock)
    thread = _in_thread(worker.run_once)
    try:
        assert codec.entered.wait(5)
        claimed = _claimed_at(meta, image_id)
        _until(lambda: _claimed_at(meta, image_id) != claimed, "the lease to be renewed within the deadline")

        tried = threading.Event()

        def refused(*_args: Any, **_kwargs: Any) -> bool:
            tried.set()
            raise sa.exc.OperationalError("UPDATE images", {}, Exception("database is locked"))

        meta.fail_attempt = refused  # type: ignore[method-assign]
        clock.now += 30.0
        assert worker.stuck() is not None
        assert tried.wait(5)  # the heartbeat thread tried to give up, after any renewal it had begun
        last = _claimed_at(meta, image_id)
        time.sleep(0.2)
        assert _claimed_at(meta, image_id) == last  # four more beats renewed nothing
        del meta.fail_attempt
        assert meta.requeue_abandoned(3, claimed_before=time.time() - 0.15) == 1
        record = meta.get_image(image_id)
        assert record is not None and record.status is Status.PENDING and record.attempts == 1
    finally:
        codec.release.set()
        thread.join(5)
    record = meta.get_image(image_id)
    assert record is not None and (record.status, record.decodes) == (Status.PENDING, 0)


def test_a_decode_within_its_deadline_is_untouched(meta: SqlMetadataStore, tmp_path: Path) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    codec, clock = BlockingCodec(hold_s=10), ManualClock()
    image_ids = [_upload(meta, blobs) for _ in range(2)]
    worker = _worker(meta, blobs, codec, batch_size=2, lease_s=0.15, decode_deadline_s=30.0, clock=clock)
    thread = _in_thread(worker.run_once)
    try:
        assert codec.entered.wait(5)
        clock.now += 59.0  # a batch of two has 60 s
        claimed = _claimed_at(meta, image_ids[0])
        _until(lambda: _claimed_at(meta, image_ids[0]) != claimed, "the lease to be renewed")
        assert worker.stuck() is None and worker.within_deadline()
    finally:
        codec.release.set()
        thread.join(5)
    for image_id in image_ids:
        record = meta.get_image(image_id)
        assert record is not None and (record.status, record.attempts, record.decodes, record.error) == (
            Status.DONE, 1, 1, None)


class FakeQueue:
    """The JobQueue calls a StreamWorker makes while handling a delivery, recorded."""

    def __init__(self) -> None:
        self.touches = 0
        self.acked: list[Job] = []

    def touch(self, consumer: str, jobs: list[Job]) -> None:
        self.touches += 1

    def ack(self, jobs: list[Job]) -> None:
        self.acked += jobs

    def dead_letter(self, job: Job, reason: str, attempts: int) -> None:
        raise AssertionError(f"dead-lettered {job}: {reason}")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_queue_worker_hung_past_its_deadline_lets_its_entries_go_and_fails_healthz(
        meta: SqlMetadataStore, tmp_path: Path) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    codec = BlockingCodec(hold_s=10)
    image_id = _upload(meta, blobs)
    job = Job("1-0", image_id)
    config = StreamWorkerConfig(consumer="w1", max_attempts=3, reclaim_after_s=0.3)
    decoder = _worker(meta, blobs, codec)
    queue = FakeQueue()
    worker = StreamWorker(meta, queue, decoder, config)  # type: ignore[arg-type]
    port = free_port()
    server = serve_metrics_and_health(port, ReceiverMetrics().registry, decoder.stuck, host="127.0.0.1")
    thread = _in_thread(lambda: worker.handle([job]))
    try:
        _until(lambda: _hung(meta, image_id), "the batch to be given up")
        touches = queue.touches
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 503 and json.loads(body)["status"] == "stuck" and "deadline" in json.loads(body)["reason"]
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        time.sleep(0.25)
        assert queue.touches == touches  # the entry idles, so another consumer's XAUTOCLAIM takes it
    finally:
        codec.release.set()
        thread.join(5)
    assert queue.acked == []  # the late return settles nothing
    assert _get(f"http://127.0.0.1:{port}/healthz") == (200, json.dumps({"status": "ok", "version": __version__}))
    server.shutdown()
    other = StreamWorker(meta, FakeQueue(), _worker(meta, blobs, FakeCodec()), config)  # type: ignore[arg-type]
    other.handle([job])
    record = meta.get_image(image_id)
    assert record is not None and (record.status, record.attempts, record.decodes) == (Status.DONE, 2, 1)


# `aeic-receiver worker`, as compose and Kubernetes run it, with a decoder whose every call blocks (for an
# hour: no test waits that long) in place of the model packages it would load.
HANGING_WORKER = """
import sys
from aeic.receiver import cli
from aeic.receiver.registry import CodecRegistry
from receiver_support import BlockingCodec

hanging = CodecRegistry.from_codecs([BlockingCodec(hold_s=3600.0)])
CodecRegistry.from_packages = lambda *packages_device_tile: hanging
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_worker_process_still_hung_after_the_grace_exits_and_its_images_decode_elsewhere(
        meta: SqlMetadataStore, tmp_path: Path, redis_url: str) -> None:
    """Was: the process stayed hung for good under Docker Compose, whose restart policy acts on exits only
    (the healthcheck just marked the container unhealthy). Now it exits with its own status, the hung image
    pending again (its attempt charged), the image of another size delivered with it uncharged (a claim in
    the fair order takes one size), and their stream entries left to another consumer, which decodes both."""
    data = tmp_path / "data"
    blobs = FilesystemBlobStore(data / "blobs")  # where the worker, with no blob URL, reads bitstreams
    image_id = _upload(meta, blobs)
    waiting_id = _upload(meta, blobs, 64, 48)  # one delivery, its turn after the 48x32 image's
    queue = JobQueue.from_url(redis_url)
    queue.ensure_group()
    queue.publish(image_id)
    queue.publish(waiting_id)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AEIC_")},
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "AEIC_QUEUE": redis_url, "AEIC_DECODE_DEADLINE_S": "0.2", "AEIC_RECLAIM_AFTER_S": "0.3",
           "AEIC_HUNG_EXIT_GRACE_S": "0.2", "AEIC_RETRY_DELAY_S": "0",
           "AEIC_BATCH_SIZE": "2"}  # both entries in one delivery (a CPU worker's default takes one)
    database = f"sqlite:///{tmp_path / 'receiver.db'}"
    try:
        worker = subprocess.run([sys.executable, "-c", HANGING_WORKER, "worker", "--data", str(data),
                                 "--database-url", database, "--consumer", "hung"],
                                check=False, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the hung worker did not exit: {exc.stderr!r}") from None
    assert worker.returncode == HUNG_EXIT_STATUS, worker.stderr
    [line] = [line for line in worker.stderr.splitlines() if "exiting with status" in line]
    assert "CRITICAL" in line and "still hung 0.2 s after its 0.2 s deadline was given up" in line, line
    record = _hung(meta, image_id)
    assert record is not None and (record.attempts, record.decodes) == (1, 0), worker.stderr
    waiting = meta.get_image(waiting_id)
    assert waiting is not None and (waiting.status, waiting.attempts, waiting.error) == (Status.PENDING, 0, None)
    assert queue.backlog().pending == 2  # the entries were never acknowledged
    taker = StreamWorker(meta, queue, _worker(meta, blobs, FakeCodec()), StreamWorkerConfig(
        consumer="next", max_attempts=3, reclaim_after_s=0.3))
    carried = taker.handle(queue.reclaim("next", 0, 10))
    for _ in range(20):  # entries a loaded machine did not reach within a turn's time budget, as `run` carries them
        carried = taker.handle(carried) if carried else carried
    done = [meta.get_image(i) for i in (image_id, waiting_id)]
    assert [(r.status, r.attempts, r.decodes) for r in done if r is not None] == [(Status.DONE, 2, 1),
                                                                                  (Status.DONE, 1, 1)]
    assert queue.backlog().pending == 0
    queue.close()


def test_a_hung_decode_that_returns_within_the_grace_does_not_end_the_process(
        meta: SqlMetadataStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A decode merely slower than its deadline costs its attempt (the claim is gone) but not a restart."""
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    codec = BlockingCodec(hold_s=10)
    image_id = _upload(meta, blobs)
    exits: list[int] = []
    worker = _worker(meta, blobs, codec, exit_when_hung_s=1.0, exit_process=exits.append)
    caplog.set_level(logging.WARNING, logger="aeic.receiver.worker")
    thread = _in_thread(worker.run_once)
    try:
        _until(lambda: _hung(meta, image_id), "the batch to be given up")
    finally:
        codec.release.set()
        thread.join(5)
    _until(lambda: "the worker goes on" in caplog.text, "the grace to end")
    assert exits == []
    assert worker.run_once() == 1  # the retry, in the same process
    record = meta.get_image(image_id)
    assert record is not None and (record.status, record.attempts, record.decodes) == (Status.DONE, 2, 1)


def test_a_batch_is_allowed_the_deadline_per_unit_of_decode_cost() -> None:
    """The deadline counts the units the rate limit and the fair queue charge (`decode_limits.decode_cost`):
    padded coded pixels plus 1/16 of the output pixels, over the same for a 1080p photo coded whole (its
    1080 rows padded to 1152), and at least one per image."""
    def image(width: int, height: int, downscale: int = 1) -> Any:
        return SimpleNamespace(width=width, height=height, downscale=downscale)  # what the sizing reads

    unit = 1920 * 1152 + 1920 * 1080 / 16
    assert decode_allowance([image(1920, 1080)] * 4, 120.0) == 480.0  # four units
    assert decode_allowance([image(64, 48)], 120.0) == 120.0  # a small picture still gets a whole deadline
    # 4K at 1/2 codes the unit's 1920x1080 but puts out four times its pixels.
    assert decode_allowance([image(64, 48), image(3840, 2160, downscale=2)], 120.0) == pytest.approx(
        120.0 * (1 + (1920 * 1152 + 3840 * 2160 / 16) / unit))  # 259.9 s
    square = decode_allowance([image(4096, 4096)], 120.0)
    assert square == pytest.approx(120.0 * (4096 * 4096 + 4096 * 4096 / 16) / unit)  # 913.6 s, cost 7.6
    wide = decode_allowance([image(8192, 8192, downscale=2)], 120.0)  # the same coded pixels, 4x the output
    assert wide == pytest.approx(120.0 * (4096 * 4096 + 8192 * 8192 / 16) / unit) and wide > square  # 1075 s
    most = decode_allowance([image(6144, 4096)], 120.0)  # the largest coded picture
    assert most == pytest.approx(120.0 * (6144 * 4096 + 6144 * 4096 / 16) / unit) and most > wide  # 1370 s
    for width, height, downscale in [(1920, 1080, 2), (3840, 2160, 1), (8192, 256, 1), (8192, 4096, 4)]:
        assert decode_allowance([image(width, height, downscale)], 120.0) == 120.0 * decode_cost(
            height, width, downscale)  # one price for the deadline and the rate limit


def test_liveness_probes_use_the_endpoint_that_reports_a_hung_decode() -> None:
    manifests = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all((ROOT / "deploy/k8s/worker.yaml").read_text())}
    [worker] = manifests["aeic-worker"]["spec"]["template"]["spec"]["containers"]
    probe = worker["livenessProbe"]["httpGet"]
    port = next(p for p in worker["ports"] if p["name"] == probe["port"])["containerPort"]
    assert probe["path"] == "/healthz" and worker["command"][-2:] == ["--metrics-port", str(port)]
    [api] = yaml.safe_load((ROOT / "deploy/k8s/api.yaml").read_text().split("\n---\n")[0])["spec"]["template"][
        "spec"]["containers"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["worker"]
    port_flag = compose["command"][compose["command"].index("--metrics-port") + 1]
    assert f"127.0.0.1:{port_flag}/healthz" in " ".join(compose["healthcheck"]["test"])
