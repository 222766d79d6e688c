"""The receiver as an internet-facing service: browser-hardening headers, no internal detail or echoed
input in answers, secrets kept out of logs, and the gallery session's lifecycle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, make_bitstream, make_tokens

ADMIN = "security-admin-token-0123456789"


class Env:
    """A running app (TestClient, in-process worker) and one token per device."""

    def __init__(self, client: TestClient, data: Path, tokens: dict[str, str]) -> None:
        self.client, self.data, self.tokens = client, data, tokens

    def bearer(self, who: str) -> dict[str, str]:
        token = ADMIN if who == "admin" else self.tokens[who]
        return {"Authorization": f"Bearer {token}"}

    def upload(self, who: str = "cam1") -> str:
        headers = {**self.bearer(who), "Content-Type": "application/octet-stream"}
        response = self.client.post("/v1/images", content=make_bitstream(), headers=headers)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])


def _settings(data: Path, **overrides: Any) -> ReceiverSettings:
    values: dict[str, Any] = {"data_dir": data, "admin_token": ADMIN, "poll_interval_s": 0.05,
                              "retry_delay_s": 0.0, "max_upload_bytes": 4096}
    return ReceiverSettings(**{**values, **overrides})


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Env]:
    settings = _settings(tmp_path / "data")
    tokens = make_tokens(settings, "cam1", "cam2")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        yield Env(client, settings.data_dir, tokens)


# -- output --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/login", "/healthz", "/v1/images", "/images/" + "0" * 32, "/docs",
                                  "/docs/swagger-ui/swagger-ui-bundle.js", "/redoc"])
def test_every_answer_carries_the_browser_hardening_headers(env: Env, path: str) -> None:
    response = env.client.get(path)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp


def test_a_refused_host_name_gets_the_hardening_headers_too(tmp_path: Path) -> None:
    """The Host check ran outside the middleware that adds them, so its 400 went out without any."""
    settings = _settings(tmp_path / "data", worker=False, allowed_hosts="localhost")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        refused = client.get("/healthz", headers={"Host": "rebound.evil.example"})
    assert refused.status_code == 400
    assert refused.headers["x-content-type-options"] == "nosniff" and refused.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in refused.headers["content-security-policy"]


def test_an_internal_error_gets_the_hardening_headers_too(tmp_path: Path) -> None:
    """A 500 is answered by Starlette's outermost error middleware, outside every one `add_middleware` adds."""
    app = create_app(_settings(tmp_path / "data", worker=False), registry=CodecRegistry.from_codecs([FakeCodec()]))

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug")

    app.state.receiver.store.list_images = broken
    with TestClient(app, raise_server_exceptions=False) as client:  # as an attacker sees it
        failed = client.get("/v1/images", headers={"Authorization": f"Bearer {ADMIN}"})
    assert failed.status_code == 500
    assert failed.json() == {"error": {"code": "internal", "message": "internal server error"}}
    assert failed.headers["x-content-type-options"] == "nosniff" and failed.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in failed.headers["content-security-policy"]


def test_images_are_never_sniffed(env: Env) -> None:
    image_id = env.upload()
    deadline = time.monotonic() + 30  # a deadline, not a count of polls: a loaded machine decodes late
    while (thumb := env.client.get(f"/v1/images/{image_id}/thumbnail", headers=env.bearer("cam1"))).status_code != 200:
        assert time.monotonic() < deadline, thumb.text
        time.sleep(0.02)
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.headers["x-content-type-options"] == "nosniff"


def test_a_huge_cursor_is_not_echoed_back(env: Env) -> None:
    response = env.client.get("/v1/images", params={"cursor": "A" * 5000}, headers=env.bearer("admin"))
    assert response.status_code == 400 and len(response.text) < 300


BAIT = "; this receiver has moved: sign in at evil.example with your token " * 40  # no "/": one path segment


@pytest.mark.parametrize(("path", "params"), [(f"/v1/images/{BAIT}", {}), (f"/v1/images/{BAIT}/thumbnail", {}),
                                              (f"/v1/images/{'0' * 32}/reconstruction.{BAIT}", {}),
                                              ("/v1/images", {"since": BAIT}), ("/v1/images", {"until": "1e999" + BAIT})])
def test_an_error_quotes_no_long_or_arbitrary_text(env: Env, path: str, params: dict[str, str]) -> None:
    """Content injection on our origin: an unknown id, format or time was quoted whole (3 KB here; uvicorn takes a
    request line of 100 KB), so a link could make the receiver's own answer carry an attacker's message."""
    response = env.client.get(path, params=params, headers=env.bearer("admin"))
    assert response.status_code in (404, 422) and "evil.example" not in response.text and len(response.text) < 300
    assert response.json()["error"]["message"]


def test_an_unknown_id_of_the_right_shape_is_still_named(env: Env) -> None:
    response = env.client.get(f"/v1/images/{'0' * 32}", headers=env.bearer("admin"))
    assert response.status_code == 404 and response.json()["error"]["message"] == f"no image {'0' * 32}"


