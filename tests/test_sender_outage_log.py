"""What the agent logs while the receiver cannot be reached: the first failure with its cause, reminders at
growing intervals, one line when uploads recover (aeic.sender.outage), not one line per try.

The forwarder runs on a manual clock that its backoff sleeps move, against a receiver behind httpx's
MockTransport, so a day of outage takes milliseconds.
"""

from __future__ import annotations

import io
import itertools
import random
import re
from pathlib import Path

import httpx
from aeic.sender.backoff import Backoff
from aeic.sender.forward import Forwarder
from aeic.sender.outage import LONGEST_INTERVAL_S, OutageLog
from aeic.sender.report import Reporter
from aeic.sender.spool import Spool
from aeic.sender.uploader import Outcome, Uploader, UploadResult
from manual_clock import ManualClock
from sender_support import make_bitstream

DAY = 86400.0


class SwitchableReceiver:
    """Refuses connections while ``down``; else accepts every upload with a new id."""

    def __init__(self) -> None:
        self.down = True
        self.requests = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return httpx.Response(202, json={"id": f"img{self.requests}"})


def _agent(tmp_path: Path, receiver: SwitchableReceiver, clock: ManualClock) -> tuple[Forwarder, io.StringIO]:
    """A forwarder wired as ``aeic-send watch`` wires it (its reporter's listener and line writer), with
    the default backoff (1 s doubling to 300 s), a manual clock and sleeps that move it."""
    err = io.StringIO()
    reporter = Reporter(out=io.StringIO(), err=err)

    def sleep(seconds: float) -> None:
        clock.now += seconds

    uploader = Uploader("http://receiver.test", "device-token", transport=httpx.MockTransport(receiver))
    forwarder = Forwarder(Spool(tmp_path / "spool"), uploader, backoff=Backoff(rng=random.Random(3)), sleep=sleep,
                          clock=clock, listener=reporter.upload, on_error=reporter.info)  # fmt: skip
    return forwarder, err


def test_a_day_long_outage_is_a_few_lines_not_one_per_try(tmp_path: Path) -> None:
    """Was: one line per try ("upload of ... not done: ...; it stays queued"), 390 in this day (the backoff's
    jitter makes its 300-s cap 225 s on average)."""
    receiver, clock = SwitchableReceiver(), ManualClock()
    forwarder, err = _agent(tmp_path, receiver, clock)
    for i in range(3):
        forwarder.spool.put(make_bitstream(i), source=f"img{i}.jpg")
    report = forwarder.flush(max_wait=DAY)
    assert report.accepted == 0 and receiver.requests > 280  # tried all day, every 300 s at most
    lines = err.getvalue().splitlines()
    first, reminders = lines[0], lines[1:]
    assert first.startswith("uploads failing: cannot reach receiver.test: ConnectError: [Errno 111] Connection refused")
    assert "3 item(s) queued" in first
    # 1, 2, 4 ... 32 min apart, then hourly: 6 + 22 reminders (each told on the first try after its time).
    assert 26 <= len(reminders) <= 30, lines
    assert all(line.startswith("uploads still failing after ") and "3 item(s) queued" in line for line in reminders)
    assert re.match(r"uploads still failing after \d+ s \(", reminders[0]) and " h (" in reminders[-1]

    receiver.down = False
    clock.now += 5
    assert forwarder.flush(max_wait=60).accepted == 3
    recovered = err.getvalue().splitlines()[len(lines):]
    assert recovered[0].startswith("uploads recovered after 24.0 h of failures (")
    assert recovered[0].endswith("failed tries); 2 item(s) queued")  # told at the first accepted upload
    assert [line for line in recovered[1:] if not line.startswith("uploaded img")] == []


def _retry(detail: str = "ConnectError: refused", outcome: Outcome = Outcome.RETRY) -> UploadResult:
    return UploadResult(outcome, None, detail)


def test_reminders_grow_to_the_longest_interval_and_say_what_changed() -> None:
    clock, lines = ManualClock(0.0), list[str]()
    log = OutageLog(lines.append, lambda: 7, clock)
    told_at = []
    while clock.now < 6 * 3600:
        before = len(lines)
        log.failed(_retry())
        if len(lines) > before:
            told_at.append(clock.now)
        clock.now += 10
    assert told_at[:8] == [0, 60, 180, 420, 900, 1860, 3780, 7380]  # 1, 2, 4 ... min, then at most an hour
    assert all(b - a <= LONGEST_INTERVAL_S for a, b in itertools.pairwise(told_at))
    assert lines[1] == "uploads still failing after 60 s (7 tries); 7 item(s) queued; last: ConnectError: refused"

    log.failed(_retry("HTTP 401: token revoked (check the device token)", Outcome.BLOCKED))
    assert lines[-1].endswith("last: HTTP 401: token revoked (check the device token)")  # another kind: at once


def test_a_flapping_link_settles_at_a_few_lines_an_hour() -> None:
    """The link drops for 20 s every 2 minutes. Each logged recovery doubles the quiet window after it; a
    drop that begins and ends inside it is only counted, in the next first line. Was: a line per failed try,
    720 in this day; now 58, two an hour at the end."""
    clock, lines = ManualClock(0.0), list[str]()
    log = OutageLog(lines.append, lambda: 1, clock)
    while clock.now < DAY:
        log.failed(_retry())
        clock.now += 20
        log.delivered()
        clock.now += 100
    recovered = "uploads recovered after 20 s of failures (1 failed try); 1 item(s) queued"
    assert [line.split(":")[0] for line in lines[:6]] == ["uploads failing", recovered] * 3  # at 0, 120, 360 s
    assert lines[4].endswith("; 1 brief outage(s) before it were not logged")  # the one at 240 s
    assert len(lines) < 3 * 24, len(lines)


def test_an_outage_after_a_calm_window_is_told_at_once() -> None:
    clock, lines = ManualClock(0.0), list[str]()
    log = OutageLog(lines.append, lambda: 1, clock)
    log.failed(_retry())
    clock.now += 30
    log.delivered()
    clock.now += 120  # longer than the quiet window (60 s): not a flapping link
    log.failed(_retry("HTTP 503: storage_unavailable"))
    assert len(lines) == 3 and lines[2].startswith("uploads failing: HTTP 503: storage_unavailable")


def test_an_outage_inside_the_quiet_window_is_told_when_it_outlasts_it() -> None:
    clock, lines = ManualClock(0.0), list[str]()
    log = OutageLog(lines.append, lambda: 4, clock)
    log.failed(_retry())
    clock.now += 10
    log.delivered()
    clock.now += 20  # 20 s into the 60-s window
    log.failed(_retry())
    assert len(lines) == 2  # not told yet
    clock.now += 50
    log.failed(_retry())
    assert lines[2].startswith("uploads failing for 50 s: ConnectError: refused; 4 item(s) queued")
