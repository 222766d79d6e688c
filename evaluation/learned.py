"""LPIPS, DISTS and patch FID/KID: used only when their code *and* weights are already on this machine.

These metrics need pretrained backbones (AlexNet/VGG/Inception) that the libraries fetch from the internet
on first use. The evaluation never downloads anything: :func:`probe` checks that the package imports
(all of them need torchvision, which AEIC does not install) and that every weight file is already in the
torch hub cache, and otherwise reports ``skipped: weights not available offline`` with what is missing.

Implementations, when present: ``lpips`` (AlexNet, as in the paper's LPIPS), ``DISTS_pytorch``, and
``torchmetrics`` FID/KID (torch-fidelity's Inception). FID/KID are computed on 256x256 patches as in
HiFiC and the AEIC paper: a grid of non-overlapping patches, then the same grid shifted by half a patch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PATCH = 256
# metric -> (python modules that must import, weight files expected in <torch hub>/checkpoints)
REQUIREMENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lpips": (("torchvision", "lpips"), ("alexnet-owt-7be5be79.pth",)),
    "dists": (("torchvision", "DISTS_pytorch"), ("vgg16-397923af.pth",)),
    "fid": (
        ("torchvision", "torchmetrics", "torch_fidelity"),
        ("weights-inception-2015-12-05-6726825d.pth",),
    ),
    "kid": (
        ("torchvision", "torchmetrics", "torch_fidelity"),
        ("weights-inception-2015-12-05-6726825d.pth",),
    ),
}
PER_IMAGE = ("lpips", "dists")
PER_SET = ("fid", "kid")


@dataclass(frozen=True)
class LearnedStatus:
    """Whether one learned metric can run offline here, and if not, why."""

    name: str
    available: bool
    message: str


def _checkpoint_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def probe(checkpoint_dir: Path | None = None) -> dict[str, LearnedStatus]:
    """Status of each learned metric; never imports the libraries nor touches the network."""
    ckpt = checkpoint_dir if checkpoint_dir is not None else _checkpoint_dir()
    out = {}
    for name, (modules, weights) in REQUIREMENTS.items():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        missing += [str(ckpt / w) for w in weights if not (ckpt / w).is_file()]
        if missing:
            msg = "skipped: weights not available offline (missing: " + ", ".join(missing) + ")"
            out[name] = LearnedStatus(name, False, msg)
        else:
            out[name] = LearnedStatus(name, True, "available")
    return out


def patches(rgb: np.ndarray, size: int = PATCH) -> list[np.ndarray]:
    """Non-overlapping ``size`` patches, then the grid shifted by ``size // 2`` (HiFiC's FID protocol)."""
    out = []
    for offset in (0, size // 2):
        h, w = rgb.shape[0] - offset, rgb.shape[1] - offset
        for y in range(offset, offset + (h // size) * size, size):
            for x in range(offset, offset + (w // size) * size, size):
                out.append(rgb[y : y + size, x : x + size])
    return out


class LearnedMetrics:
    """Computes whichever learned metrics :func:`probe` found; the others stay absent from the results."""

    def __init__(self, status: dict[str, LearnedStatus] | None = None) -> None:
        self.status = status if status is not None else probe()
        self._models: dict[str, Any] = {}
        self._sets: dict[str, dict[str, Any]] = {}  # group label -> {"fid": metric, "kid": metric}

    @property
    def per_image_names(self) -> list[str]:
        return [n for n in PER_IMAGE if self.status[n].available]

    def _model(self, name: str) -> Any:
        if name not in self._models:
            if name == "lpips":
                import lpips

                self._models[name] = lpips.LPIPS(net="alex", verbose=False).eval()
            else:
                from DISTS_pytorch import DISTS

                self._models[name] = DISTS().eval()
        return self._models[name]

    def per_image(self, ref: np.ndarray, rec: np.ndarray) -> dict[str, float]:
        """LPIPS (inputs in [-1, 1]) and DISTS (inputs in [0, 1]) for one pair, where available."""
        import torch

        def tensor(img: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(img.transpose(2, 0, 1).copy()).float().unsqueeze(0) / 255.0

        out = {}
        with torch.no_grad():
            x, y = tensor(ref), tensor(rec)
            if self.status["lpips"].available:
                out["lpips"] = float(self._model("lpips")(x * 2 - 1, y * 2 - 1))
            if self.status["dists"].available:
                out["dists"] = float(self._model("dists")(x, y))
        return out

    def add_to_set(self, group: str, ref: np.ndarray, rec: np.ndarray) -> None:
        """Feed one pair's patches to the FID/KID accumulators of ``group`` (e.g. "rate 0 / aeic")."""
        if not any(self.status[n].available for n in PER_SET):
            return
        import torch
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        if group not in self._sets:
            self._sets[group] = {
                "fid": FrechetInceptionDistance(feature=2048),
                "kid": KernelInceptionDistance(feature=2048, subset_size=50),
            }

        def batch(img: np.ndarray) -> torch.Tensor | None:
            ps = patches(img)
            return torch.from_numpy(np.stack([p.transpose(2, 0, 1) for p in ps])) if ps else None

        real, fake = batch(ref), batch(rec)
        if real is None:
            return
        for metric in self._sets[group].values():
            metric.update(real, real=True)
            metric.update(fake, real=False)

    def set_results(self) -> dict[str, dict[str, float]]:
        """Group -> {"fid": ..., "kid": ...} over everything added; KID needs more patches than its subset."""
        out: dict[str, dict[str, float]] = {}
        for group, ms in self._sets.items():
            out[group] = {"fid": float(ms["fid"].compute())}
            try:
                out[group]["kid"] = float(ms["kid"].compute()[0])
            except ValueError:  # fewer patches than subset_size
                pass
        return out
