"""Browser-hardening response headers on every answer of the receiver.

Why on every response and not only the gallery's HTML: an image or a JSON error opened directly in a
browser must not be sniffed into HTML, framed by another site, or leak its URL through the Referer; the
gallery and the API documentation (/docs, served from this origin too: `api_docs`) get a Content-Security-
Policy that allows only their own scripts, styles and images, so a markup injection could not run script
even if escaping ever failed. No path is exempt.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_SECURITY_POLICY", "HardenedFastAPI", "SecurityHeadersMiddleware"]

CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
]


class SecurityHeadersMiddleware:
    """Pure ASGI middleware (it does not buffer bodies, so streamed uploads stay streamed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in _HEADERS:
                    if name not in present:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HardenedFastAPI(FastAPI):
    """A FastAPI app whose every answer passes `SecurityHeadersMiddleware`: it wraps the whole middleware
    stack. Added with `add_middleware`, it missed what the outer layers answer themselves: Starlette's error
    middleware sends every 500 (the app's own `internal` error body included), outside all added ones."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeadersMiddleware(super().build_middleware_stack())
