"""Fixtures for the scale-out tests: a real Redis server and an S3-compatible server (moto in server
mode), each started on loopback by the fixture (`aeic.local_servers`) and stopped afterwards."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from receiver_support import started

from aeic import local_servers


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A throw-away Redis (Debian's redis-server) on loopback, no persistence; yields its base URL."""
    yield from started(local_servers.redis_server())


_DB = itertools.cycle(range(1, 16))  # each test empties its database before and after


@pytest.fixture()
def redis_url(redis_server: str) -> Iterator[str]:
    """An empty Redis database of its own for each test."""
    import redis

    url = f"{redis_server}/{next(_DB)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server on loopback (AWS credentials for it are put in the environment)."""
    for key, value in local_servers.S3_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    yield from started(local_servers.s3_server())
