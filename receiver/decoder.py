"""The receiver's codec: parse, entropy-decode (exact, torch backend), synthesise, one UNet pass, pixels.

Entropy decoding is per image (it is sequential by nature); synthesis, the UNet and the pixel
decoder run batched over images of the same padded size, on CUDA when present. The pixel decoder,
most of the memory, renders at most ``tile_pixels`` per pass: a larger picture in tiles, a larger
batch in parts (:mod:`aeic.codec.tiling`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from aeic.codec import taesd
from aeic.codec.diffusion_decoder import NanoDecoder
from aeic.codec.model import ModelConfig, build_decoder, receiver_state_dict
from aeic.codec.synthesis import SynthesisTransform
from aeic.codec.tiling import decode_in_tiles, tile_plan
from aeic.codec.torch_backend import TorchBackend
from aeic.shared import bitstream, decode_limits
from aeic.shared.entropy_model import FRACTION_BITS
from aeic.shared.model_package import ModelPackage, ModelPackageError
from aeic.shared.padding import ALIGNMENT, correct_colours, padded_size, upscale_image
from safetensors.torch import load_file
from torch import nn

_FINISH_ROWS = 256  # rows quantised at a time
# decoder_dtype: what a full-profile decoder's SD-Turbo UNet and VAE compute in
DECODER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
log = logging.getLogger(__name__)


class DecodeError(ValueError):
    """A well-formed container this receiver cannot decode (unknown model, bad rate level)."""


class UnknownModelError(DecodeError):
    pass


class ImageTooLargeError(DecodeError):
    """The header asks for more pixels than this decoder will hold in memory (refused before any decoding)."""


@dataclass
class Timings:
    entropy_ms: float = 0.0
    synthesis_ms: float = 0.0


@dataclass
class _Parsed:
    header: bitstream.Header
    payload: bytes
    timings: Timings = field(default_factory=Timings)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ReceiverModel(nn.Module):
    """Synthesis transform and one-step decoder, as stored in ``receiver.safetensors``."""

    pixel_decoder: nn.Module | None  # set in __init__ past nn.Module's registration

    def __init__(self, config: ModelConfig, pixel_decoder: nn.Module | None) -> None:
        super().__init__()
        self.config = config
        object.__setattr__(self, "pixel_decoder", pixel_decoder)  # frozen, external: not in state_dict
        self.synthesis = SynthesisTransform(
            config.analysis.latent_channels, config.decoder.latent_channels, config.synthesis_widths
        )
        self.decoder = build_decoder(config, pixel_decoder)

    @torch.no_grad()
    def forward(self, y_hat: torch.Tensor, positions: torch.Tensor,
                tile_pixels: int = decode_limits.TILE_PIXELS) -> torch.Tensor:
        """RGB in [0, 1] at 32x ``y_hat``'s size; the pixel decoder in passes of at most ``tile_pixels``
        output pixels (plus a halo): a batch that has more in parts, a picture that has more in tiles."""
        unet_input, residual = self.synthesis(y_hat)
        latent = self.decoder.refine(unet_input, residual, positions)
        pixel_decoder = getattr(self.decoder, "pixel_decoder", None)
        split, halo, exact = tile_plan(pixel_decoder)
        if not split:
            return decode_in_tiles(self.decoder.decode_pixels, latent, tile_pixels // 64, halo, exact)
        assert isinstance(pixel_decoder, nn.Sequential)  # tile_plan splits only a Sequential
        head, tail = pixel_decoder[:split], pixel_decoder[split:]  # the same layers, run in two calls
        return decode_in_tiles(lambda features: tail(features).clamp(0, 1), head(latent), tile_pixels // 64,
                               halo, exact)


def load_receiver_model(package: ModelPackage, dtype: str = "float32") -> ReceiverModel:
    """The package's receiver half on the CPU (float32), its pixel decoder loaded where it is external; a
    full-profile decoder's SD-Turbo UNet and VAE in ``dtype`` (the nano decoders stay float32)."""
    try:
        config = ModelConfig.from_dict(package.manifest["config"])
    except (KeyError, TypeError) as exc:  # a package another version exported: one line, not a TypeError
        raise ModelPackageError(f"{package.path}: its model configuration is not this version's ({exc}); was it "
                                "exported by another version of aeic?") from None
    pixel_decoder = taesd.load_taef2("decoder") if config.pixel_decoder == "taef2" else None
    model = ReceiverModel(config, pixel_decoder)
    state = {k: v.float() for k, v in load_file(str(package.file("receiver.safetensors"))).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected = set(receiver_state_dict(model.synthesis, model.decoder))
    if unexpected or expected & set(missing):
        raise ModelPackageError(f"{package.path}: receiver weights do not match the model ({len(unexpected)} unexpected)")
    if config.profile == "full":
        from aeic.codec.full_profile import FullDecoder  # diffusers: only where SD-Turbo is there to load

        assert isinstance(model.decoder, FullDecoder)
        model.decoder.set_dtype(DECODER_DTYPES[dtype])
    return model


def check_decoder_dtype(dtype: str, device: torch.device) -> None:
    """Refuse a dtype that is not one, and float16 on the CPU: torch computes SD-Turbo's UNet over 20 times
    slower in it there than in float32 (docs/receiver.md)."""
    if dtype not in DECODER_DTYPES:
        raise ValueError(f"decoder_dtype {dtype!r} is none of {', '.join(DECODER_DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise ValueError("decoder_dtype float16 needs a GPU (on a CPU torch computes it far slower than "
                         "float32): use bfloat16 or float32 there")


class ReceiverCodec:
    """Decodes AEIC bitstreams made with one model package."""

    def __init__(self, package: ModelPackage, device: str = "auto",
                 tile_pixels: int = decode_limits.TILE_PIXELS, dtype: str = "float32") -> None:
        self.package = package
        self.max_coded_pixels = decode_limits.MAX_CODED_PIXELS  # per synthesis pass: a batch is split to fit
        self.tile_pixels = tile_pixels  # padded coded pixels the pixel decoder renders in one pass
        self.device = resolve_device(device)
        config = package.manifest.get("config")
        if isinstance(config, dict) and config.get("profile") == "full":  # before the minute SD-Turbo takes to load
            check_decoder_dtype(dtype, self.device)
        self.model = load_receiver_model(package, dtype).to(self.device).eval()
        decoder = self.model.decoder  # the full profile's FullDecoder renders with its VAE, never TAEF2
        if self.model.pixel_decoder is not None and isinstance(decoder, NanoDecoder):
            decoder.attach_pixel_decoder(self.model.pixel_decoder.to(self.device))
        if self.model.config.profile == "full" and self.device.type == "cpu":  # "auto" without a GPU, say
            log.warning("model %s decodes with SD-Turbo on the CPU (device %s): minutes a photo, past the decode "
                        'deadline; give it a GPU (the receiver\'s device = "cuda", aeic decode --device cuda)',
                        package.model_id.hex(), device)
        self.backend = TorchBackend(self.device)
        self.channels = self.model.config.analysis.latent_channels
        self.last_timings: list[Timings] = []

    @classmethod
    def from_package(cls, path: Path | str | None = None, device: str = "auto",
                     tile_pixels: int = decode_limits.TILE_PIXELS, dtype: str = "float32") -> ReceiverCodec:
        return cls(ModelPackage.load(path), device, tile_pixels, dtype)

    @property
    def model_id(self) -> bytes:
        return self.package.model_id

    def parse(self, data: bytes) -> _Parsed:
        """Validate the container and that this model can decode it (no decoding yet)."""
        stream = bitstream.unpack(data)
        header = stream.header
        if header.model_id != self.model_id:
            raise UnknownModelError(
                f"bitstream made with model {header.model_id.hex()}, this receiver has {self.model_id.hex()}"
            )
        if header.rate_index >= self.package.num_levels:
            raise DecodeError(f"rate level {header.rate_index} outside 0..{self.package.num_levels - 1}")
        reason = decode_limits.header_oversize_reason(header)
        if reason is not None:  # refused before entropy decoding: the header alone sets the cost
            raise ImageTooLargeError(f"too large to decode: {reason}")
        return _Parsed(header, stream.payload)

    def _latent(self, parsed: _Parsed) -> torch.Tensor:
        header = parsed.header
        height, width = padded_size(*header.coded_size, ALIGNMENT)
        shape = (self.channels, height // 32, width // 32)
        start = time.perf_counter()
        fixed = self.package.entropy_model.decode(parsed.payload, shape, self.backend)
        parsed.timings.entropy_ms = (time.perf_counter() - start) * 1e3
        gain = self.package.level_gains[header.rate_index][:, None, None]
        return torch.from_numpy((fixed / (1 << FRACTION_BITS) / gain).astype(np.float32))

    def decode(self, data: bytes) -> np.ndarray:
        """HxWx3 uint8 at the true size."""
        return self.decode_batch([data])[0]

    def decode_batch(self, streams: list[bytes]) -> list[np.ndarray]:
        """Decode several streams; same-size images share one synthesis/UNet/pixel batch. The first failure
        raises (after the others are decoded: `decode_each` says which failed)."""
        outcomes = self.decode_each(streams)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return outcomes  # type: ignore[return-value]  # no exception among them

    def decode_each(self, streams: list[bytes]) -> list[np.ndarray | Exception]:
        """Each stream's image, or the exception that stream raised: one bad stream of a batch fails alone and
        the others are entropy-decoded once (a batch that failed as a whole was decoded again one by one, its
        good images' entropy decoding included). A failed synthesis pass is retried one image at a time from
        the latents already decoded, so a pass too large for the device fails no image that fits alone."""
        outcomes: list[np.ndarray | Exception | None] = [None] * len(streams)
        decoded: dict[int, tuple[_Parsed, torch.Tensor]] = {}
        timings = [Timings() for _ in streams]
        for i, data in enumerate(streams):
            try:
                parsed = self.parse(data)
                parsed.timings = timings[i]
                decoded[i] = parsed, self._latent(parsed)
            except Exception as exc:  # noqa: BLE001 - this stream's failure, reported as its outcome
                outcomes[i] = exc
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, latent) in decoded.items():
            groups.setdefault(tuple(latent.shape), []).append(i)
        for same_size in groups.values():
            coded_height, coded_width = padded_size(*decoded[same_size[0]][0].header.coded_size, ALIGNMENT)
            # synthesis memory grows with the batch: split it to stay within max_coded_pixels per pass
            per_pass = max(1, self.max_coded_pixels // (coded_height * coded_width))
            for first in range(0, len(same_size), per_pass):
                members = same_size[first : first + per_pass]
                try:
                    self._synthesise(members, decoded, outcomes)
                except Exception as exc:  # noqa: BLE001 - alone, each image fails (or not) by itself
                    for i in members:
                        try:
                            if len(members) > 1:
                                self._synthesise([i], decoded, outcomes)
                            else:
                                outcomes[i] = exc
                        except Exception as alone:  # noqa: BLE001
                            outcomes[i] = alone
        self.last_timings = timings
        return outcomes  # type: ignore[return-value]  # every stream has an image or an exception

    def _synthesise(self, members: list[int], decoded: dict[int, tuple[_Parsed, torch.Tensor]],
                    results: list[np.ndarray | Exception | None]) -> None:
        """One synthesis/UNet/pixel pass over ``members`` (same latent size), their images into ``results``."""
        start = time.perf_counter()
        batch = torch.stack([decoded[i][1] for i in members]).to(self.device)
        positions = torch.tensor([self.package.level_position(decoded[i][0].header.rate_index) for i in members])
        pixels = self.model(batch, positions.to(self.device), self.tile_pixels).cpu()
        elapsed = (time.perf_counter() - start) * 1e3 / len(members)
        for row, i in enumerate(members):
            parsed = decoded[i][0]
            parsed.timings.synthesis_ms = elapsed
            results[i] = self._finish(pixels[row], parsed.header)

    @staticmethod
    def _finish(pixels: torch.Tensor, header: bitstream.Header) -> np.ndarray:
        """Crop, quantise (in bands of rows: no float copy of a whole large picture), scale back, colours,
        grey where the source was (the model decodes colour: a grey photo would come back tinted)."""
        coded_height, coded_width = header.coded_size
        floats = pixels[:, :coded_height, :coded_width].permute(1, 2, 0).numpy()
        rgb = np.empty((coded_height, coded_width, 3), dtype=np.uint8)
        for top in range(0, coded_height, _FINISH_ROWS):  # the assignment truncates, as astype(uint8) does
            rgb[top : top + _FINISH_ROWS] = (floats[top : top + _FINISH_ROWS] * 255 + 0.5).clip(0, 255)
        rgb = upscale_image(rgb, header.downscale, header.height, header.width)
        rgb = correct_colours(rgb, header.colour_stats) if header.colour_stats else rgb
        return to_grey(rgb) if header.grey else rgb


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """The luma of ``rgb`` (ITU-R BT.601 weights, as Pillow's ``convert("L")``) in all three channels, in place.

    Integer weights per band of rows: no float copy of a whole large picture."""
    for top in range(0, rgb.shape[0], _FINISH_ROWS):
        band = rgb[top : top + _FINISH_ROWS].astype(np.uint32)
        luma = (band[..., 0] * 299 + band[..., 1] * 587 + band[..., 2] * 114 + 500) // 1000
        rgb[top : top + _FINISH_ROWS] = luma.astype(np.uint8)[..., None]
    return rgb
