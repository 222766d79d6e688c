"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
import os

from aeic.receiver.api.state import ReceiverState, receiver_state
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aeic import __version__

__all__ = ["healthz", "metrics", "readyz"]

log = logging.getLogger(__name__)


def healthz(request: Request) -> JSONResponse:
    """Liveness: the process answers, and its decode worker is not hung past a batch's deadline (a stuck
    decoder call or a deadlock, which only a restart clears: the 503 has the orchestrator do it)."""
    state = receiver_state(request)
    stuck = state.worker.stuck() if state.worker is not None else None
    if stuck is not None:
        return JSONResponse({"status": "stuck", "version": __version__, "reason": stuck}, status_code=503)
    return JSONResponse({"status": "ok", "version": __version__})


def _log_failure(state: ReceiverState, check: str, line: str | None) -> None:
    """Log a failure of `check` the readiness probe found once, and once when it clears: a probe every 10 s
    through a day of full disk logged the same warning 8,640 times."""
    logged = state.failures_logged.get(check)
    if line is not None and line != logged:
        log.warning("%s (logged again only when it changes)", line)
        state.failures_logged[check] = line
    elif line is None and logged is not None:
        log.warning("readiness: the %s is usable again", check)
        del state.failures_logged[check]


def _reason(exc: Exception) -> str:
    """An OS error's reason for /readyz ('No space left on device'), never its message: that names paths."""
    return f": {os.strerror(exc.errno)}" if isinstance(exc, OSError) and exc.errno else ""


def readyz(request: Request) -> JSONResponse:
    """Readiness: database reachable, blob store usable, worker running, at least one model served, and no
    model whose decoder failed to load (the type only: the message may name paths)."""
    state = receiver_state(request)
    checks: dict[str, str] = {}
    try:
        state.store.ping()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        # The detail (a folder, a host) goes to the log only, as the blob store's below.
        _log_failure(state, "database", f"readiness: database check failed: {exc}")
        checks["database"] = f"error: {type(exc).__name__}{_reason(exc)}"
    else:
        _log_failure(state, "database", None)
    try:
        state.blobs.ping()
        checks["blobs"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a read-only or full disk, an unreachable bucket
        # The detail (paths, bucket names) goes to the log only: /readyz answers anonymous callers.
        _log_failure(state, "blob store", f"readiness: blob store check failed: {exc}")
        checks["blobs"] = f"error: {type(exc).__name__}{_reason(exc)}"
    else:
        _log_failure(state, "blob store", None)
    checks["models"] = "ok" if state.registry.model_ids() else "error: no model package loaded"
    for model_id, failure in sorted(state.registry.load_failures().items()):  # uploads for it could not decode
        checks["models"] = f"error: the decoder of model {model_id.hex()} cannot be loaded ({failure})"
    if state.queue is not None:
        try:
            state.queue.ping()
            checks["queue"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["queue"] = f"error: {type(exc).__name__}"
    elif state.settings.worker:
        checks["worker"] = "ok" if state.worker is not None and state.worker.is_alive() else "error: not running"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


def metrics(request: Request) -> Response:
    """Prometheus exposition."""
    return Response(generate_latest(receiver_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
