"""The rate limiters' token buckets in Redis, shared by every API replica of a scale-out deployment.

Why: an in-process bucket gives each of N replicas behind a load balancer its own budget, so a device
uploads at N times its limit and an address guesses N times as many tokens. Each operation on a bucket
is one Lua script, atomic on the Redis server, timed by the server's clock (TIME), so replicas whose
clocks disagree still agree on the bucket. Buckets carry a TTL that ends once they would have refilled:
a refilled bucket means the same as no bucket, so idle ones vanish.

While Redis cannot be reached, each limiter falls back to an in-process bucket of the same rate and
burst (`RateLimiter`): neither open (no limit) nor closed (refusing everyone; the sign-in limiter's gate
runs on every bearer-token request, so closed would refuse every upload too). The budget is then per
replica again, N times the setting, until Redis answers; Redis is tried again every `retry_s`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from aeic.receiver.auth import RateLimiter

__all__ = ["RedisRateLimiter"]

log = logging.getLogger(__name__)

# KEYS[1]: the bucket, a hash {tokens, last}. ARGV: operation (acquire, wait, refund), rate in
# tokens per second, burst, cost, paid, now in seconds ('' for the server's clock), TTL margin in ms.
# The arithmetic is RateLimiter's, step for step, on the same doubles (numbers travel as round-trip
# decimal strings, '%.17g'), so both answer alike to the same calls.
_SCRIPT = """
local rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local function fmt(x) return string.format('%.17g', x) end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'last')
local stored, last = tonumber(state[1]), tonumber(state[2])
if ARGV[1] == 'refund' then
  if stored then redis.call('HSET', KEYS[1], 'tokens', fmt(math.min(burst, stored + 1))) end
  return '0'
end
local now
if ARGV[6] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[6])
end
local tokens = burst
if stored then tokens = math.min(burst, stored + (now - last) * rate) end
if ARGV[1] == 'wait' then
  if tokens >= 1 then return '0' end
  return fmt((1 - tokens) / rate)
end
local result = 0
local cost, paid = tonumber(ARGV[4]), tonumber(ARGV[5])
local threshold = math.min(cost, burst)
if tokens + paid >= threshold then
  tokens = tokens - (cost - paid)
else
  result = (threshold - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', fmt(tokens), 'last', fmt(now))
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((burst - tokens) / rate * 1000) + tonumber(ARGV[7])))
return fmt(result)
"""

# A bucket outlives its refill by this much, so a call that names its own `now` (tests) or a Redis
# whose clock steps is never answered from a bucket that vanished a little early.
_TTL_MARGIN_MS = 60_000


class RedisRateLimiter:
    """`RateLimiter`'s token bucket per key (same calls, same answers) kept in Redis under `prefix`, so
    every process that uses the same Redis and prefix draws on one budget per key."""

    def __init__(self, client: Any, per_minute: float, burst: int, prefix: str, retry_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._script = client.register_script(_SCRIPT)
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._prefix = prefix
        self._local = RateLimiter(per_minute, burst)
        self._retry_s = retry_s
        self._clock = clock
        self._retry_at: float | None = None  # while Redis is down: when to try it again
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, per_minute: float, burst: int, prefix: str) -> RedisRateLimiter:
        """A limiter on its own connection pool to `url` that fails fast: no retries, a one-second timeout,
        as every request waits on it and an unreachable Redis only means the local fallback."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0,
                                      retry=Retry(NoBackoff(), 0), health_check_interval=30)
        return cls(client, per_minute, burst, prefix)

    def acquire(self, key: str, now: float | None = None, cost: float = 1.0, paid: float = 0.0) -> float:
        """As `RateLimiter.acquire`, on the shared bucket."""
        shared = self._run("acquire", key, now, cost, paid)
        return self._local.acquire(key, now, cost, paid) if shared is None else shared

    def wait(self, key: str, now: float | None = None) -> float:
        """As `RateLimiter.wait`, on the shared bucket."""
        shared = self._run("wait", key, now)
        return self._local.wait(key, now) if shared is None else shared

    def refund(self, key: str) -> None:
        """As `RateLimiter.refund`, on the shared bucket."""
        if self._run("refund", key, None) is None:
            self._local.refund(key)

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()

    def _run(self, op: str, key: str, now: float | None, cost: float = 1.0, paid: float = 0.0) -> float | None:
        """The script's answer, or None when Redis is down (or was, less than `retry_s` ago)."""
        import redis

        with self._lock:
            if self._retry_at is not None and self._clock() < self._retry_at:
                return None
        try:
            reply = self._script(keys=[self._prefix + key],
                                 args=[op, repr(self._rate), repr(self._burst), repr(cost), repr(paid),
                                       "" if now is None else repr(now), _TTL_MARGIN_MS])
        except redis.RedisError as exc:
            with self._lock:
                if self._retry_at is None:
                    log.warning("rate limiter %r: Redis failed (%s); limiting in this process only, "
                                "trying Redis again every %.0f s", self._prefix, exc, self._retry_s)
                self._retry_at = self._clock() + self._retry_s
            return None
        with self._lock:
            if self._retry_at is not None:
                log.info("rate limiter %r: Redis is back; limits are shared again", self._prefix)
                self._retry_at = None
        return float(reply)
