"""One-step diffusion decoders: one UNet pass on the synthesized latent, then a pixel decoder.

The rate index conditions the UNet as a pseudo-timestep. A fixed-seed noise map widens the
UNet's input so an adversarially trained UNet can synthesise texture the bitstream does not
carry, while decoding the same bitstream always gives the same picture.

``NanoDecoder`` (the shipped default) is a small diffusers ``UNet2DModel`` with the TAEF2 pixel
decoder; the paper's SD-Turbo decoder lives in :mod:`aeic.codec.full_profile`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from torch import nn

from . import taesd
from .device_cache import DeviceCopy

NOISE_SEED = 20251212


@dataclass(frozen=True)
class NanoDecoderConfig:
    latent_channels: int = taesd.LATENT_CHANNELS
    noise_channels: int = 4
    widths: tuple[int, ...] = (64, 128, 128)
    num_rates: int = 6
    internal_pixel_width: int = 64  # only for the internal pixel decoder


def rate_timestep(rate_index: torch.Tensor, num_rates: int) -> torch.Tensor:
    """Pseudo-timesteps spread over the usual 0..999 range: low rates look 'noisier'."""
    return (num_rates - 1 - rate_index.float()) * (999.0 / max(num_rates - 1, 1))


def noise_map(shape: tuple[int, ...]) -> torch.Tensor:
    """The seeded noise, drawn on the host: the same numbers on every device, so a stream decodes alike anywhere."""
    return torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(NOISE_SEED))


class InternalPixelDecoder(nn.Sequential):
    """A small pixel decoder trained with the codec (the alternative to the pretrained TAEF2)."""

    def __init__(self, latent_channels: int, width: int = 64) -> None:
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, width, 3, padding=1), nn.GELU()]
        for _ in range(3):
            layers += [nn.Conv2d(width, 4 * width, 3, padding=1), nn.PixelShuffle(2), nn.GELU()]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        super().__init__(*layers)


class NanoDecoder(nn.Module):
    """Tiny one-step UNet; TAEF2's decoder (external, frozen) or an internal one makes the pixels."""

    def __init__(
        self,
        config: NanoDecoderConfig = NanoDecoderConfig(),
        pixel_decoder: nn.Module | None = None,
        internal_pixel_decoder: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.latent_channels = config.latent_channels
        self.noise = DeviceCopy(noise_map)  # kept on the device: no host copy per pass
        blocks = len(config.widths)
        self.unet = UNet2DModel(
            in_channels=config.latent_channels + config.noise_channels,
            out_channels=config.latent_channels,
            down_block_types=("DownBlock2D",) * blocks,
            up_block_types=("UpBlock2D",) * blocks,
            block_out_channels=config.widths,
            layers_per_block=1,
            norm_num_groups=min(32, config.widths[0]),
        )
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)
        if internal_pixel_decoder:
            self.pixel_decoder = InternalPixelDecoder(config.latent_channels, config.internal_pixel_width)
        else:  # frozen and not part of state_dict: loaded from its own (configured) weights
            object.__setattr__(self, "pixel_decoder", pixel_decoder)

    def refine(self, unet_input: torch.Tensor, residual: torch.Tensor, rate_index: torch.Tensor) -> torch.Tensor:
        """The decoder latent: residual + one UNet pass."""
        noise = self.noise.like((1, self.config.noise_channels, *unet_input.shape[2:]), unet_input)
        sample = torch.cat([unet_input, noise.expand(unet_input.shape[0], -1, -1, -1)], 1)
        timestep = rate_timestep(rate_index, self.config.num_rates).to(unet_input.device)
        return residual + self.unet(sample, timestep).sample

    def decode_pixels(self, latent: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1]."""
        if self.pixel_decoder is None:
            self.attach_pixel_decoder(taesd.load_taef2("decoder").to(latent.device))
        return self.pixel_decoder(latent).clamp(0, 1) if not self.training else self.pixel_decoder(latent)

    def attach_pixel_decoder(self, module: nn.Module) -> None:
        object.__setattr__(self, "pixel_decoder", module)
