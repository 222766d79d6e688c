"""aeic.sender.spool: durable, bounded, crash-recovering store-and-forward queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from aeic.sender.spool import Spool, SpoolCorruptError, SpoolFullError, idempotency_key
from aeic.shared.durable import TMP_PREFIX, atomic_write
from sender_support import make_bitstream, traced_peak


def test_put_names_item_by_digest_and_writes_sidecar(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = make_bitstream(1)
    item = spool.put(data, source="a.jpg", rate_index=1)
    assert item.key == idempotency_key(data) and len(item.key) == 64
    assert item.path == tmp_path / "pending" / f"{item.key}.aeic"
    assert item.path.read_bytes() == data
    meta = json.loads(item.path.with_suffix(".json").read_text())
    assert meta["source"] == "a.jpg" and meta["attempts"] == 0 and meta["rate_index"] == 1
    assert meta["created"] <= time.time()


def test_same_bitstream_twice_is_one_item(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.put(make_bitstream(1), source="a")
    second = spool.put(make_bitstream(1), source="b")
    assert first.key == second.key and len(spool) == 1 and second.source == "a"


def test_identical_frames_of_two_captures_are_two_items_one_capture_put_twice_is_one(tmp_path: Path) -> None:
    """A still scene's frames can code byte-identically (black frames always do); each is its own event."""
    spool = Spool(tmp_path)
    data = make_bitstream(1)
    first = spool.put(data, source="camera-1", capture="camera-20261207T141500-1")
    second = spool.put(data, source="camera-2", capture="camera-20261207T141510-2")
    again = spool.put(data, source="camera-1", capture="camera-20261207T141500-1")
    assert first.key != second.key and again.key == first.key and len(spool) == 2
    assert first.key == f"{idempotency_key(data)}-camera-20261207T141500-1"
    assert spool.read(first) == spool.read(Spool(tmp_path).items()[1]) == data  # the digest check reads past the name
    first.path.write_bytes(b"bit rot")
    with pytest.raises(SpoolCorruptError):
        spool.read(first)
    with pytest.raises(ValueError, match="capture name"):
        spool.put(data, capture="../../etc/passwd")


def test_items_are_listed_oldest_first_and_survive_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    keys = [spool.put(make_bitstream(i), source=f"img{i}").key for i in range(5)]
    reopened = Spool(tmp_path)
    assert [item.key for item in reopened.items()] == keys
    assert [reopened.read(item) for item in reopened.items()] == [make_bitstream(i) for i in range(5)]


def test_bound_on_item_count_refuses_new_items_and_keeps_old(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_items=2)
    spool.put(make_bitstream(1))
    spool.put(make_bitstream(2))
    with pytest.raises(SpoolFullError, match="max_items=2"):
        spool.put(make_bitstream(3))
    assert len(spool) == 2
    assert {item.key for item in spool.items()} == {idempotency_key(make_bitstream(i)) for i in (1, 2)}
    spool.put(make_bitstream(2))  # a duplicate of a queued item is not a new item: accepted


def test_bound_on_bytes(tmp_path: Path) -> None:
    first = make_bitstream(1, payload_bytes=100)
    spool = Spool(tmp_path, max_bytes=len(first) + 50)
    spool.put(first)
    with pytest.raises(SpoolFullError, match="max_bytes"):
        spool.put(make_bitstream(2, payload_bytes=100))
    assert len(spool) == 1 and not list((tmp_path / "pending").glob(f"{TMP_PREFIX}*"))


