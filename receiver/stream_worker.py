"""`aeic-receiver worker`: a decode worker process fed by the Redis Stream (scale-out mode, issue 8).

Each process is one consumer of the group. It reads entries (XREADGROUP) and takes over entries a dead
consumer held longer than `reclaim_after_s` (XAUTOCLAIM). An entry is a turn to decode, not an order of
service: the worker claims from the database in its order fair across devices (`claim_batch`, by
`fair_tag`) until the images of the entries it holds are settled, so one device's burst in the stream
does not hold up the others' images; entries still unsettled (their image held elsewhere, not yet due, or
not reached within the turns' time budget) it carries into its next delivery. Images a dead worker held it
takes over by id (`storage.claims`). The database decides who decodes, so a redelivered entry of a done
image, or of one decoded in another entry's turn, is only acknowledged. Decoding itself is the embedded
`DecodeWorker`'s (batches, per-image fallback, retries, results in the blob store). While a batch runs, a
heartbeat keeps both the stream entries and the database claims fresh, so only a dead worker's jobs are
ever taken over; a batch hung past its decode deadline stops the heartbeat (its entries and images go to
another worker) and fails `/healthz`, served beside the metrics for the liveness probe; if the decode has
not returned `hung_exit_grace_s` later, the process exits with status 75 (`HUNG_EXIT_STATUS`), as Docker
restarts a container only when it exits. An image that fails for good goes to the dead-letter stream
with its reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from aeic.receiver.queue import Job, JobQueue
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import DEFAULT_BATCH_SIZE, ReceiverSettings
from aeic.receiver.storage import Claim, SqlMetadataStore, Status
from aeic.receiver.storage.claims import (
    claim_ids,
    fail_exhausted_stale,
    orphaned_ids,
    refresh_claim,
)
from aeic.receiver.worker import DecodeWorker, error_line, heartbeat

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["StreamWorker", "StreamWorkerConfig", "claim_owner", "default_consumer_name", "run_worker",
           "serve_metrics_and_health"]

log = logging.getLogger(__name__)


def default_consumer_name() -> str:
    """Unique per process and readable in XINFO CONSUMERS: host-pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def claim_owner(consumer: str) -> str:
    """The owner id the worker's claim tokens start with (16 hex digits of the consumer name's SHA-256): a
    worker decodes images of other entries than its own in turns, so the stream's pending list no longer
    says which images a worker holds, and the `claim_token` column does."""
    return hashlib.sha256(consumer.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StreamWorkerConfig:
    """Consumer knobs."""

    consumer: str
    batch_size: int = DEFAULT_BATCH_SIZE
    max_attempts: int = 3
    reclaim_after_s: float = 60.0
    block_ms: int = 1000
    reconcile_every_s: float = 30.0


class StreamWorker:
    """One consumer: read or reclaim entries, claim in the database, decode, acknowledge."""

    def __init__(self, store: SqlMetadataStore, queue: JobQueue, decoder: DecodeWorker,
                 config: StreamWorkerConfig) -> None:
        self.store, self.queue, self.decoder, self.config = store, queue, decoder, config
        self._stop = threading.Event()
        self._turns_left = False  # the last delivery's turns stopped at their time budget, work was left

    # -- main loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set; the batch in progress is finished first."""
        self._stop = stop
        self._preload()
        next_reclaim = next_reconcile = 0.0
        group_ready = failing = False
        carried: list[Job] = []  # entries of the last delivery still unsettled: handled again with the next
        while not stop.is_set():
            try:
                if not group_ready:  # also after an error: a Redis restarted without its data lost the group
                    self.queue.ensure_group()
                    group_ready = True
                jobs: list[Job] = []
                if time.monotonic() >= next_reclaim:
                    jobs = self.queue.reclaim(self.config.consumer, int(self.config.reclaim_after_s * 1000),
                                              self.config.batch_size * 4)
                    next_reclaim = time.monotonic() + self.config.reclaim_after_s / 4
                room = self.config.batch_size - len(carried)  # hold no more entries than one batch's
                if not jobs and room > 0:
                    jobs = self.queue.read(self.config.consumer, room, self.config.block_ms)
                elif not jobs and not self._turns_left:
                    stop.wait(self.config.block_ms / 1000)  # nothing to claim: poll the carried entries
                held = {j.entry_id for j in carried}
                delivery, carried = carried + [j for j in jobs if j.entry_id not in held], []
                if delivery:
                    carried = self.handle(delivery)
                if time.monotonic() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = time.monotonic() + self.config.reconcile_every_s
                failing = False
            except Exception as exc:  # Redis or the database may be briefly unavailable: keep the process alive
                # The traceback once per outage, then a line a retry (was a 100-line traceback every second).
                if failing:
                    log.warning("worker iteration failed again; retrying: %s", error_line(exc))
                else:
                    log.exception("worker iteration failed; retrying")
                group_ready, failing = False, True
                stop.wait(1.0)

    def _preload(self) -> None:
        registry: CodecRegistry = self.decoder.registry
        for model_id in sorted(registry.model_ids()):
            try:
                registry.get(model_id)
            except Exception:  # the job that needs it records the reason
                log.exception("could not load the decoder for model %s", model_id.hex())

    # -- one delivery ----------------------------------------------------------------------------

    def handle(self, jobs: Sequence[Job]) -> list[Job]:
        """Settle entries of finished or deleted images, decode in turns (`_take_turns`), take over by id
        the images of dead workers' stale claims, settle; returns the entries still unsettled (their image
        is held by another worker, not yet due, failed this time, or was not reached within the turns'
        time budget), which `run` carries into its next delivery rather than leave them to come back after
        the idle timeout."""
        by_image: dict[str, list[Job]] = {}
        for job in jobs:
            by_image.setdefault(job.image_id, []).append(job)
        waiting = {i for i in by_image if not self._settle(i, by_image[i], decoded_here=False)}
        self._turns_left = False
        if not waiting:
            return []
        self.queue.touch(self.config.consumer, [j for i in waiting for j in by_image[i]])
        stale_before = time.time() - self.config.reclaim_after_s
        exhausted = fail_exhausted_stale(self.store, sorted(waiting), stale_before, self.config.max_attempts)
        for image_id in exhausted:
            if self._settle(image_id, by_image[image_id], decoded_here=False):
                waiting.discard(image_id)
        if not self.decoder.storage_ready():
            # the entries stay pending and come back once the blob store is usable
            return [j for i in by_image if i in waiting for j in by_image[i]]
        error = self._take_turns(by_image, waiting)
        # Images the turns cannot claim because a worker holds them: a dead one's claims are taken over here
        # (an attempt counted) once stale, and failed instead on their last attempt (`fail_exhausted_stale`
        # above). Each alone, as the embedded worker claims a retry: an image that kills the process took the
        # images claimed with it down on every takeover, until all of them were failed undecoded. The rest
        # wait for their turn (carried, or back after the idle timeout): claimed here they would jump it.
        for image_id in [i for i in by_image if i in waiting and self._claimed(i)]:
            claim = claim_ids(self.store, [image_id], stale_before, self.config.max_attempts)
            if claim is not None:  # None: held by a live worker
                error = self._decode(claim, by_image, waiting) or error
        if error is not None:
            raise error
        return [j for i in by_image if i in waiting for j in by_image[i]]

    def _claimed(self, image_id: str) -> bool:
        """Whether the image is being decoded (by another worker, when asked between this one's claims)."""
        record = self.store.get_image(image_id)
        return record is not None and record.status is Status.DECODING

    def _take_turns(self, by_image: dict[str, list[Job]], waiting: set[str]) -> Exception | None:
        """Claim and decode the database's next batches in its order fair across devices (`claim_batch`)
        while images of this delivery (`waiting`) are unsettled: a burst of one device's entries ahead in
        the stream then gets its turns, not all of them, before other devices' images. The entries are
        touched before each further claim, as a run of short decodes may outlast the idle timeout. Stops
        when nothing is claimable (what is left is held elsewhere or not yet due), when a decode failed
        for another try (the retry waits for a later delivery), when the worker is asked to stop, and after
        `reclaim_after_s / 4` (`_turns_left`), so that `run` takes a dead worker's entries over and
        reconciles on time however long a backlog is."""
        budget_end = time.monotonic() + self.config.reclaim_after_s / 4
        first = True
        while waiting and not self._stop.is_set():
            if not first:
                if time.monotonic() >= budget_end:
                    self._turns_left = True
                    return None
                self.queue.touch(self.config.consumer, [j for i in waiting for j in by_image[i]])
            claim = self.store.claim_batch(self.config.batch_size)
            if claim is None:
                return None
            ids, first = [r.id for r in claim.records], False
            error = self._decode(claim, by_image, waiting)
            for image_id in sorted(waiting - set(ids)):
                if self._settle(image_id, by_image[image_id], decoded_here=False):  # done by another worker
                    waiting.discard(image_id)
            if error is not None:
                return error
            if any(r is not None and r.status is Status.PENDING for r in map(self.store.get_image, ids)):
                return None
        return None

    def _decode(self, claim: Claim, by_image: dict[str, list[Job]], waiting: set[str]) -> Exception | None:
        """Decode a claim (one model and size: `claim_batch`'s, or a single image taken over) and settle the
        entries of its images among `waiting` (this delivery's images not yet settled; those settled leave
        it); the error, if `process` raised (it has handed the claim back), for the caller to raise. The
        entries of `waiting` stay fresh meanwhile, whether this claim holds their images or not."""
        with self._heartbeat([j for i in waiting for j in by_image[i]], claim.token):
            try:
                self.decoder.process(claim)
            except Exception as exc:  # noqa: BLE001 - the caller raises it once the delivery is settled
                return exc
        for record in claim.records:
            if record.id not in waiting:  # another delivery's entry: settled when it is read
                log.info("decoded image=%s consumer=%s in turn", record.id, self.config.consumer)
            elif self._settle(record.id, by_image[record.id], decoded_here=True):
                waiting.discard(record.id)
        return None

    def _settle(self, image_id: str, jobs: list[Job], decoded_here: bool) -> bool:
        """Acknowledge or dead-letter entries whose image needs no more work; False if it still does."""
        record = self.store.get_image(image_id)
        if record is None:
            log.info("image=%s deleted: acknowledged", image_id)
            self.queue.ack(jobs)
        elif record.status is Status.DONE:
            if decoded_here:
                log.info("decoded image=%s consumer=%s", image_id, self.config.consumer)
            else:
                log.info("image=%s already decoded: acknowledged without decoding", image_id)
            self.queue.ack(jobs)
        elif record.status is Status.FAILED:
            log.warning("image=%s failed after %d attempt(s): %s; dead-lettered", image_id, record.attempts,
                        record.error)
            self.queue.dead_letter(jobs[0], record.error or "failed", record.attempts)
            self.queue.ack(jobs[1:])
        else:
            return False
        return True

    def _heartbeat(self, jobs: list[Job], token: str) -> AbstractContextManager[None]:
        """Keep entries and claims fresh while a (possibly long) batch decodes. Separately: Redis being down
        must not let the database claim go stale (or the other way round), or a live worker's images would
        be taken over (and failed on their last attempt). Neither once the group decoding is past its
        deadline (`DecodeWorker.within_deadline`): a hung decode lets its entries and images go."""
        return heartbeat(self.config.reclaim_after_s / 3, [lambda: self.queue.touch(self.config.consumer, jobs),
                                                            lambda: refresh_claim(self.store, token)],
                         alive=self.decoder.within_deadline)

    # -- safety net ------------------------------------------------------------------------------

    def reconcile(self) -> int:
        """Enqueue pending images (and stale claims) that have no entry in the stream: an enqueue that failed
        after the upload was stored, a Redis that lost its data. One worker at a time. A busy stream is no
        reason to wait: under steady load it is never empty, so images with an entry are skipped instead
        (the stream is read first, so an entry settled meanwhile at worst gives a duplicate, which the
        database claim makes harmless)."""
        if not self.queue.lock("reconcile", self.config.reconcile_every_s):
            return 0
        backlog = self.queue.backlog()
        queued = set() if backlog.lag == 0 and backlog.pending == 0 else self.queue.queued_image_ids()
        now = time.time()
        ids = [i for i in orphaned_ids(self.store, older_than=now - self.config.reconcile_every_s,
                                       stale_before=now - self.config.reclaim_after_s, limit=1000)
               if i not in queued]
        for image_id in ids:
            self.queue.publish(image_id)
        if ids:
            log.warning("re-enqueued %d image(s) that had no queue entry", len(ids))
        return len(ids)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a probe still being answered must not hold up the process's exit


# Seconds a metrics connection may wait between reads of its request: without a limit a client that
# connected and sent nothing held a thread of the worker for good (a probe sends its request at once).
METRICS_READ_TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Not a line per request: a probe every few seconds would bury the worker's own log."""


def serve_metrics_and_health(port: int, registry: CollectorRegistry, stuck: Callable[[], str | None],
                             host: str = "0.0.0.0", read_timeout_s: float = METRICS_READ_TIMEOUT_S) -> WSGIServer:
    """Serve Prometheus metrics and, at `/healthz`, liveness (in a daemon thread): 503 with a short reason
    while `stuck()` gives one (a decode hung past its deadline), for the liveness probe, which `/metrics`
    cannot be: it answers as long as the process does."""
    from prometheus_client import make_wsgi_app

    from aeic import __version__

    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics_app(environ, start_response)
        reason = stuck()
        body = json.dumps({"status": "stuck", "version": __version__, "reason": reason} if reason is not None
                          else {"status": "ok", "version": __version__}).encode()
        start_response("200 OK" if reason is None else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    try:
        handler = type("MetricsHandler", (_QuietHandler,), {"timeout": read_timeout_s})
        server = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=handler)
    except OSError as exc:  # said in one line by the command line: which port, and why
        raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    threading.Thread(target=server.serve_forever, name="aeic-metrics", daemon=True).start()
    return server


def run_worker(settings: ReceiverSettings, consumer: str | None = None, metrics_port: int | None = None) -> int:
    """Process entry point: build stores, decoders and the queue from settings; stop on SIGTERM/SIGINT."""
    from aeic.receiver.backends import open_blob_store, open_queue
    from aeic.receiver.data_dir import prepare_data_dir
    from aeic.receiver.metrics import ReceiverMetrics
    from aeic.receiver.storage.orphans import BlobSweeper, ListedBlobStore
    from aeic.receiver.worker import WorkerConfig

    queue = open_queue(settings)
    if queue is None:
        raise ValueError("the worker needs a queue: --queue redis://host:6379/0 or AEIC_QUEUE")
    prepare_data_dir(settings.data_dir)
    consumer = consumer or default_consumer_name()
    store = SqlMetadataStore.from_url(settings.resolved_database_url(), owner=claim_owner(consumer))
    store.migrate()
    metrics = ReceiverMetrics()
    blobs = open_blob_store(settings)  # the API creates the bucket before it stores the first upload
    registry = CodecRegistry.from_packages(settings.model_packages, settings.device, settings.decode_tile_pixels,
                                           settings.decoder_dtype)
    decoder = DecodeWorker(store, blobs, registry, WorkerConfig(
        batch_size=settings.batch_size, max_attempts=settings.max_attempts, retry_delay_s=settings.retry_delay_s,
        poll_interval_s=settings.poll_interval_s, thumbnail_px=settings.thumbnail_px,
        lease_s=settings.reclaim_after_s, decode_deadline_s=settings.decode_deadline_s,
        exit_when_hung_s=settings.hung_exit_grace_s), metrics)
    if metrics_port is not None:
        serve_metrics_and_health(metrics_port, metrics.registry, decoder.stuck)
    config = StreamWorkerConfig(consumer=consumer, batch_size=settings.batch_size,
                                max_attempts=settings.max_attempts, reclaim_after_s=settings.reclaim_after_s)
    stop = threading.Event()
    log.info("worker %s consuming %s (group %s)", config.consumer, queue.stream, queue.group)
    # Orphan blobs (an API replica killed between an object and its row): every worker sweeps, as the API
    # replicas do not; the grace keeps a sweep off a blob whose row is on its way, so peers cannot race.
    sweeper = BlobSweeper(store, blobs, orphans=True) if isinstance(blobs, ListedBlobStore) else None
    if sweeper is not None:
        sweeper.start()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        StreamWorker(store, queue, decoder, config).run(stop)
    finally:
        if sweeper is not None:
            sweeper.stop()
        queue.close()
        store.close()
        for sig, handler in previous.items():  # a caller in-process (a test) gets its own handlers back
            signal.signal(sig, handler)
    return 0
