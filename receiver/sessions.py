"""Gallery sign-in sessions: what the browser's cookie stands for.

Why not put the token itself in the cookie: a cookie is copied around (browser profiles, debugging
proxies, a stolen laptop), and a device token in it would let its holder upload as the device for as
long as the token lives. The cookie holds a random session secret instead; the database keeps only its
SHA-256 and a hash of the token that opened it (`Authenticator.session_key`), the session expires after
`session_ttl_s`, signing out deletes it server-side, and each request re-checks the token so that
revoking it ends the session. Signing in again ends the browser's previous session, so a copy of its
cookie does not outlive it.

Over HTTPS the cookie is named `__Host-aeic_session`: browsers take a `__Host-` cookie only when it is
Secure, has Path=/ and no Domain, i.e. when this host set it itself, so a sibling subdomain (which may set
cookies for the parent domain) cannot plant a session of its choosing, which the same-site check on
`POST /login` would never see. Plain HTTP keeps `aeic_session`: a `__Host-` cookie must be Secure.
"""

from __future__ import annotations

import secrets
import time
from typing import NamedTuple

from aeic.receiver.auth import Authenticator, Principal, hash_token
from aeic.receiver.storage import MetadataStore
from starlette.requests import HTTPConnection

__all__ = ["COOKIE_NAMES", "GallerySessions", "SessionCookie", "session_cookie"]

_PLAIN_COOKIE = "aeic_session"
_HOST_COOKIE = "__Host-aeic_session"
COOKIE_NAMES = (_PLAIN_COOKIE, _HOST_COOKIE)


class SessionCookie(NamedTuple):
    """How a request's session cookie is named and whether it is Secure."""

    name: str
    secure: bool


def session_cookie(request: HTTPConnection, cookie_secure: bool | None) -> SessionCookie:
    """The session cookie for `request`: Secure as `cookie_secure` says (unset: when the request came over
    HTTPS), and then `__Host-` named. Only that name is read back, so over HTTPS a cookie planted under the
    plain name is no session."""
    secure = request.url.scheme == "https" if cookie_secure is None else cookie_secure
    return SessionCookie(_HOST_COOKIE if secure else _PLAIN_COOKIE, secure)


class GallerySessions:
    """Open, resolve and close gallery sessions."""

    def __init__(self, store: MetadataStore, auth: Authenticator, ttl_s: float) -> None:
        self._store = store
        self._auth = auth
        self.ttl_s = ttl_s

    def open(self, token: str) -> str | None:
        """A new session secret for a valid `token` (the cookie's value), or None for an invalid one. The
        secret is always minted here, never taken from the browser: no session fixation."""
        who = self._auth.authenticate(token)
        if who is None:
            return None
        session = secrets.token_urlsafe(32)
        self._store.add_session(hash_token(session), self._auth.session_key(who, token, session),
                                time.time() + self.ttl_s)
        return session

    def principal(self, session: str | None) -> Principal | None:
        """The caller behind a session cookie; None when unknown, expired, signed out or its token revoked."""
        if not session or len(session) > 128:
            return None
        key = self._store.session_token_hash(hash_token(session))
        return None if key is None else self._auth.principal_for_session(key, session)

    def close(self, session: str | None) -> None:
        """Sign out (a no-op for an unknown session)."""
        if session:
            self._store.delete_session(hash_token(session))
