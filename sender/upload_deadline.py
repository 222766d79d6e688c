"""A wall-clock limit on one whole HTTP exchange, not on each socket read.

httpx's timeouts bound every read and write separately, so a server (or a middlebox) that
trickles its answer a byte at a time, each byte inside the read timeout, holds an upload, and
with it the spool's drain, for as long as it likes. The sender's ``timeout`` setting means
"seconds per HTTP request", so every socket operation here waits at most what is left of that
request's budget, then fails as a timeout, which the uploader retries like any network error.
"""

from __future__ import annotations

import ssl
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import httpcore
import httpx


class Deadline:
    """The end of the exchange in progress (``None`` between exchanges: no limit but httpx's)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at: float | None = None

    @contextmanager
    def running(self, seconds: float) -> Iterator[None]:
        """Bound every socket operation inside the ``with`` block to ``seconds`` in all."""
        self._at = self._clock() + seconds
        try:
            yield
        finally:
            self._at = None

    def clip(self, timeout: float | None, error: type[Exception]) -> float | None:
        """The smaller of an operation's own timeout and what is left; ``error`` if nothing is."""
        if self._at is None:
            return timeout
        left = self._at - self._clock()
        if left <= 0:
            raise error("the request's time limit ran out")
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.clip(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.clip(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        clipped = self._deadline.clip(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, clipped), self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, deadline: Deadline) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        clipped = self._deadline.clip(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, clipped, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.NetworkStream:
        clipped = self._deadline.clip(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, clipped, socket_options), self._deadline)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def deadline_transport(deadline: Deadline, verify: ssl.SSLContext | bool, proxy: str | None = None) -> httpx.HTTPTransport:
    """An httpx transport whose connections obey ``deadline`` (HTTP/1.1; direct, or through an HTTP(S)
    ``proxy``: a proxy that trickles its answers is bounded like a receiver that does).

    httpx builds its connection pool without a way to pass a network backend, so the pool is
    rebuilt with one; tests/test_sender_upload.py fails if a new httpx stops using it.
    """
    transport = httpx.HTTPTransport(verify=verify)
    ssl_context = httpx.create_ssl_context(verify=verify)
    backend = _DeadlineBackend(deadline)
    # keepalive_expiry: httpx's default, so an idle camera's next upload opens a fresh connection.
    if proxy is None:  # no public hook for the network backend: the pool is replaced
        transport._pool = httpcore.ConnectionPool(ssl_context=ssl_context, keepalive_expiry=5.0, network_backend=backend)
        return transport
    via = httpx.Proxy(proxy)
    transport._pool = httpcore.HTTPProxy(
        proxy_url=httpcore.URL(
            scheme=via.url.raw_scheme, host=via.url.raw_host, port=via.url.port, target=via.url.raw_path
        ),
        proxy_auth=via.raw_auth,
        proxy_headers=via.headers.raw,
        ssl_context=ssl_context,
        keepalive_expiry=5.0,
        network_backend=backend,
    )
    return transport
