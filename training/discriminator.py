"""A small rate-conditioned patch discriminator on decoder latents, with hinge losses.

Judging latents at 1/8 resolution rather than pixels keeps adversarial fine-tuning affordable on
a CPU; the pixel decoder is frozen, so realistic latents decode to realistic texture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm


class LatentDiscriminator(nn.Module):
    def __init__(self, latent_channels: int, num_rates: int, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            spectral_norm(nn.Conv2d(latent_channels, width, 3, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * width, 2 * width, 3, padding=1)),
            nn.LeakyReLU(0.2),
        )
        self.rate_embedding = nn.Embedding(num_rates, 2 * width)
        self.head = spectral_norm(nn.Conv2d(2 * width, 1, 3, padding=1))

    def forward(self, latent: torch.Tensor, rate_index: torch.Tensor) -> torch.Tensor:
        """Per-patch realism logits."""
        features = self.body(latent)
        conditioned = features + self.rate_embedding(rate_index)[:, :, None, None] * features
        return self.head(conditioned)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
