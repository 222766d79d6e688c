"""Pixel-domain losses the training stages share: MSE, MS-SSIM, a texture-energy and a low-pass term.

The texture term is the training-side twin of the evaluation's texture retention: the patch-wise
ratio of mean squared luma gradients, penalised as |log r| so that blur (r < 1) and invented noise
(r > 1) both cost, which MSE and MS-SSIM alone do not do (they reward blur at low rates).
The low-pass term is the MSE of block means at MS-SSIM's two coarsest scales (8x and 16x): most of the
MS-SSIM that the decoder loses to classic codecs at equal bytes is there (regional colour and tone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim

LUMA = (0.299, 0.587, 0.114)
TEXTURE_PATCH = 32
TEXTURE_EPS = 1e-5
MS_SSIM_WINDOW = 7  # five scales with a 7-pixel window need sides above 96 pixels
MS_SSIM_SIGMA = 1.5  # pytorch_msssim's default
LOWPASS_FACTORS = (8, 16)  # the downsampling of MS-SSIM's fourth and fifth scales


def msssim(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM, (N,), of ``reconstruction`` clamped to [0, 1].

    pytorch_msssim's Gaussian window is made here on the images' device: left to the library, it is made on
    the host and copied to the GPU at each of the five scales, a blocking copy each."""
    taps = torch.arange(MS_SSIM_WINDOW, device=original.device, dtype=original.dtype) - MS_SSIM_WINDOW // 2
    window = torch.exp(-(taps**2) / (2 * MS_SSIM_SIGMA**2))
    window = (window / window.sum()).reshape(1, 1, 1, -1).repeat(original.shape[1], 1, 1, 1)
    return ms_ssim(reconstruction.clamp(0, 1), original, data_range=1.0, size_average=False, win=window)


def luma_gradient_energy(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean squared luma gradient over ``patch``-sized windows, (N, 1, H/patch, W/patch).

    The luma weights stay Python numbers: a tensor of them made on the host would be a blocking copy to
    the GPU."""
    red, green, blue = images.split(1, dim=1)
    luma = LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue
    dx = luma.diff(dim=-1)[..., :-1, :]
    dy = luma.diff(dim=-2)[..., :, :-1]
    return F.avg_pool2d(dx.pow(2) + dy.pow(2), patch)


def texture_loss(reconstruction: torch.Tensor, original: torch.Tensor, patch: int = TEXTURE_PATCH) -> torch.Tensor:
    """Per-image mean of |log| of the patch-wise gradient-energy ratio, (N,)."""
    ratio = (luma_gradient_energy(reconstruction, patch) + TEXTURE_EPS) / (luma_gradient_energy(original, patch) + TEXTURE_EPS)
    return ratio.log().abs().flatten(1).mean(1)


def lowpass_mse(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image MSE of ``LOWPASS_FACTORS``-sized block means, averaged over the factors, (N,)."""
    terms = [(F.avg_pool2d(reconstruction, k) - F.avg_pool2d(original, k)).pow(2).flatten(1).mean(1) for k in LOWPASS_FACTORS]
    return torch.stack(terms).mean(0)


def batch_texture_retention(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The evaluation's min(r, 1/r) over the whole batch (a monitor, not a loss), 0 where r is not positive.

    Left on the images' device, to be read when the step is done: read at once, it would make the step
    wait for the GPU."""
    size = reconstruction.shape[-1]
    r = luma_gradient_energy(reconstruction, size - 1).mean() / luma_gradient_energy(original, size - 1).mean()
    return torch.where(r > 0, torch.minimum(r, 1 / r), 0.0)


def pixel_distortion(reconstruction: torch.Tensor, original: torch.Tensor, mse_weight: float,
                     msssim_weight: float, texture_weight: float | torch.Tensor,
                     lowpass_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-image terms, (N,) each: weighted ``total`` and the unweighted ``mse``, ``ms_ssim``, ``texture``, ``lowpass``.

    ``texture_weight`` may be one weight per image, (N,): then the texture term is always computed, since
    testing a tensor on the GPU for zeros waits for the device.
    """
    mse = (reconstruction - original).pow(2).flatten(1).mean(1)
    structural = msssim(reconstruction, original)
    weighted = isinstance(texture_weight, torch.Tensor) or texture_weight > 0
    texture = texture_loss(reconstruction, original) if weighted else torch.zeros_like(mse)
    lowpass = lowpass_mse(reconstruction, original) if lowpass_weight > 0 else torch.zeros_like(mse)
    total = mse_weight * mse + msssim_weight * (1 - structural) + texture_weight * texture + lowpass_weight * lowpass
    return {"total": total, "mse": mse, "ms_ssim": structural, "texture": texture, "lowpass": lowpass}
