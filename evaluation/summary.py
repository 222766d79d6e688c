"""``OUT/summary.json``'s tables: the rows typed back from the CSV's strings, the means per (point, method)
with unreachable and failed images counted rather than dropped, and the machine the timings were taken on."""

from __future__ import annotations

import math
import os
import platform
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from aeic.evaluation.runner import RatePoint

INTEGER = {"width", "height", "rate_index", "quality", "budget_bytes", "bytes"}
TEXT = {"image", "point", "method", "status", "detail"}


def typed_row(row: dict[str, str]) -> dict[str, Any]:
    """CSV strings back to numbers (empty -> None) for JSON."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in TEXT:
            out[key] = value
        elif value in ("", None) or math.isnan(number := float(value)):  # NaN: undefined, JSON null
            out[key] = None
        else:
            out[key] = int(number) if key in INTEGER and number.is_integer() else number
    return out


def means(
    rows: list[dict[str, str]], columns: list[str], points: list[RatePoint], methods: list[str]
) -> list[dict[str, Any]]:
    """Per (point, method): counts of ok/unreachable/error images and the mean of every numeric column; a
    metric undefined for an image (NaN: texture of a flat original) is left out of its mean and the image named
    under ``undefined_images``."""
    numeric = [c for c in columns if c not in TEXT and c not in {"width", "height"}]
    out = []
    for point in points:
        for method in methods:
            group = [r for r in rows if r["point"] == point.label and r["method"] == method]
            if not group:
                continue
            ok = [r for r in group if r["status"] == "ok"]
            entry: dict[str, Any] = {
                "point": point.label, "method": method, "n_ok": len(ok),
                "n_unreachable": sum(r["status"] == "unreachable" for r in group),
                "n_error": sum(r["status"] == "error" for r in group),
                "unreachable_images": [r["image"] for r in group if r["status"] == "unreachable"],
                "error_images": [r["image"] for r in group if r["status"] == "error"],
            }  # fmt: skip
            entry["undefined_images"] = {}
            for col in numeric:
                cells = [(r["image"], float(r[col])) for r in ok if r.get(col) not in ("", None)]
                values = [v for _, v in cells if not math.isnan(v)]
                entry[col] = float(np.mean(values)) if values else None
                if undefined := [image for image, v in cells if math.isnan(v)]:
                    entry["undefined_images"][col] = undefined
            out.append(entry)
    return out


def machine_info() -> dict[str, Any]:
    """What the timings were measured on."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
