"""Tiled pixel decoding: exact for a local pixel decoder, unchanged below the tile size, configurable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from aeic.codec import cli as codec_cli
from aeic.codec import taesd
from aeic.codec.diffusion_decoder import InternalPixelDecoder
from aeic.codec.testing import make_tiny_package
from aeic.codec.tiling import APPROXIMATE_HALO, decode_in_tiles, receptive_radius, tile_plan
from aeic.receiver.decoder import ReceiverCodec
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.sender.encoder import SenderCodec
from aeic.shared import decode_limits
from torch import nn


def _photo(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows / height, cols / width, ((rows + cols) % 48) / 48], -1) * 200
    return np.clip(base + rng.normal(0, 14, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def stream(package: Path) -> bytes:
    """A 384x256 picture coded whole: 48x32 decoder latent pixels."""
    return SenderCodec.from_package(package, downscale=1).encode(_photo(256, 384), 1)


def test_receptive_radius_of_the_internal_pixel_decoder_and_taef2() -> None:
    # 3x3 convolutions at 1/8, 1/8, 1/4, 1/2 and 1/1: 1 + 1 + 1/2 + 1/4 + 1/8 latent pixels
    assert receptive_radius(InternalPixelDecoder(8, 4)) == 3
    assert receptive_radius(nn.Sequential(nn.Conv2d(1, 1, 5, padding=2), nn.Upsample(scale_factor=2),
                                          nn.Conv2d(1, 1, 3, padding=1))) == 3  # 2 + 1/2, rounded up
    assert receptive_radius(taesd.build_decoder()) is None  # group norms: not local
    assert tile_plan(InternalPixelDecoder(8, 4)) == (0, 3, True)
    assert tile_plan(None) == (0, APPROXIMATE_HALO, False)
    # TAEF2: clamp, conv, ReLU and the three pooled blocks at 1/8 run whole; the rest is local: at 1/4 a
    # conv and three blocks of three 3x3 convs (10/2), at 1/2 the same (10/4), at 1/1 a conv, a block and
    # the last conv (5/8): 8.125 latent pixels, rounded up
    assert tile_plan(taesd.build_decoder()) == (6, 9, True)
    assert tile_plan(nn.Sequential(nn.GroupNorm(1, 4), nn.Upsample(scale_factor=2), nn.GroupNorm(1, 4))) == (
        0, APPROXIMATE_HALO, False)  # not local after a resolution change: blended


def test_taef2_tiles_after_its_whole_head_equal_the_whole_decode() -> None:
    """TAEF2's group norms read the whole picture at 1/8: tiling the whole decoder (blended) was 27.6 dB
    from the whole decode with real weights; its head whole and its local tail in tiles give the same."""
    torch.manual_seed(2)
    decoder = taesd.build_decoder().eval()
    latent = torch.randn(1, taesd.LATENT_CHANNELS, 22, 30)
    split, halo, exact = tile_plan(decoder)
    head, tail = decoder[:split], decoder[split:]
    with torch.no_grad():
        whole = decoder(latent)
        tiled = decode_in_tiles(tail, head(latent), 100, halo, exact)
        blended_whole_decoder = decode_in_tiles(decoder, latent, 100, APPROXIMATE_HALO, exact=False)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    assert (blended_whole_decoder - whole).abs().max() > 1e-3  # what the split avoids


@pytest.mark.parametrize("max_pixels", [1, 30, 64, 200])
def test_tiles_with_the_receptive_halo_equal_the_whole_decode(max_pixels: int) -> None:
    torch.manual_seed(0)
    decoder = InternalPixelDecoder(8, 8).eval()
    latent = torch.randn(2, 8, 21, 27)
    with torch.no_grad():
        whole = decoder(latent)
        tiled = decode_in_tiles(decoder, latent, max_pixels, 3)
        no_halo = decode_in_tiles(decoder, latent, max_pixels, 0)
    assert tiled.shape == whole.shape == (2, 3, 168, 216)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)
    assert (no_halo - whole).abs().max() > 1e-3  # the halo is what makes the seams vanish


def test_blended_tiles_of_a_local_decoder_are_close_and_weigh_to_one() -> None:
    """Blending (for decoders that are not local) keeps a constant picture constant and, given a halo
    as wide as the receptive radius, a local decoder's picture nearly unchanged."""
    torch.manual_seed(1)
    decoder = InternalPixelDecoder(8, 8).eval()
    latent = torch.randn(1, 8, 20, 26)
    with torch.no_grad():
        whole = decoder(latent)
        blended = decode_in_tiles(decoder, latent, 49, 4, exact=False)
    assert (blended - whole).abs().max() < 0.05 * whole.abs().max()
    ones = decode_in_tiles(lambda x: torch.ones(1, 3, 8 * x.shape[2], 8 * x.shape[3]), latent, 30, 5, exact=False)
    torch.testing.assert_close(ones, torch.ones(1, 3, 160, 208))


