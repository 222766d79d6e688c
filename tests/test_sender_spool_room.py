"""aeic.sender.spool: the size bounds decided from a tally, not a listing of ``pending/`` on every put.

A put used to list the folder twice and stat every item (about 0.2 s at 20,000 items here): a camera
frame each second or two fell behind during the long outages the spool is for. These tests pin what
the tally must keep: the bounds, several processes (here: Spool instances) on one folder, removals
by others, crash leftovers, duplicates and a folder deleted while running.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from aeic.sender import spool as spool_module
from aeic.sender.spool import Spool, SpoolFullError, idempotency_key
from aeic.shared.durable import atomic_write
from manual_clock import ManualClock
from sender_support import make_bitstream


class Listings:
    """How many times ``pending/`` was listed since the spool was opened (opening recovers from a crash
    with listings of its own); each listing is the cost that grows with the backlog."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[Path] = []
        scandir = os.scandir

        def spy(path: str | os.PathLike[str]) -> Iterator[os.DirEntry[str]]:
            self.paths.append(Path(path))
            return scandir(path)

        monkeypatch.setattr(spool_module.os, "scandir", spy)

    def opened(self, spool: Spool) -> Spool:
        self.paths.clear()
        return spool

    def of(self, spool: Spool) -> int:
        return sum(1 for path in self.paths if path == spool.pending_dir)


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> Listings:
    return Listings(monkeypatch)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def test_puts_list_pending_once_per_recount_not_once_per_item(tmp_path: Path, listings: Listings) -> None:
    spool = listings.opened(Spool(tmp_path))  # the default clock and interval (30 s): 50 puts take seconds
    for i in range(50):
        spool.put(make_bitstream(i))
    assert listings.of(spool) == 1
    assert len(spool) == 50


def test_a_tally_older_than_recount_seconds_is_counted_again(
    tmp_path: Path, clock: ManualClock, listings: Listings
) -> None:
    spool = listings.opened(Spool(tmp_path, recount_seconds=30, clock=clock))
    spool.put(make_bitstream(1))
    clock.now += 29.9
    spool.put(make_bitstream(2))
    assert listings.of(spool) == 1
    clock.now += 0.1
    spool.put(make_bitstream(3))
    assert listings.of(spool) == 2


def test_recount_seconds_zero_counts_on_every_put(tmp_path: Path, clock: ManualClock, listings: Listings) -> None:
    spool = listings.opened(Spool(tmp_path, recount_seconds=0, clock=clock))
    for i in range(3):
        spool.put(make_bitstream(i))
    assert listings.of(spool) == 3
    with pytest.raises(ValueError, match="recount_seconds"):
        Spool(tmp_path, recount_seconds=-1)


def test_bounds_hold_from_the_tally(tmp_path: Path, clock: ManualClock) -> None:
    counted = Spool(tmp_path / "items", max_items=3, clock=clock)
    for i in range(3):
        counted.put(make_bitstream(i))
    with pytest.raises(SpoolFullError, match="3 items pending"):
        counted.put(make_bitstream(3))
    first, small = make_bitstream(1, payload_bytes=100), make_bitstream(4, payload_bytes=5)
    sized = Spool(tmp_path / "bytes", max_bytes=2 * len(first) + len(small), clock=clock)
    sized.put(first)
    sized.put(make_bitstream(2, payload_bytes=100))
    with pytest.raises(SpoolFullError, match="max_bytes"):
        sized.put(make_bitstream(3, payload_bytes=100))
    sized.put(small)  # what still fits goes
    assert len(counted) == 3 and len(sized) == 3 and sized.pending_bytes() == sized.max_bytes


def test_the_same_bitstream_again_takes_no_room(tmp_path: Path, clock: ManualClock) -> None:
    spool = Spool(tmp_path, max_items=2, clock=clock)
    for _ in range(3):
        spool.put(make_bitstream(1))
    spool.put(make_bitstream(2))
    with pytest.raises(SpoolFullError):
        spool.put(make_bitstream(3))
    assert spool.keys() == {idempotency_key(make_bitstream(i)) for i in (1, 2)}


def test_a_second_spool_on_the_folder_counts_what_the_first_queued(tmp_path: Path, clock: ManualClock) -> None:
    first = Spool(tmp_path, max_items=3, clock=clock)
    for i in range(3):
        first.put(make_bitstream(i))
    second = Spool(tmp_path, max_items=3, clock=clock)
    with pytest.raises(SpoolFullError):
        second.put(make_bitstream(10))
    assert len(second) == 3


