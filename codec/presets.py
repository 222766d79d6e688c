"""Named model configurations: the shipped nano model, the paper's moderate encoder, test sizes."""

from __future__ import annotations

from dataclasses import replace

from .analysis import ME, SE, AnalysisConfig
from .diffusion_decoder import NanoDecoderConfig
from .model import ModelConfig

# test sizes: every part present, a few thousand parameters, an internal pixel decoder
_TINY = ModelConfig(
    name="tiny-se",
    analysis=AnalysisConfig(widths=(8, 16, 16, 32, 32)),
    z_channels=8,
    hyper_width=16,
    hyper_synthesis_width=16,
    hyper_features=16,
    context_width=16,
    synthesis_widths=(16, 16),
    decoder=NanoDecoderConfig(latent_channels=8, noise_channels=2, widths=(32, 32), num_rates=3, internal_pixel_width=8),
    rates_bpp=(0.01, 0.03, 0.06),
    pixel_decoder="internal",
)

# Rate points reaching 0.16 bpp: a photo coded at half size (four times the bpp of its byte budget)
# then has a level for every budget up to 0.05 bpp instead of falling back to whole-size coding.
# Six points, as nano-se, so a run can start from the nano-se package.
WIDE_RATES = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
_WIDE = ModelConfig(name="nano-se", analysis=SE, rates_bpp=WIDE_RATES, decoder=NanoDecoderConfig(num_rates=len(WIDE_RATES)))

# The paper's size: the same shallow sender, decoded by SD-Turbo's pruned UNet and the SD VAE from a local
# diffusers folder (AEIC_SD_TURBO_DIR). Trained on a GPU by training/configs/full-*.toml.
_FULL = replace(
    _WIDE,
    name="full-se",
    profile="full",
    decoder=NanoDecoderConfig(latent_channels=4, noise_channels=4, num_rates=len(WIDE_RATES)),
    pixel_decoder="vae",
)

_TINY_FULL = replace(
    _TINY,
    name="tiny-full",
    profile="full",
    decoder=NanoDecoderConfig(latent_channels=4, noise_channels=4, num_rates=3),
    pixel_decoder="vae",
)

PRESETS: dict[str, ModelConfig] = {
    "nano-se": ModelConfig(name="nano-se", analysis=SE),
    "nano-me": ModelConfig(name="nano-me", analysis=ME),
    "nano-se-wide": _WIDE,
    # the same codec without the pretrained TAEF2: its pixel decoder trains with it
    "nano-se-wide-internal": replace(_WIDE, name="nano-se-internal", pixel_decoder="internal"),
    # its distillation teacher: the moderate encoder in front of the same entropy model and decoder
    "nano-me-wide-internal": replace(_WIDE, name="nano-me-internal", analysis=ME, pixel_decoder="internal"),
    "full-se": _FULL,
    "full-me": replace(_FULL, name="full-me", analysis=ME),
    "tiny-se": _TINY,
    "tiny-me": replace(_TINY, name="tiny-me", analysis=replace(_TINY.analysis, blocks_per_stage=2)),
    # the paper's decoder profile at test size: needs AEIC_SD_TURBO_DIR (a tiny random folder in tests)
    "tiny-full": _TINY_FULL,
    "tiny-full-me": replace(_TINY_FULL, name="tiny-full-me", analysis=replace(_TINY.analysis, blocks_per_stage=2)),
}


class UnknownPresetError(ValueError):
    """A configuration or checkpoint names a preset this version does not have."""


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
