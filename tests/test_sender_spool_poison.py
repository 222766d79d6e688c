"""One item the receiver keeps failing must not hold back the queue; an outage must not multiply requests.

A fake receiver behind httpx's MockTransport answers each upload by its key, and the forwarder runs on
injected clocks and sleeps, so every backoff and every per-item time is exact and nothing waits.
"""

from __future__ import annotations

import io
import json
import os
import random
import threading
from pathlib import Path

import httpx
import pytest
from aeic.sender.backoff import Backoff
from aeic.sender.cli import main
from aeic.sender.config import SenderConfig
from aeic.sender.forward import Forwarder, ItemPolicy
from aeic.sender.pipeline import Codec
from aeic.sender.report import Reporter
from aeic.sender.spool import DEFAULT_MAX_ITEM_BYTES, Spool, SpoolItem
from aeic.sender.uploader import Outcome, Uploader, UploadResult
from sender_support import make_bitstream, traced_peak

TOKEN = "device-token"
Answer = int | tuple[int, str] | type[httpx.TransportError]


class FakeReceiver:
    """Stores what it accepts; ``fail`` answers some keys otherwise, ``down`` answers every key otherwise.

    An answer is a status, a (status, Retry-After) pair, or a transport error to raise.
    """

    def __init__(self) -> None:
        self.requests: list[str] = []  # the Idempotency-Key of every upload, in order
        self.stored: list[str] = []
        self.fail: dict[str, Answer] = {}
        self.down: Answer | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        key = request.headers["Idempotency-Key"]
        self.requests.append(key)
        answer = self.down if self.down is not None else self.fail.get(key)
        if isinstance(answer, type):
            raise answer("simulated", request=request)
        if answer is not None:
            status, retry_after = answer if isinstance(answer, tuple) else (answer, "")
            headers = {"Retry-After": retry_after} if retry_after else {}
            return httpx.Response(status, json={"detail": f"handler crashed on {key[:8]}"}, headers=headers)
        repeated = key in self.stored
        if not repeated:
            self.stored.append(key)
        return httpx.Response(200 if repeated else 202, json={"id": f"img-{self.stored.index(key) + 1}"})


