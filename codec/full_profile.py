"""The paper's ``full`` decoder profile: SD-Turbo's UNet, pruned, run once; the SD VAE makes the pixels.

Loaded from a local diffusers folder only (:mod:`~aeic.codec.sd_turbo_folder`); nothing is downloaded.
The pruning and widening follow the paper's description; where it leaves details open the
choices below are ours, made so that the surgery keeps SD-Turbo's computation at start:

* Time embedding. ``time_proj`` and ``time_embedding`` (sinusoid + two linear layers) are replaced
  by a learned table with one vector per rate point, initialised with what the original embedding
  gave for that rate's pseudo-timestep (:func:`~aeic.codec.diffusion_decoder.rate_timestep`), so
  the first step of training starts exactly where SD-Turbo was for those timesteps.
* Cross-attention. ``attn2`` and its pre-norm ``norm2`` are set to ``None`` in every transformer
  block: diffusers skips the branch when ``attn2 is None``, so their parameters and compute are
  gone and no prompt or text encoder is needed (the UNet runs with ``encoder_hidden_states=None``).
  Up to float rounding, this equals the original UNet with each ``attn2`` output projection zeroed.
* ``conv_in`` widened: it takes the synthesized latent plus ``noise_channels`` fixed-seed noise
  channels (the same seeded noise as the nano profile). The new input weights start at zero, so
  the noise is ignored until training gives it a use. Assumption: the paper's "widened" is read
  as extra input channels; its exact number of noise channels is ours (default 4).
* ``conv_out`` keeps the VAE latent width (4 for SD) and becomes fully trainable, as does
  ``conv_in``; the output is added to the synthesis residual (``latent = residual + UNet(x)``).
* LoRA adapters (peft) on the attention projections, the transformer in/out projections and the
  resnet, down- and up-sampling convolutions; every base weight is frozen.

A package stores only what training changed, so its decoder is right only on the base weights it was
trained on. It records their fingerprint (:func:`base_fingerprint`); loading it on a folder of other
weights (another model such as SD 1.5 or SDXL, another SD-Turbo revision, other channel counts) is a
:class:`BaseWeightsError` that names the folder, not a decoder that silently draws the wrong picture.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from .device_cache import DeviceCopy
from .diffusion_decoder import noise_map, rate_timestep
from .sd_turbo_folder import load_unet_and_vae

LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "conv",
)
FINGERPRINT = "base_fingerprint"  # the buffer (and package tensor) naming the base weights
_FINGERPRINT_SAMPLES = 1024  # values read from each base tensor: any other weights differ in nearly all


class BaseWeightsError(ValueError):
    """The SD-Turbo folder cannot serve this decoder: another model, other channel counts, other weights."""


def base_fingerprint(*modules: nn.Module) -> bytes:
    """16 bytes naming the modules' weights: each tensor's name, shape and evenly spaced values rounded
    to float16. Cheap (a few thousand values per tensor, not SD-Turbo's 3.4 GB) and the same for a
    folder's float32 weights and its fp16 variant, on every machine (integer sampling, IEEE rounding)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            if flat.numel() > _FINGERPRINT_SAMPLES:
                flat = flat[torch.arange(_FINGERPRINT_SAMPLES) * (flat.numel() - 1) // (_FINGERPRINT_SAMPLES - 1)]
            digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
            digest.update(flat.to(device="cpu", dtype=torch.float16).numpy().tobytes())
    return digest.digest()[:16]


class RateIndex(nn.Module):
    """Stands in for ``time_proj``: hands the rate index through unchanged."""

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps


class RateEmbedding(nn.Module):
    """Stands in for ``time_embedding``: one learned vector per rate point."""

    weight: nn.Parameter

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(table.clone())

    def forward(self, rate: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Rows at integer rate points; linear interpolation between them for intermediate levels.

        ``condition`` is diffusers' ``timestep_cond``, which the UNet passes to every time embedding; SD-Turbo
        has none."""
        position = rate.float().clamp(0, self.weight.shape[0] - 1)
        low = position.floor().long().clamp(max=max(self.weight.shape[0] - 2, 0))
        high = (low + 1).clamp(max=self.weight.shape[0] - 1)
        frac = (position - low).unsqueeze(-1).to(self.weight.dtype)
        rows = (1 - frac) * self.weight[low] + frac * self.weight[high]
        # diffusers hands the rate over in the dtype the UNet computes in, which the rows take; the table stays
        # float32 (the levels' positions, sixteenths of a rate step below 16, are exact in either half type)
        return rows.to(rate.dtype) if rate.is_floating_point() else rows


def _original_time_embedding(unet: UNet2DConditionModel, num_rates: int) -> torch.Tensor:
    timesteps = rate_timestep(torch.arange(num_rates), num_rates)
    with torch.no_grad():
        return unet.time_embedding(unet.time_proj(timesteps).to(unet.dtype)).detach()


def replace_time_embedding(unet: UNet2DConditionModel, num_rates: int) -> None:
    unet.time_embedding = RateEmbedding(_original_time_embedding(unet, num_rates))
    unet.time_proj = RateIndex()


def prune_cross_attention(unet: UNet2DConditionModel) -> int:
    """Remove ``attn2`` (and its ``layer_norm`` pre-norm) from every transformer block; returns the count."""
    removed = 0
    for module in unet.modules():
        if getattr(module, "attn2", None) is None:
            continue
        module.attn2 = None
        if getattr(module, "norm_type", None) == "layer_norm":
            module.norm2 = None  # only the cross-attention branch reads it for this norm type
        removed += 1
    return removed


def widen_conv_in(unet: UNet2DConditionModel, extra_channels: int) -> None:
    """Append zero-weight input channels to ``conv_in``: the output is unchanged until trained."""
    old = unet.conv_in
    new = nn.Conv2d(
        old.in_channels + extra_channels, old.out_channels, old.kernel_size, old.stride, old.padding
    )
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        assert new.bias is not None  # made with one
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)


def _drop_legacy_aliases(unet: UNet2DConditionModel) -> None:
    """Down/upsamplers register their conv twice (``Conv2d_0`` and ``conv``); peft would wrap only the
    first name while ``forward`` calls ``conv``. Keeping one name puts the adapter in the compute path."""
    for module in unet.modules():
        alias = module._modules.get("Conv2d_0")
        if alias is not None and alias is module._modules.get("conv"):
            del module._modules["Conv2d_0"]


def add_lora(unet: UNet2DConditionModel, rank: int) -> None:
    _drop_legacy_aliases(unet)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    inject_adapter_in_model(config, unet)


def _check_compatible(unet: UNet2DConditionModel, vae: AutoencoderKL, source: str) -> None:
    channels = vae.config.latent_channels
    if unet.config.in_channels != channels or unet.config.out_channels != channels:
        raise BaseWeightsError(
            f"{source}: UNet in/out channels {unet.config.in_channels}/{unet.config.out_channels} "
            f"do not match the VAE's {channels} latent channels"
        )
    if unet.config.addition_embed_type is not None or unet.class_embedding is not None:
        raise BaseWeightsError(f"{source}: a UNet with class or added (e.g. SDXL text-time) embeddings, "
                               "not SD-Turbo's; it is not supported")


class FullDecoder(nn.Module):
    """SD-Turbo one-step decoder with :class:`~aeic.codec.diffusion_decoder.NanoDecoder`'s interface."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        num_rates: int,
        lora_rank: int = 8,
        noise_channels: int = 4,
        source: str = "the base UNet and VAE",
    ) -> None:
        super().__init__()
        _check_compatible(unet, vae, source)
        self.source = source  # named when weights trained on other base weights are loaded
        self.register_buffer(FINGERPRINT, torch.tensor(list(base_fingerprint(unet, vae)), dtype=torch.uint8))
        self.latent_channels: int = vae.config.latent_channels
        self.num_rates = num_rates
        self.noise_channels = noise_channels
        self.noise = DeviceCopy(noise_map)  # the nano decoder's noise, kept on the device
        replace_time_embedding(unet, num_rates)
        prune_cross_attention(unet)
        widen_conv_in(unet, noise_channels)
        add_lora(unet, lora_rank)
        self.unet = unet
        self.vae = vae
        self._freeze()

    def _freeze(self) -> None:
        self.requires_grad_(False)
        for parameter in self.trainable_parameters():
            parameter.requires_grad_(True)

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Hold and run the UNet and the VAE in ``dtype`` (float16, bfloat16: half the weights' memory and, on a
        GPU, the activations' too), keeping the small rate table float32. Called once the weights are loaded,
        as the fingerprint was taken from them as stored. A VAE whose config sets ``force_upcast`` (diffusers'
        default: its activations may overflow float16 at high resolution) stays float32 under float16, as
        diffusers' pipelines run it; bfloat16 has float32's range and needs no upcast."""
        # nn.Module's cast: diffusers' own warns at every dtype cast that it "can lead to inconsistent results",
        # naming the modules that must stay float32 (none, for these two)
        nn.Module.to(self.unet, dtype)
        self.unet.time_embedding.float()
        upcast = dtype == torch.float16 and self.vae.config.force_upcast
        nn.Module.to(self.vae, torch.float32 if upcast else dtype)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """LoRA adapters, the rate embedding, conv_in and conv_out; everything else stays frozen."""
        for name, parameter in self.unet.named_parameters():
            if "lora_" in name or name.split(".")[0] in ("time_embedding", "conv_in", "conv_out"):
                yield parameter

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes, and the fingerprint of the base weights it changed: the rest reloads from
        the SD-Turbo folder (``load_state_dict(strict=False)``), which must hold those weights."""
        names = {id(p) for p in self.trainable_parameters()}
        state = {f"unet.{n}": p.detach() for n, p in self.unet.named_parameters() if id(p) in names}
        return {**state, FINGERPRINT: getattr(self, FINGERPRINT)}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Refuse, in one line naming the folder, weights trained on other base weights or another
        architecture (torch would list every tensor of another shape, or load them silently when the
        shapes agree). A whole state (a training checkpoint) brings its base weights along; weights
        saved before fingerprints existed load unchecked."""
        own = getattr(self, FINGERPRINT)
        theirs = state_dict.setdefault(prefix + FINGERPRINT, own)
        shapes = {prefix + name: tuple(value.shape) for name, value in self.state_dict().items()}
        whole = all(key in state_dict for key in shapes)
        if not whole and not torch.equal(theirs.double().cpu(), own.double().cpu()):
            raise BaseWeightsError(
                f"these decoder weights were trained on other base weights (fingerprint "
                f"{bytes(theirs.to(torch.uint8).tolist()).hex()}) than those in {self.source} "
                f"({bytes(own.tolist()).hex()}): point AEIC_SD_TURBO_DIR at the SD-Turbo folder they were trained on"
            )
        unfit = [key for key, value in state_dict.items() if key in shapes and tuple(value.shape) != shapes[key]]
        unfit += [key for key in state_dict if key.startswith(prefix + "unet.") and key not in shapes]
        if unfit:
            raise BaseWeightsError(
                f"{len(unfit)} decoder tensors (first {unfit[0]}) do not fit the UNet in {self.source}: it is "
                "another model (other widths, channels or attention layout) than the one they were trained on"
            )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def refine(
        self, unet_input: torch.Tensor, residual: torch.Tensor, rate_index: torch.Tensor
    ) -> torch.Tensor:
        """The decoder latent: residual + one pass of the pruned UNet at the rate's embedding."""
        shape = (1, self.noise_channels, *unet_input.shape[2:])
        noise = self.noise.like(shape, unet_input).expand(unet_input.shape[0], -1, -1, -1)
        sample = torch.cat([unet_input, noise], 1)
        rate = rate_index.to(unet_input.device).reshape(-1).expand(unet_input.shape[0])
        refined = self.unet(sample.to(self.unet.conv_in.weight.dtype), rate, encoder_hidden_states=None).sample
        return residual + refined.to(residual.dtype)

    def decode_pixels(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE decoder on a scaled latent; RGB in [0, 1]."""
        config = self.vae.config
        raw = latent / config.scaling_factor + (config.shift_factor or 0.0)
        pixels = self.vae.decode(raw.to(self.vae.dtype)).sample.to(latent.dtype)
        return ((pixels + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_latent(self, image: torch.Tensor) -> torch.Tensor:
        """The latent teacher: the VAE encoder's mode on an RGB image in [0, 1], scaled like SD."""
        config = self.vae.config
        raw = self.vae.encode((image * 2 - 1).to(self.vae.dtype)).latent_dist.mode().to(image.dtype)
        return (raw - (config.shift_factor or 0.0)) * config.scaling_factor


def load_full_decoder(
    folder: Path, num_rates: int, lora_rank: int = 8, noise_channels: int = 4
) -> FullDecoder:
    """Build the full-profile decoder from a local diffusers folder holding ``unet/`` and ``vae/``."""
    unet, vae = load_unet_and_vae(folder)
    return FullDecoder(unet, vae, num_rates, lora_rank, noise_channels, source=f"SD-Turbo folder {folder}")
