"""Temporary files of crash-safe writes in a folder that processes of several containers or hosts share
(an API container and worker containers on one blob volume, a spool a second container opens): a start-up
sweep must neither delete another container's write in progress (that write then fails) nor keep a dead
one forever because its pid, counted in another pid namespace, names a live process here (pid 1 always)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aeic.receiver.storage import FilesystemBlobStore
from aeic.receiver.storage.blobs import reconstruction_key
from aeic.sender.cli import MAX_OUTPUT_STEM_BYTES
from aeic.shared import durable
from aeic.shared.durable import FOREIGN_TMP_AGE_S, TMP_PREFIX, atomic_write, remove_stale_tmp

OTHER = "0badc0"  # a digest of a machine, boot or pid namespace that is not this one's


def _tmp(folder: Path, writer: str, *, age_s: float = 0.0) -> Path:
    """A half-written temporary file as atomic_write names it; ``writer`` is what follows the target's name."""
    path = folder / f"{TMP_PREFIX}{'ab' * 16}.png.{writer}.0a1b2c3d"
    path.write_bytes(b"half")
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def _new(pid: int, machine: str = durable._MACHINE, boot: str = durable._BOOT,
         pid_space: str = durable._PID_SPACE) -> str:
    return f"{pid}-{machine}{boot}{pid_space}"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_write_of_this_process_keeps_its_temporary_through_a_sweep_and_leaves_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    fsync = os.fsync

    def sweeping_fsync(fd: int) -> None:
        if not seen:
            seen.extend(entry.name for entry in tmp_path.glob(f"{TMP_PREFIX}*"))
            assert remove_stale_tmp(tmp_path) == 0
        fsync(fd)

    monkeypatch.setattr(os, "fsync", sweeping_fsync)
    atomic_write(tmp_path / "a.png", b"data")
    assert (tmp_path / "a.png").read_bytes() == b"data" and len(seen) == 1
    assert f".{os.getpid()}-{durable._MACHINE}{durable._BOOT}{durable._PID_SPACE}." in seen[0]
    assert [entry.name for entry in tmp_path.iterdir()] == ["a.png"]


def test_the_temporary_of_the_senders_longest_output_name_fits_a_file_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's tag lengthens every temporary name: the sender's output names are cut so that theirs
    stays under Linux's 255 bytes, with the largest pid Linux gives (4194304)."""
    monkeypatch.setattr(os, "getpid", lambda: 4_194_304)
    target = tmp_path / f"{'é' * (MAX_OUTPUT_STEM_BYTES // 2)}-99999.aeic"
    atomic_write(target, b"x")
    assert target.read_bytes() == b"x"


def test_a_fresh_temporary_of_another_container_is_kept_though_its_pid_is_dead_here(tmp_path: Path) -> None:
    """Was: its pid, dead here, made it a crash's leftover: an API container starting beside a worker
    container deleted the worker's reconstruction half-written, and the worker's write failed."""
    container = _tmp(tmp_path, _new(_dead_pid(), pid_space=OTHER), age_s=FOREIGN_TMP_AGE_S - 60)
    host = _tmp(tmp_path, _new(_dead_pid(), machine=OTHER, boot=OTHER, pid_space=OTHER))
    assert remove_stale_tmp(tmp_path) == 0
    assert container.exists() and host.exists()


def test_a_temporary_of_another_container_goes_once_older_than_any_write_though_its_pid_is_alive_here(
        tmp_path: Path) -> None:
    for pid in (1, os.getpid(), os.getppid()):
        _tmp(tmp_path, _new(pid, pid_space=OTHER), age_s=FOREIGN_TMP_AGE_S + 60)
        _tmp(tmp_path, _new(pid, machine=OTHER, boot=OTHER, pid_space=OTHER), age_s=FOREIGN_TMP_AGE_S + 60)
    assert remove_stale_tmp(tmp_path) == 6 and not list(tmp_path.iterdir())


def test_a_temporary_written_before_this_machine_restarted_goes_at_once(tmp_path: Path) -> None:
    """A device that lost power mid-write: every process of that boot is gone, whatever its pid is now."""
    _tmp(tmp_path, _new(1, boot=OTHER))
    _tmp(tmp_path, _new(os.getppid(), boot=OTHER, pid_space=OTHER))
    assert remove_stale_tmp(tmp_path) == 2 and not list(tmp_path.iterdir())


def test_a_temporary_of_this_pid_space_is_judged_by_its_pid_however_old(tmp_path: Path) -> None:
    live = _tmp(tmp_path, _new(os.getppid()), age_s=10 * FOREIGN_TMP_AGE_S)  # a writer stopped, not dead
    _tmp(tmp_path, _new(_dead_pid()))
    assert remove_stale_tmp(tmp_path) == 1 and list(tmp_path.iterdir()) == [live]