class Clocks:
    """Monotonic and wall clocks that only move when the forwarder sleeps or a test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.wall = 1_800_000_000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


def _forwarder(
    spool: Spool,
    receiver: FakeReceiver,
    clocks: Clocks,
    policy: ItemPolicy | None = None,
    errors: list[str] | None = None,
    results: list[tuple[str, UploadResult]] | None = None,
) -> Forwarder:
    uploader = Uploader("http://receiver.test", TOKEN, transport=httpx.MockTransport(receiver))

    def listen(item: SpoolItem, result: UploadResult) -> None:
        if results is not None:
            results.append((item.key, result))

    return Forwarder(
        spool,
        uploader,
        backoff=Backoff(base=1.0, max_delay=300.0, rng=random.Random(5)),
        item_policy=policy,
        sleep=clocks.sleep,
        clock=lambda: clocks.now,
        wall_clock=lambda: clocks.wall,
        listener=listen,
        on_error=(errors if errors is not None else []).append,
    )


def _spool_with(root: Path, count: int, start: int = 0) -> tuple[Spool, list[str]]:
    spool = Spool(root)
    return spool, [spool.put(make_bitstream(i), source=f"img{i}.jpg").key for i in range(start, start + count)]


@pytest.mark.parametrize("answer", [500, 502, 504, httpx.ReadTimeout], ids=["500", "502", "504", "timeout"])
def test_a_poison_item_does_not_hold_back_the_items_behind_it(tmp_path: Path, answer: Answer) -> None:
    """The oldest item crashes a receiver handler (or is too slow for a proxy); the others still go, in order."""
    spool, keys = _spool_with(tmp_path / "spool", 5)
    receiver, clocks, errors = FakeReceiver(), Clocks(), list[str]()
    receiver.fail[keys[0]] = answer
    forwarder = _forwarder(spool, receiver, clocks, errors=errors)
    report = forwarder.flush(max_wait=60)
    assert receiver.stored == keys[1:]  # delivered in queue order
    assert receiver.requests == keys  # the poison item cost one request, not one per backoff interval
    assert report.accepted == 4 and report.set_aside == 1 and report.stopped is None and clocks.sleeps == []
    [poison] = spool.items()
    assert poison.key == keys[0] and poison.failed_alone == 1 and poison.attempts == 1
    assert clocks.wall < poison.next_attempt <= clocks.wall + 1.0  # its own backoff: backoff_base at first
    assert len(errors) == 1 and "set aside" in errors[0] and "img0.jpg" in errors[0]

    forwarder.drain_pass()  # not due yet: not tried
    assert len(receiver.requests) == 5
    clocks.advance(1.0)
    spool.put(make_bitstream(9), source="img9.jpg")
    forwarder.drain_pass()
    again = spool.items()[0]
    assert again.failed_alone == 2 and again.attempts == 2 and len(receiver.stored) == 5
    assert 1.0 <= again.next_attempt - clocks.wall <= 2.0  # doubled


@pytest.mark.parametrize("answer", [502, httpx.ConnectError], ids=["502", "refused"])
def test_an_outage_costs_one_request_per_backoff_interval(tmp_path: Path, answer: Answer) -> None:
    """Every item fails: one probe per interval (and a second item on the first pass only, when the
    answer could be one item's fault), nothing set aside; once the receiver is back, all go."""
    spool, keys = _spool_with(tmp_path / "spool", 8)
    receiver, clocks = FakeReceiver(), Clocks()
    receiver.down = answer
    forwarder = _forwarder(spool, receiver, clocks)
    report = forwarder.flush(max_wait=600)
    first_pass = 1 if answer is httpx.ConnectError else 2
    assert len(clocks.sleeps) >= 6 and len(receiver.requests) == first_pass + len(clocks.sleeps)
    assert report.accepted == 0 and report.set_aside == 0 and report.stopped is not None
    assert receiver.requests == (keys * 3)[: len(receiver.requests)]  # the probe walks the queue, round
    assert all(item.failed_alone == 0 and item.next_attempt == 0.0 for item in spool.items())

    receiver.down = None
    report = forwarder.flush(max_wait=600)
    assert report.accepted == 8 and report.set_aside == 0 and sorted(receiver.stored) == sorted(keys)
    probe = receiver.stored[0]
    assert receiver.stored[1:] == [key for key in keys if key != probe]  # then oldest first again


def test_a_run_of_failing_items_at_the_head_is_not_taken_for_an_outage(tmp_path: Path) -> None:
    """Two poison items in a row look like an outage once; the next pass probes behind them."""
    spool, keys = _spool_with(tmp_path / "spool", 6)
    receiver, clocks = FakeReceiver(), Clocks()
    receiver.fail = {keys[0]: 500, keys[1]: 500}
    report = _forwarder(spool, receiver, clocks).flush(max_wait=60)
    assert receiver.stored == keys[2:] and len(clocks.sleeps) == 1
    assert receiver.requests == [keys[0], keys[1], keys[2], keys[0], keys[1], *keys[3:]]
    assert report.set_aside == 2 and [item.failed_alone for item in spool.items()] == [1, 1]


def test_retry_after_is_honoured_and_a_429_is_not_an_item_fault(tmp_path: Path) -> None:
    spool, keys = _spool_with(tmp_path / "spool", 3)
    receiver, clocks = FakeReceiver(), Clocks()
    receiver.down = (429, "40")
    forwarder = _forwarder(spool, receiver, clocks)
    report = forwarder.drain_pass()
    assert receiver.requests == keys[:1] and report.stopped is not None and report.stopped.retry_after == 40.0
    assert forwarder.backoff.next_delay(report.stopped.retry_after) >= 40.0

    # One stream answered with 503 and Retry-After: each pass stops as asked, yet the stream is set aside.
    receiver.down, receiver.fail = None, {keys[0]: (503, "5")}
    report = forwarder.drain_pass()  # probes behind the item that failed, then the head fails after it
    assert receiver.requests[1:] == [keys[1], keys[0]] and report.stopped is not None
    assert report.stopped.retry_after == 5.0 and report.set_aside == 1
    forwarder.drain_pass()
    assert receiver.stored == keys[1:] and [item.failed_alone for item in spool.items()] == [1]
    assert spool.items()[0].next_attempt - clocks.wall >= 5.0


def test_a_poison_item_is_rejected_with_its_reason_after_both_limits(tmp_path: Path) -> None:
    spool, keys = _spool_with(tmp_path / "spool", 1)
    receiver, clocks, results = FakeReceiver(), Clocks(), list[tuple[str, UploadResult]]()
    receiver.fail[keys[0]] = 500
    policy = ItemPolicy(max_attempts=3, max_age=7200, backoff_max=600)
    forwarder = _forwarder(spool, receiver, clocks, policy, results=results)
    since = clocks.wall
    for frame in range(60):  # a camera: a new frame before each pass, a pass each time the poison is due
        spool.put(make_bitstream(100 + frame))
        forwarder.drain_pass()
        if spool.rejected():
            break
        [poison] = [item for item in spool.items() if item.key == keys[0]]
        assert poison.failed_alone == frame + 1 and poison.failed_alone_since == since
        assert poison.failed_alone < 3 or clocks.wall - since < 7200  # not given up before both limits
        clocks.advance(poison.next_attempt - clocks.wall)
    assert frame + 1 >= 3 and clocks.wall - since >= 7200
    [rejected] = spool.rejected()
    assert rejected.key == keys[0] and rejected.extra["status"] == 500 and len(spool) == 0
    reason = rejected.extra["reason"]
    assert f"gave up after {frame + 1} failed uploads" in reason and "while the receiver accepted other items" in reason
    assert "last answer: HTTP 500: handler crashed on" in reason
    assert results[-1] == (keys[0], UploadResult(Outcome.REJECTED, 500, reason))
    assert len(receiver.stored) == frame + 1  # every frame was delivered meanwhile


def _no_codec(config: SenderConfig, reporter: Reporter) -> Codec:
    raise AssertionError("the spool command needs no codec")


def test_the_per_item_state_survives_a_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spool, keys = _spool_with(tmp_path / "spool", 3)
    receiver, clocks = FakeReceiver(), Clocks()
    receiver.fail[keys[0]] = 500
    _forwarder(spool, receiver, clocks).flush(max_wait=60)
    assert receiver.stored == keys[1:]
    sidecar = json.loads((spool.pending_dir / f"{keys[0]}.json").read_text(encoding="utf-8"))
    assert sidecar["failed_alone"] == 1 and sidecar["failed_alone_since"] == clocks.wall

    restarted = Spool(tmp_path / "spool")  # a new process: nothing but the disk
    new = restarted.put(make_bitstream(50), source="after-restart.jpg").key
    forwarder = _forwarder(restarted, receiver, clocks)
    forwarder.drain_pass()
    assert receiver.requests[-1] == new and receiver.requests.count(keys[0]) == 1  # still set aside
    [item] = restarted.items()
    assert item.failed_alone == 1 and item.next_attempt == sidecar["next_attempt"]

    assert main(["spool", "--spool", str(restarted.root)], codec_factory=_no_codec) == 0
    captured = capsys.readouterr()
    assert "set aside: failed 1x while others were accepted" in captured.out and "1 set aside" in captured.err

    clocks.advance(item.next_attempt - clocks.wall)
    receiver.fail.clear()  # the receiver was fixed meanwhile
    forwarder.drain_pass()
    assert len(restarted) == 0 and sorted(receiver.stored) == sorted([*keys, new])


def test_a_poison_item_alone_in_the_queue_waits_for_its_own_time(tmp_path: Path) -> None:
    """Once proven at fault, an item left alone in the queue is not retried every drain interval."""
    spool, keys = _spool_with(tmp_path / "spool", 2)
    receiver, clocks = FakeReceiver(), Clocks()
    receiver.fail[keys[0]] = 500
    forwarder = _forwarder(spool, receiver, clocks)
    forwarder.flush(max_wait=60)
    clocks.advance(spool.items()[0].next_attempt - clocks.wall)
    report = forwarder.flush(max_wait=60)  # alone: nothing to compare it with
    assert report.stopped is None and clocks.sleeps == [] and receiver.requests.count(keys[0]) == 2
    [item] = spool.items()
    assert item.failed_alone == 1 and item.attempts == 2 and item.next_attempt > clocks.wall


def test_a_read_only_spool_still_sets_the_poison_item_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, keys = _spool_with(tmp_path / "spool", 3)

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(spool, "_write_sidecar", read_only)
    monkeypatch.setattr(spool, "remove", read_only)
    receiver, clocks = FakeReceiver(), Clocks()
    receiver.fail[keys[0]] = 500
    forwarder = _forwarder(spool, receiver, clocks)
    forwarder.flush(max_wait=60)
    forwarder.drain_pass()
    assert receiver.stored == keys[1:] and receiver.requests == keys  # the poison is remembered in memory
    assert forwarder.undelivered() == 1


def test_an_oversized_pending_file_is_rejected_unread(tmp_path: Path) -> None:
    """A file in pending/ far larger than any bitstream (copied in by hand, a damaged entry) is moved to
    rejected/ with the reason, without being read into memory, and the items behind it go."""
    spool, keys = _spool_with(tmp_path / "spool", 1)
    big_key = "f" * 64
    big = spool.pending_dir / f"{big_key}.aeic"
    with big.open("wb") as file:
        file.truncate(4 * DEFAULT_MAX_ITEM_BYTES)  # sparse: costs no disk, 64 MiB if read
    os.utime(big, (1.0, 1.0))  # the oldest item
    receiver, clocks = FakeReceiver(), Clocks()
    err = io.StringIO()
    forwarder = _forwarder(spool, receiver, clocks)
    forwarder._listener = Reporter(err=err).upload
    report, peak = traced_peak(forwarder.drain_pass)
    assert peak < DEFAULT_MAX_ITEM_BYTES // 4, f"the pass allocated {peak} bytes"
    assert report.rejected == 1 and report.accepted == 1 and receiver.requests == keys
    [rejected] = spool.rejected()
    assert rejected.key == big_key and "spool_max_item_bytes" in rejected.extra["reason"]
    assert f"{4 * DEFAULT_MAX_ITEM_BYTES} bytes" in rejected.extra["reason"] and big_key[:12] in err.getvalue()


def test_a_configured_item_bound_applies(tmp_path: Path) -> None:
    item = Spool(tmp_path / "spool").put(make_bitstream(1, payload_bytes=100))  # queued before the bound was lowered
    spool = Spool(tmp_path / "spool", max_item_bytes=64)  # a new stream this large is refused by put
    receiver, clocks = FakeReceiver(), Clocks()
    report = _forwarder(spool, receiver, clocks).drain_pass()
    assert report.rejected == 1 and receiver.requests == [] and spool.rejected()[0].key == item.key


def test_a_stopping_agent_does_not_try_a_second_item_to_judge_the_first(tmp_path: Path) -> None:
    spool, keys = _spool_with(tmp_path / "spool", 3)
    receiver, clocks = FakeReceiver(), Clocks()
    receiver.fail[keys[0]] = 500
    forwarder = _forwarder(spool, receiver, clocks)
    stop = threading.Event()
    forwarder._listener = lambda item, result: stop.set()  # SIGTERM during the first upload
    report = forwarder.drain_pass(stop)
    assert receiver.requests == keys[:1] and report.stopped is None
    first = spool.items()[0]
    assert first.key == keys[0] and first.attempts == 1 and first.failed_alone == 0  # a plain attempt


def test_a_refused_token_counts_against_no_item(tmp_path: Path) -> None:
    spool, keys = _spool_with(tmp_path / "spool", 3)
    receiver, clocks = FakeReceiver(), Clocks()
    receiver.fail[keys[0]] = 500
    forwarder = _forwarder(spool, receiver, clocks)
    forwarder.flush(max_wait=60)
    clocks.advance(spool.items()[0].next_attempt - clocks.wall)
    spool.put(make_bitstream(7))
    receiver.down = 401  # the token was revoked
    report = forwarder.flush(max_wait=60)
    assert report.stopped is not None and report.stopped.outcome is Outcome.BLOCKED and clocks.sleeps == []
    assert len(receiver.requests) == 4 and spool.rejected() == []
    assert [item.failed_alone for item in spool.items()] == [1, 0]


def test_a_one_shot_waits_within_its_window_for_an_item_set_aside_after_a_lost_answer(tmp_path: Path) -> None:
    """Was: `send`/`flush` ended after one pass with exit 3 and the image queued when one answer was lost (an item
    set aside, its retry due in a second) although `retry_for` gave them a minute. Now the flush of a one-shot
    command waits for the item's own next try within its window."""
    spool, keys = _spool_with(tmp_path / "spool", 3)
    receiver, clocks = FakeReceiver(), Clocks()
    receiver.fail[keys[0]] = httpx.ReadTimeout
    forwarder = _forwarder(spool, receiver, clocks)
    first = forwarder.drain_pass()
    assert first.set_aside == 1 and receiver.stored == keys[1:]
    del receiver.fail[keys[0]]  # the answer was lost once; the next try goes through
    report = forwarder.flush(max_wait=60, wait_for_set_aside=True)
    assert receiver.stored == [*keys[1:], keys[0]] and len(spool) == 0 and report.stopped is None
    assert len(clocks.sleeps) == 1 and 0 < clocks.sleeps[0] <= 1.0  # the item's own backoff, not more


def test_a_one_shot_gives_a_poison_item_its_own_tries_only_within_its_window(tmp_path: Path) -> None:
    spool, keys = _spool_with(tmp_path / "spool", 3)
    receiver, clocks = FakeReceiver(), Clocks()
    receiver.fail[keys[0]] = 500
    report = _forwarder(spool, receiver, clocks).flush(max_wait=60, wait_for_set_aside=True)
    assert receiver.stored == keys[1:] and len(spool) == 1 and report.set_aside >= 1
    assert sum(clocks.sleeps) <= 60 and 2 <= receiver.requests.count(keys[0]) <= 8  # growing delays, not a hammer