def _recording_decoder(calls: list[tuple[int, ...]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A local 8x decoder (nearest upsampling of three channels) that records each latent shape it is given."""
    def decode(latent: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(latent.shape))
        return latent[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3)

    return decode


def test_a_picture_within_the_tile_is_decoded_by_one_call() -> None:
    calls: list[tuple[int, ...]] = []
    decode = _recording_decoder(calls)
    latent = torch.randn(1, 4, 10, 12)
    assert decode_in_tiles(decode, latent, 120, 3) is not None and calls == [(1, 4, 10, 12)]
    calls.clear()
    decode_in_tiles(decode, latent, 119, 3)  # tiles of at most 10x10: two of 10x6, each with a 3-pixel halo inside
    assert calls == [(1, 4, 10, 9), (1, 4, 10, 9)]


def test_a_batch_is_split_into_passes_within_the_bound() -> None:
    calls: list[tuple[int, ...]] = []
    decode = _recording_decoder(calls)
    latent = torch.randn(5, 4, 4, 4)
    np.testing.assert_array_equal(decode_in_tiles(decode, latent, 40, 3).numpy(), decode(latent).numpy())
    assert [shape[0] for shape in calls[:-1]] == [2, 2, 1]  # two 4x4 pictures per 40-pixel pass
    calls.clear()
    decode_in_tiles(decode, latent[:2], 8, 0)  # over the bound: each picture alone, in 2x2 tiles
    assert calls == [(1, 4, 2, 2)] * 8


def test_the_default_tile_keeps_a_1080p_photo_coded_whole_in_one_pass() -> None:
    assert decode_limits.padded_coded_pixels(1080, 1920, 1) <= decode_limits.TILE_PIXELS
    assert decode_limits.padded_coded_pixels(1536, 1536, 1) <= decode_limits.TILE_PIXELS
    assert decode_limits.MAX_CODED_PIXELS > decode_limits.TILE_PIXELS


def test_receiver_decodes_the_same_bytes_tiled_and_whole(package: Path, stream: bytes) -> None:
    whole = ReceiverCodec.from_package(package, device="cpu", tile_pixels=384 * 256).decode(stream)
    default = ReceiverCodec.from_package(package, device="cpu").decode(stream)
    np.testing.assert_array_equal(default, whole)  # under the default tile: today's decode
    for tile in (128 * 128, 100 * 100, 64 * 64):  # 2x3, 3x4 and 4x6 tiles
        tiled = ReceiverCodec.from_package(package, device="cpu", tile_pixels=tile).decode(stream)
        assert tiled.shape == whole.shape == (256, 384, 3)
        assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1  # float rounding at most, no seams


def test_a_batch_decodes_the_same_bytes_split_into_passes(package: Path) -> None:
    sender = SenderCodec.from_package(package, downscale=1)
    streams = [sender.encode(np.roll(_photo(128, 192), 17 * seed, axis=1), seed % 3) for seed in range(3)]
    together = ReceiverCodec.from_package(package, device="cpu").decode_batch(streams)
    one_per_pass = ReceiverCodec.from_package(package, device="cpu", tile_pixels=128 * 192).decode_batch(streams)
    assert all(np.array_equal(a, b) for a, b in zip(together, one_per_pass, strict=True))


def test_the_setting_reaches_the_codec(package: Path) -> None:
    settings = ReceiverSettings(decode_tile_pixels=512 * 512)
    assert ReceiverSettings().decode_tile_pixels == decode_limits.TILE_PIXELS
    registry = CodecRegistry.from_packages([package], "cpu", settings.decode_tile_pixels)
    (model_id,) = registry.model_ids()
    codec = registry.get(model_id)
    assert isinstance(codec, ReceiverCodec) and codec.tile_pixels == 512 * 512


def test_aeic_decode_takes_the_tile_size(package: Path, stream: bytes, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = ReceiverCodec.from_package

    def recording(path: Path | str | None = None, device: str = "auto",
                  tile_pixels: int = decode_limits.TILE_PIXELS, dtype: str = "float32") -> ReceiverCodec:
        seen.append(tile_pixels)
        return original(path, device, tile_pixels, dtype)

    monkeypatch.setattr(ReceiverCodec, "from_package", recording)
    (tmp_path / "a.aeic").write_bytes(stream)
    args = ["decode", str(tmp_path / "a.aeic"), "--model", str(package), "--device", "cpu"]
    assert codec_cli.main([*args, "--tile-pixels", "16384"]) == 0
    assert codec_cli.main(args) == 0
    assert seen == [16384, decode_limits.TILE_PIXELS]
