"""The scale-out deployment on real servers on loopback: PostgreSQL, Redis, an S3-compatible server
(moto), an API with no decoder of its own, and 3 `aeic-receiver worker` processes decoding real
bitstreams of a tiny model package. Uploads arrive while no worker runs, then while 3 run; one worker is
SIGKILLed mid-batch. Every image must end `done`, decoded exactly once (the database's decode counter),
with its reconstruction in the object store, and nothing may be left in the queue.

AEIC_SCALEOUT_UPLOADS sets the number of uploads (default 300).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import receiver_support
import scaleout_support
import sqlalchemy as sa
from receiver_support import ServerThread

pytest.importorskip("redis", reason="redis is not installed (scale extra)")
pytest.importorskip("boto3", reason="boto3 is not installed (scale extra)")
pytest.importorskip("aeic.codec.testing", reason="aeic.codec.testing (tiny model package) not available")

from aeic.receiver.api import create_app
from aeic.receiver.auth import create_device_token
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import Status
from aeic.receiver.stream_worker import claim_owner
from aeic.sender.encoder import SenderCodec

redis_server, redis_url = scaleout_support.redis_server, scaleout_support.redis_url
s3_server = scaleout_support.s3_server
postgres_server, postgres_url = receiver_support.postgres_server, receiver_support.postgres_url
tiny_package = receiver_support.tiny_package

UPLOADS = int(os.environ.get("AEIC_SCALEOUT_UPLOADS", "300"))
DISTINCT = 24  # distinct photos; each is uploaded several times as separate images
RECLAIM_AFTER_S = 4.0


def _worker(name: str, logs: Path, redis: str, database: str, s3: str, package: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AEIC_S3_ENDPOINT_URL": s3, "AEIC_RECLAIM_AFTER_S": str(RECLAIM_AFTER_S),
           "AEIC_RETRY_DELAY_S": "0.5", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "aeic.receiver.cli", "worker", "--queue", redis, "--database-url", database,
               "--blob-url", "s3://aeic-cluster/blobs", "--model", str(package), "--device", "cpu",
               "--batch-size", "4", "--consumer", name, "--data", str(logs / name), "--log-level", "info"]
    with open(logs / f"{name}.log", "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _statuses(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT status, count(*) FROM images GROUP BY status")).all())


def _claimed_by(engine: sa.Engine, consumer: str) -> set[str]:
    """The images `consumer` is decoding (its claim tokens start with its owner id: in turns, a worker
    decodes images of other consumers' entries, so its own pending entries do not say which)."""
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT id FROM images WHERE status = 'decoding' AND claim_token LIKE :p"),
                                {"p": claim_owner(consumer) + "%"}).scalars())


def test_three_workers_one_killed_every_image_decoded_exactly_once(
        tmp_path: Path, tiny_package: Path, postgres_url: str, redis_url: str, s3_server: str) -> None:
    sender = SenderCodec.from_package(tiny_package)
    streams = [sender.encode(receiver_support.natural_photo(64, 64, seed), 0) for seed in range(DISTINCT)]
    settings = ReceiverSettings(data_dir=tmp_path / "api", database_url=postgres_url, queue=redis_url,
                                blob_url="s3://aeic-cluster/blobs", s3_endpoint_url=s3_server,
                                model_packages=[tiny_package], rate_limit_per_minute=1e6, rate_limit_burst=10_000)
    app = create_app(settings)
    state = app.state.receiver
    engine = state.store.engine
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
            token = create_device_token(state.store, "edge-1")
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}

            def upload(indices: range) -> None:
                for i in indices:
                    response = client.post("/v1/images", content=streams[i % DISTINCT], headers=headers)
                    assert response.status_code == 202, response.text

            # No worker runs: the API still accepts, and the backlog waits in the stream.
            first = UPLOADS // 3
            upload(range(first))
            assert _statuses(engine) == {Status.PENDING.value: first}
            assert state.queue.backlog().lag == first

            started = time.monotonic()
            for name in ("w0", "w1", "w2"):
                workers[name] = _worker(name, tmp_path, redis_url, postgres_url, s3_server, tiny_package)
            producer = threading.Thread(target=upload, args=(range(first, UPLOADS),))
            producer.start()

            # Kill w0 with SIGKILL while it is decoding a claimed batch: freeze it, look, kill or let it go on.
            deadline = time.monotonic() + 240
            in_flight: set[str] = set()
            while not in_flight:
                assert time.monotonic() < deadline, "w0 never held a batch"
                assert workers["w0"].poll() is None, (tmp_path / "w0.log").read_text()[-3000:]
                if _statuses(engine).get(Status.DONE.value, 0) >= 8:
                    os.killpg(workers["w0"].pid, signal.SIGSTOP)
                    in_flight = _claimed_by(engine, "w0")
                    if not in_flight:
                        os.killpg(workers["w0"].pid, signal.SIGCONT)
                time.sleep(0.05)
            os.killpg(workers["w0"].pid, signal.SIGKILL)
            killed_at = time.monotonic() - started
            workers["w0"].wait()
            producer.join(120)
            assert not producer.is_alive()

            while _statuses(engine).get(Status.DONE.value, 0) < UPLOADS:
                assert time.monotonic() < deadline, f"not drained: {_statuses(engine)}"
                for name in ("w1", "w2"):
                    assert workers[name].poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
                time.sleep(0.2)

            drained_at = time.monotonic() - started
            with engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT id, status, decodes, attempts FROM images")).all()
            assert len(rows) == UPLOADS
            assert {r.status for r in rows} == {Status.DONE.value}
            assert {r.decodes for r in rows} == {1}  # every image decoded exactly once
            retried = {r.id for r in rows if r.attempts > 1}
            assert retried == in_flight and max(r.attempts for r in rows) <= 2  # only w0's batch, taken over
            blobs = state.blobs
            assert all(blobs.exists(f"reconstructions/{r.id[:2]}/{r.id}.png") for r in rows)
            some = rows[0].id
            png = client.get(f"/v1/images/{some}/reconstruction", headers={"Authorization": f"Bearer {token}"})
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
            backlog = state.queue.backlog()
            assert (backlog.lag, backlog.pending) == (0, 0)
            assert state.queue.dead_letters() == []
            survivors = "".join((tmp_path / f"{n}.log").read_text() for n in ("w1", "w2"))
            assert all(f"decoded image={i}" in survivors for i in retried)  # the takeover happened
            print(f"\n{UPLOADS} uploads: w0 killed {killed_at:.1f}s after the workers started holding "
                  f"{len(in_flight)} claims (taken over); drained after {drained_at:.1f}s")
    finally:
        for process in workers.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for name, process in workers.items():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                pytest.fail(f"worker {name} did not stop on SIGTERM")
    assert workers["w1"].returncode == 0 and workers["w2"].returncode == 0  # graceful stop
