"""The gallery's sign-in sessions against what a security review found: a second sign-in from the same
browser left the first session alive, an HTTPS cookie another subdomain could plant, and a sign-in form
whose body could take forever."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from receiver_support import ServerThread, gallery_app

ADMIN = "sessions-admin-token-0123456789"
PLAIN = "aeic_session"
HOST = "__Host-aeic_session"


@pytest.fixture()
def https(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """A client of the gallery over HTTPS (cookie_secure unset: it follows the request's scheme)."""
    app, tokens = gallery_app(tmp_path, ADMIN, ("cam1", "cam2"), worker=False)
    with TestClient(app, base_url="https://testserver") as client:
        yield client, tokens


def _sign_in(client: TestClient, token: str) -> str:
    """The Set-Cookie header of a successful sign-in."""
    answer = client.post("/login", data={"token": token}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    return answer.headers["set-cookie"]


def test_signing_in_again_ends_the_browsers_previous_session(tmp_path: Path) -> None:
    """A copy of the first cookie (lifted from the browser profile) stayed valid for `session_ttl_s` after
    the browser signed in again; the new session is the server's secret, not the one the browser sent."""
    app, tokens = gallery_app(tmp_path, ADMIN, ("cam1", "cam2"), worker=False)
    with TestClient(app) as client:
        _sign_in(client, tokens["cam1"])
        first = str(client.cookies[PLAIN])
        _sign_in(client, tokens["cam2"])
        second = str(client.cookies[PLAIN])
        assert second != first
        assert client.get("/v1/images").status_code == 200  # the new session works
        client.cookies.clear()
        client.cookies.set(PLAIN, first)
        assert client.get("/v1/images").status_code == 401
        client.cookies.clear()
        client.cookies.set(PLAIN, "chosen-by-the-client")  # no fixation: the server mints the secret
        minted = _sign_in(client, tokens["cam1"]).split(";")[0].removeprefix(f"{PLAIN}=")
        assert minted not in ("chosen-by-the-client", first, second) and len(minted) == 43


def test_a_failed_sign_in_leaves_the_session_alone(tmp_path: Path) -> None:
    app, tokens = gallery_app(tmp_path, ADMIN, worker=False)
    with TestClient(app) as client:
        _sign_in(client, tokens["cam1"])
        assert client.post("/login", data={"token": "aeic_wrong"}, follow_redirects=False).status_code == 401
        assert client.get("/v1/images").status_code == 200


def test_over_https_the_cookie_is_host_only(https: tuple[TestClient, dict[str, str]]) -> None:
    """`__Host-`: browsers accept it only Secure, with Path=/ and no Domain, so a sibling subdomain cannot
    set it for this host; sign-out clears it under the same name."""
    client, tokens = https
    cookie = _sign_in(client, tokens["cam1"])
    assert cookie.startswith(f"{HOST}=")
    attributes = [part.strip().lower() for part in cookie.split(";")[1:]]
    assert "secure" in attributes and "path=/" in attributes and not any(a.startswith("domain") for a in attributes)
    assert client.get("/v1/images").status_code == 200
    out = client.post("/logout", follow_redirects=False)
    assert out.status_code == 303 and out.headers["set-cookie"].startswith(f'{HOST}=""')
    assert "secure" in out.headers["set-cookie"].lower()
    assert client.get("/v1/images").status_code == 401


def test_over_https_a_cookie_under_the_plain_name_is_not_a_session(https: tuple[TestClient, dict[str, str]]) -> None:
    """What evil.example.com can plant for example.com (`Domain=example.com`): its own valid session, which
    showed the victim the attacker's gallery (and took the pictures the victim then uploaded by hand)."""
    client, tokens = https
    _sign_in(client, tokens["cam2"])
    planted = str(client.cookies[HOST])
    client.cookies.clear()
    client.cookies.set(PLAIN, planted)
    assert client.get("/v1/images").status_code == 401
    assert 'name="token"' in client.get("/").text


def test_cookie_secure_names_the_cookie_even_behind_a_plain_http_hop(tmp_path: Path) -> None:
    """`cookie_secure=true` behind a TLS proxy that is not trusted to forward the scheme: the browser sees
    HTTPS, so the cookie is Secure, and so `__Host-`."""
    app, tokens = gallery_app(tmp_path, ADMIN, worker=False, cookie_secure=True)
    with TestClient(app) as client:
        assert _sign_in(client, tokens["cam1"]).startswith(f"{HOST}=")


def test_plain_http_keeps_the_plain_name(tmp_path: Path) -> None:
    """`__Host-` needs Secure, which a browser on plain HTTP would not send back."""
    app, tokens = gallery_app(tmp_path, ADMIN, worker=False)
    with TestClient(app) as client:
        cookie = _sign_in(client, tokens["cam1"])
    assert cookie.startswith(f"{PLAIN}=") and "secure" not in cookie.lower()


def test_a_trickled_sign_in_form_is_cut_off(tmp_path: Path) -> None:
    """Slowloris on the sign-in form (no token needed): headers, a few bytes, then silence held the request
    open for as long as the client liked; it is answered 408 at `upload_timeout_s` and closed."""
    app, _tokens = gallery_app(tmp_path, ADMIN, worker=False, upload_timeout_s=0.5)
    with ServerThread(app) as server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 100\r\n\r\ntoken=aeic_")
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'name="token"' in answer  # the form again, to try once more
    assert 0.4 < elapsed < 5  # answered at the deadline, then the connection was closed


def test_signing_out_clears_the_browsers_cache_of_this_site(https: tuple[TestClient, dict[str, str]]) -> None:
    """Thumbnails and pictures are `private, max-age=86400`: after signing out on a shared computer they stayed
    in the browser's cache for a day, for the next user of the browser to see."""
    client, tokens = https
    _sign_in(client, tokens["cam1"])
    out = client.post("/logout", follow_redirects=False)
    assert out.status_code == 303 and out.headers["clear-site-data"] == '"cache"'
