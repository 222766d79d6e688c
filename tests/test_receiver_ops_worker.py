"""`aeic-receiver worker` as an operator runs it: a metrics port in use is one line naming it, and a Redis
outage is one traceback, then a line a retry, not a traceback every second."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from aeic.receiver.cli import main
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.storage import FilesystemBlobStore, SqlMetadataStore
from aeic.receiver.stream_worker import StreamWorker, StreamWorkerConfig
from aeic.receiver.worker import DecodeWorker, WorkerConfig
from receiver_support import FakeCodec


def test_a_metrics_port_in_use_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Was: `aeic-receiver: Address already in use`, naming neither the port nor what wanted it."""
    registry = CodecRegistry.from_codecs([FakeCodec()])
    monkeypatch.setattr(CodecRegistry, "from_packages", lambda *_args: registry)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # No Redis is reached before the metrics server starts: an unused port stands for the queue.
        assert main(["worker", "--data", str(tmp_path / "data"), "--queue", "redis://127.0.0.1:9/0",
                     "--metrics-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"aeic-receiver: cannot serve metrics on 0.0.0.0:{port}: Address already in use\n"


class _RedisDown:
    """A JobQueue whose Redis refuses every connection."""

    stream, group = "aeic:decode", "aeic-decoders"

    def __init__(self) -> None:
        self.calls = 0

    def ensure_group(self) -> None:
        import redis

        self.calls += 1
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_a_redis_outage_is_one_traceback_then_a_line_a_retry(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    store = SqlMetadataStore.from_url(f"sqlite:///{tmp_path / 'receiver.db'}")
    store.migrate()
    decoder = DecodeWorker(store, FilesystemBlobStore(tmp_path / "blobs"),
                           CodecRegistry.from_codecs([FakeCodec()]), WorkerConfig())
    queue = _RedisDown()
    worker = StreamWorker(store, queue, decoder, StreamWorkerConfig(consumer="w1"))  # type: ignore[arg-type]
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="aeic.receiver.stream_worker"):
        thread = threading.Thread(target=worker.run, args=(stop,))
        thread.start()
        stop.wait(2.5)  # the loop retries every second
        stop.set()
        thread.join(10)
    store.close()
    records = [r for r in caplog.records if r.name == "aeic.receiver.stream_worker"]
    assert queue.calls >= 3 and len(records) == queue.calls
    assert records[0].exc_info is not None and all(r.exc_info is None for r in records[1:])
    assert all(r.getMessage() == "worker iteration failed again; retrying: ConnectionError: Error 111 "
               "connecting to 127.0.0.1:6379. Connection refused." for r in records[1:])


class _DatabaseDown(SqlMetadataStore):
    """A store whose database refuses the worker's claims."""

    def claim_batch(self, *args: object, **kwargs: object) -> None:
        raise sa.exc.OperationalError("UPDATE images ...", {}, ConnectionRefusedError("connection refused"))


def test_the_embedded_worker_logs_a_database_outage_once_then_a_line_a_poll(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Was: `serve`'s worker logged a full traceback every poll interval (every second by default) for as
    long as the database was down."""
    store = _DatabaseDown(sa.create_engine(f"sqlite:///{tmp_path / 'receiver.db'}"))
    store.migrate()
    decoder = DecodeWorker(store, FilesystemBlobStore(tmp_path / "blobs"),
                           CodecRegistry.from_codecs([FakeCodec()]), WorkerConfig(poll_interval_s=0.02))
    with caplog.at_level(logging.WARNING, logger="aeic.receiver.worker"):
        decoder.start()
        threading.Event().wait(0.5)
        decoder.stop()
    store.close()
    records = [r for r in caplog.records if r.name == "aeic.receiver.worker"]
    assert len(records) >= 3
    assert records[0].exc_info is not None and all(r.exc_info is None for r in records[1:])
    assert all(r.getMessage() == "decode worker iteration failed again: OperationalError: "
               "(builtins.ConnectionRefusedError) connection refused" for r in records[1:])


class _Fatal(BaseException):
    """What no `except Exception` catches (a MemoryError would be caught; this stands for whatever is not)."""


class _FatalRegistry(CodecRegistry):
    def get(self, model_id: bytes) -> object:  # type: ignore[override]
        raise _Fatal("the decoder's load ended the thread")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread ends, as meant
def test_liveness_fails_when_the_embedded_worker_thread_has_ended(tmp_path: Path) -> None:
    """Was: /healthz said ok for good while nothing decoded (/readyz's 'not running' only takes the receiver
    out of service; it is not restarted)."""
    from aeic.receiver.api import create_app
    from aeic.receiver.settings import ReceiverSettings
    from fastapi.testclient import TestClient

    registry = _FatalRegistry.from_codecs([FakeCodec()])
    settings = ReceiverSettings(data_dir=tmp_path / "data", poll_interval_s=0.05)
    with TestClient(create_app(settings, registry=registry)) as client:
        worker = client.app.state.receiver.worker
        assert worker._thread is not None
        worker._thread.join(10)
        answer = client.get("/healthz")
    assert answer.status_code == 503 and answer.json()["reason"] == ("the decode worker's thread has ended; "
                                                                     "decoding resumes after a restart")