def test_what_another_process_queued_is_the_only_overshoot_and_a_recount_ends_it(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The documented tolerance: a put decides from its last count plus its own changes, so puts of
    another process since that count can pass the bound by as many items, never more, and for no
    longer than ``recount_seconds``."""
    ours = Spool(tmp_path, max_items=5, clock=clock)
    theirs = Spool(tmp_path, max_items=5, clock=clock)
    for i in range(3):
        ours.put(make_bitstream(i))
    for i in (10, 11):
        theirs.put(make_bitstream(i))
    with pytest.raises(SpoolFullError):
        theirs.put(make_bitstream(12))
    accepted = 0
    for i in range(20, 30):
        try:
            ours.put(make_bitstream(i))
        except SpoolFullError:
            break
        accepted += 1
    assert accepted == 2 and len(ours) == 5 + 2  # over by what the other one queued since our count
    clock.now += ours.recount_seconds
    with pytest.raises(SpoolFullError, match="7 items pending"):
        ours.put(make_bitstream(40))


def test_room_another_process_made_is_found_before_refusing(tmp_path: Path, clock: ManualClock) -> None:
    producer = Spool(tmp_path, max_items=2, clock=clock)
    producer.put(make_bitstream(1))
    producer.put(make_bitstream(2))
    drain = Spool(tmp_path, clock=clock)  # e.g. a separate `aeic-send flush`
    drain.remove(drain.items()[0])
    producer.put(make_bitstream(3))  # the tally said full; a count found the room
    assert len(producer) == 2


def test_a_removal_another_process_made_first_is_not_taken_off_twice(tmp_path: Path, clock: ManualClock) -> None:
    """Taking a removal off the tally when another process had already made it would leave the tally
    below the folder, and puts would then pass the bound."""
    ours = Spool(tmp_path, max_items=2, clock=clock)
    item = ours.put(make_bitstream(1))
    theirs = Spool(tmp_path, max_items=2, clock=clock)
    theirs.put(make_bitstream(2))
    theirs.remove(item)
    ours.remove(item)  # already gone: not ours to count
    ours.put(make_bitstream(3))
    with pytest.raises(SpoolFullError):
        ours.put(make_bitstream(4))
    assert len(ours) == 2


def test_own_removals_rejections_and_requeues_keep_the_tally_without_a_count(
    tmp_path: Path, clock: ManualClock, listings: Listings
) -> None:
    spool = listings.opened(Spool(tmp_path, max_items=2, clock=clock))
    a, b = spool.put(make_bitstream(1)), spool.put(make_bitstream(2))
    spool.remove(a)
    spool.put(make_bitstream(3))
    spool.reject(b, "HTTP 422: bad")
    spool.put(make_bitstream(4))
    assert listings.of(spool) == 1 and len(spool) == 2
    assert spool.requeue_rejected() == 1  # an operator's requeue is not refused: 3 pending now
    with pytest.raises(SpoolFullError, match="3 items pending"):
        spool.put(make_bitstream(5))


class SlowCount:
    """Counting ``pending/`` takes ``seconds`` on the fake clock, as a large backlog does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, clock: ManualClock, seconds: float) -> None:
        self.calls = 0
        count = spool_module._count

        def slow(directory: Path) -> tuple[int, int]:
            self.calls += 1
            clock.now += seconds
            return count(directory)

        monkeypatch.setattr(spool_module, "_count", slow)


