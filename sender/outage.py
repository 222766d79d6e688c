"""What the log says while uploads fail: an outage as an operator wants to read it.

Why: the agent retries a receiver it cannot reach for as long as the outage lasts, and it logged one line
per try, about 300 a day at the 300-s backoff cap, each saying the same thing. An outage is now told as

* its first failure, with the cause and how many items are queued;
* reminders at growing intervals (1 min after the first line, then 2, 4, 8 ... min apart, at most
  :data:`LONGEST_INTERVAL_S`), each with how long it has lasted, the tries, the items queued and the
  latest cause; a failure of another kind (a refused token after a dead network) is told at once;
* one line when an upload is accepted again, with how long it lasted.

A link that keeps dropping would still make two lines per drop. So after a recovery that was logged, a
new outage within the quiet window is not told at once: it is told when it outlasts the window, and one
that ends inside it is only counted, in the next first-failure line. The window starts at
:data:`FIRST_INTERVAL_S`, doubles with each logged recovery while drops keep coming (at most
:data:`LONGEST_INTERVAL_S`), and starts again from its first length once uploads went through for a
whole window: a flapping link settles at two lines an hour, a steady one has its next outage told at once.

The times are the forwarder's monotonic clock (a clock set by NTP mid-outage does not move them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from aeic.sender.uploader import Outcome, UploadResult

FIRST_INTERVAL_S = 60.0
LONGEST_INTERVAL_S = 3600.0


class OutageLog:
    """Turns the forwarder's failed and delivered passes into the few lines described above.

    ``emit`` writes one line; ``queued`` counts the items still to deliver (called only for a line that
    is written, as it lists the spool); ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        emit: Callable[[str], None],
        queued: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit, self._queued, self._clock = emit, queued, clock
        self._since: float | None = None  # when the failures now going on began
        self._tries = 0  # failed passes since then
        self._told = False  # their first line was written
        self._outcome: Outcome | None = None  # the kind of failure last written
        self._next_reminder = 0.0
        self._interval = FIRST_INTERVAL_S  # between reminders of this outage
        self._quiet = FIRST_INTERVAL_S  # the window after a logged recovery
        self._quiet_until = -math.inf
        self._recovered_at = -math.inf  # when the last outage ended, told or not
        self._untold = 0  # outages that began and ended inside a quiet window

    def failed(self, result: UploadResult) -> None:
        """A pass ended on ``result`` (a retry or a refusal that no item is to blame for)."""
        now = self._clock()
        if self._since is None:
            if now - self._recovered_at >= self._quiet:  # up for a whole window since: not flapping
                self._quiet, self._quiet_until = FIRST_INTERVAL_S, -math.inf
            self._since, self._tries, self._told = now, 0, False
        self._tries += 1
        if not self._told:
            if now >= self._quiet_until:
                self._first_line(result, now)
            return
        if result.outcome is not self._outcome or now >= self._next_reminder:
            self._outcome = result.outcome
            self._interval = min(2 * self._interval, LONGEST_INTERVAL_S)
            self._next_reminder = now + self._interval
            self._emit(f"uploads still failing after {_duration(now - self._since)} ({self._tries} tries); "
                       f"{self._queued()} item(s) queued; last: {result.detail}")  # fmt: skip

    def delivered(self) -> None:
        """An upload was accepted."""
        if self._since is None:
            return
        now = self._clock()
        if self._told:
            tries = f"{self._tries} failed {'try' if self._tries == 1 else 'tries'}"
            self._emit(f"uploads recovered after {_duration(now - self._since)} of failures ({tries}); "
                       f"{self._queued()} item(s) queued")  # fmt: skip
            self._quiet_until = now + self._quiet
            self._quiet = min(2 * self._quiet, LONGEST_INTERVAL_S)
        else:
            self._untold += 1
        self._since, self._recovered_at = None, now

    def _first_line(self, result: UploadResult, now: float) -> None:
        assert self._since is not None
        self._told, self._outcome = True, result.outcome
        self._interval = FIRST_INTERVAL_S
        self._next_reminder = now + self._interval
        lasted = f" for {_duration(now - self._since)}" if now > self._since else ""
        untold = f"; {self._untold} brief outage(s) before it were not logged" if self._untold else ""
        self._untold = 0
        self._emit(f"uploads failing{lasted}: {result.detail}; {self._queued()} item(s) queued, kept in the spool "
                   f"and retried (a reminder at growing intervals, a line when uploads recover){untold}")  # fmt: skip


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.2 h``, ``2.5 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