def test_remove_and_record_attempt(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    item = spool.put(make_bitstream(1))
    spool.record_attempt(item, "ConnectError: refused")
    again = Spool(tmp_path).items()[0]
    assert again.attempts == 1 and again.last_error == "ConnectError: refused"
    spool.remove(again)
    spool.remove(again)  # a second removal (another process was faster) is harmless
    assert len(spool) == 0 and not any((tmp_path / "pending").iterdir())


def test_reject_keeps_item_with_reason_and_requeue_brings_it_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    item = spool.put(make_bitstream(1), source="x.png")
    spool.reject(item, "HTTP 422: unknown model id", status=422)
    assert len(spool) == 0
    [rejected] = Spool(tmp_path).rejected()
    assert rejected.extra["reason"] == "HTTP 422: unknown model id" and rejected.extra["status"] == 422
    assert rejected.source == "x.png" and rejected.path.read_bytes() == make_bitstream(1)
    assert spool.requeue_rejected() == 1
    assert [i.key for i in spool.items()] == [item.key] and spool.rejected() == []


def test_corrupted_bitstream_is_detected(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    item = spool.put(make_bitstream(1))
    item.path.write_bytes(b"bit rot")
    with pytest.raises(SpoolCorruptError):
        spool.read(item)


def test_recovery_cleans_tmp_files_and_repairs_sidecars(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.put(make_bitstream(1), source="kept")
    pending = tmp_path / "pending"
    # A writer killed mid-write leaves a temp file: it is not an item and gets removed ...
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    (pending / f"{TMP_PREFIX}{'d' * 64}.aeic.{dead.stdout.strip()}.0a1b2c3d").write_bytes(b"half a bitstr")
    # ... unless its writer is still alive (another process writing right now).
    live = pending / f"{TMP_PREFIX}{'e' * 64}.aeic.{os.getppid()}.0a1b2c3d"
    live.write_bytes(b"being written")
    # Killed between the bitstream's rename and its sidecar: the item stays, with a new sidecar.
    orphan = make_bitstream(2)
    atomic_write(pending / f"{idempotency_key(orphan)}.aeic", orphan)
    # Killed between unlinking a delivered bitstream and its sidecar: the sidecar goes.
    (pending / f"{'0' * 64}.json").write_text("{}")
    # A sidecar truncated by a disk error does not hide its item.
    (pending / f"{kept.key}.json").write_text("{not json")

    recovered = Spool(tmp_path)
    keys = {item.key for item in recovered.items()}
    assert keys == {kept.key, idempotency_key(orphan)}
    assert list(pending.glob(f"{TMP_PREFIX}*")) == [live]
    assert not (pending / f"{'0' * 64}.json").exists()
    assert (pending / f"{idempotency_key(orphan)}.json").exists()
    assert all(recovered.read(item) for item in recovered.items())


@pytest.mark.parametrize("sidecar", ["null", "[1, 2]", '"text"', '{"created": "yesterday"}', '{"attempts": []}'])
def test_a_sidecar_of_the_wrong_shape_does_not_stop_the_spool(tmp_path: Path, sidecar: str) -> None:
    spool = Spool(tmp_path)
    damaged = spool.put(make_bitstream(1), source="damaged")
    fine = spool.put(make_bitstream(2), source="fine")
    damaged.path.with_suffix(".json").write_text(sidecar)
    reopened = Spool(tmp_path)
    items = {item.key: item for item in reopened.items()}
    assert set(items) == {damaged.key, fine.key} and items[fine.key].source == "fine"
    assert reopened.read(items[damaged.key]) == make_bitstream(1)
    reopened.record_attempt(items[damaged.key], "HTTP 503")  # a fresh, valid sidecar
    assert {i.key: i.attempts for i in Spool(tmp_path).items()}[damaged.key] == 1


@pytest.mark.parametrize("when", ["NaN", "Infinity", "1e300", "-1e300"])
def test_a_sidecar_time_no_clock_shows_is_damage(
    tmp_path: Path, when: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid JSON with a time out of any clock's range (a sidecar edited by hand, or damaged): 1e300 made
    ``aeic-send spool`` die with a traceback (OverflowError from time.localtime), and NaN left the item
    never due, so never uploaded."""
    from aeic.sender import cli

    spool = Spool(tmp_path)
    item = spool.put(make_bitstream(1), source="x.jpg")
    item.path.with_suffix(".json").write_text(f'{{"failed_alone": 1, "next_attempt": {when}, "created": 1.0}}')
    [read] = Spool(tmp_path).items()
    assert read.extra.get("recovered") is True and read.next_attempt == 0.0 and read.failed_alone == 0
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    assert cli.main(["spool", "--spool", str(tmp_path)]) == cli.EXIT_OK
    assert "1 pending" in capsys.readouterr().err


def test_record_attempt_on_a_full_disk_keeps_the_item_and_does_not_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    item = spool.put(make_bitstream(1))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "_write_sidecar", disk_full)
    spool.record_attempt(item, "ConnectError: refused")
    assert item.attempts == 1 and spool.read(item) == make_bitstream(1) and len(spool) == 1


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from sender_support import make_bitstream
    from aeic.sender.spool import Spool
    spool = Spool({root!r})
    i = 0
    while True:
        item = spool.put(make_bitstream(i, payload_bytes=2000), source=f"img{{i}}")
        print(item.key, flush=True)  # printed only after put() returned: promised durable
        i += 1
    """
)


def test_kill_dash_nine_mid_stream_loses_no_acknowledged_item(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    script = WRITER.format(tests=str(Path(__file__).parent), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    promised: list[str] = []
    assert proc.stdout is not None
    while len(promised) < 25:
        line = proc.stdout.readline()
        assert line, "writer died early"
        promised.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    promised += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]

    spool = Spool(root)
    present = {item.key for item in spool.items()}
    assert set(promised) <= present  # every acknowledged put survived
    assert len(present) - len(promised) <= 1  # at most the one in flight, and then complete
    for item in spool.items():
        assert idempotency_key(spool.read(item)) == item.key
    assert not list((root / "pending").glob(f"{TMP_PREFIX}*"))


def test_a_drain_of_a_large_backlog_holds_its_order_not_every_item(tmp_path: Path) -> None:
    """A device offline for days queues tens of thousands of items (the default bound is 100,000).
    A pass that stops at its first failed upload must not hold every item's metadata (about 1.4 KB
    each, 140 MB at the bound): it holds the order, about 200 bytes an item."""

    from aeic.sender.forward import Forwarder
    from aeic.sender.uploader import Outcome, UploadResult

    spool, count = Spool(tmp_path), 2000
    for i in range(count):  # written directly: the test is about reading, not fsync
        data = make_bitstream(i)
        key = idempotency_key(data)
        (spool.pending_dir / f"{key}.aeic").write_bytes(data)
        sidecar = {"created": i, "source": f"/srv/camera/img{i:06d}.jpg", "attempts": 3,
                   "last_error": "ConnectError: [Errno 111] Connection refused"}  # fmt: skip
        (spool.pending_dir / f"{key}.json").write_text(json.dumps(sidecar))

    class Down:
        def upload(self, data: bytes, key: str) -> UploadResult:
            return UploadResult(Outcome.RETRY, None, "ConnectError", receiver_wide=True)

    forwarder = Forwarder(spool, Down())  # type: ignore[arg-type]
    report, peak = traced_peak(forwarder.drain_pass)
    assert report.failed_attempts == 1 and report.stopped is not None
    assert peak < 400 * count, f"a pass held {peak / count:.0f} bytes per queued item"
    assert [item.source for item in spool.items()[:2]] == ["/srv/camera/img000000.jpg", "/srv/camera/img000001.jpg"]


def test_a_crashed_writer_with_this_process_id_is_recognised_as_gone(tmp_path: Path) -> None:
    """In a container the agent is pid 1 on every start: a temporary file named with our pid but older
    than this process is an earlier run's leftover and goes; one written now by another thread stays."""
    from aeic.shared import durable

    pending = Spool(tmp_path).pending_dir
    earlier_run = pending / f"{TMP_PREFIX}{'a' * 64}.aeic.{os.getpid()}.0a1b2c3d"
    earlier_run.write_bytes(b"half")
    before = durable._PROCESS_STARTED - 60
    os.utime(earlier_run, (before, before))
    writing_now = pending / f"{TMP_PREFIX}{'b' * 64}.aeic.{os.getpid()}.0a1b2c3d"
    writing_now.write_bytes(b"being written")
    Spool(tmp_path)
    assert list(pending.glob(f"{TMP_PREFIX}*")) == [writing_now]
