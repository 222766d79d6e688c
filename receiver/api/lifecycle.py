"""What the app does when it starts (locks, migration, start-up sweeps, the embedded worker) and stops."""

from __future__ import annotations

import logging
import time

from aeic.receiver.api.state import ReceiverState
from aeic.receiver.backends import prepare_backends
from aeic.receiver.data_dir import lock_data_dir, lock_sqlite_database, unlock_data_dir
from aeic.receiver.log_redaction import install_log_redaction
from aeic.receiver.redis_limiter import RedisRateLimiter
from aeic.receiver.storage import FilesystemBlobStore
from aeic.receiver.storage.orphans import BlobSweeper, ListedBlobStore

__all__ = ["start_receiver", "stop_receiver"]

log = logging.getLogger(__name__)


def start_receiver(state: ReceiverState) -> None:
    """Ready the storage, take the worker's locks and start it (the app's start-up)."""
    install_log_redaction()  # here, after the server has set up its loggers
    if state.worker is not None:  # before requeueing: only the data directory's one worker may do that
        _lock_worker(state)
    version = state.store.migrate()
    prepare_backends(state.blobs, state.queue)
    orphans = state.worker is not None  # only where the data directory's lock is held: one sweep per folder
    if isinstance(state.blobs, FilesystemBlobStore) or (orphans and isinstance(state.blobs, ListedBlobStore)):
        state.sweeper = BlobSweeper(state.store, state.blobs, orphans=orphans)  # files, or an S3 bucket
        state.sweeper.start()
    if state.worker is not None:
        _requeue_dead_claims(state)
        state.worker.start()
    log.info("receiver ready: schema v%d, models %s, claims owned as %s", version,
             ", ".join(sorted(m.hex() for m in state.registry.model_ids())) or "none", state.store.owner)


def _lock_worker(state: ReceiverState) -> None:
    """Take the data directory's worker lock, then a SQLite database's; a start refused the second gives
    the first back (no `stop_receiver` follows a failed start)."""
    data_dir_lock = lock_data_dir(state.settings.data_dir)
    try:
        sqlite_lock = lock_sqlite_database(state.settings.resolved_database_url())
    except BaseException:
        unlock_data_dir(data_dir_lock)
        raise
    state.worker_locks += [data_dir_lock] if sqlite_lock is None else [data_dir_lock, sqlite_lock]


def _requeue_dead_claims(state: ReceiverState) -> None:
    """Requeue what this data directory's previous life left `decoding` (the lock says it is dead) and the
    claims whose lease ran out; never a live peer's (receivers on other folders may share the database)."""
    lease = state.settings.reclaim_after_s
    requeued = state.store.requeue_abandoned(state.settings.max_attempts, claimed_before=time.time() - lease,
                                             owner=state.store.owner)
    if requeued:
        log.warning("requeued %d image(s) left in decoding by a previous run or a dead peer", requeued)


def stop_receiver(state: ReceiverState) -> None:
    """Stop the worker, close connections and give the locks back (the app's shutdown)."""
    if state.worker is not None:
        state.worker.stop()
    if state.sweeper is not None:
        state.sweeper.stop()
    if state.queue is not None:
        state.queue.close()
    for limiter in (state.limiter, state.login_limiter):
        if isinstance(limiter, RedisRateLimiter):
            limiter.close()
    state.store.close()
    while state.worker_locks:
        unlock_data_dir(state.worker_locks.pop())
