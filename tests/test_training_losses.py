"""The pixel losses: per-image terms, and a texture term that blur and invented noise both raise."""

from __future__ import annotations

import pytest
import torch
from aeic.training.losses import batch_texture_retention, pixel_distortion, texture_loss


def test_texture_loss_counts_blur_and_invented_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=generator)
    blurred = torch.nn.functional.avg_pool2d(image, 5, stride=1, padding=2)
    noisy = image + 0.3 * torch.randn(image.shape, generator=generator)
    assert float(texture_loss(image, image)) == pytest.approx(0.0)
    assert float(texture_loss(blurred, image)) > 1.0
    assert float(texture_loss(noisy, image)) > 0.3
    assert batch_texture_retention(blurred, image) < 0.3


def test_pixel_distortion_is_per_image_and_zero_for_a_perfect_copy() -> None:
    images = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    worse = images.clone()
    worse[1] = torch.nn.functional.avg_pool2d(images[1:2], 5, stride=1, padding=2)[0]
    terms = pixel_distortion(worse, images, mse_weight=100.0, msssim_weight=1.0, texture_weight=0.25)
    assert all(t.shape == (3,) for t in terms.values())
    assert float(terms["total"][0]) == pytest.approx(0.0, abs=1e-5)
    assert float(terms["total"][1]) > 0.1 and float(terms["texture"][1]) > 0.5


def test_pixel_distortion_takes_one_texture_weight_per_image() -> None:
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    blurred = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)
    per_image = pixel_distortion(blurred, images, 100.0, 1.0, torch.tensor([0.0, 0.5]))
    untextured = pixel_distortion(blurred, images, 100.0, 1.0, 0.0)
    textured = pixel_distortion(blurred, images, 100.0, 1.0, 0.5)
    assert float(per_image["total"][0]) == pytest.approx(float(untextured["total"][0]))
    assert float(per_image["total"][1]) == pytest.approx(float(textured["total"][1]))


def test_lowpass_term_sees_regional_tone_not_fine_detail() -> None:
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    shuffled = images.clone()
    shuffled[:, :, 0::2, 0::2], shuffled[:, :, 1::2, 1::2] = images[:, :, 1::2, 1::2], images[:, :, 0::2, 0::2]
    darker = images.clone()
    darker[..., :64, :64] -= 0.1  # one 64-pixel region loses tone
    fine = pixel_distortion(shuffled, images, 0.0, 0.0, 0.0, lowpass_weight=1.0)
    tonal = pixel_distortion(darker, images, 0.0, 0.0, 0.0, lowpass_weight=1.0)
    assert float(fine["mse"].mean()) > 10 * float(tonal["mse"].mean())
    assert float(fine["lowpass"].max()) < 1e-12
    assert float(tonal["lowpass"].min()) == pytest.approx(0.01 / 4, rel=1e-4)
    assert float(tonal["total"].min()) == pytest.approx(float(tonal["lowpass"].min()))
