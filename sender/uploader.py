"""POST one bitstream to the receiver and classify the answer.

The receiver contract (issue 6): ``POST {base}/v1/images`` with the bitstream as body,
``Content-Type: application/octet-stream``, ``Authorization: Bearer <device token>`` and an
``Idempotency-Key`` (hex SHA-256 of the body, then ``-capture`` for a camera frame: see
:func:`aeic.sender.spool.idempotency_key`). It answers 202 with an id once the bitstream
is durably stored, and the same id (200 or 202) for a repeated key, so a retry after a lost
answer never stores an image twice.

How answers map to what the spool does (see :class:`Outcome`):

* 2xx with the receiver's receipt (a JSON body with the image ``id``): ``ACCEPTED``, the item
  leaves the spool.
* 2xx without a receipt, 408, 429, 5xx, network and TLS errors: ``RETRY``, the item stays; back
  off with jitter (at least the server's ``Retry-After``). A 2xx without an id is not the
  receiver's answer (a captive portal or a proxy's page): taking it as delivered would lose the image.
  The forwarder learns from the next item whether such a failure is this item's alone
  (:mod:`aeic.sender.forward`); ``receiver_wide`` marks those that cannot be.
* 401, 403 (token refused), 404, 405 (wrong URL), 3xx (moved), 415 (the media type refused: the
  sender always sends ``application/octet-stream``, so a proxy or another server answers): ``BLOCKED``.
  Nothing is wrong with the item: every item would get the same answer until an operator fixes the
  token, URL or proxy, so items stay queued (not rejected) and the drain stops with the reason.
* an HTML page with a 4xx other than 413 (a web server or proxy at the URL, ``http://`` to a TLS port):
  ``BLOCKED``; the receiver answers in JSON, and the page says nothing about the item.
* 422 ``unknown_model``: ``RETRY``. The stream is sound; the receiver does not serve its model yet
  (a sender given a new model package before the receiver): rejected, every photo of the rollout
  waited in ``rejected/`` for an operator to requeue it. As a retry it waits out the upgrade like an
  outage, and an item the receiver keeps refusing while it takes others is given up after a day.
* any other 4xx (bad bitstream, too large, ...): ``REJECTED``, the item moves
  to ``rejected/`` with the receiver's reason; it is never retried automatically.

A reason that is an HTML page (a proxy's or a web server's error page) is shown by its title, so a
log line says "502 Bad Gateway", not a page of markup. Whatever the answer holds (a body that does not decode as its Content-Encoding says, JSON nested
too deep to parse, header bytes that are not ASCII), it is classified by its status: a proxy's
or an attacker's odd page must not crash ``send`` or ``flush``.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import html
import re
import ssl
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from aeic.sender.upload_deadline import Deadline, deadline_transport
from aeic.shared.url_redaction import without_password

from aeic import __version__

UPLOAD_PATH = "/v1/images"
API_ROOT = "/v1"
_BLOCKING_STATUSES = frozenset({401, 403, 404, 405, 415})
_RETRY_4XX = frozenset({408, 429})
# The receiver answers with a few hundred bytes of JSON; anything longer is someone else's page,
# and only its start is kept (for the reason shown), so a big body cannot fill a small device's memory.
MAX_ANSWER_BYTES = 64 * 1024
_BODY_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})
# What a bearer token may hold (RFC 6750's b64token, and every printable ASCII character besides):
# anything else cannot go into a header, and would fail every upload as if the network did.
_TOKEN_CHARACTERS = re.compile(r"[\x21-\x7e]+")
_RECEIPT_ID = re.compile(r"[\x21-\x7e]{1,255}")
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RETRY = "retry"
    BLOCKED = "blocked"


@dataclass(frozen=True)
class UploadResult:
    """What one POST achieved; ``detail`` is a one-line human-readable reason."""

    outcome: Outcome
    status: int | None
    detail: str
    receiver_id: str | None = None
    retry_after: float = 0.0
    # A RETRY that says nothing about this item: no connection to the receiver at all, or a 429 (the
    # device's rate limit). The drain backs off at once instead of trying the next item to learn
    # whether the fault is the item's.
    receiver_wide: bool = False


class UploadConfigError(ValueError):
    """The uploader cannot be configured as asked (bad URL, missing token or CA bundle)."""


def endpoint_url(base: str) -> str:
    """``https://host:port``, the API root ``.../v1`` (as the receiver's docs name it) or ``.../v1/images`` ->
    the full upload URL."""
    try:
        parts = urlsplit(base)
        parts.port  # noqa: B018 - raises for a port that is not a number in 0..65535
    except ValueError as exc:  # "http://[::1", "http://host:99999"
        raise UploadConfigError(f"receiver URL {base!r} is not valid: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UploadConfigError(f"receiver URL must be http:// or https://host[:port], got {base!r}")
    path = parts.path.rstrip("/").removesuffix(API_ROOT)  # the API root was posted to .../v1/v1/images, a 404
    if not path.endswith(UPLOAD_PATH):
        path += UPLOAD_PATH
    return f"{parts.scheme}://{parts.netloc}{path}"


def tls_verification(ca_bundle: str | Path | None) -> ssl.SSLContext | bool:
    """Certificate verification is always on; a CA bundle replaces the system store."""
    if ca_bundle is None:
        return True
    path = Path(ca_bundle)
    if not path.is_file():
        raise UploadConfigError(f"CA bundle {path} does not exist or is not a file")
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise UploadConfigError(f"CA bundle {path} is not a valid PEM bundle ({exc})") from None


def environment_proxy(url: str) -> str | None:
    """The HTTP(S) proxy the usual variables name for ``url`` (``https_proxy``, ``http_proxy``,
    ``all_proxy``, either case; ``no_proxy`` exempts hosts), or None to connect directly.

    Why here: the uploader's own transport (the whole-request time limit) made httpx ignore these
    variables, so a device that reaches the internet only through a proxy failed every upload with a
    name-resolution error that never mentioned the proxy.
    """
    proxies = urllib.request.getproxies_environment()
    parts = urlsplit(url)
    if _exempt(parts.hostname or "", proxies.get("no", "")):
        return None
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    proxy = proxy if "://" in proxy else f"http://{proxy}"
    if urlsplit(proxy).scheme not in ("http", "https"):
        raise UploadConfigError(f"proxy {without_password(proxy)} is not http:// or https:// (SOCKS is not supported)")
    return proxy


def _exempt(host: str, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (comma list of host names, ``.domain`` or ``domain`` for its sub-domains, an
    optional ``:port``, ``*`` for all) names ``host``."""
    for entry in no_proxy.lower().split(","):
        name = entry.strip()
        if name == "*":
            return True
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name  # host:port; not an IPv6 address
        name = name.strip("[]").lstrip(".")
        if name and (host == name or host.endswith(f".{name}")):
            return True
    return False


