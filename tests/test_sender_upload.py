"""Uploader, backoff and forwarder against a real HTTP server on loopback."""

from __future__ import annotations

import email.utils
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aeic.sender.backoff import Backoff
from aeic.sender.forward import Forwarder
from aeic.sender.spool import Spool, SpoolItem, idempotency_key
from aeic.sender.uploader import (
    Outcome,
    UploadConfigError,
    Uploader,
    _transport_detail,
    classify,
    endpoint_url,
    environment_proxy,
)
from sender_support import ReceiverDouble, make_bitstream, self_signed_certificate

TOKEN = "device-token"


def _spool_with(tmp_path: Path, count: int) -> tuple[Spool, list[str]]:
    spool = Spool(tmp_path / "spool")
    keys = [spool.put(make_bitstream(i), source=f"img{i}.jpg").key for i in range(count)]
    return spool, keys


def test_endpoint_url() -> None:
    assert endpoint_url("https://host:8000") == "https://host:8000/v1/images"
    assert endpoint_url("http://host/base/") == "http://host/base/v1/images"
    assert endpoint_url("http://host/v1/images") == "http://host/v1/images"


def test_endpoint_url_of_the_api_root() -> None:
    """The receiver's docs give its API as "under /v1": ``--to http://host:8080/v1`` posted to /v1/v1/images,
    a 404 that stopped every upload with "check the receiver URL"."""
    assert endpoint_url("http://host:8080/v1") == "http://host:8080/v1/images"
    assert endpoint_url("https://host/aeic/v1/") == "https://host/aeic/v1/images"
    assert endpoint_url("http://host/v10") == "http://host/v10/v1/images"
    with pytest.raises(UploadConfigError):
        endpoint_url("ftp://host")
    with pytest.raises(UploadConfigError):
        endpoint_url("host:8000")


def test_missing_token_and_ca_bundle_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(UploadConfigError, match="AEIC_TOKEN"):
        Uploader("http://127.0.0.1:1", "")
    with pytest.raises(UploadConfigError, match="CA bundle"):
        Uploader("https://127.0.0.1:1", TOKEN, ca_bundle=tmp_path / "missing.pem")


def test_upload_speaks_the_contract_and_repeats_are_idempotent() -> None:
    data = make_bitstream(7)
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url, TOKEN) as uploader:
        first = uploader.upload(data, idempotency_key(data))
        again = uploader.upload(data, idempotency_key(data))
    assert first.outcome is Outcome.ACCEPTED and first.status == 202 and first.receiver_id == "img-1"
    assert again.outcome is Outcome.ACCEPTED and again.status == 200 and again.receiver_id == "img-1"
    assert list(receiver.stored) == [idempotency_key(data)]


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.ACCEPTED),
        (202, Outcome.ACCEPTED),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (400, Outcome.REJECTED),
        (413, Outcome.REJECTED),
        (422, Outcome.REJECTED),
        (401, Outcome.BLOCKED),
        (403, Outcome.BLOCKED),
        (404, Outcome.BLOCKED),
        (307, Outcome.BLOCKED),
    ],
)
def test_classification(status: int, outcome: Outcome) -> None:
    response = httpx.Response(status, json={"id": "img-1", "detail": "why"}, headers={"Retry-After": "7"})
    result = classify(response)
    assert result.outcome is outcome
    if outcome is Outcome.REJECTED:
        assert result.detail == f"HTTP {status}: why"
    if status in (429, 503):
        assert result.retry_after == 7.0


@pytest.mark.parametrize("body", [b"<html>Sign in to the hotel wifi</html>", b"", b'{"status": "ok"}'])
def test_a_2xx_without_the_receivers_receipt_keeps_the_item(body: bytes) -> None:
    result = classify(httpx.Response(200, content=body))
    assert result.outcome is Outcome.RETRY and "receipt" in result.detail


