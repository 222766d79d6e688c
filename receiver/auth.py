"""Who is calling: device tokens (stored only as SHA-256 hashes), the admin token, and per-device
rate limiting.

Why SHA-256 and not a slow password hash: tokens are 256 random bits, so a fast hash is enough to make a
leaked database useless to an attacker, and it keeps the per-request check cheap.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aeic.receiver.storage import ImageRecord, MetadataStore

__all__ = [
    "DEVICE_NAME",
    "Authenticator",
    "InvalidDeviceNameError",
    "Limiter",
    "Principal",
    "RateLimiter",
    "create_device_token",
    "hash_token",
]

log = logging.getLogger(__name__)

DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # \Z: `$` would pass a final newline
_TOKEN_PREFIX = "aeic_"
# Shorter admin tokens are named in the log at start-up: deploy/k8s's placeholder (REPLACE_ME) and the demo's
# are public, and the sign-in limit is per address, so a short one is within reach of many addresses' guesses.
_ADMIN_TOKEN_MIN_CHARS = 24


class InvalidDeviceNameError(ValueError):
    """Device names are 1-128 characters of letters, digits, '.', '_' and '-'."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: one device, or the admin (device None)."""

    device: str | None
    admin: bool = False

    def can_see(self, record: ImageRecord) -> bool:
        """A device sees only its own images; the admin sees all."""
        return self.admin or record.device == self.device


def hash_token(token: str) -> str:
    """The hex SHA-256 under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_device_token(store: MetadataStore, device: str) -> str:
    """Mint a token for `device`, store its hash, and return the token (shown once, never stored)."""
    if not DEVICE_NAME.match(device):
        raise InvalidDeviceNameError(f"invalid device name {device!r}: use 1-128 of A-Z a-z 0-9 . _ -")
    token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
    store.add_device_token(device, hash_token(token))
    return token


class Authenticator:
    """Maps a bearer token, or what a gallery session stores of one, to a `Principal`."""

    def __init__(self, store: MetadataStore, admin_token: str | None) -> None:
        self._store = store
        self._admin_hash = hash_token(admin_token) if admin_token else None
        if admin_token and len(admin_token) < _ADMIN_TOKEN_MIN_CHARS:
            log.warning("the admin token is only %d characters long: anyone who guesses it sees every device's "
                        "images; set a long random one (openssl rand -hex 32)", len(admin_token))

    def authenticate(self, token: str | None) -> Principal | None:
        """The caller behind `token`, or None when it is missing, unknown or revoked. The admin comparison
        is constant-time."""
        if not token:
            return None
        token_hash = hash_token(token)
        if self._admin_hash is not None and hmac.compare_digest(token_hash, self._admin_hash):
            return Principal(device=None, admin=True)
        return self._device(token_hash)

    def session_key(self, who: Principal, token: str, session: str) -> str:
        """What the gallery session `session` (its secret), opened by `who` with `token`, stores of that
        token. A device token's SHA-256, as `device_tokens` holds it: 256 random bits, of no use to a guesser.
        The admin token is the operator's to choose, so a hash of it would let a copy of the database test
        guesses offline: its sessions store it hashed with the session's secret, which only the browser holds."""
        if who.admin and self._admin_hash is not None:
            return _bound(self._admin_hash, session)
        return hash_token(token)

    def principal_for_session(self, key: str, session: str) -> Principal | None:
        """The caller behind a session's stored `session_key`, checked against the current admin token and
        the live device tokens on every call, so a revocation or a new admin token takes effect at once."""
        if self._admin_hash is not None and hmac.compare_digest(key, _bound(self._admin_hash, session)):
            return Principal(device=None, admin=True)
        return self._device(key)

    def _device(self, token_hash: str) -> Principal | None:
        device = self._store.device_for_token(token_hash)
        return Principal(device=device) if device else None


def _bound(token_hash: str, session: str) -> str:
    """A token's hash bound to one session's secret (SHA-256 of both, hex)."""
    return hash_token(f"{token_hash}:{session}")


_MIN_PRUNE_SIZE = 1024  # buckets kept before the first pruning


class Limiter(Protocol):
    """A token bucket per key: `RateLimiter` in one process, `redis_limiter.RedisRateLimiter` shared by
    every API replica of a scale-out deployment."""

    def acquire(self, key: str, now: float | None = None, cost: float = 1.0, paid: float = 0.0) -> float: ...

    def wait(self, key: str, now: float | None = None) -> float: ...

    def refund(self, key: str) -> None: ...


class RateLimiter:
    """Token bucket per key: `burst` tokens at once, refilled at `per_minute` tokens per minute; a request
    costs one token, or what `acquire` is told (an upload: its decode cost, `decode_limits.decode_cost`).

    In-process state, for the embedded single-process receiver (with a Redis `queue`, the API's limiters
    are `redis_limiter.RedisRateLimiter`, which falls back to this one while Redis is down). Keys may come
    from clients (the sign-in limiter keys by address), so buckets that have refilled, which mean the
    same as no bucket, are dropped whenever the table doubles: it cannot grow without bound.
    """

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._prune_at = _MIN_PRUNE_SIZE

    def acquire(self, key: str, now: float | None = None, cost: float = 1.0, paid: float = 0.0) -> float:
        """Take `cost` tokens; returns 0.0 when allowed, else the seconds until the bucket holds them.

        A cost over the burst is allowed from a full bucket and leaves it in debt, so any cost passes
        eventually and a device's sustained rate stays `per_minute` tokens whatever it asks for. `paid`:
        tokens an earlier `acquire` took for the same request (the upload's one-token gate before its body
        is read, when its cost is not yet known); they count toward the cost, and are kept when refused, as
        the request was read, so the wait is until the bucket holds the whole cost again."""
        now = self._clock() if now is None else now
        threshold = min(cost, self._burst)
        with self._lock:
            tokens = self._refilled(key, now)
            allowed = tokens + paid >= threshold
            self._buckets[key] = (tokens - (cost - paid) if allowed else tokens, now)
            self._prune_if_large(now)
        return 0.0 if allowed else (threshold - tokens) / self._rate

    def wait(self, key: str, now: float | None = None) -> float:
        """Seconds until ``key`` has a token (0.0: now), taking none: a gate for requests that `acquire` only
        once they have failed (a wrong API token), so that right ones never take a token."""
        now = self._clock() if now is None else now
        with self._lock:
            tokens = self._refilled(key, now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def refund(self, key: str) -> None:
        """Give back the token an `acquire` took for a request that turned out not to count (a successful
        sign-in): taking it first is what keeps concurrent requests from all passing one check."""
        with self._lock:
            if key in self._buckets:
                tokens, last = self._buckets[key]
                self._buckets[key] = (min(self._burst, tokens + 1.0), last)

    def _prune_if_large(self, now: float) -> None:
        """Drop refilled buckets once the table has doubled since the last pruning (caller holds the lock)."""
        if len(self._buckets) < self._prune_at:
            return
        self._buckets = {key: bucket for key, bucket in self._buckets.items() if self._refilled(key, now) < self._burst}
        self._prune_at = max(_MIN_PRUNE_SIZE, 2 * len(self._buckets))

    def _refilled(self, key: str, now: float) -> float:
        """Tokens `key` has at `now` (a full bucket when it has none yet); the caller holds the lock."""
        tokens, last = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - last) * self._rate)
