"""The delivery guarantee under network faults, against the real receiver app (uvicorn on loopback, real
SQLite storage and idempotency): an upload whose answer is lost, arrives after the client's timeout, or
whose body is cut part way is retried, and the receiver's catalogue holds every image exactly once,
also when the receiver restarted between the try and the retry.

The faults come from :class:`FaultProxy`, a TCP relay between the sender and the receiver that treats
each new connection as the next entry of its script. The randomized soak with kill -9 of real
``aeic-receiver serve`` and ``aeic-send watch`` processes is ``benchmarks/delivery_soak.py``.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Iterator
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

PASS = "pass"  # relay the request and its answer
LOSE_ANSWER = "lose-answer"  # relay the request whole, then close on the client once the receiver answers
LATE_ANSWER = "late-answer"  # relay the request, hold the answer past the client's timeout, then relay it
CUT_BODY = "cut-body"  # relay the request's head and a few bytes of its body, then close both sides


class FaultProxy:
    """A loopback TCP relay to ``target``; connection n gets ``script[n]`` (PASS once it runs out)."""

    def __init__(self, target_port: int, script: list[str], hold_s: float = 0.0) -> None:
        self.target_port, self.script, self.hold_s = target_port, list(script), hold_s
        self.connections: list[str] = []
        self.answered = threading.Event()  # a receiver answer reached the proxy (LATE_ANSWER: before its hold)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FaultProxy:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self._start(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        _close(self._listener)
        for thread in self._threads:
            thread.join(10)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by __exit__
                return
            mode = self.script[len(self.connections)] if len(self.connections) < len(self.script) else PASS
            self.connections.append(mode)
            self._start(self._relay, client, mode)

    def _relay(self, client: socket.socket, mode: str) -> None:
        """One request and its answer per connection, so each upload meets the next entry of the script."""
        server = socket.create_connection(("127.0.0.1", self.target_port))
        try:
            head = _read_head(client)
            if mode == CUT_BODY:
                server.sendall(head + client.recv(3))
                return  # both sides closed with the body short by all but a few bytes
            server.sendall(head)
            self._start(_pipe, client, server)
            answer = _read_answer(server)
            self.answered.set()
            if mode == LOSE_ANSWER:
                client.shutdown(socket.SHUT_RDWR)
                return
            if mode == LATE_ANSWER:
                time.sleep(self.hold_s)
            with contextlib.suppress(OSError):  # LATE_ANSWER: the client gave up and closed
                client.sendall(answer)
        finally:
            _close(client)
            _close(server)


def _close(sock: socket.socket) -> None:
    """Shut down, then close: a thread blocked in ``recv`` or ``accept`` on it returns (a close alone leaves
    it waiting)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _read_head(sock: socket.socket) -> bytes:
    """The request line and headers, up to and including the blank line (a byte at a time: nothing of the
    body is read here)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    return head


def _read_answer(sock: socket.socket) -> bytes:
    """A whole HTTP answer with a Content-Length body (the receiver's JSON)."""
    answer = _read_head(sock)
    length = int(next((line.split(b":", 1)[1] for line in answer.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))  # fmt: skip
    while length > 0 and (chunk := sock.recv(length)):
        answer += chunk
        length -= len(chunk)
    return answer


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        return


@pytest.fixture()
def receiver(tmp_path: Path) -> Iterator[RealReceiver]:
    real = RealReceiver(tmp_path / "receiver-data", [receiver_support.FakeCodec(model_id=b"TEST")])
    real.start()
    try:
        yield real
    finally:
        real.stop()


def _flush(spool: Spool, url: str, token: str, timeout: float = 5.0) -> None:
    """Drain ``spool`` through ``url`` with backoffs of milliseconds, waiting for an item set aside (it failed
    while the receiver accepted the next one) at its own time, as a one-shot command does."""
    with Uploader(url, token, timeout=timeout) as uploader:
        forwarder = Forwarder(spool, uploader, backoff=Backoff(base=0.01, max_delay=0.05), sleep=time.sleep)
        report = forwarder.flush(max_wait=30, wait_for_set_aside=True)
        assert report.stopped is None, report.stopped


def _catalogue(receiver: RealReceiver) -> dict[int, int]:
    """How many images the receiver stored, by their width (each test stream has its own)."""
    counts: dict[int, int] = {}
    for image in receiver.images():
        counts[image["width"]] = counts.get(image["width"], 0) + 1
    return counts


@pytest.mark.parametrize("fault", [LOSE_ANSWER, CUT_BODY])
def test_a_lost_answer_or_a_cut_body_is_retried_and_stored_once(
    tmp_path: Path, receiver: RealReceiver, fault: str
) -> None:
    spool = Spool(tmp_path / "spool")
    streams = [make_bitstream(i, width=64 + 8 * i) for i in range(3)]
    for data in streams:
        spool.put(data)
    with FaultProxy(receiver.port, [fault, PASS, fault, PASS, fault]) as proxy:
        _flush(spool, proxy.url, receiver.token)
    assert len(spool) == 0
    assert proxy.connections[:5] == [fault, PASS, fault, PASS, fault]
    assert _catalogue(receiver) == {64 + 8 * i: 1 for i in range(3)}


def test_the_flush_command_waits_for_an_item_set_aside_after_a_lost_answer(
    tmp_path: Path, receiver: RealReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: `aeic-send flush` exited 3 after about a second, the image queued (and in fact stored), although its
    retry was due a second later and `retry_for` gave it a minute."""
    from aeic.sender.cli import EXIT_OK, main

    spool = Spool(tmp_path / "spool")
    for i in range(2):
        spool.put(make_bitstream(i, width=64 + 8 * i))
    monkeypatch.setenv("AEIC_TOKEN", receiver.token)
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    with FaultProxy(receiver.port, [LOSE_ANSWER, PASS, PASS]) as proxy:
        code = main(["flush", "--to", proxy.url, "--spool", str(spool.root), "--retry-for", "30"])
    assert code == EXIT_OK and len(spool) == 0
    assert _catalogue(receiver) == {64: 1, 72: 1}


def test_an_answer_after_the_clients_timeout_is_retried_and_stored_once(
    tmp_path: Path, receiver: RealReceiver
) -> None:
    spool = Spool(tmp_path / "spool")
    data = make_bitstream(7, width=72)
    spool.put(data)
    with FaultProxy(receiver.port, [LATE_ANSWER], hold_s=1.5) as proxy:
        with Uploader(proxy.url, receiver.token, timeout=0.5) as uploader:
            first = uploader.upload(data, spool.items()[0].key)
            assert first.outcome is Outcome.RETRY and "timeout" in first.detail
            assert proxy.answered.is_set()  # the receiver had stored it and answered; the answer came late
        _flush(spool, proxy.url, receiver.token)
    assert len(spool) == 0 and _catalogue(receiver) == {72: 1}


def test_a_retry_after_a_lost_answer_is_recognised_by_a_restarted_receiver(
    tmp_path: Path, receiver: RealReceiver
) -> None:
    """The acknowledgement is lost, the receiver restarts (a new process on the same data directory), the
    retry carries the same Idempotency-Key and gets the id stored before: one image, not two."""
    spool = Spool(tmp_path / "spool")
    data = make_bitstream(9, width=80)
    key = spool.put(data).key
    with FaultProxy(receiver.port, [LOSE_ANSWER]) as proxy, Uploader(proxy.url, receiver.token, timeout=5) as up:
        assert up.upload(data, key).outcome is Outcome.RETRY
        stored = receiver.images()
        receiver.stop()
        receiver.start()
        again = up.upload(data, key)
    assert again.outcome is Outcome.ACCEPTED and [again.receiver_id] == [image["id"] for image in stored]
    assert _catalogue(receiver) == {80: 1}


def test_a_full_receiver_disk_keeps_the_item_queued_until_there_is_room(
    tmp_path: Path, receiver: RealReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on the blob write is a 503 with Retry-After, a retry for the sender; the item is delivered
    once the disk has room, and the failed write left no blob behind."""
    from aeic.receiver.storage import FilesystemBlobStore

    real_put = FilesystemBlobStore.put

    def full(store: FilesystemBlobStore, key: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    spool = Spool(tmp_path / "spool")
    data = make_bitstream(11, width=88)
    key = spool.put(data).key
    with Uploader(receiver.url, receiver.token, timeout=5) as uploader:
        monkeypatch.setattr(FilesystemBlobStore, "put", full)
        refused = uploader.upload(data, key)
        monkeypatch.setattr(FilesystemBlobStore, "put", real_put)
    assert refused.outcome is Outcome.RETRY and refused.status == 503 and refused.retry_after > 0
    assert receiver.images() == [] and len(spool) == 1
    _flush(spool, receiver.url, receiver.token)
    assert len(spool) == 0 and _catalogue(receiver) == {88: 1}
    stored = receiver.settings.data_dir / "blobs" / "bitstreams"
    blobs = [path for path in stored.rglob("*") if path.is_file()]
    assert len(blobs) == 1
