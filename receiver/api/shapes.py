"""The JSON the API answers with for an image (`schemas` documents it for OpenAPI)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aeic.receiver.storage import ImageRecord

__all__ = ["image_json"]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def image_json(record: ImageRecord) -> dict[str, Any]:
    """The public description of an image."""
    base = f"/v1/images/{record.id}"
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
