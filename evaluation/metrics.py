"""Full-reference image quality metrics on 8-bit RGB arrays.

Every function takes two ``HxWx3`` uint8 arrays (original, reconstruction) of the same shape and returns a
Python float, so results serialise to JSON/CSV unchanged.

- :func:`psnr`: RGB, peak 255, capped at :data:`PSNR_CAP_DB` so identical images give a finite number that
  survives JSON and averaging.
- :func:`ms_ssim`: pytorch_msssim on ``[0, 255]`` with ``data_range=255`` and the standard 5 scales.
  MS-SSIM needs the shorter side to exceed 160 px; smaller images are mirror-padded (``numpy`` "symmetric"
  mode, both images alike) up to 161 px. Documented fallback: padding repeats content, so scores on tiny
  images are indicative only.
- :func:`texture_retention`: how much of the original's luma gradient energy the reconstruction keeps,
  as ``min(r, 1/r)`` so both blur and invented noise lower it (1 = same energy).
- :func:`perceptual_metric_fn`: weight-free metrics from ``piq`` (HaarPSI, VIF-p, FSIM, GMSD). ``piq``'s
  package ``__init__`` imports torchvision (for its learned metrics), which this project does not install;
  :func:`_piq_module` therefore loads only the needed submodules. The same mirror-pad fallback as MS-SSIM
  applies below each metric's minimum size. Identical images get each metric's ideal value (1, or 0 for
  GMSD) without calling piq, whose HaarPSI divides zero by zero on two all-black images and returns inf.

The torch-based metrics run single-threaded (:func:`_single_thread`): measured on the 2-core dev machine
under load, a Kodak image's MS-SSIM + piq metrics take 1.2 s with one intra-op thread and 6.4 s with two.
The previous thread count is restored, so the codec's own timings are unaffected.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PSNR_CAP_DB = 100.0
MS_SSIM_MIN_SIDE = 161  # pytorch_msssim asserts min(H, W) > (11 - 1) * 2**4
BT601_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

# name -> (piq submodule, function, minimum side in px, higher_is_better)
PERCEPTUAL_METRICS: dict[str, tuple[str, str, int, bool]] = {
    "haarpsi": ("piq.haarpsi", "haarpsi", 16, True),
    "vif": ("piq.vif", "vif_p", 41, True),
    "fsim": ("piq.fsim", "fsim", 8, True),
    "gmsd": ("piq.gmsd", "gmsd", 8, False),
}


def _check_pair(ref: np.ndarray, rec: np.ndarray) -> None:
    """Reject arrays that are not same-shape 8-bit RGB, with a message that says which."""
    for name, img in (("original", ref), ("reconstruction", rec)):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{name} must be an HxWx3 uint8 array, got {img.dtype} {img.shape}")
    if ref.shape != rec.shape:
        raise ValueError(f"shape mismatch: original {ref.shape} vs reconstruction {rec.shape}")


def psnr(ref: np.ndarray, rec: np.ndarray) -> float:
    """PSNR in dB over all RGB samples with peak 255, capped at ``PSNR_CAP_DB``."""
    _check_pair(ref, rec)
    mse = float(np.mean((ref.astype(np.float64) - rec.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(255.0**2 / mse))


def _pad_to_min(img: np.ndarray, min_side: int) -> np.ndarray:
    """Mirror-pad (symmetric, bottom/right) so both sides are at least ``min_side``."""
    pad_h = max(0, min_side - img.shape[0])
    pad_w = max(0, min_side - img.shape[1])
    if pad_h == 0 and pad_w == 0:
        return img
    return np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")


def _to_tensor(img: np.ndarray, scale: float) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float32 tensor multiplied by ``scale``."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().unsqueeze(0) * scale


@contextmanager
def _single_thread() -> Iterator[None]:
    """torch.no_grad with one intra-op thread, restoring the caller's thread count afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(previous)


def ms_ssim(ref: np.ndarray, rec: np.ndarray) -> float:
    """MS-SSIM (pytorch_msssim, data_range 255, 5 scales); mirror-pads images below 161 px."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    _check_pair(ref, rec)
    x = _to_tensor(_pad_to_min(ref, MS_SSIM_MIN_SIDE), 1.0)
    y = _to_tensor(_pad_to_min(rec, MS_SSIM_MIN_SIDE), 1.0)
    with _single_thread():
        return float(_ms_ssim(x, y, data_range=255.0, size_average=True))


def luma(img: np.ndarray) -> np.ndarray:
    """BT.601 luma (0.299 R + 0.587 G + 0.114 B) as float64, range 0..255."""
    return img.astype(np.float64) @ BT601_LUMA


def gradient_energy(img: np.ndarray) -> float:
    """Mean squared luma gradient: mean of squared forward differences along x plus along y."""
    y = luma(img)
    energy = 0.0
    if y.shape[1] > 1:
        energy += float(np.mean(np.diff(y, axis=1) ** 2))
    if y.shape[0] > 1:
        energy += float(np.mean(np.diff(y, axis=0) ** 2))
    return energy


def texture_retention(ref: np.ndarray, rec: np.ndarray) -> float:
    """``min(r, 1/r)`` with ``r`` = gradient energy of reconstruction / original; 1 means equal energy.

    Two flat images give 1; one flat and one not gives 0.
    """
    _check_pair(ref, rec)
    e_ref, e_rec = gradient_energy(ref), gradient_energy(rec)
    if e_ref == 0.0 and e_rec == 0.0:
        return 1.0
    if e_ref == 0.0 or e_rec == 0.0:
        return 0.0
    r = e_rec / e_ref
    return min(r, 1.0 / r)


# The metrics that need only numpy and pytorch_msssim, in the order of results.csv's columns.
CORE_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "psnr": psnr,
    "ms_ssim": ms_ssim,
    "texture": texture_retention,
}


def _piq_module(name: str) -> ModuleType:
    """Import ``piq.<sub>`` without running piq's ``__init__`` (which needs torchvision).

    If ``import piq`` works (torchvision present), it is used as is. Otherwise an empty package shell for
    ``piq`` is registered in ``sys.modules`` so that its torchvision-free submodules import normally.
    """
    if "piq" not in sys.modules:
        try:
            importlib.import_module("piq")
        except ImportError:
            spec = importlib.util.find_spec("piq")
            if spec is None:
                raise
            sys.modules["piq"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(name)


def perceptual_metric_fn(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """A ``(ref, rec) -> float`` function for one entry of :data:`PERCEPTUAL_METRICS`."""
    module_name, func_name, min_side, higher_is_better = PERCEPTUAL_METRICS[name]
    func = getattr(_piq_module(module_name), func_name)

    def metric(ref: np.ndarray, rec: np.ndarray) -> float:
        _check_pair(ref, rec)
        if np.array_equal(ref, rec):  # the ideal value; piq's HaarPSI of two black images is inf
            return 1.0 if higher_is_better else 0.0
        x = _to_tensor(_pad_to_min(ref, min_side), 1.0 / 255.0)
        y = _to_tensor(_pad_to_min(rec, min_side), 1.0 / 255.0)
        with _single_thread():
            return float(func(x, y, data_range=1.0))

    metric.__name__ = name
    return metric
