"""The rate limiters shared by API replicas through Redis (real redis-server): the Lua bucket answers as the
in-process one does, replicas on one Redis enforce one budget per device and per address, buckets expire
once refilled and run on the Redis server's clock, and while Redis is down each replica limits on its own
(uploads are still stored, over the limit they get 429 with Retry-After) and shares again once it is back."""

from __future__ import annotations

import logging
import random
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import scaleout_support
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, make_bitstream, make_tokens

pytest.importorskip("redis", reason="redis is not installed (scale extra)")

import redis
from aeic.receiver.api import create_app
from aeic.receiver.auth import RateLimiter
from aeic.receiver.redis_limiter import _TTL_MARGIN_MS, RedisRateLimiter
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from manual_clock import ManualClock

from aeic import local_servers

redis_server, redis_url = scaleout_support.redis_server, scaleout_support.redis_url

KEYS = ["cam-1", "cam-2", "198.51.100.7"]


class FlakyRedis(redis.Redis):
    """A client whose commands fail as if the server were gone while `down` is set; counts its commands."""

    down = False
    commands = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        if self.down:
            raise redis.ConnectionError("Error 111 connecting to redis. Connection refused.")
        return super().execute_command(*args, **options)


def _bucket(client: redis.Redis, name: str) -> tuple[float, float] | None:
    """The (tokens, last) a bucket holds in Redis, None when there is none."""
    tokens, last = client.hmget(name, "tokens", "last")
    return None if tokens is None or last is None else (float(tokens), float(last))


def _op(limiter: RateLimiter | RedisRateLimiter, rng: random.Random, key: str, now: float,
        burst: int) -> tuple[str, float | None]:
    """One random call (the same one for both limiters, as both get an `rng` in the same state)."""
    op = rng.choice(["acquire", "acquire", "gate+cost", "wait", "refund"])
    if op == "acquire":
        return op, limiter.acquire(key, now=now)
    if op == "gate+cost":  # an upload: one token before the body, the rest of its cost (maybe over the burst)
        cost = rng.choice([1.0, rng.uniform(1.0, 3.0 * burst)])
        return op, limiter.acquire(key, now=now, cost=cost, paid=1.0)
    if op == "wait":
        return op, limiter.wait(key, now=now)
    return op, limiter.refund(key)


@pytest.mark.parametrize(("per_minute", "burst"), [(60.0, 3), (7.5, 1), (600.0, 60), (10.0, 10)])
def test_the_redis_bucket_answers_every_call_as_the_in_process_one(redis_url: str, per_minute: float,
                                                                   burst: int) -> None:
    client = redis.Redis.from_url(redis_url)
    shared = RedisRateLimiter(client, per_minute, burst, prefix="t:")
    local = RateLimiter(per_minute, burst)
    seed = random.Random(f"{per_minute}/{burst}")
    now, refill = 1_000_000.0, 60.0 / per_minute  # seconds per token
    answers = []
    for step in range(1500):
        key = seed.choice(KEYS)
        now += seed.choice([0.0, seed.uniform(0.0, refill), seed.uniform(0.0, 4 * refill)])
        state = seed.getstate()
        want = _op(local, seed, key, now, burst)
        seed.setstate(state)
        got = _op(shared, seed, key, now, burst)
        assert got == want, f"step {step}, key {key}: Redis {got}, in process {want}"
        answers.append(want)
    # the buckets themselves agree, bit for bit (and are in Redis: the script ran, no fallback answered)
    assert {key: _bucket(client, f"t:{key}") for key in local._buckets} == local._buckets and len(local._buckets) == len(KEYS)
    # the sequence went through refusals, debt and refills, not only one of them
    assert {"acquire", "gate+cost", "wait", "refund"} == {op for op, _ in answers}
    assert any(op == "acquire" and wait == 0.0 for op, wait in answers)
    assert any(op == "acquire" and wait is not None and wait > 0.0 for op, wait in answers)


def test_two_limiters_on_two_connections_share_one_budget_on_the_servers_clock(redis_url: str) -> None:
    one, two = (RedisRateLimiter(redis.Redis.from_url(redis_url), 60.0, 4, prefix="aeic:ratelimit:uploads:")
                for _ in range(2))
    answers = [(one if i % 2 else two).acquire("cam-1") for i in range(6)]
    assert [wait == 0.0 for wait in answers] == [True] * 4 + [False] * 2
    assert 0.9 < answers[-1] <= 1.0  # a token a second: the next one comes within the second
    for limiter in (one, two, one, two):  # failures seen by either replica: the address's 4 are gone
        assert limiter.acquire("198.51.100.7") == 0.0
    assert two.wait("198.51.100.7") > 0.0 and one.wait("198.51.100.7") > 0.0
    client = redis.Redis.from_url(redis_url)
    server_now = float(client.time()[0])
    bucket = _bucket(client, "aeic:ratelimit:uploads:cam-1")
    assert bucket is not None
    tokens, last = bucket
    assert abs(last - server_now) < 5 and -0.1 < tokens < 0.1  # timed by Redis, not by either process


