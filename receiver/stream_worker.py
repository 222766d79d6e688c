"""`aeic-receiver worker`: a decode worker process fed by the Redis Stream (scale-out mode, issue 8).

Each process is one consumer of the group. It reads entries (XREADGROUP), takes over entries a dead
consumer held longer than `reclaim_after_s` (XAUTOCLAIM), and claims the images in the database by id
(`storage.claims`): the database decides who decodes, so a redelivered entry of a done image is only
acknowledged. Decoding itself is the embedded `DecodeWorker`'s (batches, per-image fallback, retries,
results in the blob store). While a batch runs, a heartbeat keeps both the stream entries and the database
claims fresh, so only a dead worker's jobs are ever taken over; a batch hung past its decode deadline
stops the heartbeat (its entries and images go to another worker) and fails `/healthz`, served beside the
metrics for the liveness probe; if the decode has not returned `hung_exit_grace_s` later, the process exits
with status 75 (`HUNG_EXIT_STATUS`), as Docker restarts a container only when it exits. An image that fails
for good goes to the dead-letter stream with its reason.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from aeic.receiver.queue import Job, JobQueue
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import Claim, ImageRecord, SqlMetadataStore, Status
from aeic.receiver.storage.claims import (
    claim_ids,
    fail_exhausted_stale,
    orphaned_ids,
    refresh_claim,
    tried_ids,
)
from aeic.receiver.worker import DecodeWorker, heartbeat

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["StreamWorker", "StreamWorkerConfig", "default_consumer_name", "run_worker", "serve_metrics_and_health"]

log = logging.getLogger(__name__)


def default_consumer_name() -> str:
    """Unique per process and readable in XINFO CONSUMERS: host-pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class StreamWorkerConfig:
    """Consumer knobs."""

    consumer: str
    batch_size: int = 4
    max_attempts: int = 3
    reclaim_after_s: float = 60.0
    block_ms: int = 1000
    reconcile_every_s: float = 30.0


class StreamWorker:
    """One consumer: read or reclaim entries, claim in the database, decode, acknowledge."""

    def __init__(self, store: SqlMetadataStore, queue: JobQueue, decoder: DecodeWorker,
                 config: StreamWorkerConfig) -> None:
        self.store, self.queue, self.decoder, self.config = store, queue, decoder, config

    # -- main loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set; the batch in progress is finished first."""
        self._preload()
        next_reclaim = next_reconcile = 0.0
        group_ready = False
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
                if not jobs:
                    jobs = self.queue.read(self.config.consumer, self.config.batch_size, self.config.block_ms)
                if jobs:
                    self.handle(jobs)
                if time.monotonic() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = time.monotonic() + self.config.reconcile_every_s
            except Exception:  # Redis or the database may be briefly unavailable: keep the process alive
                log.exception("worker iteration failed; retrying")
                group_ready = False
                stop.wait(1.0)

    def _preload(self) -> None:
        registry: CodecRegistry = self.decoder.registry
        for model_id in sorted(registry.model_ids()):
            try:
                registry.get(model_id)
            except Exception:  # the job that needs it records the reason
                log.exception("could not load the decoder for model %s", model_id.hex())

    # -- one delivery ----------------------------------------------------------------------------

    def handle(self, jobs: Sequence[Job]) -> None:
        """Settle entries of finished or deleted images, claim the rest, decode, settle them."""
        by_image: dict[str, list[Job]] = {}
        for job in jobs:
            by_image.setdefault(job.image_id, []).append(job)
        open_ids = [i for i in by_image if not self._settle(i, by_image[i], decoded_here=False)]
        if not open_ids:
            return
        stale_before = time.time() - self.config.reclaim_after_s
        for image_id in fail_exhausted_stale(self.store, open_ids, stale_before, self.config.max_attempts):
            self._settle(image_id, by_image[image_id], decoded_here=False)
        if not self.decoder.storage_ready():
            return  # the entries stay pending and come back once the blob store is usable
        # First attempts are claimed and decoded together; a retry (its decode failed, or the worker holding
        # it died) alone and after them, as the embedded worker does: an image that kills the process took
        # the images claimed with it down on every takeover, until all of them were failed undecoded.
        retried = tried_ids(self.store, open_ids)
        first = [i for i in open_ids if i not in retried]
        open_jobs = [j for i in open_ids for j in by_image[i]]
        error: Exception | None = None
        for ids in ([first] if first else []) + [[i] for i in open_ids if i in retried]:
            claim = claim_ids(self.store, ids, stale_before, self.config.max_attempts)
            if claim is None:
                continue  # held by a live worker or not yet due: the entries stay pending and come back later
            error = self._decode(claim, by_image, open_jobs) or error
        if error is not None:
            raise error

    def _decode(self, claim: Claim, by_image: dict[str, list[Job]], beat_jobs: list[Job]) -> Exception | None:
        """Decode a claim in compatible groups and settle their entries; the first error, for the caller to
        raise once every claim of the delivery has had its turn. `beat_jobs` (this claim's entries and those
        waiting for a later claim of the delivery) stay fresh meanwhile."""
        error: Exception | None = None
        with self._heartbeat(beat_jobs, claim.token):
            for group in _compatible(claim.records, self.config.batch_size):
                # Every group gets its turn even when an earlier one raised (`process` has handed that one's
                # claims back): a group skipped here would sit in `decoding`, unbeaten, until it looked like
                # a dead worker's and lost an attempt it never had.
                try:
                    self.decoder.process(Claim(token=claim.token, records=group))
                except Exception as exc:  # noqa: BLE001 - raised after the loop, once every group is settled
                    error = error or exc
                    continue
                for record in group:
                    self._settle(record.id, by_image[record.id], decoded_here=True)
        return error

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