def test_backoff_grows_with_jitter_and_caps() -> None:
    backoff = Backoff(base=1.0, factor=2.0, max_delay=10.0, jitter=0.5, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 10, 10, 10, 10]
    for delay, ceiling in zip(delays, ceilings):
        assert ceiling * 0.5 <= delay <= ceiling
    assert len(set(delays[4:])) == 4  # jittered: devices do not retry in lockstep
    assert backoff.next_delay(at_least=9.5) >= 9.5  # Retry-After is honoured
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_receiver_down_then_up_every_image_arrives_exactly_once(tmp_path: Path) -> None:
    spool, keys = _spool_with(tmp_path, 12)
    receiver = ReceiverDouble(TOKEN)  # not started: connection refused
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            receiver.start()  # the link comes back after three backoff periods

    backoff = Backoff(base=1.0, max_delay=60.0, rng=random.Random(0))
    try:
        with Uploader(receiver.url, TOKEN, timeout=5) as uploader:
            report = Forwarder(spool, uploader, backoff=backoff, sleep=fake_sleep).flush(max_wait=3600)
    finally:
        receiver.stop()
    assert report.accepted == 12 and report.stopped is None and len(spool) == 0
    assert sorted(receiver.stored) == sorted(keys)
    assert [r["status"] for r in receiver.requests] == [202] * 12  # each sent once after the outage
    assert len(sleeps) == 3 and 0.5 <= sleeps[0] <= 1 and 1 <= sleeps[1] <= 2 and 2 <= sleeps[2] <= 4


def test_lost_acknowledgement_is_retried_without_a_duplicate(tmp_path: Path) -> None:
    spool, keys = _spool_with(tmp_path, 3)
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url, TOKEN) as uploader:
        receiver.inject = ["drop-after-store", 503]
        report = Forwarder(spool, uploader, sleep=lambda s: None).flush(max_wait=60)
    assert report.accepted == 3 and len(spool) == 0
    assert sorted(receiver.stored) == sorted(keys)  # stored once each
    statuses = [r["status"] for r in receiver.requests]
    assert statuses.count(None) == 1 and 503 in statuses and statuses.count(200) == 1  # the re-send


def test_restart_after_crash_delivers_remaining_items_exactly_once(tmp_path: Path) -> None:
    spool, keys = _spool_with(tmp_path, 6)
    with ReceiverDouble(TOKEN) as receiver:
        # First run: delivers two, then the receiver stored the third but the ack was lost and
        # the process "crashed" (we drop everything and reopen the spool from disk).
        with Uploader(receiver.url, TOKEN) as uploader:
            forwarder = Forwarder(spool, uploader)
            for item in spool.items()[:2]:
                assert forwarder._deliver(item).outcome is Outcome.ACCEPTED
            receiver.inject = ["drop-after-store"]
            assert forwarder._deliver(spool.items()[0]).outcome is Outcome.RETRY
        restarted = Spool(tmp_path / "spool")
        assert len(restarted) == 4
        with Uploader(receiver.url, TOKEN) as uploader:
            report = Forwarder(restarted, uploader, sleep=lambda s: None).flush(max_wait=60)
    assert report.accepted == 4 and len(restarted) == 0
    assert sorted(receiver.stored) == sorted(keys)


def test_rejected_items_move_aside_and_others_still_go(tmp_path: Path) -> None:
    spool, keys = _spool_with(tmp_path, 2)
    bad = spool.put(b"not a bitstream at all", source="garbage.bin")
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url, TOKEN) as uploader:
        report = Forwarder(spool, uploader, sleep=lambda s: None).flush(max_wait=60)
    assert report.accepted == 2 and report.rejected == 1 and len(spool) == 0
    [rejected] = spool.rejected()
    assert rejected.key == bad.key and "invalid bitstream" in rejected.extra["reason"]
    assert rejected.extra["status"] == 422
    assert sorted(receiver.stored) == sorted(keys)


def test_wrong_token_blocks_without_rejecting_or_waiting(tmp_path: Path) -> None:
    spool, _ = _spool_with(tmp_path, 3)
    sleeps: list[float] = []
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url, "wrong") as uploader:
        report = Forwarder(spool, uploader, sleep=sleeps.append).flush(max_wait=60)
    assert report.stopped is not None and report.stopped.outcome is Outcome.BLOCKED
    assert "device token" in report.stopped.detail
    assert len(spool) == 3 and spool.rejected() == [] and sleeps == [] and receiver.stored == {}
    assert spool.items()[0].attempts == 1


def test_flush_gives_up_at_deadline_keeping_items(tmp_path: Path) -> None:
    spool, _ = _spool_with(tmp_path, 2)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    receiver = ReceiverDouble(TOKEN)  # never started
    with Uploader(receiver.url, TOKEN, timeout=5) as uploader:
        forwarder = Forwarder(
            spool, uploader, backoff=Backoff(rng=random.Random(1)), sleep=sleep, clock=lambda: now[0]
        )
        report = forwarder.flush(max_wait=20)
    assert report.accepted == 0 and report.stopped is not None and report.stopped.outcome is Outcome.RETRY
    assert "ConnectError" in report.stopped.detail
    assert now[0] <= 20 and len(spool) == 2


