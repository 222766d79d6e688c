"""Who is asking: a bearer token (a device's or the admin's) or the gallery's session cookie
(`aeic.receiver.auth` checks the tokens, `aeic.receiver.sessions` the cookies), and the sign-in limit that
wrong tokens count against."""

from __future__ import annotations

import math
from typing import Annotated

from aeic.receiver.api.state import ReceiverState, receiver_state
from aeic.receiver.auth import Principal
from aeic.receiver.errors import ApiError
from aeic.receiver.sessions import session_cookie
from fastapi import Depends, Request

__all__ = ["Caller", "bearer_token", "client_address", "optional_principal", "principal"]


def bearer_token(request: Request) -> str | None:
    """The request's bearer token, if it sends one (`Authorization: Bearer ...`)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def client_address(request: Request) -> str:
    """The key failed sign-ins are counted under (the proxy's client address when it forwards one)."""
    return request.client.host if request.client else "unknown"


def optional_principal(request: Request) -> Principal | None:
    """The caller, or None when anonymous. A bearer token wins; otherwise the gallery's session cookie,
    which is honoured for reads only, so a cross-site form can never make it write."""
    state = receiver_state(request)
    token = bearer_token(request)
    if token is not None:
        return _bearer_principal(state, client_address(request), token)
    if request.method in ("GET", "HEAD"):
        cookie = session_cookie(request, state.settings.cookie_secure)
        return state.sessions.principal(request.cookies.get(cookie.name))
    return None


def _bearer_principal(state: ReceiverState, address: str, token: str) -> Principal | None:
    """A wrong bearer token costs its address one of the gallery's sign-in attempts, and an address out of
    them is refused before any check (429), so no /v1 route is a way round the sign-in limit. A valid
    token costs nothing: a fleet behind one address is slowed only while wrong tokens come from it.

    The wrong token takes its attempt after the check, atomically, and is answered 429 when none is left:
    guesses sent at once all pass the gate before the first of them has failed, and each was answered
    401 (40 of 200 at once with a limit of 3). A right token sent then is 429 too, so a 429 tells nothing."""
    wait = state.login_limiter.wait(address)
    if wait <= 0:
        who = state.auth.authenticate(token)
        if who is not None:
            return who
        wait = state.login_limiter.acquire(address)
        if wait <= 0:
            return None
    seconds = str(max(1, math.ceil(wait)))
    raise ApiError(429, "too_many_failed_tokens", f"too many wrong tokens from this address; retry in {seconds} s",
                   headers={"Retry-After": seconds})


def principal(request: Request) -> Principal:
    """The caller; 401 when the token is missing or invalid."""
    who = optional_principal(request)
    if who is None:
        raise ApiError(401, "unauthorized", "a valid bearer token is required",
                       headers={"WWW-Authenticate": 'Bearer realm="aeic"'})
    return who


Caller = Annotated[Principal, Depends(principal)]
