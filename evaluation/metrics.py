"""Full-reference image quality metrics on 8-bit RGB arrays.

Every function takes two ``HxWx3`` uint8 arrays (original, reconstruction) of the same shape and returns a
Python float, so results serialise to JSON/CSV unchanged.

- :func:`psnr`: RGB, peak 255, capped at :data:`PSNR_CAP_DB` so identical images give a finite number that
  survives JSON and averaging.
- :func:`ms_ssim`: pytorch_msssim's definition on ``[0, 255]`` with ``data_range=255`` and the standard 5
  scales, computed here in bands of rows so that a large photo does not hold a dozen float copies of itself.
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


BAND_PIXELS = 1 << 18  # pixels PSNR and texture hold as numbers at once (a 24 MP photo: 92 bands)


def _row_bands(height: int, width: int) -> Iterator[slice]:
    """The bands of rows, at most :data:`BAND_PIXELS` pixels each, that PSNR and texture work through: the
    classic search scores every downscale factor's full-size picture, and four float64 copies of a 24 MP
    photo per call were 890 MB."""
    step = max(1, BAND_PIXELS // width)
    for top in range(0, height, step):
        yield slice(top, top + step)


def psnr(ref: np.ndarray, rec: np.ndarray) -> float:
    """PSNR in dB over all RGB samples with peak 255, capped at ``PSNR_CAP_DB``; the squared error summed
    exactly in integers, band by band."""
    _check_pair(ref, rec)
    squared = 0
    for band in _row_bands(*ref.shape[:2]):
        diff = ref[band].astype(np.int32) - rec[band]
        squared += int(np.einsum("ijk,ijk->", diff, diff, dtype=np.int64))
    if squared == 0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(255.0**2 * ref.size / squared))


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

    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().unsqueeze(0).mul_(scale)  # in place: a fresh copy


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


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as pytorch_msssim
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_BAND_PIXELS = 1 << 18  # SSIM map pixels computed at once: 3 MB per float32 copy of a band


def _gaussian_window(channels: int) -> torch.Tensor:
    """The 11-tap, sigma 1.5 Gaussian as a ``channels x 1 x 1 x 11`` depthwise kernel (pytorch_msssim's)."""
    import torch

    taps = torch.arange(SSIM_WINDOW, dtype=torch.float32) - SSIM_WINDOW // 2
    gauss = torch.exp(-(taps**2) / (2 * SSIM_SIGMA**2))
    return (gauss / gauss.sum()).reshape(1, 1, 1, -1).repeat(channels, 1, 1, 1)


def _blur(image: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian, valid part only: rows first, then columns, as pytorch_msssim filters."""
    import torch.nn.functional as F

    channels = image.shape[1]
    rows = F.conv2d(image, window.transpose(2, 3), groups=channels)
    return F.conv2d(rows, window, groups=channels)


def _ssim_means(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the means of the SSIM and contrast-structure maps of one scale, computed over bands of
    rows (each with the window's 10 rows of overlap, so the bands' maps tile the whole map exactly): a whole
    map's dozen float copies were 6.6 GB for a 24 MP photo."""
    import torch

    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    map_height, map_width = x.shape[2] - SSIM_WINDOW + 1, x.shape[3] - SSIM_WINDOW + 1
    band = max(1, SSIM_BAND_PIXELS // map_width)
    ssim_sum = torch.zeros(x.shape[1], dtype=torch.float64)
    cs_sum = torch.zeros(x.shape[1], dtype=torch.float64)
    for top in range(0, map_height, band):
        rows = slice(top, top + min(band, map_height - top) + SSIM_WINDOW - 1)
        xb, yb = x[:, :, rows], y[:, :, rows]
        mu_x, mu_y = _blur(xb, window), _blur(yb, window)
        mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
        var_x, var_y = _blur(xb * xb, window) - mu_xx, _blur(yb * yb, window) - mu_yy
        cov = _blur(xb * yb, window) - mu_xy
        cs_map = (2 * cov + c2) / (var_x + var_y + c2)
        ssim_map = (2 * mu_xy + c1) / (mu_xx + mu_yy + c1) * cs_map
        ssim_sum += ssim_map.sum(dim=(0, 2, 3), dtype=torch.float64)
        cs_sum += cs_map.sum(dim=(0, 2, 3), dtype=torch.float64)
    count = map_height * map_width
    return ssim_sum / count, cs_sum / count


def ms_ssim_scale_terms(ref: np.ndarray, rec: np.ndarray) -> torch.Tensor:
    """MS-SSIM's terms before clipping, per scale and channel (5 x 3, float64): contrast-structure at scales
    1-4, SSIM at scale 5, with pytorch_msssim's definition (data range 255, 2x2 average pooling with zero
    padding on odd sides); mirror-pads images below 161 px. Each scale's maps are computed in bands of rows,
    so a large photo holds its two pictures and a band (pytorch_msssim took 6.6 GB and over a minute for a
    24 MP photo)."""
    import torch
    import torch.nn.functional as F

    _check_pair(ref, rec)
    x = _to_tensor(_pad_to_min(ref, MS_SSIM_MIN_SIDE), 1.0)
    y = _to_tensor(_pad_to_min(rec, MS_SSIM_MIN_SIDE), 1.0)
    window = _gaussian_window(x.shape[1])
    terms = []
    with _single_thread():
        for scale in range(len(MS_SSIM_WEIGHTS)):
            ssim_mean, cs_mean = _ssim_means(x, y, window)
            if scale == len(MS_SSIM_WEIGHTS) - 1:
                terms.append(ssim_mean)
                break
            terms.append(cs_mean)
            padding = [side % 2 for side in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    return torch.stack(terms)


def ms_ssim(ref: np.ndarray, rec: np.ndarray) -> float:
    """MS-SSIM (the standard 5 scales and weights, :func:`ms_ssim_scale_terms`): per channel the weighted
    geometric mean of its terms, negative ones clipped to 0, then the mean over channels."""
    import torch

    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64).unsqueeze(1)
    return float(torch.prod(torch.relu(ms_ssim_scale_terms(ref, rec)) ** weights, dim=0).mean())


def luma(img: np.ndarray) -> np.ndarray:
    """BT.601 luma (0.299 R + 0.587 G + 0.114 B) as float64, range 0..255."""
    return img.astype(np.float64) @ BT601_LUMA


def gradient_energy(img: np.ndarray) -> float:
    """Mean squared luma gradient: mean of squared forward differences along x plus along y, summed band by
    band (each band's first row continues the previous band's last)."""
    height, width = img.shape[:2]
    along_x = along_y = 0.0
    previous: np.ndarray | None = None  # the last luma row of the band before
    for band in _row_bands(height, width):
        y = luma(img[band])
        along_x += float(np.sum(np.diff(y, axis=1) ** 2))
        rows = y if previous is None else np.concatenate([previous, y])
        along_y += float(np.sum(np.diff(rows, axis=0) ** 2))
        previous = y[-1:]
    energy = 0.0
    if width > 1:
        energy += along_x / (height * (width - 1))
    if height > 1:
        energy += along_y / ((height - 1) * width)
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