class Uploader:
    """An HTTP client bound to one receiver and one device token (one connection pool).

    ``timeout`` bounds a whole exchange (connect, send, answer), not each socket read; a
    ``transport`` given for tests replaces the network and with it that limit. Without one, the
    proxy the environment names for the receiver's URL is used (:func:`environment_proxy`).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        ca_bundle: str | Path | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        token = token.strip()  # a line end from an env file edited on Windows is not part of it
        if not token:
            raise UploadConfigError("no device token: pass --token or set AEIC_TOKEN")
        if not _TOKEN_CHARACTERS.fullmatch(token):
            raise UploadConfigError("the device token holds a space, a control or a non-ASCII character, which no "
                                    "token has (a pasting or encoding mistake?); it is not shown here")  # fmt: skip
        self.url = endpoint_url(base_url)
        self._timeout = timeout
        self._deadline = Deadline()
        verify = tls_verification(ca_bundle)
        self.proxy = None if transport is not None else environment_proxy(self.url)
        self._client = httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers={"Authorization": f"Bearer {token}", "User-Agent": f"aeic-send/{__version__}"},
            follow_redirects=False,
            transport=transport or deadline_transport(self._deadline, verify, self.proxy),
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Uploader:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upload(self, data: bytes, key: str) -> UploadResult:
        """POST ``data`` once; never raises for network or HTTP failures."""
        headers = {"Content-Type": "application/octet-stream", "Idempotency-Key": key, "Accept-Encoding": "identity"}
        try:
            with self._deadline.running(self._timeout):
                response = self._post(data, headers)
        except httpx.TransportError as exc:
            unreached = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            detail = _transport_detail(exc)
            if unreached:  # "Name or service not known" alone does not say which name
                via = f" through the proxy {without_password(self.proxy)}" if self.proxy else ""
                detail = f"cannot reach {urlsplit(without_password(self.url)).netloc}{via}: {detail}"
            elif isinstance(exc, httpx.TimeoutException):  # "ReadTimeout: timed out" says neither who nor how long
                detail = f"no whole answer within the {self._timeout:g}-s timeout (connected, then silent or slow): {detail}"
            return UploadResult(Outcome.RETRY, None, detail, receiver_wide=unreached)
        return classify(response)

    def _post(self, data: bytes, headers: dict[str, str]) -> httpx.Response:
        """The answer with at most :data:`MAX_ANSWER_BYTES` of its (decoded) body read."""
        with self._client.stream("POST", self.url, content=data, headers=headers) as response:
            body = _bounded_body(response)
        # Raw header bytes: values that are not ASCII (Latin-1 from some proxy) cannot be encoded again.
        kept = [(k, v) for k, v in response.headers.raw if k.lower().decode("latin-1") not in _BODY_FRAMING]
        return httpx.Response(response.status_code, headers=kept, content=bytes(body[:MAX_ANSWER_BYTES]))


# Content-Encoding -> zlib's wbits. We ask for identity; a server that compresses anyway is decoded here, at
# most MAX_ANSWER_BYTES out, where httpx expanded each 64 KiB network read whole (64 MiB of a gzip bomb).
_ZLIB_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def _bounded_body(response: httpx.Response) -> bytearray:
    """At most :data:`MAX_ANSWER_BYTES` of the body, decoded; empty for an encoding other than gzip or
    deflate, or a body that does not decode as its encoding says: the status still counts."""
    if response.is_stream_consumed:  # read already, and decoded, by the transport (httpx.MockTransport in tests)
        return bytearray(response.content[:MAX_ANSWER_BYTES])
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    decoder = zlib.decompressobj(_ZLIB_WBITS[encoding]) if encoding in _ZLIB_WBITS else None
    body = bytearray()
    if decoder is None and encoding not in ("", "identity"):
        return body
    try:
        for chunk in response.iter_raw():
            body += decoder.decompress(chunk, MAX_ANSWER_BYTES - len(body)) if decoder else chunk
            if len(body) >= MAX_ANSWER_BYTES:
                break
    except zlib.error:
        body.clear()
    return body


def classify(response: httpx.Response) -> UploadResult:
    """Map an HTTP answer to an :class:`Outcome` (see the module docstring)."""
    status = response.status_code
    body = _json(response)
    reason = _reason(response, body)
    if 200 <= status < 300:
        receipt = _receiver_id(body)
        if receipt is None:
            return UploadResult(Outcome.RETRY, status, f"HTTP {status} without the receiver's receipt (a captive "
                                f"portal or proxy answering?): {reason}")  # fmt: skip
        return UploadResult(Outcome.ACCEPTED, status, f"HTTP {status}", receipt)
    if status in _RETRY_4XX or status >= 500:
        return UploadResult(Outcome.RETRY, status, f"HTTP {status}: {reason}", None, _retry_after(response), status == 429)
    if status in _BLOCKING_STATUSES:
        hint = {401: "check the device token", 403: "check the device token",
                415: "the receiver or a proxy before it refused application/octet-stream; check the URL and proxy",
                }.get(status, "check the receiver URL")  # fmt: skip
        return UploadResult(Outcome.BLOCKED, status, f"HTTP {status}: {reason} ({hint})")
    if 300 <= status < 400:
        where = _one_line(response.headers.get("Location", "?"))
        return UploadResult(
            Outcome.BLOCKED, status, f"HTTP {status}: receiver moved to {where}; use that URL"
        )
    if 400 <= status < 500:
        if status != 413 and _is_html(response):  # a size limit is about the item, any other page is not
            return UploadResult(Outcome.BLOCKED, status, f"HTTP {status}: {reason} (a web page, not the receiver's "
                                "JSON answer: check the receiver URL, its port and any proxy)")  # fmt: skip
        if _error_code(body) == "unknown_model":
            return UploadResult(Outcome.RETRY, status, f"HTTP {status}: {reason} (deploy this sender's model "
                                "package on the receiver; the item stays queued)")  # fmt: skip
        return UploadResult(Outcome.REJECTED, status, f"HTTP {status}: {reason}")
    return UploadResult(Outcome.RETRY, status, f"unexpected HTTP {status}")


def _json(response: httpx.Response) -> object:
    """The answer's body as JSON, or None when it is not JSON (or nested too deep to parse)."""
    try:
        return response.json()
    except (ValueError, RecursionError):
        return None