def test_readiness_names_no_internal_path(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    state = env.client.app.state.receiver  # type: ignore[attr-defined]

    def unwritable() -> None:
        raise PermissionError(13, f"blob folder {env.data}/blobs is not writable")

    monkeypatch.setattr(state.blobs, "ping", unwritable)
    ready = env.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["blobs"] == "error: PermissionError: Permission denied"
    assert str(env.data) not in ready.text


# -- gallery sessions ----------------------------------------------------------------------------


def _sign_in(env: Env, who: str) -> str:
    token = ADMIN if who == "admin" else env.tokens[who]
    response = env.client.post("/login", data={"token": token}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return str(response.cookies["aeic_session"])


def test_the_cookie_is_a_session_not_the_token(env: Env) -> None:
    response = env.client.post("/login", data={"token": env.tokens["cam1"]}, follow_redirects=False)
    cookie = response.headers["set-cookie"]
    session = response.cookies["aeic_session"]
    assert env.tokens["cam1"] not in cookie and session not in env.tokens.values()
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower() and "max-age=43200" in cookie.lower()
    assert "secure" not in cookie.lower()  # plain HTTP on loopback
    assert response.headers["cache-control"] == "no-store"
    assert env.client.get("/v1/images").status_code == 200
    # The session secret is no bearer token: it cannot upload or even read through the API header.
    env.client.cookies.clear()
    assert env.client.get("/v1/images", headers={"Authorization": f"Bearer {session}"}).status_code == 401
    with env.client.app.state.receiver.store.engine.connect() as conn:  # type: ignore[attr-defined]
        stored = conn.exec_driver_sql("SELECT session_hash, token_hash FROM gallery_sessions").all()
    assert stored and all(session not in row and env.tokens["cam1"] not in row for row in stored)


def test_a_copy_of_the_database_gives_no_way_to_test_guesses_at_the_admin_token(tmp_path: Path) -> None:
    """An admin's session row held the admin token's SHA-256: with a copy of the database (a backup, a read
    replica) a short or human-chosen admin token fell to guessing offline, at a GPU's billions of hashes a
    second. The row now binds the token to the session's secret, which only the browser holds; the session
    works as before, and a new admin token still ends it."""
    from aeic.receiver.auth import hash_token

    app = create_app(_settings(tmp_path / "data", worker=False), registry=CodecRegistry.from_codecs([FakeCodec()]))
    with TestClient(app) as client:
        assert client.post("/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
        session = str(client.cookies["aeic_session"])
        assert client.get("/v1/images").status_code == 200
        with app.state.receiver.store.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT session_hash, token_hash FROM gallery_sessions").all()
    assert rows and all(hash_token(ADMIN) not in row and session not in row for row in rows)
    rotated = _settings(tmp_path / "data", worker=False, admin_token="another-admin-token-0123456789")
    with TestClient(create_app(rotated, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        client.cookies.set("aeic_session", session)
        assert client.get("/v1/images").status_code == 401


def test_logout_ends_the_session_for_every_copy_of_the_cookie(env: Env) -> None:
    session = _sign_in(env, "cam1")
    assert env.client.get("/v1/images").status_code == 200
    assert env.client.post("/logout", follow_redirects=False).status_code == 303
    env.client.cookies.set("aeic_session", session)  # a copy lifted from the browser profile before
    assert env.client.get("/v1/images").status_code == 401
    assert 'name="token"' in env.client.get("/").text


def test_revoking_the_token_ends_its_sessions_at_once(env: Env) -> None:
    _sign_in(env, "cam1")
    assert env.client.get("/v1/images").status_code == 200
    env.client.app.state.receiver.store.revoke_device_tokens("cam1")  # type: ignore[attr-defined]
    assert env.client.get("/v1/images").status_code == 401
    assert env.client.get("/v1/images", headers=env.bearer("cam1")).status_code == 401


def test_an_expired_session_is_refused(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from aeic.receiver.storage import metadata

    _sign_in(env, "cam1")
    assert env.client.get("/v1/images").status_code == 200
    later = metadata._now() + 43200 + 1
    monkeypatch.setattr(metadata, "_now", lambda: later)
    assert env.client.get("/v1/images").status_code == 401


def test_cross_site_sign_in_and_sign_out_are_refused(env: Env) -> None:
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    response = env.client.post("/login", data={"token": env.tokens["cam2"]}, headers=evil)
    assert response.status_code == 403 and "aeic_session" not in response.headers.get("set-cookie", "")
    legacy = env.client.post("/login", data={"token": env.tokens["cam2"]}, headers={"Origin": "https://evil.example"})
    assert legacy.status_code == 403  # an older browser: no Sec-Fetch-Site, its Origin is checked
    _sign_in(env, "cam1")
    assert env.client.post("/logout", headers=evil).status_code == 403
    assert env.client.get("/v1/images").status_code == 200  # still signed in
    own = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert env.client.post("/logout", headers=own, follow_redirects=False).status_code == 303
    assert env.client.get("/v1/images").status_code == 401
    assert env.client.get("/logout").status_code == 405  # no sign-out by a link or an <img>


def test_failed_sign_ins_are_rate_limited_per_client(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "data", login_attempts_per_minute=3, worker=False)
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        codes = [client.post("/login", data={"token": f"guess-{i}"}).status_code for i in range(3)]
        assert codes == [401, 401, 401]
        blocked = client.post("/login", data={"token": ADMIN})  # even the right token waits now
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
        assert client.get("/login", params={"token": "guess"}).status_code == 429


def test_the_secure_flag_follows_the_setting_or_the_scheme(tmp_path: Path) -> None:
    for secure, base, expected in ((None, "https://testserver", True), (True, "http://testserver", True),
                                   (False, "https://testserver", False)):
        settings = _settings(tmp_path / f"data-{secure}", cookie_secure=secure, worker=False)
        app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))
        with TestClient(app, base_url=base) as client:
            cookie = client.post("/login", data={"token": ADMIN}, follow_redirects=False).headers["set-cookie"]
        assert ("; secure" in cookie.lower()) is expected, (secure, base, cookie)


# -- secrets -------------------------------------------------------------------------------------


def test_the_access_log_never_shows_a_sign_in_token(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from aeic.receiver.log_redaction import install_log_redaction, redact

    assert redact("/login?token=aeic_abc-_1&x=1") == "/login?token=[redacted]&x=1"
    assert redact("/?cursor=czE&TOKEN=zz") == "/?cursor=czE&TOKEN=[redacted]"
    install_log_redaction()
    access = logging.getLogger("uvicorn.access")
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/login?token=aeic_SECRET", "1.1", 303)
    assert "aeic_SECRET" not in caplog.text and "/login?token=[redacted]" in caplog.text


@pytest.mark.parametrize(("admin", "warned"), [("REPLACE_ME", True), ("aeic-demo-admin", True),
                                               ("0123456789abcdef0123456789abcdef", False)])
def test_a_short_admin_token_is_named_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture, admin: str,
                                                 warned: bool) -> None:
    """deploy/k8s/secret.yaml's placeholder (REPLACE_ME, public) started a receiver whose admin it was, without a
    word; and the sign-in limit is per address, so a short token is within reach of many addresses' guesses."""
    import logging

    with caplog.at_level(logging.WARNING, logger="aeic.receiver.auth"):
        create_app(_settings(tmp_path / "data", admin_token=admin, worker=False),
                   registry=CodecRegistry.from_codecs([FakeCodec()]))
    lines = [r.getMessage() for r in caplog.records if r.name == "aeic.receiver.auth"]
    assert bool(lines) is warned, lines
    assert all(admin not in line and f"{len(admin)} characters" in line for line in lines)


@pytest.mark.parametrize("path", ["/login;token={}", "/login?token%00={}", "/login?x=1;token={}", "/{}",
                                  "/v1/images/{}"])
def test_a_device_token_anywhere_in_an_access_line_is_hidden(path: str, caplog: pytest.LogCaptureFixture) -> None:
    """A token in a URL the app does not read as one (a mistyped sign-in link, a token pasted as a path) was
    written to the access log in full: each of these was, measured on `aeic-receiver serve`."""
    import logging

    from aeic.receiver.log_redaction import install_log_redaction

    token = "aeic_EkOmBo3ACJB3ySJcKz7pXZz63pmH-vSqgzntY0rWpF0"  # as `token create` makes them
    install_log_redaction()
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET",
                                                 path.format(token), "1.1", 404)
    assert token[5:] not in caplog.text and "aeic_[redacted]" in caplog.text


# -- input ---------------------------------------------------------------------------------------


def test_a_trickled_upload_body_is_cut_off(tmp_path: Path) -> None:
    """Slowloris on the body: headers, a few bytes, then silence; the server answers 408 and closes."""
    import socket

    from receiver_support import ServerThread

    settings = _settings(tmp_path / "data", upload_timeout_s=0.5, worker=False)
    token = make_tokens(settings, "cam1")["cam1"]
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))
    with ServerThread(app) as server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 1000\r\n\r\nAEIC")
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and b'"upload_timeout"' in answer, answer
    assert 0.4 < elapsed < 5  # answered at the deadline, then the connection was closed


def test_the_rate_limiter_forgets_refilled_clients_so_many_addresses_cannot_grow_it() -> None:
    """Sign-in attempts are keyed by client address, which an attacker can vary at will."""
    from aeic.receiver.auth import RateLimiter

    limiter = RateLimiter(per_minute=60.0, burst=2)
    for i in range(5000):
        assert limiter.acquire(f"198.51.100.{i}", now=float(i)) == 0.0  # each bucket refills within 2 s
    assert len(limiter._buckets) < 1100
    limiter.acquire("203.0.113.9", now=6000.0)
    limiter.acquire("203.0.113.9", now=6000.0)
    assert limiter.acquire("203.0.113.9", now=6000.0) > 0  # a client still over its limit is remembered