def _compatible(records: list[ImageRecord], batch_size: int) -> Iterator[list[ImageRecord]]:
    """Batches of at most `batch_size` images with the same model and size (what one decode call takes)."""
    key = lambda r: (r.model_id, r.width, r.height)
    for _, group in itertools.groupby(sorted(records, key=lambda r: (key(r), r.seq)), key=key):
        items = list(group)
        for start in range(0, len(items), batch_size):
            yield items[start:start + batch_size]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a probe still being answered must not hold up the process's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Not a line per request: a probe every few seconds would bury the worker's own log."""


def serve_metrics_and_health(port: int, registry: CollectorRegistry, stuck: Callable[[], str | None],
                             host: str = "0.0.0.0") -> WSGIServer:
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

    server = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="aeic-metrics", daemon=True).start()
    return server


def run_worker(settings: ReceiverSettings, consumer: str | None = None, metrics_port: int | None = None) -> int:
    """Process entry point: build stores, decoders and the queue from settings; stop on SIGTERM/SIGINT."""
    from aeic.receiver.backends import open_blob_store, open_queue
    from aeic.receiver.data_dir import prepare_data_dir
    from aeic.receiver.metrics import ReceiverMetrics
    from aeic.receiver.worker import WorkerConfig

    queue = open_queue(settings)
    if queue is None:
        raise ValueError("the worker needs a queue: --queue redis://host:6379/0 or AEIC_QUEUE")
    prepare_data_dir(settings.data_dir)
    store = SqlMetadataStore.from_url(settings.resolved_database_url())
    store.migrate()
    metrics = ReceiverMetrics()
    blobs = open_blob_store(settings)  # the API creates the bucket before it stores the first upload
    registry = CodecRegistry.from_packages(settings.model_packages, settings.device, settings.decode_tile_pixels)
    decoder = DecodeWorker(store, blobs, registry, WorkerConfig(
        batch_size=settings.batch_size, max_attempts=settings.max_attempts, retry_delay_s=settings.retry_delay_s,
        poll_interval_s=settings.poll_interval_s, thumbnail_px=settings.thumbnail_px,
        lease_s=settings.reclaim_after_s, decode_deadline_s=settings.decode_deadline_s,
        exit_when_hung_s=settings.hung_exit_grace_s), metrics)
    if metrics_port is not None:
        serve_metrics_and_health(metrics_port, metrics.registry, decoder.stuck)
    config = StreamWorkerConfig(consumer=consumer or default_consumer_name(), batch_size=settings.batch_size,
                                max_attempts=settings.max_attempts, reclaim_after_s=settings.reclaim_after_s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("worker %s consuming %s (group %s)", config.consumer, queue.stream, queue.group)
    try:
        StreamWorker(store, queue, decoder, config).run(stop)
    finally:
        queue.close()
        store.close()
    return 0