def test_a_full_spool_is_not_counted_for_every_refused_frame(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = SlowCount(monkeypatch, clock, seconds=0.5)
    spool = Spool(tmp_path, max_items=2, clock=clock)
    spool.put(make_bitstream(1))
    item = spool.put(make_bitstream(2))
    for i in range(10, 15):  # a camera frame a second, refused from the count 0.5 s to 5 s old
        clock.now += 1
        with pytest.raises(SpoolFullError):
            spool.put(make_bitstream(i))
    assert counts.calls == 1
    clock.now += 5  # 20 times the count's 0.5 s since it began: the next refusal counts again
    with pytest.raises(SpoolFullError):
        spool.put(make_bitstream(20))
    assert counts.calls == 2
    spool.remove(item)  # our own drain made room: seen at once
    spool.put(make_bitstream(21))
    assert counts.calls == 2


def test_a_pending_folder_deleted_while_full_takes_the_next_item_at_once(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = SlowCount(monkeypatch, clock, seconds=10)  # no count would be due for 200 s
    spool = Spool(tmp_path, max_items=2, clock=clock)
    spool.put(make_bitstream(1))
    spool.put(make_bitstream(2))
    shutil.rmtree(spool.pending_dir)  # an operator clearing the backlog
    spool.put(make_bitstream(3))
    spool.put(make_bitstream(4))
    with pytest.raises(SpoolFullError):  # and the bound holds in the new folder
        spool.put(make_bitstream(5))
    assert counts.calls == 2 and len(spool) == 2  # the first put's count, and the new folder's at full
    shutil.rmtree(spool.root)  # the whole spool
    spool.put(make_bitstream(6))
    assert [item.key for item in spool.items()] == [idempotency_key(make_bitstream(6))]


def test_a_crashed_writers_bitstream_counts_on_the_next_processs_first_put(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The tally lives in memory: a crash loses it, and a new process counts before its first put,
    including a bitstream whose writer died before its sidecar."""
    pending = Spool(tmp_path).pending_dir
    orphan = make_bitstream(1)
    atomic_write(pending / f"{idempotency_key(orphan)}.aeic", orphan)
    restarted = Spool(tmp_path, max_items=1, clock=clock)
    with pytest.raises(SpoolFullError, match="1 items pending"):
        restarted.put(make_bitstream(2))


def _disk_full_for_bitstreams(monkeypatch: pytest.MonkeyPatch, code: int = errno.ENOSPC) -> None:
    """The spool's disk has no room (or went read-only): every bitstream write fails as ``atomic_write`` does then."""

    def full(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
        if path.suffix == spool_module.DATA_SUFFIX:
            raise OSError(code, os.strerror(code), str(path))
        atomic_write(path, data, sync_dir=sync_dir)

    monkeypatch.setattr(spool_module, "atomic_write", full)


def test_a_full_disk_refuses_an_item_as_a_full_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk with no room is a bound like ``max_bytes``: the image is refused with SpoolFullError (which the
    agent waits out without encoding again) and nothing is stored; the next put after room came back goes."""
    spool = Spool(tmp_path / "spool")
    queued = spool.put(make_bitstream(1))
    with monkeypatch.context() as patch:
        _disk_full_for_bitstreams(patch)
        with pytest.raises(SpoolFullError, match="its disk is full"):
            spool.put(make_bitstream(2))
    assert [item.key for item in spool.items()] == [queued.key]
    assert spool.put(make_bitstream(2)).key == idempotency_key(make_bitstream(2)) and len(spool) == 2


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_a_full_spool_disk_does_not_make_the_watcher_encode_every_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: int
) -> None:
    """Was: ENOSPC was an OSError the watcher retried on every scan, encoding the photo again and logging an
    error each time (38 encodes and 76 lines in 35 s with a real full tmpfs at --poll 0.5; 45 encodes in
    1.5 s here at --poll 0.02). Now the full spool's gate holds: one encode, one error, one line. A card gone
    read-only is held the same way, and its line no longer calls the spool full (it said "is full")."""
    pytest.importorskip("aeic.sender.encoder")  # the command layer catches the encoder's BudgetError
    import numpy as np
    from aeic.sender import cli
    from PIL import Image
    from sender_support import ContainerCodec, ScanCounter

    folder = tmp_path / "outbox"
    folder.mkdir()
    for index in range(2):
        Image.fromarray(np.full((24, 32, 3), 40 * index, np.uint8)).save(folder / f"{index}.png")
    codec = ContainerCodec()
    _disk_full_for_bitstreams(monkeypatch, error)
    monkeypatch.setenv("AEIC_TOKEN", "device-token")
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    ScanCounter(monkeypatch, stop_after=40)  # the 2nd scan's photo is refused; 38 scans more to encode it again
    code = cli.main(["watch", str(folder), "--to", "http://127.0.0.1:9", "--spool", str(tmp_path / "spool"),
                     "--poll", "0.02"], codec_factory=lambda config, reporter: codec)  # fmt: skip
    err = capsys.readouterr().err
    assert code == cli.EXIT_OK
    assert codec.calls == 1, err
    assert err.count("not queued") == 1 and err.count("takes no new image: none is encoded") == 1
    assert ("is full" in err) == (error == errno.ENOSPC) and ("read-only" in err) == (error == errno.EROFS)


def test_a_read_only_spool_disk_refuses_an_item_as_a_full_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: EROFS (an SD card's failure mode) was an OSError the watcher retried on every scan, encoding the photo
    again each time, as ENOSPC was. Now the full spool's gate holds it too, with a line that says what to do."""
    spool = Spool(tmp_path / "spool")
    with monkeypatch.context() as patch:
        _disk_full_for_bitstreams(patch, errno.EROFS)
        with pytest.raises(SpoolFullError, match="read-only .* remount it read-write or replace the card"):
            spool.put(make_bitstream(2))
    assert len(spool) == 0 and spool.put(make_bitstream(2)).key == idempotency_key(make_bitstream(2))
