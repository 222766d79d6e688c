"""Fixtures for the scale-out tests: a real Redis server and an S3-compatible server (moto in server
mode), each started on loopback by the fixture and stopped afterwards."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from receiver_support import free_port, unavailable

from aeic.demo import stop_process

S3_ENV = {"AWS_ACCESS_KEY_ID": "aeic-test", "AWS_SECRET_ACCESS_KEY": "aeic-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, timeout=10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A throw-away Redis (Debian's redis-server) on loopback, no persistence; yields its base URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server not installed (install with .ci/install-system-deps.sh)")
    port, workdir = free_port(), Path(tempfile.mkdtemp(prefix="aeic-redis-"))
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(workdir), "--loglevel", "warning"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, process, "redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


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
    try:
        import moto.server  # noqa: F401
    except ImportError:
        unavailable("moto[server] is not installed (dev extra)")
    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, process, "moto server", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)
