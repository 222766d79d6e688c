"""Connections whose request headers never complete are closed (`header_timeout_s`): uvicorn kept each one,
and its file descriptor, for as long as the client liked, until the receiver accepted nothing more."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from aeic.receiver.header_timeout import protocol_with_header_timeout
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

LIMIT_S = 0.5


async def _echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{len(await request.body())}")


async def _early(request: Request) -> PlainTextResponse:
    """Answers without reading the body, as a 401 for a wrong token does."""
    return PlainTextResponse("early")


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """A uvicorn server on loopback with a 0.5 s header limit and 1 s for a dropped body, serving `/` (answers
    the body's length) and `/early` (answers without reading the body)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = Starlette(routes=[Route("/", _echo, methods=["GET", "POST"]), Route("/early", _early)])
    config = uvicorn.Config(app, log_level="warning", http=protocol_with_header_timeout(LIMIT_S, LIMIT_S * 2), lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()


def _closed_after(conn: socket.socket, within_s: float) -> float:
    """Seconds until the server closes `conn` (reads EOF), failing past `within_s`."""
    start = time.monotonic()
    conn.settimeout(within_s)
    while True:
        try:
            data = conn.recv(4096)
        except TimeoutError:
            raise AssertionError(f"the connection was still open after {within_s} s") from None
        except ConnectionResetError:
            return time.monotonic() - start
        if not data:
            return time.monotonic() - start


def _response(conn: socket.socket) -> bytes:
    """One whole answer: its headers, then as many bytes as its Content-Length says."""
    conn.settimeout(5)
    data = b""
    while True:
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head.lower())
        if length is not None and len(body) >= int(length.group(1)):
            return data
        chunk = conn.recv(4096)
        assert chunk, data
        data += chunk


def test_a_connection_that_sends_nothing_is_closed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        assert LIMIT_S * 0.8 < _closed_after(conn, 5) < LIMIT_S + 2


def test_headers_that_trickle_in_are_closed_at_the_limit(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\n")
        for _ in range(3):
            time.sleep(LIMIT_S / 4)
            conn.sendall(b"X-A: b\r\n")  # each byte in time, the whole too late
        assert _closed_after(conn, 5) < LIMIT_S + 2


def test_a_slow_body_after_complete_headers_is_not_cut(port: int) -> None:
    """The header limit ends with the headers; the body is the routes' to time (`upload_timeout_s`)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        time.sleep(LIMIT_S * 2.5)
        conn.sendall(b"cd")
        answer = _response(conn)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n4")


def test_a_kept_alive_connection_gets_the_limit_for_each_request(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(conn).endswith(b"\r\n\r\n0")
        conn.sendall(b"GET / HTTP/1.1\r\n")  # the next request's first bytes, then nothing
        assert _closed_after(conn, 5) < LIMIT_S + 2


def test_serve_closes_an_idle_connection_and_still_answers(tmp_path: Path) -> None:
    """`aeic-receiver serve` uses the protocol with its setting."""
    env = {**os.environ, "AEIC_HEADER_TIMEOUT_S": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "aeic.receiver.cli", "serve", "--data", str(tmp_path / "data"), "--port", "0",
         "--no-worker"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stderr is not None
        found = re.search(r"bound http://127\.0\.0\.1:(\d+);", process.stderr.readline())
        assert found is not None
        served = int(found.group(1))
        deadline = time.monotonic() + 60
        while True:  # the port refuses connections until start-up is complete
            assert process.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{served}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", served)) as idle:
            assert 0.8 < _closed_after(idle, 60) < 60
        with socket.create_connection(("127.0.0.1", served)) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            conn.settimeout(10)
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_protocol_class_carries_its_limit() -> None:
    protocol = protocol_with_header_timeout(3.0, 7.0)
    assert (protocol.header_timeout_s, protocol.dropped_body_timeout_s) == (3.0, 7.0)
    assert asyncio.Protocol in protocol.__mro__


def test_the_queue_workers_metrics_port_closes_a_silent_connection() -> None:
    """Was: a thread per connection, each waiting for its request line for good."""
    from aeic.receiver import stream_worker
    from prometheus_client import CollectorRegistry

    server = stream_worker.serve_metrics_and_health(0, CollectorRegistry(), lambda: None, host="127.0.0.1",
                                                    read_timeout_s=LIMIT_S)
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1])) as conn:
            assert _closed_after(conn, 5) < LIMIT_S + 2
        answer = httpx.get(f"http://127.0.0.1:{server.server_address[1]}/healthz", timeout=5)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
    finally:
        server.shutdown()
        server.server_close()


def test_a_body_trickled_after_its_answer_is_cut_at_the_limit(port: int) -> None:
    """Was: a 401 (or any answer given before the body was read) left uvicorn reading and dropping the
    declared body for as long as it came, so a client sending a byte now and then held the connection."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"GET /early HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nab")
        assert _response(conn).endswith(b"\r\n\r\nearly")
        start = time.monotonic()
        conn.settimeout(0.1)
        while time.monotonic() - start < 5:
            try:
                conn.sendall(b"x")
                if conn.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
            time.sleep(LIMIT_S / 5)
        assert LIMIT_S * 1.5 < time.monotonic() - start < LIMIT_S * 2 + 2  # the dropped body's limit, 1 s


def test_a_body_finished_after_its_answer_keeps_the_connection_alive(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"GET /early HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        assert _response(conn).endswith(b"\r\n\r\nearly")
        conn.sendall(b"cd")
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(conn).endswith(b"\r\n\r\n0")
