"""The app factory: storage and components wired into a `ReceiverState`, the routes, the gallery and the
lifecycle assembled into one FastAPI app."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aeic.receiver.api.lifecycle import start_receiver, stop_receiver
from aeic.receiver.api.routes import api_router
from aeic.receiver.api.state import ReceiverState
from aeic.receiver.api_docs import install_api_docs
from aeic.receiver.auth import Authenticator, Limiter, RateLimiter
from aeic.receiver.backends import open_blob_store, open_queue
from aeic.receiver.data_dir import owner_id, prepare_data_dir
from aeic.receiver.errors import install_error_handlers
from aeic.receiver.metrics import ReceiverMetrics
from aeic.receiver.redis_limiter import RedisRateLimiter
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.security_headers import HardenedFastAPI
from aeic.receiver.sessions import GallerySessions
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import BlobStore, SqlMetadataStore
from aeic.receiver.worker import DecodeWorker, WorkerConfig
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from aeic import __version__

__all__ = ["UnderPrefix", "build_state", "create_app"]


class UnderPrefix:
    """Requests as a proxy that serves the receiver under `prefix` (`root_path`) passes them on, stripped of
    it, seen as ASGI has them: `root_path` the prefix and the path under it, as uvicorn's --root-path makes
    them (a path that still has the prefix is left as it is). Set here, not by the server, so that it holds
    whatever server runs the app; the gallery, /docs and the OpenAPI document name their addresses under it."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            if path != self.prefix and not path.startswith(self.prefix + "/"):
                raw = scope.get("raw_path") or path.encode()
                scope = {**scope, "path": self.prefix + path, "raw_path": self.prefix.encode() + raw}
            scope = {**scope, "root_path": self.prefix}
        await self.app(scope, receive, send)


def build_state(settings: ReceiverSettings, registry: CodecRegistry | None = None,
                blobs: BlobStore | None = None) -> ReceiverState:
    """Open storage and wire the components (nothing runs until the app starts)."""
    prepare_data_dir(settings.data_dir)
    store = SqlMetadataStore.from_url(settings.resolved_database_url(), owner=owner_id(settings.data_dir))
    blob_store = blobs if blobs is not None else open_blob_store(settings)
    queue = open_queue(settings)
    if registry is None:
        registry = CodecRegistry.from_packages(settings.model_packages, settings.device, settings.decode_tile_pixels,
                                               settings.decoder_dtype)
    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    metrics_ = ReceiverMetrics()
    metrics_.watch_jobs(store.status_counts)
    worker = None
    if settings.worker and queue is None:
        config = WorkerConfig(batch_size=settings.batch_size, max_attempts=settings.max_attempts,
                              retry_delay_s=settings.retry_delay_s, poll_interval_s=settings.poll_interval_s,
                              thumbnail_px=settings.thumbnail_px, lease_s=settings.reclaim_after_s,
                              decode_deadline_s=settings.decode_deadline_s)
        worker = DecodeWorker(store, blob_store, registry, config, metrics_)
    auth = Authenticator(store, admin)
    login_burst = max(1, math.ceil(settings.login_attempts_per_minute))
    return ReceiverState(settings=settings, store=store, blobs=blob_store, registry=registry, auth=auth,
                         limiter=_limiter(settings, settings.rate_limit_per_minute, settings.rate_limit_burst,
                                          "uploads"),
                         metrics=metrics_, worker=worker, queue=queue,
                         sessions=GallerySessions(store, auth, settings.session_ttl_s),
                         login_limiter=_limiter(settings, settings.login_attempts_per_minute, login_burst,
                                                "sign-in"))


def _limiter(settings: ReceiverSettings, per_minute: float, burst: int, name: str) -> Limiter:
    """With a Redis `queue` (API replicas), buckets in that Redis, so the replicas share one budget per key
    instead of each granting the whole of it; else this process's."""
    if settings.queue:
        return RedisRateLimiter.from_url(settings.queue, per_minute, burst, prefix=f"aeic:ratelimit:{name}:")
    return RateLimiter(per_minute, burst)


def create_app(settings: ReceiverSettings, registry: CodecRegistry | None = None,
               blobs: BlobStore | None = None) -> FastAPI:
    """The ASGI app. `registry` injects decoders (default: the configured model packages)."""
    state = build_state(settings, registry, blobs)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(start_receiver, state)
        try:
            yield
        finally:
            await run_in_threadpool(stop_receiver, state)

    # FastAPI's /docs and /redoc load their UI from a CDN: install_api_docs serves Swagger UI from here.
    app = HardenedFastAPI(title="AEIC receiver", version=__version__, lifespan=lifespan, docs_url=None,
                          redoc_url=None, swagger_ui_oauth2_redirect_url=None)  # security headers on every answer
    app.state.receiver = state
    hosts = [host.strip() for host in settings.allowed_hosts.split(",") if host.strip()]
    if hosts != ["*"]:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    if settings.root_path:
        app.add_middleware(UnderPrefix, prefix=settings.root_path)
    install_error_handlers(app)
    app.include_router(api_router())
    install_api_docs(app)
    from aeic.receiver.gallery import install_gallery  # imports this package: keep the import here

    install_gallery(app)
    return app
