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
LOWPASS_FACTORS = (8, 16)  # the downsampling of MS-SSIM's fourth and fifth scales


def luma_gradient_energy(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean squared luma gradient over ``patch``-sized windows, (N, 1, H/patch, W/patch)."""
    weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)[None, :, None, None]
    luma = (images * weights).sum(1, keepdim=True)
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


def batch_texture_retention(reconstruction: torch.Tensor, original: torch.Tensor) -> float:
    """The evaluation's min(r, 1/r) over the whole batch (a monitor, not a loss)."""
    size = reconstruction.shape[-1]
    r = float(luma_gradient_energy(reconstruction, size - 1).mean() / luma_gradient_energy(original, size - 1).mean())
    return min(r, 1 / r) if r > 0 else 0.0


def pixel_distortion(reconstruction: torch.Tensor, original: torch.Tensor, mse_weight: float,
                     msssim_weight: float, texture_weight: float | torch.Tensor,
                     lowpass_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-image terms, (N,) each: weighted ``total`` and the unweighted ``mse``, ``ms_ssim``, ``texture``, ``lowpass``.

    ``texture_weight`` may be one weight per image, (N,).
    """
    mse = (reconstruction - original).pow(2).flatten(1).mean(1)
    structural = ms_ssim(reconstruction.clamp(0, 1), original, data_range=1.0, size_average=False, win_size=MS_SSIM_WINDOW)
    weighted = bool(torch.as_tensor(texture_weight).gt(0).any())
    texture = texture_loss(reconstruction, original) if weighted else torch.zeros_like(mse)
    lowpass = lowpass_mse(reconstruction, original) if lowpass_weight > 0 else torch.zeros_like(mse)
    total = mse_weight * mse + msssim_weight * (1 - structural) + texture_weight * texture + lowpass_weight * lowpass
    return {"total": total, "mse": mse, "ms_ssim": structural, "texture": texture, "lowpass": lowpass}
