"""A tiny random SD-Turbo folder in diffusers format (``unet/``, ``vae/``) for the full-profile tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

CROSS_DIM = 32


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        use_linear_projection=True,  # as in SD 2.x / SD-Turbo
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def write_tiny_sd_turbo(root: Path) -> Path:
    torch.manual_seed(0)
    tiny_unet().save_pretrained(root / "unet")
    tiny_vae().save_pretrained(root / "vae")
    return root


def write_other_base(root: Path, kind: str) -> Path:
    """A tiny diffusers folder of another base model than :func:`write_tiny_sd_turbo`'s, as a user might
    point AEIC_SD_TURBO_DIR at: ``reseeded`` (the same architecture, other weights: another revision),
    ``sd15`` (convolutional transformer projections, another text width), ``wider`` (other block widths),
    ``latent16`` (a 16-channel VAE and UNet), ``sdxl`` (an added text-time embedding)."""
    torch.manual_seed(5)
    unet_args = tiny_unet().config
    vae = tiny_vae()
    changes: dict[str, dict] = {
        "reseeded": {},
        "sd15": {"use_linear_projection": False, "cross_attention_dim": 48},
        "wider": {"block_out_channels": (64, 64)},
        "latent16": {"in_channels": 16, "out_channels": 16},
        "sdxl": {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": CROSS_DIM + 6 * 8},
    }
    names = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection")
    UNet2DConditionModel(**({name: unet_args[name] for name in names} | changes[kind])).save_pretrained(root / "unet")
    if kind == "latent16":
        vae = AutoencoderKL(**{**{name: vae.config[name] for name in (
            "down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "norm_num_groups",
            "sample_size")}, "latent_channels": 16})
    vae.save_pretrained(root / "vae")
    return root


def write_tiny_full_stream(root: Path, photo: Path) -> tuple[Path, Path, Path]:
    """(SD-Turbo folder, a tiny-full package made on it, ``photo`` coded by that package), all under ``root``."""
    import pytest
    from aeic.codec import cli as codec_cli
    from aeic.codec.export import export_package
    from aeic.codec.model import AEICModel
    from aeic.codec.presets import preset

    folder = write_tiny_sd_turbo(root / "sd-turbo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AEIC_SD_TURBO_DIR", str(folder))
        torch.manual_seed(0)
        package = export_package(AEICModel(preset("tiny-full")), root / "package")
    stream = root / "photo.aeic"
    assert codec_cli.main(["encode", str(photo), "--model", str(package), "-o", str(stream)]) == 0
    return folder, package, stream
