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
  as ``min(r, 1/r)`` so both blur and invented noise lower it (1 = same energy); NaN for a flat original.
- :func:`perceptual_metric_fn`: weight-free metrics from ``piq`` (HaarPSI, VIF-p, FSIM, GMSD). ``piq``'s
  package ``__init__`` imports torchvision (for its learned metrics), which this project does not install;
  :func:`_piq_module` therefore loads only the needed submodules. The same mirror-pad fallback as MS-SSIM
  applies below each metric's minimum size. piq holds a dozen whole-picture float maps (VIF-p 3.4 GB above
  the pictures for a 24 MP photo), so each metric is computed here in bands of rows (FSIM: only piq's own
  first pooling, after which its picture is ~256 px), equal to piq's number within float32 rounding. Identical images get each metric's ideal value (1, or 0 for
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


Rows = Callable[[int, int], "torch.Tensor"]  # (top, bottom) -> those rows of a picture, 1 x C x rows x W float


def _array_rows(img: np.ndarray) -> Rows:
    """Rows of an 8-bit picture as float, made when asked: the full-size scale never exists whole in float."""
    return lambda top, bottom: _to_tensor(img[top:bottom], 1.0)


def _tensor_rows(tensor: torch.Tensor) -> Rows:
    """Rows of a float picture already made (a pooled scale)."""
    return lambda top, bottom: tensor[:, :, top:bottom]


def _ssim_means(x: Rows, y: Rows, height: int, width: int, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the means of the SSIM and contrast-structure maps of one ``height x width`` scale, computed
    over bands of rows (each with the window's 10 rows of overlap, so the bands' maps tile the whole map
    exactly): a whole map's dozen float copies were 6.6 GB for a 24 MP photo."""
    import torch

    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    map_height, map_width = height - SSIM_WINDOW + 1, width - SSIM_WINDOW + 1
    band = max(1, SSIM_BAND_PIXELS // map_width)
    ssim_sum = torch.zeros(window.shape[0], dtype=torch.float64)
    cs_sum = torch.zeros(window.shape[0], dtype=torch.float64)
    for top in range(0, map_height, band):
        stop = min(map_height, top + band) + SSIM_WINDOW - 1
        xb, yb = x(top, stop), y(top, stop)
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


def _pooled(rows: Rows, height: int, width: int) -> torch.Tensor:
    """pytorch_msssim's step to the next scale of an RGB picture, band by band: 2x2 average pooling with one
    zero row (column) on both sides of an odd height (width), counted in the mean."""
    import torch
    import torch.nn.functional as F

    pad_h, pad_w = height % 2, width % 2
    out_h, out_w = (height + 2 * pad_h - 2) // 2 + 1, (width + 2 * pad_w - 2) // 2 + 1
    out = torch.empty(1, 3, out_h, out_w)
    step = max(1, SSIM_BAND_PIXELS // out_w)
    for top in range(0, out_h, step):
        bottom = min(out_h, top + step)
        start, stop = 2 * top - pad_h, 2 * bottom - pad_h  # input rows of output rows top:bottom
        band = F.pad(rows(max(0, start), min(height, stop)), [0, 0, max(0, -start), max(0, stop - height)])
        out[:, :, top:bottom] = F.avg_pool2d(band, 2, padding=(0, pad_w))
    return out


def ms_ssim_scale_terms(ref: np.ndarray, rec: np.ndarray) -> torch.Tensor:
    """MS-SSIM's terms before clipping, per scale and channel (5 x 3, float64): contrast-structure at scales
    1-4, SSIM at scale 5, with pytorch_msssim's definition (data range 255, 2x2 average pooling with zero
    padding on odd sides); mirror-pads images below 161 px. Each scale's maps are computed in bands of rows,
    and the full-size scale is read from the 8-bit pictures band by band, so a large photo holds its
    quarter-size float pictures and a band (pytorch_msssim took 6.6 GB and over a minute for a 24 MP photo;
    the full-size float pair alone was 576 MB)."""
    import torch

    _check_pair(ref, rec)
    ref, rec = _pad_to_min(ref, MS_SSIM_MIN_SIDE), _pad_to_min(rec, MS_SSIM_MIN_SIDE)
    height, width = ref.shape[:2]
    x, y = _array_rows(ref), _array_rows(rec)
    window = _gaussian_window(3)
    terms = []
    with _single_thread():
        for scale in range(len(MS_SSIM_WEIGHTS)):
            ssim_mean, cs_mean = _ssim_means(x, y, height, width, window)
            if scale == len(MS_SSIM_WEIGHTS) - 1:
                terms.append(ssim_mean)
                break
            terms.append(cs_mean)
            px, py = _pooled(x, height, width), _pooled(y, height, width)
            height, width = px.shape[2:]
            x, y = _tensor_rows(px), _tensor_rows(py)
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


# Below it an original is flat: its luma steps average under about 0.7 grey levels along each axis, nothing a
# viewer sees as texture, and the ratio would be of noise (a near-perfect copy with a few one-level specks
# scored 0). Kodak's and the non-Kodak photos' energies are 158 and up, so their scores do not change.
FLAT_GRADIENT_ENERGY = 1.0


def texture_retention(ref: np.ndarray, rec: np.ndarray) -> float:
    """``min(r, 1/r)`` with ``r`` = gradient energy of reconstruction / original; 1 means equal energy.

    NaN (undefined) when the original is flat (:data:`FLAT_GRADIENT_ENERGY`): there is no texture to keep,
    and the means leave the image out and name it. A flat reconstruction of a textured original gives 0.
    """
    _check_pair(ref, rec)
    e_ref = gradient_energy(ref)
    if e_ref < FLAT_GRADIENT_ENERGY:
        return math.nan
    e_rec = gradient_energy(rec)
    if e_rec == 0.0:
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


PIQ_BAND_PIXELS = 1 << 20  # output pixels a banded piq metric computes at once (a 24 MP photo: 23 bands)


def _piq_scaled(rows: np.ndarray, scale: float) -> torch.Tensor:
    """A band of rows as piq sees it: our ``[0, 1]`` tensor (``_to_tensor`` with 1/255, what piq was given)
    times ``scale``, the ``x / data_range * scale`` each piq metric starts with (``/ 1.0`` is exact)."""
    tensor = _to_tensor(rows, 1.0 / 255.0)
    return tensor if scale == 1.0 else tensor.mul_(scale)


def _band_steps(rows: int, width: int, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """``(top, bottom)`` of bands of output rows, ``PIQ_BAND_PIXELS`` pixels each and a multiple of
    ``multiple`` rows high (a pooling's stride, so each band starts on a pooling window)."""
    step = max(1, PIQ_BAND_PIXELS // (max(1, width) * multiple)) * multiple
    for top in range(0, rows, step):
        yield top, min(rows, top + step)


def _half_yiq(img: np.ndarray, channels: int, scale: float) -> torch.Tensor:
    """piq's ``rgb2yiq`` then 2x2 average pooling of the picture zero-padded at the bottom and right by
    ``max(H % 2, W % 2)`` (HaarPSI's and GMSD's first step; the first ``channels`` of Y, I, Q), band by band."""
    import torch
    import torch.nn.functional as F

    rgb2yiq = _piq_module("piq.functional").rgb2yiq
    height, width = img.shape[:2]
    pad = max(height % 2, width % 2)
    out = torch.empty(1, channels, (height + pad) // 2, (width + pad) // 2)
    for top, bottom in _band_steps(height, width, multiple=2):
        yiq = rgb2yiq(_piq_scaled(img[top:bottom], scale))[:, :channels]
        yiq = F.pad(yiq, [0, pad, 0, pad if bottom == height else 0])
        out[:, :, top // 2 : top // 2 + yiq.shape[2] // 2] = F.avg_pool2d(yiq, kernel_size=2, stride=2)
    return out


GMSD_T = 170 / 255.0**2  # piq's gmsd default: the similarity's stability constant for [0, 1] luma


def _gradient_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GMSD's gradient magnitude similarity map of two half-size lumas (Prewitt filters, zero padding of
    one pixel, as piq's ``gradient_map``), computed in bands of rows with one row of overlap each side."""
    import torch
    import torch.nn.functional as F

    functional = _piq_module("piq.functional")
    prewitt = functional.prewitt_filter(dtype=x.dtype)
    kernels = torch.stack([prewitt, prewitt.transpose(-1, -2)])
    height, width = x.shape[2:]
    out = torch.empty(1, 1, height, width)
    for top, bottom in _band_steps(height, width):
        rows = slice(max(0, top - 1), min(height, bottom + 1))
        pad = [1, 1, 1 if top == 0 else 0, 1 if bottom == height else 0]
        grads = [F.conv2d(F.pad(img[:, :, rows], pad), kernels).pow(2).sum(dim=1, keepdim=True).sqrt()
                 for img in (x, y)]
        out[:, :, top:bottom] = functional.similarity_map(grads[0], grads[1], constant=GMSD_T, alpha=0.0)
    return out


def _gmsd(ref: np.ndarray, rec: np.ndarray) -> float:
    """piq's GMSD (the standard deviation of the gradient magnitude similarity of the half-size lumas): the
    lumas and the similarity map whole (4 bytes a half-size pixel each), the filtering in bands."""
    import torch

    gms = _gradient_similarity(_half_yiq(ref, 1, 1.0), _half_yiq(rec, 1, 1.0))
    return float(torch.pow(gms - gms.mean(), 2).mean().sqrt())


def _fsim(ref: np.ndarray, rec: np.ndarray) -> float:
    """piq's FSIM, which first average-pools the picture by ``round(min(H, W) / 256)`` (its own rule: the
    phase congruency's FFTs and median are of the whole picture): the pooling in bands, then piq's FSIM on
    the pooled picture (about 256 px on the short side, which piq then pools by 1, i.e. not at all)."""
    import torch
    import torch.nn.functional as F

    kernel = max(1, round(min(ref.shape[:2]) / 256))
    pooled = []
    for img in (ref, rec):
        height, width = img.shape[:2]
        out = torch.empty(1, 3, height // kernel, width // kernel)
        for top, bottom in _band_steps(height - height % kernel, width, multiple=kernel):
            band = F.avg_pool2d(_piq_scaled(img[top:bottom], 255.0), kernel)
            out[:, :, top // kernel : bottom // kernel] = band
        pooled.append(out)
    # piq divides by data_range and multiplies by 255 again: within a float32 rounding of the pooled values
    return float(_piq_module("piq.fsim").fsim(pooled[0], pooled[1], data_range=255.0))


VIF_SIGMA_N_SQ, VIF_EPS = 2.0, 1e-8  # piq's vif_p defaults: the visual noise's variance, its stability constant


def _luma(img: np.ndarray) -> torch.Tensor:
    """VIF-p's luma (0.299 R + 0.587 G + 0.114 B on piq's 0..255 scale), 1x1xHxW float32, band by band."""
    import torch

    height, width = img.shape[:2]
    out = torch.empty(1, 1, height, width)
    for top, bottom in _band_steps(height, width):
        x = _piq_scaled(img[top:bottom], 255.0)
        out[:, 0, top:bottom] = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return out


def _smooth_subsample(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """VIF-p's step to the next scale, in bands: the valid Gaussian filtering kept at every second row and
    column (a stride-2 convolution)."""
    import torch
    import torch.nn.functional as F

    size = kernel.shape[-1]
    rows, cols = (x.shape[2] - size) // 2 + 1, (x.shape[3] - size) // 2 + 1
    out = torch.empty(1, 1, rows, cols)
    for top, bottom in _band_steps(rows, cols):
        out[:, :, top:bottom] = F.conv2d(x[:, :, 2 * top : 2 * (bottom - 1) + size], kernel, stride=2)
    return out


def _vif_scale_sums(x: torch.Tensor, y: torch.Tensor, kernel: torch.Tensor) -> tuple[float, float]:
    """One scale of VIF-p (Sheikh and Bovik's pixel-domain VIF as piq computes it, ``y`` the reference):
    the sums of its numerator and denominator maps, computed in bands of rows with the window's rows of
    overlap and summed in float64."""
    import torch
    import torch.nn.functional as F

    size = kernel.shape[-1]
    rows, cols = x.shape[2] - size + 1, x.shape[3] - size + 1
    num = den = 0.0
    for top, bottom in _band_steps(rows, cols):
        xb, yb = x[:, :, top : bottom + size - 1], y[:, :, top : bottom + size - 1]
        mu_x, mu_y = F.conv2d(xb, kernel), F.conv2d(yb, kernel)
        var_x = torch.relu(F.conv2d(xb * xb, kernel) - mu_x * mu_x)
        var_y = torch.relu(F.conv2d(yb * yb, kernel) - mu_y * mu_y)
        cov = F.conv2d(xb * yb, kernel) - mu_x * mu_y
        gain = cov / (var_y + VIF_EPS)  # x = gain * y + noise of variance noise_var
        noise_var = var_x - gain * cov
        flat_y, flat_x = var_y < VIF_EPS, var_x < VIF_EPS
        gain = torch.where(flat_y | flat_x, 0.0, gain)
        noise_var = torch.where(flat_y, var_x, noise_var)
        noise_var = torch.where(flat_x, 0.0, noise_var)
        var_y = torch.where(flat_y, 0.0, var_y)
        noise_var = torch.where(gain < 0, var_x, noise_var)
        gain = torch.relu(gain)
        noise_var = torch.where(noise_var > VIF_EPS, noise_var, VIF_EPS)
        num_map = torch.log10(1.0 + gain**2.0 * var_y / (noise_var + VIF_SIGMA_N_SQ))
        num += float(num_map.sum(dtype=torch.float64))
        den += float(torch.log10(1.0 + var_y / VIF_SIGMA_N_SQ).sum(dtype=torch.float64))
    return num, den


def _vif(ref: np.ndarray, rec: np.ndarray) -> float:
    """piq's ``vif_p(rec, ref)``, the original as the reference (piq's second argument), with 4 scales and
    Gaussian windows of 17, 9, 5, 3 px with sigma size/5, in bands: the two lumas and the smaller scales
    stay whole (8 bytes a pixel), each scale's maps go band by band. piq held its maps whole, 3.4 GB above
    the pictures for a 24 MP photo."""
    gaussian_filter = _piq_module("piq.functional").gaussian_filter
    x, y = _luma(rec), _luma(ref)  # y is the reference: how much of its information survives in x
    num = den = 0.0
    for scale in range(4):
        size = 2 ** (4 - scale) + 1
        kernel = gaussian_filter(size, sigma=size / 5, dtype=x.dtype).view(1, 1, size, size)
        if scale > 0:
            x, y = _smooth_subsample(x, kernel), _smooth_subsample(y, kernel)
        scale_num, scale_den = _vif_scale_sums(x, y, kernel)
        num, den = num + scale_num, den + scale_den
    return (num + VIF_EPS) / (den + VIF_EPS)


HAARPSI_C, HAARPSI_ALPHA = 30.0, 4.2  # piq's haarpsi defaults (3 scales, subsampled)


def _similarity(a: torch.Tensor, b: torch.Tensor, constant: float) -> torch.Tensor:
    """The Dice-like similarity ``(2ab + c) / (a^2 + b^2 + c)`` of HaarPSI (piq's ``similarity_map``)."""
    return _piq_module("piq.functional").similarity_map(a, b, constant=constant)


def _haar_terms(x: torch.Tensor, y: torch.Tensor, top: int, bottom: int) -> tuple[float, float]:
    """HaarPSI's weighted similarity and weight sums over the half-size rows ``top:bottom`` of two YIQ
    pictures: Haar filters of 2, 4 and 8 px on Y (zero padding, ``k/2 - 1`` before and ``k/2`` after, as
    MATLAB's ``conv2(.., 'same')``), the 2x2 mean of I and Q (one zero row and column after)."""
    import torch
    import torch.nn.functional as F

    haar_filter = _piq_module("piq.functional").haar_filter
    height = x.shape[2]
    above, below = 3, 4  # the largest filter's padding: the band's rows of overlap

    def extended(img: torch.Tensor) -> torch.Tensor:
        """Rows ``top - 3 : bottom + 4``, zeros outside the picture, as piq's zero padding gives."""
        band = img[:, :, max(0, top - above) : min(height, bottom + below)]
        return F.pad(band, [0, 0, max(0, above - top), max(0, bottom + below - height)])

    ex, ey = extended(x), extended(y)
    rows = bottom - top
    coefficients: list[tuple[torch.Tensor, torch.Tensor]] = []
    for scale in range(3):
        size = 2 ** (scale + 1)
        h_filter = haar_filter(size, dtype=x.dtype)
        kernels = torch.stack([h_filter, h_filter.transpose(-1, -2)])
        before, after = size // 2 - 1, size // 2
        window = slice(above - before, above + rows + after)
        cx, cy = (F.conv2d(F.pad(img[:, :1, window], [before, after, 0, 0]), kernels) for img in (ex, ey))
        coefficients.append((cx, cy))
    weights = torch.max(coefficients[2][0].abs(), coefficients[2][1].abs())  # 2 x rows x W
    sims = []
    for orientation in range(2):
        per_scale = [_similarity(cx[:, orientation].abs(), cy[:, orientation].abs(), HAARPSI_C)
                     for cx, cy in coefficients[:2]]
        sims.append((per_scale[0] + per_scale[1]) / 2)
    iq_x, iq_y = (F.avg_pool2d(F.pad(img[:, 1:, above : above + rows + 1], [0, 1, 0, 0]), 2, stride=1).abs()
                  for img in (ex, ey))
    iq_similarity = _similarity(iq_x, iq_y, HAARPSI_C)
    sims.append((iq_similarity[:, 0] + iq_similarity[:, 1]) / 2)
    weights = torch.cat([weights, weights.mean(dim=1, keepdim=True)], dim=1)
    sim = torch.stack(sims, dim=1)
    weighted = (sim * HAARPSI_ALPHA).sigmoid() * weights
    return float(weighted.sum(dtype=torch.float64)), float(weights.sum(dtype=torch.float64))


def _haarpsi(ref: np.ndarray, rec: np.ndarray) -> float:
    """piq's ``haarpsi`` (3 scales, subsampled, c = 30, alpha = 4.2): the half-size YIQ pictures whole (24
    bytes a half-size pixel, a quarter of the float picture), the similarity and weight sums band by band."""
    import torch

    x, y = _half_yiq(ref, 3, 255.0), _half_yiq(rec, 3, 255.0)
    weighted = weights = 0.0
    for top, bottom in _band_steps(x.shape[2], x.shape[3]):
        band_weighted, band_weights = _haar_terms(x, y, top, bottom)
        weighted, weights = weighted + band_weighted, weights + band_weights
    eps = float(torch.finfo(torch.float32).eps)
    score = (weighted + eps) / (weights + eps)
    return (math.log(score / (1 - score)) / HAARPSI_ALPHA) ** 2


_BANDED: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "haarpsi": _haarpsi,
    "vif": _vif,
    "fsim": _fsim,
    "gmsd": _gmsd,
}


def perceptual_metric_fn(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """A ``(ref, rec) -> float`` function for one entry of :data:`PERCEPTUAL_METRICS`: piq's number (``piq``'s
    function of ``(rec, ref)``: its second argument is the reference), computed in bands so that a large photo
    does not hold piq's whole-picture maps."""
    module_name, _, min_side, higher_is_better = PERCEPTUAL_METRICS[name]
    _piq_module(module_name)  # ImportError now, so that a machine without piq skips the metric (runner)
    banded = _BANDED[name]

    def metric(ref: np.ndarray, rec: np.ndarray) -> float:
        _check_pair(ref, rec)
        if np.array_equal(ref, rec):  # the ideal value; piq's HaarPSI of two black images is inf
            return 1.0 if higher_is_better else 0.0
        with _single_thread():
            return banded(_pad_to_min(ref, min_side), _pad_to_min(rec, min_side))

    metric.__name__ = name
    return metric
