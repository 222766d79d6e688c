"""Drain the spool to the receiver: upload oldest first, back off while it is unreachable.

Why a separate piece: encoding and uploading run at different paces. Images are spooled as
soon as they are encoded; the forwarder delivers them whenever the link allows, in one-shot
commands (send, flush: until the spool is empty or a deadline passes) and in the long-running
ones (watch, camera: a background thread woken by each new item).

Exactly-once delivery comes from two facts: an item leaves the spool only after a 2xx, and a
re-sent item carries the same Idempotency-Key, which the receiver answers with the id it
already stored. Sleep and clock are injectable so retry tests run in milliseconds.

An item the receiver acknowledged but the spool cannot forget (its storage went read-only, as
an SD card does after errors) is remembered by key for the life of the process and not uploaded
again: re-sending a whole backlog every pass would cost a metered link for nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aeic.sender.backoff import Backoff
from aeic.sender.spool import Spool, SpoolCorruptError, SpoolItem
from aeic.sender.uploader import Outcome, Uploader, UploadResult

Listener = Callable[[SpoolItem, UploadResult], None]


@dataclass
class DrainReport:
    """Totals of one or more passes; ``stopped`` is the failure that ended the last pass."""

    accepted: int = 0
    rejected: int = 0
    failed_attempts: int = 0
    stopped: UploadResult | None = None
    delays: list[float] = field(default_factory=list)

    def add(self, other: DrainReport) -> None:
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.failed_attempts += other.failed_attempts
        self.stopped = other.stopped


class Forwarder:
    """Uploads spooled items with one :class:`Uploader`, retrying with :class:`Backoff`."""

    def __init__(
        self,
        spool: Spool,
        uploader: Uploader,
        *,
        backoff: Backoff | None = None,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        listener: Listener | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.spool = spool
        self.uploader = uploader
        self.backoff = backoff or Backoff()
        self._sleep = sleep
        self._clock = clock
        self._listener = listener or (lambda item, result: None)
        self._on_error = on_error or (lambda line: print(line, file=sys.stderr, flush=True))
        self.acknowledged: set[str] = set()  # keys delivered whose removal from the spool failed

    def drain_pass(self, stop: threading.Event | None = None) -> DrainReport:
        """Try each pending item once, oldest first; stop at the first retry/blocked answer, or
        once ``stop`` is set (a stopping agent waits for one upload, not for a whole backlog)."""
        report = DrainReport()
        for item in self.spool.pending():
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
            self._listener(item, result)
            if result.outcome is Outcome.ACCEPTED:
                report.accepted += 1
                self.backoff.reset()
            elif result.outcome is Outcome.REJECTED:
                report.rejected += 1
            else:
                report.failed_attempts += 1
                report.stopped = result
                break
        return report

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
        if result.outcome is Outcome.ACCEPTED:
            self._forget(item)
        elif result.outcome is Outcome.REJECTED:
            self.spool.reject(item, result.detail, result.status)
        else:
            self.spool.record_attempt(item, result.detail)
        return result

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

    def flush(self, max_wait: float | None = None, stop: threading.Event | None = None) -> DrainReport:
        """Drain until the spool is empty, ``max_wait`` seconds pass, the receiver blocks us
        (bad token or URL: waiting will not help) or ``stop`` is set."""
        deadline = None if max_wait is None else self._clock() + max_wait
        total = DrainReport()
        while True:
            report = self.drain_pass(stop)
            total.add(report)
            if report.stopped is None or report.stopped.outcome is Outcome.BLOCKED:
                return total
            delay = self.backoff.next_delay(report.stopped.retry_after)
            if deadline is not None and self._clock() + delay > deadline:
                return total
            if stop is not None and stop.is_set():
                return total
            total.delays.append(delay)
            self._sleep(delay)

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
