"""Browser-hardening response headers on every answer of the receiver.

Why on every response and not only the gallery's HTML: an image or a JSON error opened directly in a
browser must not be sniffed into HTML, framed by another site, or leak its URL through the Referer; the
gallery additionally gets a Content-Security-Policy that allows only its own scripts, styles and images,
so a markup injection could not run script even if escaping ever failed.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["GALLERY_CSP", "SecurityHeadersMiddleware"]

GALLERY_CSP = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
               "form-action 'self'; frame-ancestors 'none'")
# FastAPI's /docs and /redoc load their UI from a CDN with inline script: only forbid framing there.
_DOCS_CSP = "frame-ancestors 'none'"
_DOCS_PATHS = ("/docs", "/redoc")
_COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeadersMiddleware:
    """Pure ASGI middleware (it does not buffer bodies, so streamed uploads stay streamed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        csp = _DOCS_CSP if path.startswith(_DOCS_PATHS) else GALLERY_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in [*_COMMON, (b"content-security-policy", csp.encode())]:
                    if name not in present:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
