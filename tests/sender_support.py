"""Test helpers for the sender: a loopback HTTP double of the receiver's upload contract.

The double enforces what the real receiver (issue 6) requires of an upload, so a sender that
passes against it speaks the contract: ``POST /v1/images``, ``Content-Type:
application/octet-stream``, ``Authorization: Bearer <token>``, an ``Idempotency-Key`` that is
the body's SHA-256 (then ``-capture`` for a camera frame; the receiver takes any, this is the sender's
rule), and a body that parses as an AEIC v1 bitstream. It answers 202 with a new
id, or 200 with the same id for a repeated key, and records every request, so tests can
check "every image arrives exactly once". Failure injection: queued status codes, and
"store but drop the connection before answering" (a lost acknowledgement).
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import ssl
import subprocess
import threading
import tracemalloc
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
from aeic.shared.bitstream import BitstreamError, unpack

if TYPE_CHECKING:  # not at runtime: make sender-compat runs these tests without the receiver's packages
    import uvicorn
    from aeic.sender.rows import Picture


T = TypeVar("T")


def traced_peak(call: Callable[[], T]) -> tuple[T, int]:
    """``call()``'s result and the peak bytes Python allocated while it ran (tracemalloc): memory bounds
    of the spool's passes are checked by what they hold, not by the process's noisy RSS."""
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def free_port() -> int:
    """A loopback port nothing listens on (yet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ReceiverDouble:
    """Start/stop a threaded HTTP server on a fixed loopback port (down, then up, ...)."""

    def __init__(
        self, token: str = "device-token", port: int | None = None, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.token = token
        self.tls = tls  # (certificate, key) PEM files: serve HTTPS
        self.port = port or free_port()
        self.stored: dict[str, bytes] = {}  # idempotency key -> body, what is "durably stored"
        self.ids: dict[str, str] = {}
        self.requests: list[dict] = []  # every POST: key, status answered
        self.inject: list[int | str] = []  # next answers: an HTTP status or "drop-after-store"
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> ReceiverDouble:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ReceiverDouble:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def send_json(handler: BaseHTTPRequestHandler, status: int, body: object) -> None:
    """Answer a request with ``body`` as JSON, its length given."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _handler_for(double: ReceiverDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _answer(self, status: int, body: dict, key: str | None) -> None:
            with double.lock:
                double.requests.append({"key": key, "status": status})
            send_json(self, status, body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            key = self.headers.get("Idempotency-Key")
            if self.path != "/v1/images":
                return self._answer(404, {"detail": "not found"}, key)
            with double.lock:
                injected = double.inject.pop(0) if double.inject else None
            if isinstance(injected, int):
                return self._answer(injected, {"detail": f"injected {injected}"}, key)
            if self.headers.get("Authorization") != f"Bearer {double.token}":
                return self._answer(401, {"detail": "bad or missing device token"}, key)
            if self.headers.get("Content-Type") != "application/octet-stream":
                return self._answer(415, {"detail": "body must be application/octet-stream"}, key)
            if not key or key.split("-", 1)[0] != hashlib.sha256(body).hexdigest():
                return self._answer(400, {"detail": "Idempotency-Key must start with the body's SHA-256"}, key)
            try:
                unpack(body)
            except BitstreamError as exc:
                return self._answer(422, {"detail": f"invalid bitstream: {exc}"}, key)
            with double.lock:
                repeated = key in double.stored
                if not repeated:
                    double.stored[key] = body
                    double.ids[key] = f"img-{len(double.ids) + 1}"
                image_id = double.ids[key]
            if injected == "drop-after-store":
                with double.lock:
                    double.requests.append({"key": key, "status": None})
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            return self._answer(200 if repeated else 202, {"id": image_id}, key)

    return Handler


def make_bitstream(seed: int, payload_bytes: int = 64, width: int = 64, height: int = 48) -> bytes:
    """A valid AEIC v1 container with a seeded random payload (distinct seeds, distinct keys)."""
    from aeic.shared.bitstream import Bitstream, Header, pack

    payload = hashlib.shake_256(seed.to_bytes(8, "little")).digest(payload_bytes)
    return pack(Bitstream(Header(b"TEST", width, height, rate_index=seed % 4), payload))


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 made with the openssl command-line tool."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class ScanCounter:
    """Counts the watcher's scans (``FolderWatcher.scan`` patched) so a test of the agent waits on its
    progress, not on wall time: a 1.5 s timer gave a loaded 2-core CI machine fewer scans than the test
    meant, or none after the one it needed. ``stop_after`` raises SIGTERM in the scanning thread (as
    systemd's stop would) once that many scans have ended; the agent's handler then ends the loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> None:
        from aeic.sender.watch import FolderWatcher

        self.count, self._changed = 0, threading.Condition()
        real_scan = FolderWatcher.scan

        def counted(watcher: FolderWatcher) -> list:
            try:
                return real_scan(watcher)
            finally:
                with self._changed:
                    self.count += 1
                    self._changed.notify_all()
                if self.count == stop_after:
                    signal.raise_signal(signal.SIGTERM)

        monkeypatch.setattr(FolderWatcher, "scan", counted)

    def wait_for(self, count: int, timeout: float = 30.0) -> bool:
        """Whether ``count`` scans have ended within ``timeout`` s (a bound for a hung agent, not a sync)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= count, timeout)


class ContainerCodec:
    """A stand-in for ``SenderCodec`` in CLI tests that need no model: it writes real v1
    containers whose payload grows with the rate index (8 + 40 * rate bytes), derived from the
    pixels so equal images give equal bitstreams, and raises the real ``BudgetError``."""

    model_id = b"TEST"
    provider = "CPUExecutionProvider"
    rates = (0, 1, 2, 3)
    num_levels = 4

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, rgb: Picture, rate_index: int) -> bytes:
        from aeic.sender.rows import as_rows
        from aeic.shared.bitstream import Bitstream, Header, pack

        self.calls += 1
        picture = as_rows(rgb)  # the commands pass a photo read from its file as a row source
        height, width, _ = picture.shape
        payload = hashlib.shake_256(picture.rows(0, height).tobytes()).digest(8 + 40 * rate_index)
        return pack(Bitstream(Header(self.model_id, width, height, rate_index), payload))

    def encode_to_budget(self, rgb: Picture, target_bytes: int) -> tuple[bytes, int]:
        from aeic.sender.encoder import BudgetError

        for rate in reversed(self.rates):
            data = self.encode(rgb, rate)
            if len(data) <= target_bytes:
                return data, rate
        raise BudgetError(f"even the lowest rate needs {len(data)} bytes, more than {target_bytes}")


class RealReceiver:
    """The real receiver app (aeic.receiver.api) served by uvicorn on a fixed loopback port.

    ``decoders`` are ReceiverCodec-like objects (the real one or the receiver tests' double);
    it can be started and stopped repeatedly on the same port and data directory, like a
    receiver that goes down and comes back.
    """

    def __init__(self, data_dir: Path, decoders: list, port: int | None = None) -> None:
        from aeic.receiver.auth import create_device_token
        from aeic.receiver.settings import ReceiverSettings
        from aeic.receiver.storage import SqlMetadataStore

        self.port = port or free_port()
        self.decoders = decoders
        self.admin_token = "admin-token-for-tests"
        self.settings = ReceiverSettings(
            data_dir=data_dir, admin_token=self.admin_token, poll_interval_s=0.05, retry_delay_s=0.0
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        store = SqlMetadataStore.from_url(self.settings.resolved_database_url())
        store.migrate()
        self.token = create_device_token(store, "edge-1")
        store.close()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RealReceiver:
        import time

        import uvicorn
        from aeic.receiver.api import create_app
        from aeic.receiver.registry import CodecRegistry

        app = create_app(self.settings, registry=CodecRegistry.from_codecs(self.decoders))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the receiver did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(timeout=30)
            self._server = None

    def images(self, token: str | None = None) -> list[dict]:
        """Every image the device sees, through GET /v1/images (all pages)."""
        import httpx

        items: list[dict] = []
        cursor: str | None = None
        headers = {"Authorization": f"Bearer {token or self.token}"}
        while True:
            params: dict[str, str] = {"cursor": cursor} if cursor else {}
            body = httpx.get(f"{self.url}/v1/images", headers=headers, params=params, timeout=10).json()
            items += body["items"]
            cursor = body.get("next")
            if not cursor:
                return items

    def __enter__(self) -> RealReceiver:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