def _error_code(body: object) -> str | None:
    """The stable code of the receiver's ``{"error": {"code", "message"}}`` answer, if it is one."""
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _reason(response: httpx.Response, body: object) -> str:
    """The receiver's error message: JSON ``detail``/``error``/``message`` or the text."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):  # the receiver's {"error": {code, message}}
            code = f"{error['code']}: " if error.get("code") else ""
            return _one_line(f"{code}{error['message']}")
        for field in ("detail", "error", "message"):
            if body.get(field):
                return _one_line(str(body[field]))
    text = response.text.strip() if response.content else ""
    if _is_html(response):
        text = _html_text(text)
    return _one_line(text) or response.reason_phrase or "no reason given"


def _is_html(response: httpx.Response) -> bool:
    """Whether the answer is a web page (a proxy's or web server's), by its type or its first character."""
    text = response.text.lstrip() if response.content else ""
    return "html" in response.headers.get("Content-Type", "").lower() or text[:1] == "<"


def _html_text(page: str) -> str:
    """An HTML page's title, else its text without the markup."""
    title = _HTML_TITLE.search(page)
    text = title.group(1) if title is not None and title.group(1).strip() else _HTML_TAG.sub(" ", page)
    return html.unescape(text)


def _receiver_id(body: object) -> str | None:
    """The receipt's image id: a string of 1-255 visible ASCII characters (the receiver's are 32 hex digits).
    Another server's 2xx with some other ``id`` (a number, ``false``, an object) is no receipt: taken for one,
    it deleted the image from the spool as delivered."""
    image_id = body.get("id") if isinstance(body, dict) else None
    return image_id if isinstance(image_id, str) and _RECEIPT_ID.fullmatch(image_id) else None


