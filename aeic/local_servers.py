"""Throw-away servers on loopback for the scale-out demo and the tests: PostgreSQL (Debian's server
binaries, a temporary data directory), Redis (Debian's redis-server, no persistence) and an
S3-compatible object store (moto in server mode), plus the small process helpers they share.

Each server is a context manager that yields its URL and stops the server and deletes its files on
exit, whatever happened inside. A server whose program is not installed raises `ServerNotInstalled`
naming what to install, so callers can print one line (the demo) or skip a test (the fixtures).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["S3_CREDENTIALS", "LocalServerError", "ServerNotInstalled", "create_database", "free_port",
           "postgres_bindir", "postgres_server", "redis_server", "s3_server", "stop_process", "wait_port"]

# Any credentials do for moto; boto3 only refuses to sign a request without some.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "aeic-local", "AWS_SECRET_ACCESS_KEY": "aeic-local-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}
_INSTALL_HINT = "(or run .ci/install-system-deps.sh)"


class LocalServerError(RuntimeError):
    """A local server could not be started."""


class ServerNotInstalled(LocalServerError):
    """The server's program is missing; the message says which package provides it."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Terminate, then kill if it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 60.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalServerError(f"{what} exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise LocalServerError(f"{what} did not listen on port {port} within {timeout:.0f}s")


# -- PostgreSQL ----------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The newest `/usr/lib/postgresql/<major>/bin` that has the server programs (Debian's layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    found = [p for p in found if Path(p).with_name("pg_ctl").exists()]
    return Path(found[-1]).parent if found else None


def _as_postgres_user(base: Path) -> list[str]:
    """The command prefix that runs the server programs: postgres refuses to run as root."""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ServerNotInstalled("running as root and there is no 'postgres' user to run PostgreSQL as; "
                                 f"install the Debian package postgresql {_INSTALL_HINT}") from None
    if shutil.which("runuser") is None:
        raise ServerNotInstalled("running as root and runuser is missing; install the Debian package util-linux")
    os.chown(base, user.pw_uid, user.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


@contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server with a fresh cluster (superuser `aeic`, trust authentication) on loopback.

    Yields a SQLAlchemy base URL without a database name, e.g. ``postgresql+psycopg://aeic@127.0.0.1:5432``.
    """
    bindir = postgres_bindir()
    if bindir is None:
        raise ServerNotInstalled("PostgreSQL server programs not found under /usr/lib/postgresql/*/bin; "
                                 f"install the Debian package postgresql {_INSTALL_HINT}")
    base = Path(tempfile.mkdtemp(prefix="aeic-pg-"))
    try:
        prefix = _as_postgres_user(base)
        data, port, log = base / "data", free_port(), base / "server.log"

        def run(*args: object) -> None:
            subprocess.run([*prefix, *map(str, args)], check=True, capture_output=True, start_new_session=True)

        try:
            run(bindir / "initdb", "-D", data, "-U", "aeic", "--auth=trust", "-E", "UTF8", "--no-sync")
        except subprocess.CalledProcessError as exc:
            raise LocalServerError(f"initdb failed: {exc.stderr.decode(errors='replace').strip()}") from None
        options = (f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        try:  # stopped in `finally` even when interrupted while starting
            try:
                run(bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start")
            except subprocess.CalledProcessError:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                raise LocalServerError(f"PostgreSQL did not start: {' '.join(tail) or 'no log'}") from None
            yield f"postgresql+psycopg://aeic@127.0.0.1:{port}"
        finally:
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """Create database `name` on the server at `server_url` (from `postgres_server`); returns its URL."""
    import sqlalchemy as sa

    admin = sa.create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return f"{server_url}/{name}"


# -- Redis ---------------------------------------------------------------------------------------


@contextmanager
def redis_server() -> Iterator[str]:
    """Debian's redis-server on loopback without persistence; yields ``redis://127.0.0.1:<port>``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerNotInstalled(f"redis-server not found; install the Debian package redis-server {_INSTALL_HINT}")
    port, workdir = free_port(), Path(tempfile.mkdtemp(prefix="aeic-redis-"))
    try:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(workdir), "--loglevel", "warning"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_port(port, process, "redis-server")
            yield f"redis://127.0.0.1:{port}"
        finally:
            stop_process(process, timeout=10)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- S3 (moto) -----------------------------------------------------------------------------------


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server on loopback; yields its endpoint URL (clients need `S3_CREDENTIALS`
    or any other credentials in their environment)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise ServerNotInstalled("moto's server is not installed; pip install 'moto[server]' "
                                 "(part of the dev extra: pip install -e '.[dev]')") from None
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, process, "moto server", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process, timeout=10)
