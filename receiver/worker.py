"""Background decode worker: claims pending uploads in compatible batches, decodes them, stores the
reconstruction and its thumbnail, and records timings or the failure reason.

Why claims and not a queue in memory: the database is the queue, so an upload accepted with 202 is
decoded even if the process dies before the worker reaches it (pending jobs are simply claimed after the
restart, and jobs a dead worker left in `decoding` are requeued).

Why leases: receivers on other data directories may share the database. A claim stays ours while we renew
it (`claimed_at`, every third of `lease_s`, also while one batch decodes for minutes on a CPU); one nobody
renewed for `lease_s` belongs to a dead worker, and every worker sweeps those back to pending. A worker
that lost its claim (paused past its lease, then taken over) writes no result over the new owner's.

Why a decode deadline: a renewing heartbeat alone would keep a hung decode's claim (a stuck torch call, a
deadlocked thread) forever, and nothing would notice. Past `decode_deadline_s` per unit of decode cost
(`decode_allowance`) the batch is given up: its images are recorded as a failed attempt (so another worker
or the next start decodes them, and one that hangs every time ends `failed`), its leases are no longer
renewed, and `stuck()` tells the liveness check, whose 503 has the process restarted. A decode that
returns after that writes nothing. A worker-only process (`exit_when_hung_s`) also exits by itself when
the decode has not returned shortly after the give-up: Docker restarts only containers that exit.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from aeic.receiver.images import encode_png, make_thumbnail
from aeic.receiver.metrics import ReceiverMetrics
from aeic.receiver.registry import CodecRegistry, DecoderLike
from aeic.receiver.settings import DEFAULT_BATCH_SIZE
from aeic.receiver.storage import (
    BlobNotFoundError,
    BlobStore,
    Claim,
    DecodeTimings,
    ImageRecord,
    MetadataStore,
)
from aeic.receiver.storage.blobs import bitstream_key, reconstruction_key, thumbnail_key
from aeic.shared.bitstream import BitstreamError
from aeic.shared.decode_limits import decode_cost
from aeic.shared.entropy_coding import EntropyDecodeError

__all__ = ["HUNG_EXIT_STATUS", "DecodeWorker", "WorkerConfig", "decode_allowance", "error_line", "heartbeat"]

log = logging.getLogger(__name__)
_Outcome = TypeVar("_Outcome")  # what a decode call gives per image: an image, or an image or its exception


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS, Windows)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system after a batch. A decode frees what it used, but the
    allocator kept it: one 17-byte stream claiming 4096x4096 left a receiver at 1.3 GB instead of 0.6 GB
    until it exited, and a 1080p photo coded whole 0.3 GB more (`malloc_trim`: 50-100 ms after a 20 s decode)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# Exit status of a worker process that ends itself because a decode hung: EX_TEMPFAIL (sysexits.h), "try
# again later", as its images are pending again and a restarted process may decode them.
HUNG_EXIT_STATUS = 75


@contextmanager
def heartbeat(interval_s: float, beats: list[Callable[[], object]],
              alive: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Call each of `beats` every `interval_s` in a background thread until the block ends. Each beat is
    tried separately and a failed one only logged: one store being down must not stop the others' leases,
    and the next beat may still get through before a lease runs out. A round where `alive()` is False is
    skipped: the work is hung past its deadline, and its leases must run out for others to take it over."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval_s):
            if not alive():
                continue
            for beat_one in beats:
                try:
                    beat_one()
                except Exception:
                    log.exception("could not renew a lease of the batch in progress")

    thread = threading.Thread(target=beat, name="aeic-claim-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@dataclass(frozen=True)
class WorkerConfig:
    """Worker knobs (taken from ReceiverSettings by the app)."""

    batch_size: int = DEFAULT_BATCH_SIZE
    max_attempts: int = 3
    retry_delay_s: float = 2.0
    poll_interval_s: float = 1.0
    thumbnail_px: int = 320
    lease_s: float = 60.0  # a claim not renewed for this long is a dead worker's (`reclaim_after_s`)
    decode_deadline_s: float = 120.0  # per unit of decode cost (`decode_allowance`); past it a batch is hung
    # Seconds after a hung batch was given up before the process exits with HUNG_EXIT_STATUS if that decode
    # still has not returned; None: never (the embedded worker, whose process also serves the API).
    exit_when_hung_s: float | None = None


def decode_allowance(records: list[ImageRecord], deadline_s: float) -> float:
    """Seconds a batch may take: `deadline_s` per unit of `decode_limits.decode_cost`, the price the rate
    limit and the fair queue charge (a 1080p photo coded whole is 1, 4096x4096 coded whole 7.6), and at
    least `deadline_s` per image (its fixed costs), so one deadline fits every size without being loose
    for the common ones."""
    return deadline_s * sum(decode_cost(r.height, r.width, r.downscale) for r in records)


@dataclass
class _Running:
    """The claim being processed, the seconds it is allowed and when they are up (`clock` time);
    `given_up` once they were."""

    claim: Claim
    allowance_s: float
    deadline: float
    given_up: bool = False

    def reason(self) -> str:
        """The image error of a batch given up."""
        return f"decode hung: no result within the {_seconds(self.allowance_s)} s deadline; abandoned"


@dataclass(frozen=True)
class _Decoded:
    record: ImageRecord
    rgb: np.ndarray
    timings: DecodeTimings


class DecodeWorker:
    """Runs `run_once` in a loop on a daemon thread; `wake()` after an upload skips the idle wait."""

    def __init__(self, store: MetadataStore, blobs: BlobStore, registry: CodecRegistry, config: WorkerConfig,
                 metrics: ReceiverMetrics | None = None, clock: Callable[[], float] = time.monotonic,
                 exit_process: Callable[[int], object] = os._exit) -> None:
        self.store, self.blobs, self.registry, self.config = store, blobs, registry, config
        self.metrics = metrics
        self._clock = clock  # measures decode deadlines (tests pass a fake one)
        # Ends the process when a decode stays hung (`exit_when_hung_s`): os._exit, as the thread that would
        # have to unwind is the stuck one (tests pass a recorder).
        self._exit_process = exit_process
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Failures that could not be recorded (the database was unwritable, e.g. its disk full): their images
        # stay `decoding` under our claim until the record succeeds, so it is retried before the next batch.
        self._unrecorded: list[tuple[Claim, ImageRecord, str]] = []
        self._storage_down = False  # said once per outage in the log
        # The claim being processed: if `stop()` gives up waiting for it, it is handed back rather than left
        # `decoding` (and its attempt charged) until the next start.
        self._current: Claim | None = None
        # The same claim with its decode deadline, replaced as a whole so the watchdog never pairs one claim
        # with another's deadline; `_writing` is held while a result is stored under the claim, and while the
        # watchdog gives a claim up, so a result is never written over the images' next owner's.
        self._running: _Running | None = None
        self._writing = threading.Lock()
        self._next_sweep = 0.0  # time.monotonic() of the next sweep for claims whose lease ran out
        self._preloading = False  # loading the decoders before the first claim: a stop need not wait for it

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="aeic-decode-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to finish its current batch and exit; a batch still running after `timeout` seconds
        is handed back to pending (its decode is abandoned and will not be recorded)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # A decoder still loading before the first claim (a minute for SD-Turbo) has nothing to finish.
            self._thread.join(0.5 if self._preloading else timeout)
            if self._thread.is_alive():
                log.warning("the decode worker did not stop within %s s (%s); it is abandoned",
                            _seconds(0.5 if self._preloading else timeout),
                            "loading its decoders" if self._preloading else "a decode in progress")
                self._hand_back()

    def _hand_back(self) -> None:
        """Release the claim in progress without charging its attempt: stopping is not the images' fault."""
        claim = self._current
        if claim is None:
            return
        try:
            released = self.store.release_claim(claim.token, "requeued: the receiver stopped while decoding")
        except Exception:  # the next start requeues it anyway, at the cost of an attempt
            log.exception("could not hand back the batch in progress")
            return
        if released:
            log.warning("stopped before the batch in progress finished; %d image(s) back to pending", released)

    def wake(self) -> None:
        """New work arrived: look for it now."""
        self._wake.set()

    def is_alive(self) -> bool:
        """Whether the background thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def _preload(self) -> None:
        """Load every decoder before the first job arrives (a failure is retried, and reported, per job)."""
        for model_id in sorted(self.registry.model_ids()):
            if self._stop.is_set():
                return
            try:
                self.registry.get(model_id)
            except Exception:  # the job that needs it records the reason
                log.exception("could not load the decoder for model %s", model_id.hex())

    def _loop(self) -> None:
        self._preloading = True
        try:
            self._preload()
        finally:
            self._preloading = False
        failing = False
        while not self._stop.is_set():
            self._wake.clear()
            try:
                handled = self.run_once()
                failing = False
            except Exception as exc:  # the database may be briefly unavailable; never let the thread die
                # The traceback once per outage, then a line a poll (was a traceback every poll interval).
                if failing:
                    log.warning("decode worker iteration failed again: %s", error_line(exc))
                else:
                    log.exception("decode worker iteration failed")
                failing, handled = True, 0
            if handled == 0:
                self._wake.wait(self.config.poll_interval_s)

    # -- one batch -------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim and process one batch; returns how many images it handled (0: nothing was due)."""
        self._record_unrecorded()
        self._requeue_expired()
        if not self.storage_ready():
            return 0
        claim = self.store.claim_batch(self.config.batch_size)
        if claim is None:
            return 0
        with self._renewing(claim.token):
            self.process(claim)
        return len(claim.records)

    def _requeue_expired(self) -> None:
        """Every third of a lease, requeue the claims nobody renewed for a lease: a peer receiver (or a
        queue worker) sharing the database died holding them."""
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.config.lease_s / 3
        requeued = self.store.requeue_abandoned(self.config.max_attempts,
                                                claimed_before=time.time() - self.config.lease_s)
        if requeued:
            log.warning("requeued %d image(s) whose worker stopped renewing its claim", requeued)

    def _renewing(self, token: str) -> AbstractContextManager[None]:
        """Renew the claim's lease every third of `lease_s` until the block ends: a batch may decode for
        minutes, and a claim left to expire meanwhile would be decoded again by a peer. Not past the
        batch's decode deadline, though: a hung decode must let its images go."""
        return heartbeat(self.config.lease_s / 3, [lambda: self.store.refresh_claim(token)],
                         alive=self.within_deadline)

    def stuck(self) -> str | None:
        """Why the liveness check should fail: the batch in progress ran past its decode deadline (the
        thread is hung in a decoder call or a deadlock that only a restart clears), or the thread has ended
        without being stopped (nothing would decode again, while /readyz alone only took the receiver out of
        service); None otherwise."""
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stop.is_set():
            return "the decode worker's thread has ended; decoding resumes after a restart"
        running = self._running
        if running is None or self._clock() < running.deadline:
            return None
        return (f"a decode has run past its {_seconds(running.allowance_s)} s deadline "
                f"({len(running.claim.records)} image(s))")

    def within_deadline(self) -> bool:
        """Whether the batch in progress (if any) may still renew its leases. The first time it may not,
        it is given up: each image not yet settled gets a failed attempt with the reason (pending again
        after the backoff, for another worker or the next start, or `failed` on its last attempt), and a
        result this worker produces later is dropped. While a result is being stored (under a lease renewed
        a moment before) the give-up waits for the next beat."""
        running = self._running
        if running is None or self._clock() < running.deadline:
            return True
        if not self._writing.acquire(blocking=False):
            return False
        try:
            if not running.given_up:
                running.given_up = True
                self._give_up(running)
        finally:
            self._writing.release()
        return False

    def _give_up(self, running: _Running) -> None:
        """Record a failed attempt for each image of a hung batch (a no-op for those already settled), and
        with `exit_when_hung_s` set, have the process exit if the decode has not returned by then."""
        grace = self.config.exit_when_hung_s
        then = ("/healthz answers 503 until it returns" if grace is None else
                f"the process exits with status {HUNG_EXIT_STATUS} unless it returns within {_seconds(grace)} s")
        log.error("the decode of %d image(s) has not finished within its %s s deadline; giving its claim up "
                  "(the worker thread stays stuck: %s)", len(running.claim.records), _seconds(running.allowance_s),
                  then)
        for record in running.claim.records:
            try:
                self._fail(running.claim, record, running.reason())
            except Exception:  # its lease runs out instead, as it is no longer renewed
                log.exception("could not record the hung decode of %s", record.id)
        if grace is not None:
            timer = threading.Timer(grace, self._exit_if_still_hung, args=(running, grace))
            timer.name, timer.daemon = "aeic-hung-exit", True
            timer.start()

    def _exit_if_still_hung(self, running: _Running, grace: float) -> None:
        """End the process if the batch given up `grace` seconds ago is still in progress: only a restart
        frees a thread stuck in a decoder call, and a supervisor restarts a process that exits (Docker's
        restart policy acts on exits, not on a failing healthcheck). Its images were given up already, and a
        claim holds one batch, so nothing else of ours is left in `decoding`."""
        if self._running is not running:
            log.warning("the hung decode returned within %s s of being given up; the worker goes on", _seconds(grace))
            return
        log.critical("the decode of %d image(s) is still hung %s s after its %s s deadline was given up; exiting "
                     "with status %d so that the worker is restarted (its images were given up: pending again, "
                     "or failed on their last attempt)", len(running.claim.records), _seconds(grace),
                     _seconds(running.allowance_s), HUNG_EXIT_STATUS)
        self._exit_process(HUNG_EXIT_STATUS)

    def process(self, claim: Claim) -> None:
        """Decode and record a claim made by anyone (the Redis Streams worker claims by image id); the
        decode deadline runs from here."""
        self._record_unrecorded()
        self._current = claim
        allowance = decode_allowance(claim.records, self.config.decode_deadline_s)
        self._running = _Running(claim, allowance, self._clock() + allowance)
        try:
            self._process(claim)
        except Exception as exc:
            # Hand the claim back (as a retryable failure) rather than leave it in `decoding` until a restart.
            for record in claim.records:
                reason = f"internal error while decoding: {_reason(exc)}"
                try:
                    self._fail(claim, record, reason)
                except Exception:
                    log.exception("could not release claim of %s; will retry", record.id)
                    self._unrecorded.append((claim, record, reason))
            raise
        finally:
            self._current = None
            self._running = None
            release_free_memory()

    def storage_ready(self) -> bool:
        """Whether the blob store can serve bitstreams and take results. While it cannot (a full disk, an
        unreachable bucket) nothing is claimed, so an outage costs no attempts and no decodes thrown away."""
        try:
            self.blobs.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means: do not claim now
            if not self._storage_down:
                log.warning("blob store unusable; claiming no images until it is back: %s", exc)
            self._storage_down = True
            return False
        if self._storage_down:
            log.info("blob store usable again")
        self._storage_down = False
        return True

    def _record_unrecorded(self) -> None:
        """Retry recording the failures the database refused earlier (a no-op for claims lost meanwhile)."""
        pending, self._unrecorded = self._unrecorded, []
        for claim, record, reason in pending:
            try:
                self._fail(claim, record, reason)
            except Exception:  # noqa: BLE001 - still unwritable: keep it for the next round
                self._unrecorded.append((claim, record, reason))

    def _process(self, claim: Claim) -> None:
        loaded: list[tuple[ImageRecord, bytes]] = []
        for record in claim.records:
            try:
                loaded.append((record, self.blobs.get(bitstream_key(record.id))))
            except BlobNotFoundError:
                self._fail(claim, record, "the stored bitstream is missing")
            except OSError as exc:  # the blob store is unreachable (S3 down, I/O error): not the image's fault
                log.warning("could not read the bitstream of %s: %s", record.id, exc)
                self._fail(claim, record, f"could not read the stored bitstream: {_os_reason(exc)}", storage=True)
        if not loaded:
            return
        model_id = bytes.fromhex(loaded[0][0].model_id)
        if not self.registry.knows(model_id):  # its package was taken out of service: the images wait for it
            for record, _ in loaded:
                self._fail(claim, record, f"model {record.model_id} is not served by this receiver: the image waits "
                           "until its package is served again (model_packages, --model), or is deleted", storage=True)
            return
        known = self.registry.load_failures().get(model_id)
        try:
            codec = self.registry.get(model_id)
        except Exception as exc:  # the receiver's configuration (logged), not the images': they wait for it
            if known == type(exc).__name__:  # its traceback is in the log already: a line a retry
                log.warning("could not load the decoder for model %s again: %s", model_id.hex(), error_line(exc))
            else:
                log.exception("could not load the decoder for model %s", model_id.hex())
            for record, _ in loaded:
                self._fail(claim, record, f"could not load the decoder for model {record.model_id}: {_os_reason(exc)}",
                           storage=True)
            return
        decoded = self._decode(codec, claim, loaded)
        for item in decoded:
            self._store_result(claim, item)

    def _decode(self, codec: DecoderLike, claim: Claim, loaded: list[tuple[ImageRecord, bytes]]) -> list[_Decoded]:
        """Decode as one batch. A decoder that reports each image's failure (the ReceiverCodec's `decode_each`)
        decodes each image once; with any other, a failed batch is decoded again one by one so that a bad image
        fails alone (and its good images are entropy-decoded twice)."""
        out: list[_Decoded] = []
        decode_each = getattr(codec, "decode_each", None)
        if callable(decode_each):
            outcomes, timings = self._timed_batch(codec, decode_each, [data for _, data in loaded])
            for (record, _), outcome, timing in zip(loaded, outcomes, timings):
                if isinstance(outcome, Exception):
                    self._fail(claim, record, _reason(outcome), permanent=_is_permanent(outcome))
                else:
                    out += self._checked(claim, [record], [outcome], [timing])
            return out
        try:
            results, timings = self._timed_batch(codec, codec.decode_batch, [data for _, data in loaded])
            return self._checked(claim, [r for r, _ in loaded], results, timings)
        except Exception as exc:  # noqa: BLE001 - decoder errors are data errors here
            if len(loaded) == 1:
                self._fail(claim, loaded[0][0], _reason(exc), permanent=_is_permanent(exc))
                return []
        for record, data in loaded:
            try:
                out += self._checked(claim, [record], *self._timed_batch(codec, codec.decode_batch, [data]))
            except Exception as exc:  # noqa: BLE001
                self._fail(claim, record, _reason(exc), permanent=_is_permanent(exc))
        return out

    @staticmethod
    def _timed_batch(codec: DecoderLike, decode: Callable[[list[bytes]], list[_Outcome]],
                     items: list[bytes]) -> tuple[list[_Outcome], list[DecodeTimings]]:
        """Decode with `decode` (the codec's `decode_batch` or `decode_each`) and measure each image's own cost.

        The ReceiverCodec reports per-image `last_timings` (its own entropy decoding and its share of the batched
        synthesis + decoder pass). An image's total is its own parts plus an equal share of the batch's remaining
        wall time, so the totals add up to the batch's wall time and never undercut an image's own parts."""
        start = time.perf_counter()
        results = decode(items)
        wall_ms = (time.perf_counter() - start) * 1000.0
        n = len(items)
        if len(results) != n:
            raise RuntimeError(f"decoder returned {len(results)} images for {n} bitstreams")
        split = getattr(codec, "last_timings", None)
        if not isinstance(split, (list, tuple)) or len(split) != n:
            split = [None] * n
        parts = [(_ms(getattr(t, "entropy_ms", None)),
                  _ms(getattr(t, "synthesis_ms", getattr(t, "decoder_ms", None)))) for t in split]
        own = [(entropy or 0.0) + (decoder or 0.0) for entropy, decoder in parts]
        overhead = max(0.0, wall_ms - sum(own)) / n
        timings = [DecodeTimings(entropy_ms=entropy, decoder_ms=decoder, total_ms=mine + overhead, batch_size=n)
                   for (entropy, decoder), mine in zip(parts, own)]
        return results, timings

    def _checked(self, claim: Claim, records: list[ImageRecord], results: list[np.ndarray],
                 timings: list[DecodeTimings]) -> list[_Decoded]:
        out = []
        for record, rgb, timing in zip(records, results, timings):
            rgb = np.asarray(rgb)
            if rgb.shape != (record.height, record.width, 3) or rgb.dtype != np.uint8:
                self._fail(claim, record, f"decoder returned {rgb.dtype} {rgb.shape}, expected uint8 "
                                          f"({record.height}, {record.width}, 3)")
                continue
            out.append(_Decoded(record, rgb, timing))
        return out

    def _store_result(self, claim: Claim, item: _Decoded) -> None:
        with self._writing:  # the watchdog gives no claim up while its result is being stored
            running = self._running
            if running is not None and running.given_up:
                log.warning("the decode of %s returned after its deadline; the result is dropped", item.record.id)
                return
            self._store_claimed_result(claim, item)

    def _store_claimed_result(self, claim: Claim, item: _Decoded) -> None:
        timings = item.timings
        image_id = item.record.id
        # Renewed now, the claim is ours for a whole lease, which the writes below take a fraction of. A claim
        # already lost (our lease ran out while this process was stalled) has a new owner, or will: its
        # results must not be overwritten with ours (another device may decode to other pixels).
        if not self.store.refresh_claim(claim.token, image_id):
            log.warning("lost the claim of %s before storing its result; the result is dropped", image_id)
            return
        try:
            self.blobs.put(reconstruction_key(image_id), encode_png(item.rgb))
            self.blobs.put(thumbnail_key(image_id), make_thumbnail(item.rgb, self.config.thumbnail_px))
        except OSError as exc:
            log.warning("could not store the reconstruction of %s: %s", image_id, exc)
            self._fail(claim, item.record, f"could not store the reconstruction: {_os_reason(exc)}", storage=True)
            return
        if not self.store.complete(image_id, claim.token, timings):
            # The claim was lost since the renewal: the image was deleted meanwhile (a lease does not stop
            # that), whose files would be orphans. Any other loss leaves them to the next attempt to replace.
            if self.store.get_image(image_id) is None:
                self.blobs.delete(reconstruction_key(image_id))
                self.blobs.delete(thumbnail_key(image_id))
            return
        if self.metrics is not None:
            self.metrics.decoded.labels("done").inc()
            self.metrics.decode_ms.observe(timings.total_ms)
            if timings.entropy_ms is not None:
                self.metrics.entropy_ms.observe(timings.entropy_ms)
            if timings.decoder_ms is not None:
                self.metrics.decoder_ms.observe(timings.decoder_ms)
            self.metrics.batch_size.observe(timings.batch_size)

    def _fail(self, claim: Claim, record: ImageRecord, reason: str, permanent: bool = False,
              storage: bool = False) -> None:
        """Record a failed attempt; `permanent` failures (the data itself is undecodable) are not retried.
        A `storage` failure (the bitstream could not be read or the reconstruction written: an unreachable
        object store, a full or read-only disk; or the decoder could not be loaded: a full-profile package
        without its SD-Turbo folder) is not the image's fault and does not use up its attempts: it waits, with
        the capped backoff, for the receiver. A claim lost meanwhile records (and counts) nothing."""
        delay = self.config.retry_delay_s * (2 ** max(record.attempts - 1, 0))
        retry_at = time.time() + min(delay, 3600.0)
        log.warning("decode of %s failed (attempt %d): %s", record.id, record.attempts, reason)
        if permanent:
            attempts_allowed = record.attempts
        else:
            attempts_allowed = record.attempts + 1 if storage else self.config.max_attempts
        recorded = self.store.fail_attempt(record.id, claim.token, reason, attempts_allowed, retry_at)
        if recorded and self.metrics is not None:
            self.metrics.decoded.labels("failed").inc()


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:g}"


def _ms(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _is_permanent(exc: BaseException) -> bool:
    """Errors about the data itself (invalid container, a stream this model cannot decode): retrying the
    same bytes cannot succeed. Anything else (memory, device, I/O) may be transient and is retried."""
    if isinstance(exc, (BitstreamError, EntropyDecodeError)):  # bad container or corrupt entropy-coded payload
        return True
    decoder = sys.modules.get("aeic.receiver.decoder")  # only loaded when the real codec is in use
    decode_error = getattr(decoder, "DecodeError", None)
    return isinstance(decode_error, type) and isinstance(exc, decode_error)


def _os_reason(exc: BaseException) -> str:
    """What an image's error may say of a storage or loader failure: its type and the system's reason, never
    the message, which names files, buckets or endpoints (the devices read it; the log keeps the detail)."""
    reason = f": {os.strerror(exc.errno)}" if isinstance(exc, OSError) and exc.errno else ""
    return f"{type(exc).__name__}{reason}"


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for a one-line log or error: SQLAlchemy's, redis' and botocore's
    messages run on for lines (the statement, its parameters, the response)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
