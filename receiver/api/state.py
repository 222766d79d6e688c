"""The receiver's wiring, built once per app and reached by every handler through its request."""

from __future__ import annotations

from dataclasses import dataclass, field

from aeic.receiver.api.conversions import ConversionBudget
from aeic.receiver.auth import Authenticator, Limiter
from aeic.receiver.metrics import ReceiverMetrics
from aeic.receiver.queue import JobQueue
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.sessions import GallerySessions
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import BlobStore, SqlMetadataStore
from aeic.receiver.storage.orphans import BlobSweeper
from aeic.receiver.worker import DecodeWorker
from fastapi import Request

__all__ = ["ReceiverState", "receiver_state"]


@dataclass
class ReceiverState:
    """Everything a request handler needs, built once per app."""

    settings: ReceiverSettings
    store: SqlMetadataStore
    blobs: BlobStore
    registry: CodecRegistry
    auth: Authenticator
    limiter: Limiter  # uploads' decode cost per device
    metrics: ReceiverMetrics
    worker: DecodeWorker | None
    sessions: GallerySessions
    login_limiter: Limiter  # failed gallery sign-ins per client address
    queue: JobQueue | None = None  # scale-out: decodes go to `aeic-receiver worker` processes
    # Held while the embedded worker runs: the data directory's, and a SQLite database's (`data_dir`).
    worker_locks: list[int] = field(default_factory=list)
    conversions: ConversionBudget = field(default_factory=ConversionBudget)  # JPEG/WebP downloads
    sweeper: BlobSweeper | None = None  # a filesystem store's temporaries and orphans, in the background
    # The readiness probe's last failure of each check ("database", "blob store"), logged once, not per probe.
    failures_logged: dict[str, str] = field(default_factory=dict)


def receiver_state(request: Request) -> ReceiverState:
    """The wiring of the app that serves `request`."""
    state: ReceiverState = request.app.state.receiver
    return state
