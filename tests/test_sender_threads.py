"""The encoder's onnxruntime threads follow the CPUs the process may use, not the machine's core count.

onnxruntime's default is one intra-op thread per physical core, each pinned to its core whatever the
affinity mask, so a sender held to one core (taskset, systemd's CPUAffinity=, docker --cpuset-cpus) ran
worker threads on the others. Idle threads sleep rather than spin. No torch here: this runs in the Python 3.10 sender check too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from aeic.sender.encoder import SPINNING, SenderCodec, allowed_cpus, session_options

SHIPPED = Path(__file__).resolve().parents[1] / "aeic" / "models" / "nano-se"


def _held_to(monkeypatch: pytest.MonkeyPatch, allowed: int, machine: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(allowed)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: machine)


def test_a_process_held_to_fewer_cpus_gets_that_many_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    _held_to(monkeypatch, 1, 4)
    assert allowed_cpus() == 1
    options = session_options(None)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_an_unrestricted_process_keeps_onnxruntimes_default(monkeypatch: pytest.MonkeyPatch) -> None:
    _held_to(monkeypatch, 4, 4)
    assert allowed_cpus() is None
    assert session_options(None).intra_op_num_threads == 0  # 0: onnxruntime chooses


def test_configured_threads_win_over_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    _held_to(monkeypatch, 1, 4)
    assert session_options(3).intra_op_num_threads == 3


def test_no_affinity_call_leaves_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert allowed_cpus() is None
    assert session_options(None).intra_op_num_threads == 0


def test_every_session_of_the_codec_gets_the_allowed_count(monkeypatch: pytest.MonkeyPatch) -> None:
    _held_to(monkeypatch, 2, 8)
    codec = SenderCodec.from_package(SHIPPED)
    sessions = (codec.analysis.stem, codec.analysis.trunk, codec.hyper)
    assert [s.get_session_options().intra_op_num_threads for s in sessions] == [2, 2, 2]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs two CPUs and affinity")
def test_a_process_pinned_to_one_cpu_stays_on_it() -> None:
    """The real call, no stand-ins: a child process pins itself to one CPU, loads the codec and encodes.

    With its own thread count onnxruntime also pins its worker threads, one to each core of the machine,
    so they left the CPU the process was held to (measured: three workers on the other core)."""
    script = ("import os, pathlib; cpu = sorted(os.sched_getaffinity(0))[0]; os.sched_setaffinity(0, {cpu}); "
              "import numpy as np; from aeic.sender.encoder import SenderCodec; "  # their threads start on it
              f"c = SenderCodec.from_package({str(SHIPPED)!r}); "
              "c.encode(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8), 20); "
              "tasks = pathlib.Path('/proc/self/task').iterdir(); "
              "allowed = {line.split()[1] for t in tasks for line in (t / 'status').read_text().splitlines() "
              "if line.startswith('Cpus_allowed_list')}; "
              "print(c.hyper.get_session_options().intra_op_num_threads, cpu, *sorted(allowed))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    threads, cpu, *allowed = done.stdout.split()
    assert threads == "1"
    assert allowed == [cpu]  # every thread of the process may run on that CPU only

def test_idle_threads_sleep_instead_of_spinning() -> None:
    for threads in (None, 1, 4):
        assert session_options(threads).get_session_config_entry(SPINNING) == "0"


def test_numpys_blas_follows_the_thread_count_and_is_left_alone_without_one() -> None:
    """Was: `threads=1` held onnxruntime to one thread while OpenBLAS ran one per core (1.4 times the CPU time of a
    1080p encode on two cores). In a child process: the limit is process-wide."""
    script = ("import sys; from threadpoolctl import threadpool_info; from aeic.sender.encoder import SenderCodec; "
              "before = [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']; "
              f"SenderCodec.from_package({str(SHIPPED)!r}, threads=int(sys.argv[1]) or None); "
              "print(*before, '|', *[i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'])")
    for threads in ("1", "0"):
        done = subprocess.run([sys.executable, "-c", script, threads], capture_output=True, text=True, timeout=120,
                              check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
        before, after = (part.split() for part in done.stdout.split("|"))
        assert before and set(before) == {"2"}  # numpy's BLAS is there, with two threads
        assert set(after) == ({"1"} if threads == "1" else {"2"}), threads
