"""The AEIC codec assembled from its parts, and the configuration that describes it.

Variable rate comes from per-rate channel gains: the sender scales the latent by ``gain[r]``
before quantization and the receiver divides after, so one set of weights serves every rate and
the heavy analysis transform runs once whatever the rate (the byte-budget search only repeats
the light hyper-analysis and entropy coding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .analysis import AnalysisConfig, AnalysisTransform, HyperAnalysis
from .diffusion_decoder import NanoDecoder, NanoDecoderConfig
from .entropy_model import HyperpriorContextModel
from .synthesis import SynthesisTransform

if TYPE_CHECKING:
    from .full_profile import FullDecoder


@dataclass(frozen=True)
class ModelConfig:
    name: str = "nano-se"
    profile: str = "nano"
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    z_channels: int = 64
    hyper_width: int = 128
    hyper_synthesis_width: int = 96
    hyper_features: int = 128
    context_width: int = 128
    synthesis_widths: tuple[int, int] = (128, 64)
    rates_bpp: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.07)
    decoder: NanoDecoderConfig = field(default_factory=NanoDecoderConfig)
    pixel_decoder: str = "taef2"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["analysis"] = AnalysisConfig(**_lists_as_tuples(data["analysis"]))
        data["decoder"] = NanoDecoderConfig(**_lists_as_tuples(data["decoder"]))
        data["synthesis_widths"] = tuple(data["synthesis_widths"])
        data["rates_bpp"] = tuple(data["rates_bpp"])
        return cls(**data)

    @property
    def num_rates(self) -> int:
        return len(self.rates_bpp)


def _lists_as_tuples(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def build_decoder(config: ModelConfig, pixel_decoder: nn.Module | None = None) -> NanoDecoder | FullDecoder:
    """The one-step decoder of the configured profile (``nano`` or the paper's ``full``)."""
    if config.profile == "full":
        from .full_profile import load_full_decoder
        from .sd_turbo_folder import configured_folder

        return load_full_decoder(configured_folder(), config.num_rates, noise_channels=config.decoder.noise_channels)
    return NanoDecoder(config.decoder, pixel_decoder, internal_pixel_decoder=config.pixel_decoder == "internal")


def receiver_state_dict(synthesis: nn.Module, decoder: nn.Module) -> dict[str, torch.Tensor]:
    """What a package stores for the receiver: the synthesis and the decoder's own (trained) weights.

    The full profile stores only what training changed; its base weights reload from SD-Turbo.
    """
    state = {f"synthesis.{k}": v for k, v in synthesis.state_dict().items()}
    own = getattr(decoder, "trainable_state_dict", decoder.state_dict)()
    state.update({f"decoder.{k}": v for k, v in own.items()})
    return state


class AEICModel(nn.Module):
    """Sender half (analysis, gains, hyper-analysis) and receiver half (synthesis, one-step decoder)."""

    def __init__(self, config: ModelConfig = ModelConfig(), pixel_decoder: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        channels = config.analysis.latent_channels
        self.analysis = AnalysisTransform(config.analysis)
        initial = torch.linspace(-1.5, 1.0, config.num_rates)[:, None].expand(-1, channels)
        self.log_gains = nn.Parameter(initial.clone())
        self.hyper_analysis = HyperAnalysis(channels, config.hyper_width, config.z_channels)
        self.entropy = HyperpriorContextModel(
            channels, config.z_channels, config.hyper_synthesis_width, config.hyper_features, config.context_width
        )
        self.synthesis = SynthesisTransform(channels, config.decoder.latent_channels, config.synthesis_widths)
        self.decoder = build_decoder(config, pixel_decoder)

    def gains(self, rate_index: torch.Tensor) -> torch.Tensor:
        return self.log_gains[rate_index].exp()[:, :, None, None]

    def scale_latent(self, y: torch.Tensor, rate_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latent, hyper-latent z): what the entropy model codes at this rate."""
        scaled = y * self.gains(rate_index)
        return scaled, self.hyper_analysis(scaled)

    def decoder_latent(self, y_hat_scaled: torch.Tensor, rate_index: torch.Tensor, refine: bool = True) -> torch.Tensor:
        """Receiver: dequantized scaled latent -> decoder latent (synthesis + one UNet pass).

        ``refine=False`` skips the UNet (the residual alone): rate-distortion pretraining
        learns the regression first and leaves texture to the adversarial stage.
        """
        unet_input, residual = self.synthesis(y_hat_scaled / self.gains(rate_index))
        return self.decoder.refine(unet_input, residual, rate_index) if refine else residual

    def forward(self, image: torch.Tensor, rate_index: torch.Tensor, refine: bool = True) -> dict[str, torch.Tensor]:
        """Training pass on images in [0, 1] whose sides are multiples of 128."""
        y = self.analysis(image)
        scaled, z = self.scale_latent(y, rate_index)
        y_hat, y_bits, z_bits = self.entropy(scaled, z)
        bits = y_bits.flatten(1).sum(1) + z_bits.flatten(1).sum(1)
        return {"y": y, "y_hat": y_hat, "bits": bits, "latent": self.decoder_latent(y_hat, rate_index, refine)}
