"""`python -m aeic.demo --scale-out` end to end: PostgreSQL, Redis and moto started by the demo on
loopback, the API without a decoder, 2 `aeic-receiver worker` processes decoding real bitstreams of a
tiny model package. Every image must be decoded by a worker, and nothing the demo started may be left
running afterwards. A missing server program is one line on stderr naming the package to install."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import receiver_support
from PIL import Image
from receiver_support import unavailable

from aeic import local_servers

tiny_package = receiver_support.tiny_package
MARK_ENV = "AEIC_DEMO_TEST_RUN"


@pytest.fixture()
def servers_installed() -> None:
    """What --scale-out starts; missing here is a skip, and a failure under AEIC_REQUIRE_TEST_TOOLS."""
    if local_servers.postgres_bindir() is None:
        unavailable("PostgreSQL server programs not installed (install with .ci/install-system-deps.sh)")
    if shutil.which("redis-server") is None:
        unavailable("redis-server not installed (install with .ci/install-system-deps.sh)")
    for module, what in (("moto.server", "moto[server] (dev extra)"), ("redis", "redis (scale extra)"),
                         ("boto3", "boto3 (scale extra)")):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            unavailable(f"{what} is not installed")


@pytest.fixture()
def run_root() -> Iterator[Path]:
    """The demo's working and temporary directory: every process it starts has its cwd below it (redis-server
    and postgres chdir into their data directories, which land under TMPDIR). Traversable by the postgres
    user, which the demo runs the server as when the tests run as root."""
    root = Path(tempfile.mkdtemp(prefix="aeic-demo-test-"))
    root.chmod(0o711)
    (root / "tmp").mkdir(mode=0o711)
    (root / "tmp").chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _photos(folder: Path, count: int) -> Path:
    folder.mkdir()
    for n in range(count):
        Image.fromarray(receiver_support.natural_photo(96, 64, 30 + n)).save(folder / f"photo{n}.png")
    return folder


def _started_by(root: Path, mark: str) -> list[str]:
    """Live processes (zombies excluded) whose cwd is under `root` or whose environment carries `mark`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) == os.getpid() or (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cwd = os.readlink(proc / "cwd")
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if cwd.startswith(str(root)) or f"{MARK_ENV}={mark}".encode() in environ:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _assert_nothing_left(root: Path, mark: str) -> None:
    deadline = time.monotonic() + 10  # a stopped postgres is reaped by init, not by the demo
    while (left := _started_by(root, mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []


def _demo_env(root: Path, mark: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "CI": "true", "TMPDIR": str(root / "tmp"), MARK_ENV: mark, "OMP_NUM_THREADS": "1",
            **extra}


def test_scale_out_demo_decodes_every_image_on_a_worker_and_leaves_no_process(
        servers_installed: None, tiny_package: Path, run_root: Path) -> None:
    images, out, mark = _photos(run_root / "photos", 2), run_root / "out", secrets.token_hex(8)
    result = subprocess.run(
        [sys.executable, "-m", "aeic.demo", "--scale-out", "--workers", "2", "--model", str(tiny_package),
         "--images", str(images), "--rate", "0", "--out", str(out)],
        cwd=run_root, env=_demo_env(run_root, mark), capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("image"))
    assert all(col in header for col in ("bytes", "bpp", "PSNR dB", "decode ms", "worker", "status"))
    rows = [line.split() for line in lines if line.startswith("photo")]
    assert len(rows) == 2
    assert all(row[-1] == "done" for row in rows), result.stdout
    assert all(row[-2] in ("demo-w0", "demo-w1") for row in rows), result.stdout  # decoded by a worker process
    assert any(line.startswith("gallery: http://127.0.0.1:") for line in lines)
    with Image.open(out / "side_by_side.png") as sheet:
        assert sheet.height >= 2 * 256
    _assert_nothing_left(run_root, mark)
    assert list((run_root / "tmp").iterdir()) == []  # data directories of every server removed


def test_scale_out_demo_without_redis_server_says_what_to_install(
        servers_installed: None, tiny_package: Path, run_root: Path) -> None:
    bin_dir = run_root / "bin"  # a PATH with everything the demo needs but redis-server
    bin_dir.mkdir()
    for tool in ("runuser",):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))  # type: ignore[arg-type]
    mark = secrets.token_hex(8)
    result = subprocess.run(
        [sys.executable, "-m", "aeic.demo", "--scale-out", "--model", str(tiny_package),
         "--images", str(_photos(run_root / "photos", 1))],
        cwd=run_root, env=_demo_env(run_root, mark, PATH=str(bin_dir)), capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL, check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [("demo: redis-server not found; install the Debian package "
                                            "redis-server (or run .ci/install-system-deps.sh)")]
    _assert_nothing_left(run_root, mark)
