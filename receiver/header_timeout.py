"""A time limit on each request's headers, which uvicorn lacks.

uvicorn (h11) closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`), but
neither a connection that sends nothing nor one whose headers trickle in: the app only sees a request once its
headers are complete, so no setting of its own reaches them. Each such connection holds a file descriptor
for as long as the client likes, and at the process's limit (`ulimit -n`) the receiver accepts nothing
more: measured with a limit of 400, 400 idle connections left `/healthz` unanswered. This protocol closes a
connection whose request line and headers have not all arrived within `header_timeout_s` of the
connection opening (or, on a kept-alive connection, of the next request's first byte), as nginx's
`client_header_timeout` does. The body has its own limit (`upload_timeout_s`, in the routes that read one);
the rest of a body the receiver answered without reading (a 401 for a wrong token, a 413, a GET's body) is
read and dropped by uvicorn for as long as it comes, so a client trickling a large declared body after its
401 held the connection for good: it must be in within `dropped_body_timeout_s` of the answer (the
receiver gives it `upload_timeout_s`, as it gives a body it reads: a slow sender then still reads its 413,
where cutting its upload short would leave it a broken connection to retry).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HeaderTimeoutProtocol", "protocol_with_header_timeout"]

log = logging.getLogger(__name__)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers are late (see the module doc)."""

    header_timeout_s: float = 20.0
    dropped_body_timeout_s: float = 60.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer(self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer(self.header_timeout_s)  # a kept-alive connection's next request starts
        super().data_received(data)
        if self._handling():
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE:
            self._arm_header_timer(self.dropped_body_timeout_s)  # answered before its body was read: dropped

    def _handling(self) -> bool:
        """Whether the app has the request and has not answered it yet (no limit of this module's then)."""
        return self.conn.their_state is not h11.IDLE and self.conn.our_state is not h11.DONE

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self, seconds: float) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(seconds, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self._handling() and not self.transport.is_closing():
            log.debug("closing a connection from %s: its request headers (or a dropped body) came too late",
                      self.client)
            self.transport.close()


def protocol_with_header_timeout(header_timeout_s: float,
                                 dropped_body_timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give uvicorn (`Config(http=...)`), with these limits."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout_s": header_timeout_s, "dropped_body_timeout_s": dropped_body_timeout_s})