def _retry_after(response: httpx.Response) -> float:
    """Retry-After in seconds: delta-seconds, or an HTTP date (counted from this device's clock)."""
    value = response.headers.get("Retry-After", "").strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):  # not a date either: no wait asked for
        return 0.0
    if when.tzinfo is None:  # "-0000" parses without a zone; an HTTP date is always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


# What to do about a TLS failure, by the words OpenSSL uses for it: "pass --ca-bundle" was the advice for
# every one, also for a certificate of another host or one that a device's wrong clock calls expired.
_TLS_ADVICE = (
    ("mismatch", "the certificate is for another host name: give --to (receiver_url) the name it was issued for"),
    ("expired", "the certificate has expired, or this device's clock is wrong (no real-time clock, no NTP yet?)"),
    ("not yet valid", "the certificate is not valid yet: this device's clock is probably wrong (no NTP yet?)"),
    ("CERTIFICATE_VERIFY_FAILED", "for a private CA pass --ca-bundle (ca_bundle) with the CA's PEM file"),
    ("WRONG_VERSION_NUMBER", "the receiver does not speak TLS on this port: is it http://, or the wrong port?"),
)


def _transport_detail(exc: httpx.TransportError) -> str:
    text = _one_line(str(exc)) or type(exc).__name__
    for words, advice in _TLS_ADVICE:
        if words in text:
            what = "TLS certificate verification failed" if "CERTIFICATE_VERIFY_FAILED" in text else "TLS failed"
            return f"{what} ({text}); {advice}"
    return f"{type(exc).__name__}: {text}"


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
