"""A monotonic clock the test moves by hand, for the code that takes its clock as an argument (token
buckets, decode deadlines, the spool's recount timer)."""

from __future__ import annotations


class ManualClock:
    """Returns ``now``, which moves only when a test sets or advances it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now