def test_daemon_loop_delivers_items_as_they_arrive(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stop, wake = threading.Event(), threading.Event()
    receiver = ReceiverDouble(TOKEN)
    with Uploader(receiver.url, TOKEN, timeout=5) as uploader:
        forwarder = Forwarder(spool, uploader, backoff=Backoff(base=0.02, max_delay=0.05), sleep=stop.wait)
        thread = threading.Thread(target=forwarder.run, args=(stop, wake, 5.0))
        thread.start()
        try:
            keys = [spool.put(make_bitstream(i)).key for i in range(3)]
            wake.set()
            time.sleep(0.2)  # receiver still down: the loop backs off, items stay queued
            assert len(spool) == 3
            receiver.start()
            deadline = time.monotonic() + 10
            while len(spool) and time.monotonic() < deadline:
                time.sleep(0.02)
            keys.append(spool.put(make_bitstream(99)).key)
            wake.set()
            while len(spool) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop.set()
            wake.set()
            thread.join(timeout=10)
            receiver.stop()
    assert len(spool) == 0 and sorted(receiver.stored) == sorted(keys)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_is_verified_by_default_and_a_ca_bundle_makes_it_work(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    data = make_bitstream(5)
    with ReceiverDouble(TOKEN, tls=(cert, key)) as receiver:
        with Uploader(receiver.url, TOKEN) as uploader:
            refused = uploader.upload(data, idempotency_key(data))
        with Uploader(receiver.url, TOKEN, ca_bundle=cert) as uploader:
            accepted = uploader.upload(data, idempotency_key(data))
    assert refused.outcome is Outcome.RETRY and "certificate verification failed" in refused.detail
    assert "--ca-bundle" in refused.detail
    assert accepted.outcome is Outcome.ACCEPTED and list(receiver.stored) == [idempotency_key(data)]


def test_a_tls_failure_says_what_to_do_about_it(tmp_path: Path) -> None:
    """Every verification failure advised --ca-bundle, also when it had been given and the certificate was
    for another name, or when a device's clock (no real-time clock, no NTP yet) made it look expired."""
    cert, key = self_signed_certificate(tmp_path)  # issued for 127.0.0.1
    data = make_bitstream(6)
    with ReceiverDouble(TOKEN, tls=(cert, key)) as receiver:
        port = receiver.url.rsplit(":", 1)[1]
        with Uploader(f"https://localhost:{port}", TOKEN, ca_bundle=cert) as uploader:
            other_name = uploader.upload(data, idempotency_key(data))
        with Uploader(f"http://127.0.0.1:{port}", TOKEN) as uploader:
            plain = uploader.upload(data, idempotency_key(data))
    assert other_name.outcome is Outcome.RETRY and "another host name" in other_name.detail
    assert "--ca-bundle" not in other_name.detail
    assert plain.outcome is Outcome.RETRY
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url.replace("http:", "https:"), TOKEN) as uploader:
        wrong_scheme = uploader.upload(data, idempotency_key(data))
    assert "does not speak TLS on this port" in wrong_scheme.detail
    expired = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired")
    assert "clock" in _transport_detail(expired)


def test_daemon_loop_survives_an_unexpected_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    key = spool.put(make_bitstream(1)).key
    stop, wake = threading.Event(), threading.Event()
    errors: list[str] = []
    calls = {"n": 0}
    real_pending = spool.pending

    def flaky_pending() -> Iterator[SpoolItem]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error")  # a failing SD card, once
        return real_pending()

    spool.pending = flaky_pending  # type: ignore[method-assign]
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url, TOKEN) as uploader:
        forwarder = Forwarder(
            spool, uploader, backoff=Backoff(base=0.01, max_delay=0.02), on_error=errors.append
        )
        thread = threading.Thread(target=forwarder.run, args=(stop, wake, 5.0))
        thread.start()
        deadline = time.monotonic() + 10
        while len(spool) and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        wake.set()
        thread.join(timeout=10)
    assert list(receiver.stored) == [key] and len(errors) == 1 and "Input/output error" in errors[0]


