"""Where a run's weights start (``init`` or ``init_mean``): a checkpoint, a model package folder (what
shipped), or the weighted mean of checkpoints of one lineage that each win at other rates ("model soup").
"""

from __future__ import annotations

from pathlib import Path

import torch
from aeic.codec.checkpoint import load_fitting, read_checkpoint
from aeic.codec.model import AEICModel
from aeic.codec.package_import import model_from_package


def _read_weights(checkpoint: Path) -> tuple[dict, dict]:
    """A checkpoint's whole contents and its weights (a bare state dict's, or a model package's)."""
    if Path(checkpoint).is_dir():  # a model package: start from what shipped
        return {}, model_from_package(Path(checkpoint)).state_dict()
    whole = read_checkpoint(checkpoint)
    return whole, whole.get("model", whole)


def _load_except_fresh(model: AEICModel, weights: dict, source: object, fresh: str | None) -> None:
    """Every weight of ``model`` from ``weights``, but those under the prefix ``fresh`` may be missing: a
    part the source never had (a TAEF2 model's internal pixel decoder), which this run trains from scratch."""
    missing, unexpected = load_fitting(model, weights, source, strict=fresh is None)
    absent = [key for key in missing if not key.startswith(fresh or "")]
    if unexpected or absent:
        raise ValueError(f"{source} does not fit the model: missing {absent[:3]}, unexpected {unexpected[:3]}")


def load_model_weights(model: AEICModel, checkpoint: Path, fresh: str | None = None) -> dict:
    """Load a checkpoint's weights; returns the whole checkpoint.

    ``fresh``: the key prefix of a part the source may lack, because this run trains it from scratch."""
    whole, weights = _read_weights(checkpoint)
    _load_except_fresh(model, weights, checkpoint, fresh)
    return whole


def load_mean_weights(model: AEICModel, checkpoints: dict[Path, float]) -> dict:
    """Load the weighted mean of checkpoints that share one architecture; returns the last whole
    checkpoint. Runs of one lineage that each win at other rates average into one model."""
    total = sum(checkpoints.values())
    if total <= 0 or any(weight < 0 for weight in checkpoints.values()):
        raise ValueError(f"init_mean weights must be non-negative with a positive sum, got {checkpoints}")
    mean: dict[str, torch.Tensor] = {}
    for path, weight in checkpoints.items():
        whole, weights = _read_weights(path)
        for key, value in weights.items():
            mean[key] = mean.get(key, 0) + value.double() * (weight / total) if value.is_floating_point() else value
    _load_except_fresh(model, {key: value.to(weights[key].dtype) for key, value in mean.items()}, list(checkpoints), None)
    return whole
