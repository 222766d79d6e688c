"""Drain the spool to the receiver: upload oldest first, back off while it is unreachable.

Why a separate piece: encoding and uploading run at different paces. Images are spooled as
soon as they are encoded; the forwarder delivers them whenever the link allows, in one-shot
commands (send, flush: until the spool is empty or a deadline passes) and in the long-running
ones (watch, camera: a background thread woken by each new item).

Exactly-once delivery comes from two facts: an item leaves the spool only after a 2xx, and a
re-sent item carries the same Idempotency-Key, which the receiver answers with the id it
already stored. Sleep and clocks are injectable so retry tests run in milliseconds.

An item the receiver acknowledged but the spool cannot forget (its storage went read-only, as
an SD card does after errors) is remembered by key for the life of the process and not uploaded
again: re-sending a whole backlog every pass would cost a metered link for nothing.

One item must not hold back the queue (a stream that crashes a receiver handler, or is too slow
for a proxy's timeout, fails while every other is accepted), yet an outage must cost one request
per backoff interval, not one per item. So a retryable failure is judged by the answers around it:

* the receiver accepted the item tried just before or just after it: the failure is the item's
  own. The item is *set aside* (its own backoff, persisted in its sidecar) and the drain goes on;
  after :attr:`ItemPolicy.max_attempts` such failures spanning :attr:`ItemPolicy.max_age` seconds it
  moves to ``rejected/`` with the last answer as its reason;
* the next item fails too, or the failure cannot be the item's (no connection, 429) or asks the
  device to wait (Retry-After, which the whole drain honours even when it follows an acceptance): an
  outage. The pass stops and the whole drain backs off. The next pass first probes with the item
  after the last one that failed (wrapping round), so a run of failing items at the head cannot
  pose as an outage forever; if the probe fails the pass stops after that one request, and if it
  is accepted the pass goes on from the oldest item.
* nothing left to compare it with (the last item due): an outage, unless the item was proven at
  fault before, which then waits for its own next try.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aeic.sender.backoff import Backoff
from aeic.sender.outage import OutageLog
from aeic.sender.spool import Spool, SpoolCorruptError, SpoolItem
from aeic.sender.uploader import Outcome, Uploader, UploadResult

Listener = Callable[[SpoolItem, UploadResult], None]


@dataclass(frozen=True)
class ItemPolicy:
    """How an item whose uploads fail while the receiver accepts others is retried and given up.

    Both limits must be passed before the item is rejected: the count alone would give up within
    minutes (the first retries come seconds apart), the age alone after two tries a day apart, and
    a receiver bug fixed within the day should not need an operator to requeue anything.
    """

    max_attempts: int = 10
    max_age: float = 86400.0
    backoff_max: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_age < 0 or self.backoff_max <= 0:
            raise ValueError("item policy needs max_attempts >= 1, max_age >= 0 and backoff_max > 0")


@dataclass
class DrainReport:
    """Totals of one or more passes; ``stopped`` is the failure that ended the last pass."""

    accepted: int = 0
    rejected: int = 0
    failed_attempts: int = 0
    set_aside: int = 0
    stopped: UploadResult | None = None
    delays: list[float] = field(default_factory=list)

    def add(self, other: DrainReport) -> None:
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.failed_attempts += other.failed_attempts
        self.set_aside += other.set_aside
        self.stopped = other.stopped


class Forwarder:
    """Uploads spooled items with one :class:`Uploader`, retrying with :class:`Backoff`."""

    def __init__(
        self,
        spool: Spool,
        uploader: Uploader,
        *,
        backoff: Backoff | None = None,
        item_policy: ItemPolicy | None = None,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        listener: Listener | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.spool = spool
        self.uploader = uploader
        self.backoff = backoff or Backoff()
        self.item_policy = item_policy or ItemPolicy()
        self._sleep = sleep
        self._clock = clock
        self._wall = wall_clock  # per-item times outlive the process, so they are wall-clock times
        self._listener = listener or (lambda item, result: None)
        self._on_error = on_error or (lambda line: print(line, file=sys.stderr, flush=True))
        self.acknowledged: set[str] = set()  # keys delivered whose removal from the spool failed
        self._not_before: dict[str, float] = {}  # set-aside items' next tries, for a spool that cannot record them
        self._resume_after: str | None = None  # the last item that failed in an outage: probe after it
        self.outage = OutageLog(self._on_error, self.undelivered, clock)  # the log's lines while uploads fail

    def drain_pass(self, stop: threading.Event | None = None) -> DrainReport:
        """Try each due item once, oldest first, until an outage (see the module docstring), a
        blocked answer or ``stop`` (a stopping agent waits for one upload, not for a whole backlog)."""
        report = DrainReport()
        suspect: tuple[SpoolItem, UploadResult] | None = None  # a failure waiting for the next answer
        accepted_last = False  # the last answer of this pass accepted an item: the receiver is up
        probing = self._resume_after is not None
        for item in self._due_items():
            if stop is not None and stop.is_set():
                break
            if item.key in self.acknowledged:
                self._forget(item)  # delivered before: only its removal is left to do
                continue
            try:
                result = self._deliver(item)
            except OSError as exc:
                # This item's file cannot be read or updated (a bad SD-card sector, a stray
                # directory): it stays queued, and must not hold back every item behind it.
                self._on_error(f"forwarder: spooled item {item.path} skipped: {type(exc).__name__}: {exc}")
                report.failed_attempts += 1
                continue
            if result.outcome is Outcome.ACCEPTED and result.status is not None:  # not another process's delivery
                self.outage.delivered()  # its line before the item's: the receiver answers again
            self._listener(item, result)
            if result.outcome is Outcome.ACCEPTED:
                report.accepted += 1
                self.backoff.reset()
                self._resume_after, probing, accepted_last = None, False, True
                if suspect is not None:
                    self._failed_alone(*suspect, report)
                    suspect = None
            elif result.outcome is Outcome.REJECTED:
                report.rejected += 1
            elif result.outcome is Outcome.BLOCKED:
                report.failed_attempts += 1
                report.stopped = result
                break
            else:
                report.failed_attempts += 1
                if accepted_last and not result.receiver_wide:
                    self._failed_alone(item, result, report)
                    accepted_last = False
                    if not result.retry_after:
                        continue
                    report.stopped = result  # asked to wait: the others wait too
                    break
                accepted_last = False
                if suspect is None and not probing and not result.receiver_wide and not result.retry_after:
                    suspect = (item, result)  # the next item tells an outage from this item's fault
                    continue
                self.spool.record_attempt(item, result.detail)
                report.stopped, self._resume_after = result, item.key
                break
        if suspect is not None:  # no answer came after it
            item, result = suspect
            cut_short = report.stopped is not None or (stop is not None and stop.is_set())
            if not cut_short and item.failed_alone:
                self._set_aside(item, result, own=False)  # proven at fault before: its own time, not the drain's
            else:
                self.spool.record_attempt(item, result.detail)
                if not cut_short:  # the last item due: nothing tells its fault from an outage
                    report.stopped, self._resume_after = result, item.key
        if report.stopped is not None:
            self.outage.failed(report.stopped)
        return report

    def _due_items(self) -> Iterator[SpoolItem]:
        """Pending items whose next try is due, oldest first; after an outage the probe first."""
        now = self._wall()
        probe = self._probe(now) if self._resume_after is not None else None
        if probe is not None:
            yield probe
        for item in self.spool.pending():
            if self._due(item, now) and (probe is None or item.key != probe.key):
                yield item

    def _probe(self, now: float) -> SpoolItem | None:
        """The first due item after the one whose failure ended the last pass, wrapping round."""
        first, passed = None, False
        for item in self.spool.pending():
            if item.key == self._resume_after:
                passed = True
            elif self._due(item, now):
                if passed:
                    return item
                first = item if first is None else first
        return first

    def _due(self, item: SpoolItem, now: float) -> bool:
        """Whether a set-aside item's time has come; a time further off than the longest item delay
        means the clock was set back (a device without a real-time clock), and the item is due."""
        at = self._next_try(item)
        return at <= now or at > now + self.item_policy.backoff_max

    def _next_try(self, item: SpoolItem) -> float:
        """When ``item`` may be tried next: its sidecar's time, or this process' own if later (a read-only spool)."""
        return max(item.next_attempt, self._not_before.get(item.key, 0.0))

    def _failed_alone(self, item: SpoolItem, result: UploadResult, report: DrainReport) -> None:
        """``item`` failed while the receiver accepted other items: set it aside, or give it up."""
        now, policy = self._wall(), self.item_policy
        failures = item.failed_alone + 1
        since = now if item.failed_alone_since is None else item.failed_alone_since
        name = item.source or item.key[:12]
        if failures >= policy.max_attempts and now - since >= policy.max_age:
            reason = (f"gave up after {failures} failed uploads over {(now - since) / 3600:.1f} h while the receiver "
                      f"accepted other items; last answer: {result.detail}")  # fmt: skip
            try:
                self.spool.reject(item, reason, result.status)
            except OSError as exc:  # read-only spool: it stays set aside, tried at its own pace
                self._on_error(f"forwarder: {name} cannot be moved to rejected/ ({type(exc).__name__}: {exc})")
            else:
                self._not_before.pop(item.key, None)
                report.rejected += 1
                self._listener(item, UploadResult(Outcome.REJECTED, result.status, reason))
                return
        delay = self._set_aside(item, result, own=True)
        report.set_aside += 1
        self._on_error(
            f"forwarder: {name} ({item.key[:12]}) failed while the receiver accepts other items ({result.detail}); "
            f"set aside, next try in {delay:.0f} s ({failures} such failure(s); rejected after "
            f"{policy.max_attempts} over {policy.max_age / 3600:g} h)"
        )

    def _set_aside(self, item: SpoolItem, result: UploadResult, *, own: bool) -> float:
        """Give ``item`` its own next try, later with each failed attempt; returns the delay."""
        delay = Backoff(
            base=self.backoff.base,
            factor=self.backoff.factor,
            max_delay=max(self.item_policy.backoff_max, self.backoff.base),
            jitter=self.backoff.jitter,
            rng=self.backoff.rng,
            failures=item.attempts,
        ).next_delay(result.retry_after)
        now = self._wall()
        self._not_before[item.key] = now + delay
        self.spool.set_aside(item, result.detail, now=now, until=now + delay, own=own)
        return delay

    def _deliver(self, item: SpoolItem) -> UploadResult:
        try:
            data = self.spool.read(item)
        except FileNotFoundError:
            # Another process delivered it meanwhile: nothing left to do for this item.
            return UploadResult(Outcome.ACCEPTED, None, "already delivered by another process")
        except SpoolCorruptError as exc:
            result = UploadResult(Outcome.REJECTED, None, str(exc))
            self.spool.reject(item, result.detail)
            return result
        result = self.uploader.upload(data, item.key)
        if result.outcome in (Outcome.ACCEPTED, Outcome.REJECTED):
            self._not_before.pop(item.key, None)
        if result.outcome is Outcome.ACCEPTED:
            self._forget(item)
        elif result.outcome is Outcome.REJECTED:
            self.spool.reject(item, result.detail, result.status)
        elif result.outcome is Outcome.BLOCKED:
            self.spool.record_attempt(item, result.detail)
        return result  # a RETRY is recorded once the drain knows whose fault it was

    def _forget(self, item: SpoolItem) -> None:
        """Remove a delivered item; when the spool cannot be written, remember it as delivered instead."""
        try:
            self.spool.remove(item)
        except OSError as exc:
            if item.key not in self.acknowledged:
                self.acknowledged.add(item.key)
                self._on_error(f"forwarder: {item.path} was delivered but cannot be removed from the spool "
                               f"({type(exc).__name__}: {exc}); this process will not upload it again")  # fmt: skip
            return
        self.acknowledged.discard(item.key)

    def undelivered(self) -> int:
        """Pending items not yet acknowledged by the receiver."""
        return len(self.spool.keys() - self.acknowledged)

    def flush(
        self, max_wait: float | None = None, stop: threading.Event | None = None, *, wait_for_set_aside: bool = False
    ) -> DrainReport:
        """Drain until the spool is empty, ``max_wait`` seconds pass, the receiver blocks us
        (bad token or URL: waiting will not help) or ``stop`` is set.

        ``wait_for_set_aside``: also wait for set-aside items' own next tries within ``max_wait``, as the agent
        would; a one-shot command's lost answer must not end it with the image queued while its retry is
        seconds off (without it, a pass that leaves only set-aside items ends the flush)."""
        deadline = None if max_wait is None else self._clock() + max_wait
        total = DrainReport()
        while True:
            report = self.drain_pass(stop)
            total.add(report)
            if report.stopped is None:
                delay = self._until_set_aside_due() if wait_for_set_aside else None
                if delay is None:
                    return total
            elif report.stopped.outcome is Outcome.BLOCKED:
                return total
            else:
                delay = self.backoff.next_delay(report.stopped.retry_after)
            if deadline is not None and self._clock() + delay > deadline:
                return total
            if stop is not None and stop.is_set():
                return total
            total.delays.append(delay)
            self._sleep(delay)

    def _until_set_aside_due(self) -> float | None:
        """Seconds until the first undelivered set-aside item is due, at least the base backoff (one that is due
        already but cannot be read must not spin the flush); None when no item is set aside."""
        times = [self._next_try(item) for item in self.spool.pending()
                 if item.failed_alone and item.key not in self.acknowledged]  # fmt: skip
        return max(min(times) - self._wall(), self.backoff.base) if times else None

    def run(self, stop: threading.Event, wake: threading.Event, idle_poll: float = 30.0) -> None:
        """Daemon loop for watch/camera: drain, then wait for a new item, a retry time or stop.

        A blocked receiver (token or URL refused) is retried like an outage, with the
        backoff's growing delay, so fixing the receiver side resumes delivery by itself.
        """
        while not stop.is_set():
            wake.clear()
            try:
                report = self.drain_pass(stop)
            except Exception as exc:  # noqa: BLE001 - e.g. a failing disk: report, back off, keep going
                self._on_error(f"forwarder: {type(exc).__name__}: {exc}")
                stop.wait(self.backoff.next_delay())
                continue
            if report.stopped is not None:
                delay = self.backoff.next_delay(report.stopped.retry_after)
                stop.wait(delay)
            else:
                wake.wait(idle_poll)