def test_an_unreadable_item_does_not_hold_back_the_others(tmp_path: Path) -> None:
    """A spooled file that cannot be read (failing storage) stays queued; the items behind it go."""
    spool = Spool(tmp_path / "spool")
    stuck = spool.put(make_bitstream(1), source="stuck.jpg")
    fine = spool.put(make_bitstream(2), source="fine.jpg")
    real_read = spool.read

    def failing_read(item: SpoolItem) -> bytes:
        if item.key == stuck.key:
            raise OSError(5, "Input/output error")
        return real_read(item)

    spool.read = failing_read  # type: ignore[method-assign]
    errors: list[str] = []
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url, TOKEN) as uploader:
        report = Forwarder(spool, uploader, on_error=errors.append).drain_pass()
    assert list(receiver.stored) == [fine.key] and report.accepted == 1
    assert [item.key for item in spool.items()] == [stuck.key] and spool.rejected() == []
    assert len(errors) == 1 and stuck.key in errors[0] and "Input/output error" in errors[0]


class _TricklingServer:
    """A raw HTTP/1.1 server on loopback: sends ``at_once``, then ``trickle`` a byte every ``gap`` s."""

    def __init__(self, at_once: bytes, trickle: bytes = b"", gap: float = 0.05) -> None:
        import socket

        self._at_once, self._trickle, self._gap = at_once, trickle, gap
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        connection, _ = self._listener.accept()
        with connection:
            connection.recv(65536)
            try:
                connection.sendall(self._at_once)
                for byte in self._trickle:
                    connection.sendall(bytes([byte]))
                    time.sleep(self._gap)
            except OSError:
                pass  # the uploader gave up and closed the connection, as it should

    def __enter__(self) -> _TricklingServer:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        self._thread.join(timeout=5)


_HEAD = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"


@pytest.mark.parametrize(
    ("at_once", "trickle"), [(b"", _HEAD + b" " * 200), (_HEAD, b'{"id": "' + b"x" * 192)], ids=["headers", "body"]
)
def test_a_trickling_answer_times_out_as_a_whole(at_once: bytes, trickle: bytes) -> None:
    """Each byte comes well inside the per-read timeout; the request's limit still ends it."""
    data = make_bitstream(7)
    with _TricklingServer(at_once, trickle) as server, Uploader(server.url, TOKEN, timeout=1.0) as uploader:
        started = time.monotonic()
        result = uploader.upload(data, idempotency_key(data))
        took = time.monotonic() - started
    assert result.outcome is Outcome.RETRY and "Timeout" in result.detail
    assert result.detail.startswith("no whole answer within the 1-s timeout")  # not a bare "ReadTimeout: timed out"
    assert took < 3.0, f"the upload took {took:.1f} s against a 1 s limit"


def test_a_huge_answer_is_not_read_whole() -> None:
    body = b"<html>" + b"a" * (64 * 1024 * 1024) + b"</html>"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(body)
    data = make_bitstream(8)
    with _TricklingServer(head + body) as server, Uploader(server.url, TOKEN, timeout=10.0) as uploader:
        result = uploader.upload(data, idempotency_key(data))
    assert result.outcome is Outcome.RETRY and result.status == 200
    assert "without the receiver's receipt" in result.detail and len(result.detail) <= 400


def _answer(head: str, body: bytes = b"", extra: bytes = b"") -> bytes:
    return f"HTTP/1.1 {head}\r\nContent-Length: {len(body)}\r\n".encode() + extra + b"\r\n" + body


@pytest.mark.parametrize(
    ("raw", "outcome", "status"),
    [
        (_answer("400 Bad Request", b"0123456789", b"Content-Encoding: gzip\r\n"), Outcome.REJECTED, 400),
        (_answer("202 Accepted", b"0123456789", b"Content-Encoding: gzip\r\n"), Outcome.RETRY, 202),
        (_answer("503 Busy", b"[" * 60_000), Outcome.RETRY, 503),
        (_answer("202 Accepted", b'{"id": ' + b"[" * 60_000), Outcome.RETRY, 202),
        (_answer("503 Busy", b"", b"Retry-After: 5\r\nX-Note: caf\xe9\r\n"), Outcome.RETRY, 503),
        (_answer("301 Moved", b"", b"Location: http://caf\xe9/\r\n"), Outcome.BLOCKED, 301),
    ],
    ids=["bad-gzip-400", "bad-gzip-202", "deep-json-503", "deep-json-202", "latin1-header", "latin1-location"],
)
def test_an_odd_answer_is_classified_by_its_status_not_raised(raw: bytes, outcome: Outcome, status: int) -> None:
    """A proxy's or attacker's answer must not crash `send`/`flush` with a traceback."""
    data = make_bitstream(9)
    with _TricklingServer(raw) as server, Uploader(server.url, TOKEN, timeout=5.0) as uploader:
        result = uploader.upload(data, idempotency_key(data))
    assert (result.outcome, result.status) == (outcome, status)
    assert "\n" not in result.detail and len(result.detail) <= 400
    if status == 503 and b"Retry-After" in raw:
        assert result.retry_after == 5.0


