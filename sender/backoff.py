"""Exponential backoff with jitter for upload retries.

Why jitter: after an outage many devices retry at once; randomising each delay spreads
them out instead of hammering the receiver in lockstep. The delay after the n-th
consecutive failure is ``min(max_delay, base * factor**n)`` scaled by a uniform factor in
``[1 - jitter, 1]`` ("equal jitter": never zero, never above the cap). A success resets it.
The random source is injectable so tests are deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delay schedule; call :meth:`next_delay` after a failure and :meth:`reset` after a success."""

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.factor < 1 or self.max_delay < self.base:
            raise ValueError("backoff needs base > 0, factor >= 1 and max_delay >= base")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be within [0, 1]")

    def ceiling(self) -> float:
        """The un-jittered delay for the current failure count."""
        exponent = min(self.failures, 64)  # avoid float overflow after very long outages
        return min(self.max_delay, self.base * self.factor**exponent)

    def next_delay(self, at_least: float = 0.0) -> float:
        """Seconds to wait before the next try; ``at_least`` honours a server's Retry-After."""
        ceiling = self.ceiling()
        self.failures += 1
        delay = ceiling * self.rng.uniform(1.0 - self.jitter, 1.0)
        return min(self.max_delay, max(delay, at_least))

    def reset(self) -> None:
        self.failures = 0
