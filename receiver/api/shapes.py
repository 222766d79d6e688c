"""The JSON the API answers with for an image (`schemas` documents it for OpenAPI)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aeic.receiver.storage import ImageRecord
from fastapi import Request

__all__ = ["image_json", "root_path"]


def root_path(request: Request) -> str:
    """The prefix a proxy serves the receiver under (`root_path`, e.g. `/aeic`; empty at the host's root), which
    every address the API answers with starts with: a client behind https://host/aeic/ that followed a path
    from `/` (an upload's Location, an image's links) got the proxy's 404, or another site of that host."""
    scope = request.scope
    return str(scope.get("app_root_path", scope.get("root_path", ""))).rstrip("/")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def image_json(record: ImageRecord, root: str = "") -> dict[str, Any]:
    """The public description of an image; its links start with `root` (`root_path(request)`; the gallery's
    pages add the prefix themselves)."""
    base = f"{root}/v1/images/{record.id}"
    return {
        "id": record.id,
        "status": record.status.value,
        "device": record.device,
        "model_id": record.model_id,
        "width": record.width,
        "height": record.height,
        "rate_index": record.rate_index,
        "downscale": record.downscale,
        "bytes": record.bytes,
        "bpp": record.bpp,
        "attempts": record.attempts,
        "error": record.error,
        "timings": {
            "entropy_ms": record.entropy_ms,
            "decoder_ms": record.decoder_ms,
            "decode_ms": record.decode_ms,
            "batch_size": record.batch_size,
        },
        "created_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "decoded_at": _iso(record.decoded_at),
        "links": {"self": base, "reconstruction": f"{base}/reconstruction", "thumbnail": f"{base}/thumbnail"},
    }