@pytest.mark.parametrize("url", ["http://[::1", "http://host:99999", "https://host:port/"])
def test_a_malformed_receiver_url_is_a_config_error(url: str) -> None:
    with pytest.raises(UploadConfigError, match="not valid"):
        endpoint_url(url)


def test_a_stopping_agent_finishes_the_upload_in_flight_not_the_backlog(tmp_path: Path) -> None:
    """SIGTERM sets the daemon's stop: the forwarder ends its pass after the current item, so the
    agent exits within one upload's time limit instead of after the whole queue (or systemd's kill)."""
    spool, _ = _spool_with(tmp_path, 5)
    stop, wake = threading.Event(), threading.Event()
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url, TOKEN) as uploader:
        forwarder = Forwarder(spool, uploader, listener=lambda item, result: stop.set())
        thread = threading.Thread(target=forwarder.run, args=(stop, wake, 5.0))
        thread.start()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(receiver.requests) == 1 and len(spool) == 4


def test_items_delivered_to_a_read_only_spool_are_not_uploaded_again(tmp_path: Path) -> None:
    """An SD card remounted read-only: the receiver has the items, the spool cannot forget them.
    They are reported once and not re-sent every pass; once the disk is writable they go."""
    spool, keys = _spool_with(tmp_path, 3)
    real_remove = spool.remove

    def read_only(item: SpoolItem) -> None:
        raise OSError(30, "Read-only file system")

    spool.remove = read_only  # type: ignore[method-assign]
    errors: list[str] = []
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url, TOKEN) as uploader:
        forwarder = Forwarder(spool, uploader, sleep=lambda s: None, on_error=errors.append)
        report = forwarder.flush(max_wait=60)
        forwarder.drain_pass()
        assert report.accepted == 3 and len(receiver.requests) == 3 and len(spool) == 3
        assert forwarder.undelivered() == 0
        assert len(errors) == 3 and all("will not upload it again" in line for line in errors)
        spool.remove = real_remove  # type: ignore[method-assign]
        forwarder.drain_pass()
    assert len(spool) == 0 and len(receiver.requests) == 3 and sorted(receiver.stored) == sorted(keys)


@pytest.mark.parametrize("token", ["device-token\r", "s3cret t0ken", "s3cr\u00e9t-t0ken", "s3cret\x00t0ken"])
def test_a_token_no_header_can_carry_is_a_config_error_that_does_not_show_it(token: str) -> None:
    """A CR from a Windows-edited env file failed every upload as a 'network' error with the token in the
    log line; a non-ASCII one ended the agent with a traceback."""
    if token.endswith("\r"):  # surrounding white space is no part of a token: it is dropped
        with Uploader("http://127.0.0.1:1", token) as uploader:
            assert uploader._client.headers["Authorization"] == "Bearer device-token"
        return
    with pytest.raises(UploadConfigError, match="not shown") as raised:
        Uploader("http://127.0.0.1:1", token)
    assert token not in str(raised.value)


def test_a_415_is_blocked_not_a_reason_to_reject_every_item() -> None:
    """The sender always sends application/octet-stream: a 415 comes from a proxy or another server and would
    move the whole queue to rejected/ one item at a time."""
    result = classify(httpx.Response(415, json={"error": {"code": "unsupported_media_type", "message": "no"}}))
    assert result.outcome is Outcome.BLOCKED and "proxy" in result.detail


NGINX_502 = ("<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center>"
             "<hr><center>nginx</center></body></html>")