def test_old_format_names_are_judged_by_pid_and_no_longer_kept_forever(tmp_path: Path) -> None:
    """Written before the name said where: a dead pid goes as before, and a live one (pid 1 is alive in
    every container) once older than any write, where it was kept forever."""
    live = _tmp(tmp_path, str(os.getppid()))
    _tmp(tmp_path, str(_dead_pid()))
    _tmp(tmp_path, "1", age_s=FOREIGN_TMP_AGE_S + 60)
    assert remove_stale_tmp(tmp_path) == 2 and list(tmp_path.iterdir()) == [live]


# -- real pid namespaces (containers without the rest), where the machine lets an unprivileged user make them --

WRITER = """
import os, sys
from pathlib import Path
from aeic.receiver.storage import FilesystemBlobStore
fsync = os.fsync
def stalled(fd):
    os.fsync = fsync
    print(os.getpid(), flush=True)
    if not sys.stdin.readline():  # the test closed our input: die mid-write, as kill -9 leaves it
        os._exit(9)
    fsync(fd)
os.fsync = stalled
FilesystemBlobStore(Path(sys.argv[1])).put(sys.argv[2], b"reconstruction")
print("written", flush=True)
"""


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-Urpf", "--kill-child", "true"]
    return subprocess.run(probe, check=False, capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not _namespaces_work(), reason="cannot make a user and pid namespace here")


def _writer_in_a_container(root: Path, key: str, forks_first: int = 0) -> tuple[subprocess.Popen[str], int]:
    """A process in a pid namespace of its own, stopped mid-write of a blob (before its fsync); with its pid
    there: 1, or ``forks_first + 2`` when a shell (pid 1 there) runs ``forks_first`` processes before it."""
    command = [sys.executable, "-c", WRITER, str(root), key]
    if forks_first:
        loop = f'i=0; while [ $i -lt {forks_first} ]; do /bin/true; i=$((i+1)); done; "$@"; exit $?'
        command = ["sh", "-c", loop, "sh", *command]
    writer = subprocess.Popen(["unshare", "-Urpf", "--kill-child", *command],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    return writer, int(writer.stdout.readline())


@needs_namespaces
def test_a_worker_containers_write_in_progress_survives_an_api_containers_start(tmp_path: Path) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    key = reconstruction_key("ab" * 16)
    blobs.put(key.replace("ab" * 16, "ab" + "0" * 30), b"another image")  # its shard exists: no fsync to stop
    dead_here = next(pid for pid in range(3, 1 << 22) if not Path(f"/proc/{pid}").exists())
    writer, pid_there = _writer_in_a_container(tmp_path / "blobs", key, forks_first=dead_here - 2)
    try:
        assert pid_there == dead_here
        assert blobs.remove_stale_tmp() == 0  # the API container's start-up sweep
        assert writer.communicate("go\n", timeout=30)[0].strip() == "written" and writer.returncode == 0
    finally:
        writer.kill()
    assert blobs.get(key) == b"reconstruction"


@needs_namespaces
def test_a_dead_write_of_a_containers_pid_1_is_swept_once_older_than_any_write(tmp_path: Path) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    key = reconstruction_key("ab" * 16)
    blobs.put(key.replace("ab" * 16, "ab" + "0" * 30), b"another image")
    writer, pid_there = _writer_in_a_container(tmp_path / "blobs", key)
    writer.communicate("", timeout=30)
    assert (pid_there, writer.returncode) == (1, 9)
    left = list((tmp_path / "blobs").rglob(f"{TMP_PREFIX}*"))
    assert len(left) == 1 and blobs.remove_stale_tmp() == 0  # fresh: the sweep cannot tell it from a live one
    then = time.time() - FOREIGN_TMP_AGE_S - 60
    os.utime(left[0], (then, then))
    assert blobs.remove_stale_tmp() == 1 and not left[0].exists()


@needs_namespaces
def test_a_container_with_this_hosts_name_is_another_machine(tmp_path: Path) -> None:
    """Containers on two hosts with the hosts' network and no machine id share a host name where the hosts
    do: were they one machine, a write of one would be taken for a dead boot's by the other and deleted."""
    tags = "from aeic.shared import durable; print(durable._MACHINE, durable._BOOT, durable._PID_SPACE)"
    there = subprocess.run(["unshare", "-Urpf", "--kill-child", sys.executable, "-c", tags], check=True,
                           capture_output=True, text=True).stdout.split()
    assert socket.gethostname() == subprocess.run(["unshare", "-Urpf", "hostname"], check=True,
                                                  capture_output=True, text=True).stdout.strip()
    assert there[1] == durable._BOOT and there[0] != durable._MACHINE and there[2] != durable._PID_SPACE