def test_concurrent_calls_from_two_processes_worth_of_clients_never_overdraw_the_bucket(redis_url: str) -> None:
    limiters = [RedisRateLimiter(redis.Redis.from_url(redis_url), 0.01, 20, prefix="t:") for _ in range(2)]
    granted: list[bool] = []

    def client(limiter: RedisRateLimiter) -> None:
        granted.extend(limiter.acquire("cam-1") == 0.0 for _ in range(25))

    threads = [threading.Thread(target=client, args=(limiters[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 200 and granted.count(True) == 20  # read-modify-write in one script: no race


def test_a_bucket_expires_once_it_would_have_refilled(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    limiter = RedisRateLimiter(client, 6.0, 2, prefix="t:")  # a token every 10 s
    limiter.acquire("cam-1", cost=2.0)  # empty: full again in 20 s
    assert 20_000 + _TTL_MARGIN_MS - 1000 < client.pttl("t:cam-1") <= 20_000 + _TTL_MARGIN_MS
    limiter.acquire("cam-1", cost=1.0)  # refused: the bucket keeps its tokens and its refill time
    assert client.pttl("t:cam-1") <= 20_000 + _TTL_MARGIN_MS
    limiter.refund("cam-2")  # nothing to refund: no bucket is made
    assert client.exists("t:cam-2") == 0


def _replicas(tmp_path: Path, queue: str, **overrides: Any) -> tuple[list[ReceiverSettings], dict[str, str]]:
    """Settings of two API replicas on one database and one Redis, and a device token."""
    database = f"sqlite:///{tmp_path / 'receiver.db'}"
    replicas = [ReceiverSettings(data_dir=tmp_path / f"api{i}", database_url=database, queue=queue,
                                 admin_token="replica-admin-token-0123456789", **overrides) for i in (1, 2)]
    return replicas, make_tokens(replicas[0], "cam-1")


def _upload(client: TestClient, token: str, n: int) -> Any:
    return client.post("/v1/images", content=make_bitstream(payload=bytes([n])),
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})


def test_api_replicas_on_one_redis_grant_one_upload_and_one_sign_in_budget(tmp_path: Path, redis_url: str) -> None:
    replicas, tokens = _replicas(tmp_path, redis_url, rate_limit_burst=3, rate_limit_per_minute=0.01,
                                 login_attempts_per_minute=3.0)
    codecs = CodecRegistry.from_codecs([FakeCodec()])
    with TestClient(create_app(replicas[0], registry=codecs)) as one, \
            TestClient(create_app(replicas[1], registry=codecs)) as two:
        statuses = [_upload(one if n % 2 else two, tokens["cam-1"], n).status_code for n in range(6)]
        assert statuses == [202, 202, 202, 429, 429, 429]  # in-process buckets: 3 on each, 6 in all
        refused = _upload(one, tokens["cam-1"], 9)
        assert int(refused.headers["Retry-After"]) > 60  # the shared bucket's wait, not a fresh local one
        # two wrong bearer tokens on one replica and a wrong sign-in on the other use up the address
        wrong = {"Authorization": "Bearer aeic_wrong"}
        assert [one.get("/v1/images", headers=wrong).status_code for _ in range(2)] == [401, 401]
        assert two.post("/login", data={"token": "aeic_wrong"}).status_code == 401
        assert two.get("/v1/images", headers=wrong).status_code == 429
        assert one.post("/login", data={"token": "aeic_wrong"}).status_code == 429


def test_while_redis_is_down_each_replica_limits_on_its_own_and_stores_uploads(
        tmp_path: Path, redis_server: str, caplog: pytest.LogCaptureFixture) -> None:
    with ExitStack() as outage:
        url = outage.enter_context(local_servers.redis_server())  # a Redis of its own, to stop
        [settings, _], tokens = _replicas(tmp_path, url, rate_limit_burst=2, rate_limit_per_minute=0.01,
                                          login_attempts_per_minute=2.0)
        with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as api:
            assert _upload(api, tokens["cam-1"], 0).status_code == 202  # shared bucket: 1 of 2 left
            outage.close()
            with caplog.at_level(logging.WARNING, logger="aeic.receiver.redis_limiter"):
                # the local bucket (full: it saw none of the shared one's uploads), not "no limit"
                statuses = [_upload(api, tokens["cam-1"], n).status_code for n in (1, 2, 3)]
                assert statuses == [202, 202, 429]  # 202: stored, enqueued later by reconciliation
                refused = _upload(api, tokens["cam-1"], 4)
                assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["Retry-After"]) > 60
                wrong = {"Authorization": "Bearer aeic_wrong"}
                assert [api.get("/v1/images", headers=wrong).status_code for _ in range(3)] == [401, 401, 429]
            assert "Redis failed" in caplog.text and "limiting in this process only" in caplog.text


def test_a_limiter_falls_back_while_redis_is_down_and_shares_again_when_it_is_back(redis_url: str) -> None:
    client = FlakyRedis.from_url(redis_url)
    assert isinstance(client, FlakyRedis)
    clock = ManualClock(0.0)
    limiter = RedisRateLimiter(client, 0.01, 2, prefix="t:", retry_s=5.0, clock=clock)
    assert limiter.acquire("cam-1") == 0.0  # shared: 1 left
    client.down = True
    assert [limiter.acquire("cam-1") == 0.0 for _ in range(3)] == [True, True, False]  # local: 2
    tried = client.commands
    clock.now = 4.9
    limiter.acquire("cam-1")
    assert client.commands == tried  # no retry before retry_s: a down Redis does not slow every request
    client.down = False
    clock.now = 5.0
    assert [limiter.acquire("cam-1") == 0.0 for _ in range(2)] == [True, False]  # the shared bucket's 1 left
    assert client.commands > tried


def test_the_limiter_client_fails_fast_when_nothing_listens() -> None:
    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{local_servers.free_port()}/0", 60.0, 2, prefix="t:")
    started = time.monotonic()
    assert [limiter.acquire("cam-1") == 0.0 for _ in range(3)] == [True, True, False]
    assert time.monotonic() - started < 1.0  # no retries with backoff on each request