@pytest.mark.parametrize(
    ("status", "page", "shown"),
    [
        (502, NGINX_502, "HTTP 502: 502 Bad Gateway"),
        (400, "<html><body><h1>The plain HTTP request was sent to HTTPS port</h1></body></html>",
         "HTTP 400: The plain HTTP request was sent to HTTPS port"),
        (404, "<!DOCTYPE html><html><head><title>Not Found &amp; gone</title>", "HTTP 404: Not Found & gone"),
    ],
)
def test_an_html_error_page_is_shown_by_its_title(status: int, page: str, shown: str) -> None:
    result = classify(httpx.Response(status, text=page, headers={"Content-Type": "text/html"}))
    assert result.detail.startswith(shown) and "<" not in result.detail


def test_a_retry_after_date_is_honoured() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    result = classify(httpx.Response(429, headers={"Retry-After": when}))
    assert 100 <= result.retry_after <= 121
    past = classify(httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    assert past.retry_after == 0.0
    assert classify(httpx.Response(503, headers={"Retry-After": "soon"})).retry_after == 0.0


class _ForwardProxy:
    """A forward proxy double on loopback that answers for the receiver it was asked to reach."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        targets: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                targets.append(self.path)  # absolute form: the request went through the proxy
                body = b'{"id": "img-1"}'
                self.send_response(202)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.targets = targets
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> _ForwardProxy:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_the_proxy_of_the_environment_is_used_and_no_proxy_exempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that reaches the internet only through a proxy (HTTP_PROXY in its unit's environment)
    failed every upload with a name-resolution error: the uploader's own transport made httpx ignore it."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    data = make_bitstream(3)
    with _ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        with Uploader("http://receiver.invalid:8000", TOKEN, timeout=5.0) as uploader:
            result = uploader.upload(data, idempotency_key(data))
        assert uploader.proxy == proxy.url
        assert result.outcome is Outcome.ACCEPTED and proxy.targets == ["http://receiver.invalid:8000/v1/images"]
        monkeypatch.setenv("NO_PROXY", "receiver.invalid")
        with Uploader("http://receiver.invalid:8000", TOKEN, timeout=5.0) as uploader:
            assert uploader.proxy is None
            assert uploader.upload(data, idempotency_key(data)).outcome is Outcome.RETRY  # direct: no such host
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", "socks5://user:pw@127.0.0.1:1080")
    with pytest.raises(UploadConfigError, match="SOCKS") as raised:
        Uploader("https://receiver.invalid", TOKEN)
    assert "pw" not in str(raised.value)


def test_a_trickling_proxy_is_bounded_by_the_requests_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    data = make_bitstream(4)
    with _TricklingServer(b"", _HEAD + b" " * 200) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        with Uploader("http://receiver.invalid:8000", TOKEN, timeout=1.0) as uploader:
            started = time.monotonic()
            result = uploader.upload(data, idempotency_key(data))
            took = time.monotonic() - started
    assert result.outcome is Outcome.RETRY and "Timeout" in result.detail and took < 3.0


@pytest.mark.parametrize(
    ("host", "no_proxy", "exempt"),
    [
        ("cam.example.org", "example.org", True),
        ("cam.example.org", ".example.org", True),
        ("example.org", "other.net, example.org:443", True),
        ("badexample.org", "example.org", False),
        ("anything", "*", True),
        ("::1", "[::1]", True),
        ("10.0.0.2", "10.0.0.20", False),
    ],
)
def test_no_proxy_names_hosts_and_their_domains(
    monkeypatch: pytest.MonkeyPatch, host: str, no_proxy: str, exempt: bool
) -> None:
    for name in ("no_proxy", "http_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    url = f"http://[{host}]:8000" if ":" in host else f"http://{host}:8000"
    assert environment_proxy(url) == (None if exempt else "http://proxy.internal:3128")


@pytest.mark.parametrize("base", ["http://127.0.0.1:9", "http://receiver.invalid:8000"], ids=["refused", "dns"])
def test_an_unreachable_receiver_is_named(base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """'ConnectError: [Errno -2] Name or service not known' did not say which name the agent looked up."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    data = make_bitstream(8)
    with Uploader(base, TOKEN, timeout=5.0) as uploader:
        result = uploader.upload(data, idempotency_key(data))
    assert result.outcome is Outcome.RETRY and result.receiver_wide
    assert result.detail.startswith(f"cannot reach {base.split('//')[1]}: ConnectError: ")
