"""Full (SD-Turbo) profile: loading, pruning, widening and LoRA on a tiny random UNet and VAE in diffusers format."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from aeic.codec.diffusion_decoder import rate_timestep
from aeic.codec.full_profile import (
    FINGERPRINT,
    BaseWeightsError,
    FullDecoder,
    RateEmbedding,
    load_full_decoder,
)
from aeic.shared.model_package import ModelPackage
from diffusers import AutoencoderKL, UNet2DConditionModel
from sd_turbo_support import CROSS_DIM, write_other_base, write_tiny_sd_turbo

NUM_RATES = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_turbo(tmp_path_factory.mktemp("sd_turbo"))


@pytest.fixture()
def decoder(folder: Path) -> FullDecoder:
    return load_full_decoder(folder, NUM_RATES, lora_rank=4, noise_channels=4)


def _inputs(batch: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    unet_input = torch.randn(batch, 4, size, size, generator=generator)
    residual = torch.randn(batch, 4, size, size, generator=generator)
    return unet_input, residual, torch.arange(batch) % NUM_RATES


def test_cross_attention_and_time_embedding_are_gone(decoder: FullDecoder) -> None:
    names = [name for name, _ in decoder.unet.named_parameters()]
    assert not [n for n in names if "attn2" in n or ("transformer_blocks" in n and ".norm2." in n)]
    assert not [n for n, _ in decoder.unet.named_modules() if n.endswith("attn2")]
    assert isinstance(decoder.unet.time_embedding, RateEmbedding)
    assert decoder.unet.time_embedding.weight.shape == (NUM_RATES, 32 * 4)
    assert not [n for n in names if n.startswith("time_embedding.linear")]
    assert decoder.unet.conv_in.in_channels == 4 + 4
    assert decoder.unet.conv_out.out_channels == decoder.latent_channels == 4


def test_refine_starts_as_the_original_unet_without_cross_attention(
    folder: Path, decoder: FullDecoder
) -> None:
    """Zero-initialised noise weights and LoRA, rate table from the original time embedding: at start
    refine == residual + original UNet at the pseudo-timestep with every attn2 output projection zeroed."""
    original = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    blocks = [m for m in original.modules() if getattr(m, "attn2", None) is not None]
    assert len(blocks) == 4  # down 1, mid 1, up 2 (layers_per_block + 1)
    with torch.no_grad():
        for block in blocks:
            block.attn2.to_out[0].weight.zero_()
            block.attn2.to_out[0].bias.zero_()
    unet_input, residual, rate = _inputs()
    prompt = torch.randn(2, 7, CROSS_DIM)  # irrelevant once attn2 outputs zero
    with torch.no_grad():
        expected = residual + original(unet_input, rate_timestep(rate, NUM_RATES), prompt).sample
        got = decoder.refine(unet_input, residual, rate)
    assert got.shape == residual.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - residual).abs().max() > 1e-3  # the UNet does contribute


def test_decode_pixels_and_teacher_latent(decoder: FullDecoder) -> None:
    latent = torch.randn(2, 4, 4, 6)
    with torch.no_grad():
        pixels = decoder.decode_pixels(latent)
    assert pixels.shape == (2, 3, 32, 48)
    assert pixels.min() >= 0 and pixels.max() <= 1
    teacher = decoder.encode_latent(torch.rand(1, 3, 32, 48))
    assert teacher.shape == (1, 4, 4, 6) and not teacher.requires_grad


def test_only_adapters_embedding_and_convs_train(decoder: FullDecoder) -> None:
    trainable = {n for n, p in decoder.named_parameters() if p.requires_grad}
    allowed = ("unet.time_embedding.", "unet.conv_in.", "unet.conv_out.")
    assert all("lora_" in n or n.startswith(allowed) for n in trainable)
    assert any("lora_" in n for n in trainable) and any(n.startswith(allowed[0]) for n in trainable)
    assert not [n for n in trainable if n.startswith("vae.")]
    assert {id(p) for p in decoder.trainable_parameters()} == {
        id(p) for p in decoder.parameters() if p.requires_grad
    }
    assert set(decoder.trainable_state_dict()) == trainable | {FINGERPRINT}


def test_every_lora_adapter_is_in_the_compute_path(decoder: FullDecoder) -> None:
    """LoRA B starts at zero, so its gradient is non-zero exactly when the adapter runs in forward."""
    unet_input, residual, rate = _inputs()
    decoder.refine(unet_input, residual, rate).square().mean().backward()
    lora_b = {n: p for n, p in decoder.unet.named_parameters() if "lora_B" in n}
    assert any(".downsamplers." in n for n in lora_b) and any(".upsamplers." in n for n in lora_b)
    silent = [n for n, p in lora_b.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent
    assert decoder.unet.time_embedding.weight.grad[rate].abs().sum() > 0
    assert all(p.grad is None for p in decoder.vae.parameters())


def test_missing_folder_or_component_is_named(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_full_decoder(tmp_path / "absent", NUM_RATES)
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    for item in (folder / "unet").iterdir():
        (partial / "unet" / item.name).write_bytes(item.read_bytes())
    with pytest.raises(FileNotFoundError, match="vae"):
        load_full_decoder(partial, NUM_RATES)
    (partial / "vae").mkdir()
    (partial / "vae" / "config.json").write_bytes((folder / "vae" / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="weights"):
        load_full_decoder(partial, NUM_RATES)


def test_a_near_miss_of_the_folder_says_what_to_give(folder: Path, tmp_path: Path) -> None:
    """The UNet's own folder, a Hugging Face cache root, a single-file checkpoint: each named as such."""
    with pytest.raises(FileNotFoundError, match="it is one component: give the folder holding unet/ and vae/"):
        load_full_decoder(folder / "unet", NUM_RATES)
    (tmp_path / "models--stabilityai--sd-turbo" / "snapshots" / "abc").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="a Hugging Face cache: give .*snapshots/<revision>"):
        load_full_decoder(tmp_path / "models--stabilityai--sd-turbo", NUM_RATES)
    (tmp_path / "sd_turbo.safetensors").write_bytes(b"{}")
    with pytest.raises(FileNotFoundError, match="is a file \\(a single-file checkpoint\\?\\)"):
        load_full_decoder(tmp_path / "sd_turbo.safetensors", NUM_RATES)


def test_full_profile_package_round_trip(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full-profile model exports (trained weights only) and decodes through the SD-Turbo folder."""
    import numpy as np
    from aeic.codec.export import export_package
    from aeic.codec.model import AEICModel
    from aeic.codec.presets import preset
    from aeic.receiver.decoder import ReceiverCodec
    from aeic.sender.encoder import SenderCodec

    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
    torch.manual_seed(0)
    package = export_package(AEICModel(preset("tiny-full")), tmp_path / "full")
    rgb = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    stream = SenderCodec.from_package(package).encode(rgb, 3)
    receiver = ReceiverCodec.from_package(package, device="cpu")
    assert receiver.decode(stream).shape == rgb.shape
    assert not any(".vae." in key for key in receiver_keys(package))


def receiver_keys(package: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(package / "receiver.safetensors"), "pt") as handle:
        return list(handle.keys())


def test_full_profile_renders_large_pictures_in_tiles(folder: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The SD VAE tiles like the nano pixel decoders: the same picture within the tile; over it close, not
    equal (its group norms and attention see a tile, not the picture), the tiles blended across their halos."""
    import numpy as np
    from aeic.codec.export import export_package
    from aeic.codec.model import AEICModel
    from aeic.codec.presets import preset
    from aeic.receiver.decoder import ReceiverCodec
    from aeic.sender.encoder import SenderCodec

    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
    torch.manual_seed(0)
    package = export_package(AEICModel(preset("tiny-full")), tmp_path / "full")
    rows, cols = np.mgrid[0:256, 0:384]
    rgb = (np.stack([rows / 256, cols / 384, (rows + cols) % 32 / 32], -1) * 255).astype(np.uint8)
    stream = SenderCodec.from_package(package, downscale=1).encode(rgb, 2)
    whole = ReceiverCodec.from_package(package, device="cpu", tile_pixels=256 * 384).decode(stream)
    np.testing.assert_array_equal(ReceiverCodec.from_package(package, device="cpu").decode(stream), whole)
    tiled = ReceiverCodec.from_package(package, device="cpu", tile_pixels=96 * 96).decode(stream)
    difference = np.abs(tiled.astype(int) - whole.astype(int))
    assert tiled.shape == whole.shape == rgb.shape
    # random weights make its statistics unusually tile-dependent: 3.9 levels on average here, where
    # diffusers' own VAE tiling (tiled_decode, 16-pixel latent tiles) is 18 levels off on this VAE
    assert difference.mean() < 5


@pytest.fixture(scope="module")
def package(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-full package trained (at random) on ``folder``'s base weights."""
    from aeic.codec.export import export_package
    from aeic.codec.model import AEICModel
    from aeic.codec.presets import preset

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AEIC_SD_TURBO_DIR", str(folder))
        torch.manual_seed(0)
        return export_package(AEICModel(preset("tiny-full")), tmp_path_factory.mktemp("full") / "package")


@pytest.mark.parametrize("kind", ["reseeded", "sd15", "wider", "latent16"])
def test_a_package_on_other_base_weights_is_refused_naming_the_folder(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The package holds only what training changed. On another SD-Turbo revision (same shapes) it decoded
    without a word into a wrong picture; on another model it was torch's RuntimeError listing every tensor."""
    from aeic.receiver.decoder import ReceiverCodec

    other = write_other_base(tmp_path / kind, kind)
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(other))
    with pytest.raises(BaseWeightsError, match=f"trained on other base weights .* {re.escape(str(other))}"):
        ReceiverCodec.from_package(package, device="cpu")


def test_weights_from_before_fingerprints_load_on_their_base_and_name_another_architecture(
    folder: Path, tmp_path: Path
) -> None:
    state = {k: v for k, v in load_full_decoder(folder, NUM_RATES).trainable_state_dict().items() if k != FINGERPRINT}
    missing, unexpected = load_full_decoder(folder, NUM_RATES).load_state_dict(state, strict=False)
    assert FINGERPRINT not in missing and not unexpected
    wider = load_full_decoder(write_other_base(tmp_path / "wider", "wider"), NUM_RATES)
    with pytest.raises(BaseWeightsError, match="do not fit the UNet in SD-Turbo folder .*wider: it is another model"):
        wider.load_state_dict(state, strict=False)


def test_a_whole_checkpoint_brings_its_own_base_weights(folder: Path, tmp_path: Path) -> None:
    """A training checkpoint holds the base weights too: it resumes or exports on another folder as itself."""
    trained = load_full_decoder(folder, NUM_RATES)
    other = load_full_decoder(write_other_base(tmp_path / "reseeded", "reseeded"), NUM_RATES)
    assert not torch.equal(getattr(other, FINGERPRINT), getattr(trained, FINGERPRINT))
    other.load_state_dict(trained.state_dict())
    assert torch.equal(getattr(other, FINGERPRINT), getattr(trained, FINGERPRINT))
    torch.testing.assert_close(other.unet.conv_out.weight, trained.unet.conv_out.weight)


def test_an_sdxl_folder_is_refused_naming_it(tmp_path: Path) -> None:
    sdxl = write_other_base(tmp_path / "sdxl", "sdxl")
    with pytest.raises(BaseWeightsError, match=f"{re.escape(str(sdxl))}: a UNet with .*SDXL text-time"):
        load_full_decoder(sdxl, NUM_RATES)


def test_an_fp16_variant_or_bin_folder_is_the_same_base(
    folder: Path, package: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """SD-Turbo fetched with ``variant="fp16"`` holds only ``*.fp16.safetensors``: loading it failed with
    "no file named diffusion_pytorch_model.bin". A ``.bin`` folder loaded with two diffusers warnings."""
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    unet.save_pretrained(tmp_path / "bin" / "unet", safe_serialization=False)
    vae.save_pretrained(tmp_path / "bin" / "vae", safe_serialization=False)
    unet.half().save_pretrained(tmp_path / "fp16" / "unet", variant="fp16")
    vae.half().save_pretrained(tmp_path / "fp16" / "vae", variant="fp16")
    capfd.readouterr()
    state = {k.removeprefix("decoder."): v.float() for k, v in load_file(str(package / "receiver.safetensors")).items()
             if k.startswith("decoder.")}
    unet_input, residual, rate = _inputs()
    outputs = []
    for source in (folder, tmp_path / "fp16", tmp_path / "bin"):
        decoder = load_full_decoder(source, 3)
        decoder.load_state_dict(state, strict=False)
        assert next(decoder.unet.parameters()).dtype == torch.float32
        with torch.no_grad():
            outputs.append(decoder.refine(unet_input, residual, rate % 3))
    assert capfd.readouterr().err == ""
    torch.testing.assert_close(outputs[2], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-2, atol=1e-2)  # the base rounded to float16


def test_a_truncated_download_names_the_folder_and_component(folder: Path, tmp_path: Path) -> None:
    """diffusers' own line named neither the SD-Turbo folder nor that the file may be cut short."""
    import shutil

    copy = Path(shutil.copytree(folder, tmp_path / "sd-turbo"))
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=f"SD-Turbo folder {re.escape(str(copy))}: unet/ cannot be read, corrupt or truncated"):
        load_full_decoder(copy, NUM_RATES)


def test_the_configured_folder_may_start_with_a_tilde(folder: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No shell expands ``~`` in a compose file's or a systemd unit's environment: AEIC_SD_TURBO_DIR=~/sd-turbo
    was "SD-Turbo folder not found: ~/sd-turbo" (the receiver's own paths already expand it)."""
    import shutil

    from aeic.codec.sd_turbo_folder import configured_folder

    shutil.copytree(folder, tmp_path / "sd-turbo")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", "~/sd-turbo")
    assert configured_folder() == tmp_path / "sd-turbo"
    assert load_full_decoder(configured_folder(), NUM_RATES).source == f"SD-Turbo folder {tmp_path / 'sd-turbo'}"


def test_a_full_decoder_on_the_cpu_says_so_in_the_log(folder: Path, package: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """``device = "auto"`` without a GPU (a container started without one) decoded SD-Turbo on the CPU, for
    minutes a photo, past the decode deadline: the worker gave every batch up as hung and never said why."""
    import logging

    from aeic.codec.testing import make_tiny_package
    from aeic.receiver.decoder import ReceiverCodec

    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
    with caplog.at_level(logging.WARNING, logger="aeic.receiver.decoder"):
        ReceiverCodec.from_package(make_tiny_package(tmp_path / "nano"), device="cpu")
        assert not caplog.records  # the nano decoders are made for the CPU
        ReceiverCodec.from_package(package, device="cpu")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"model {ModelPackage.load(package).model_id.hex()} decodes with SD-Turbo on the CPU (device cpu): "
        "minutes a photo, past the decode deadline; give it a GPU (the receiver's device = \"cuda\", "
        "aeic decode --device cuda)")


def test_serve_refuses_a_missing_sd_turbo_folder_at_start(folder: Path, package: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """As a decoder device the machine lacks: one line and status 2 before the port is bound, where the
    receiver started, accepted uploads and left them waiting for a decoder that could never load."""
    from aeic.receiver import cli

    def bound(*args: object) -> None:
        raise AssertionError("the check passed: serve bound its port")

    monkeypatch.setattr(cli, "_listen", bound)
    main = cli.main
    monkeypatch.delenv("AEIC_SD_TURBO_DIR", raising=False)
    serve = ["serve", "--data", str(tmp_path / "data"), "--model", str(package), "--port", "0"]
    assert main(serve) == 2
    assert capsys.readouterr().err == (
        "aeic-receiver: invalid configuration: the full profile needs AEIC_SD_TURBO_DIR: a local SD-Turbo "
        "diffusers folder\n")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    for item in (folder / "unet").iterdir():
        (tmp_path / "partial" / "unet" / item.name).write_bytes(item.read_bytes())
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(tmp_path / "partial"))
    assert main(serve) == 2
    assert capsys.readouterr().err == (
        f"aeic-receiver: invalid configuration: SD-Turbo folder {tmp_path / 'partial'}: missing "
        f"{tmp_path / 'partial' / 'vae' / 'config.json'}\n")


def _trained(decoder: FullDecoder) -> FullDecoder:
    """``decoder`` with non-zero LoRA B, as after training (fresh adapters add nothing whatever their dtype)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return decoder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_holds_the_base_in_half_and_keeps_the_boundary_float32(folder: Path, dtype: torch.dtype) -> None:
    """The UNet (its adapters and convs too) computes in ``dtype``; the rate table stays float32, the VAE too
    under float16 (its config's force_upcast, diffusers' default); inputs and outputs stay float32 and close to
    the float32 decoder's. Measured on these inputs: bfloat16 0.018 (float16 0.0021) at most off a UNet output
    of up to 1.39 (with the adapters kept float32 no closer: 0.022, 0.0023); the bfloat16 VAE 0.43 levels off
    on average, 5.9 at most."""
    torch.manual_seed(0)  # peft draws LoRA A at random
    reference = _trained(load_full_decoder(folder, NUM_RATES, lora_rank=4)).eval()
    half = copy.deepcopy(reference)
    fingerprint = getattr(half, FINGERPRINT).clone()
    half.set_dtype(dtype)
    unet = {name: p.dtype for name, p in half.unet.named_parameters()}
    assert unet.pop("time_embedding.weight") == torch.float32
    assert set(unet.values()) == {dtype} and any("lora_" in name for name in unet)
    assert {p.dtype for p in half.vae.parameters()} == {torch.float32 if dtype == torch.float16 else dtype}
    assert torch.equal(getattr(half, FINGERPRINT), fingerprint)
    unet_input, residual, _ = _inputs()
    rate = torch.tensor([0.5, 2.0])  # between two rate points, and on one
    with torch.no_grad():
        expected, got = reference.refine(unet_input, residual, rate), half.refine(unet_input, residual, rate)
        pixels, half_pixels = reference.decode_pixels(expected), half.decode_pixels(expected)
    assert got.dtype == half_pixels.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0.04 if dtype == torch.bfloat16 else 0.005)
    levels = (half_pixels - pixels).abs() * 255
    assert levels.mean() < (1 if dtype == torch.bfloat16 else 1e-9) and levels.max() < 10


def test_a_vae_without_force_upcast_runs_in_float16(folder: Path) -> None:
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    vae.register_to_config(force_upcast=False)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    decoder = FullDecoder(unet, vae, NUM_RATES)
    decoder.set_dtype(torch.float16)
    assert {p.dtype for p in decoder.vae.parameters()} == {torch.float16}
    with torch.no_grad():
        assert decoder.decode_pixels(torch.randn(1, 4, 4, 4)).dtype == torch.float32


def test_the_fingerprint_is_taken_before_the_cast(folder: Path, package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """base_fingerprint rounds to float16: a float16 copy of the weights has the float32 weights' fingerprint,
    a bfloat16 one another (fewer mantissa bits). A package trained in float32 loads at every dtype."""
    from aeic.codec.full_profile import base_fingerprint
    from aeic.codec.sd_turbo_folder import load_unet_and_vae
    from aeic.receiver.decoder import ReceiverCodec

    unet, vae = load_unet_and_vae(folder)
    stored = base_fingerprint(unet, vae)
    assert base_fingerprint(unet.half(), vae.half()) == stored
    assert base_fingerprint(unet.to(torch.bfloat16), vae.to(torch.bfloat16)) != stored
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
    for dtype in ("bfloat16", "float32"):
        decoder = ReceiverCodec.from_package(package, device="cpu", dtype=dtype).model.decoder
        assert bytes(getattr(decoder, FINGERPRINT).tolist()) == stored


def test_a_bfloat16_receiver_decodes_close_to_float32(package: Path, folder: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the package: bitstream in, uint8 pixels out. Measured on these random weights: 1.6 and 2.0
    levels off on average at a trained rate point and between two (the picture's deviation is 53)."""
    import numpy as np
    from aeic.receiver.decoder import ReceiverCodec
    from aeic.sender.encoder import SenderCodec

    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
    rows, cols = np.mgrid[0:96, 0:128]
    rgb = (np.stack([rows / 96, cols / 128, (rows + cols) % 32 / 32], -1) * 255).astype(np.uint8)
    sender = SenderCodec.from_package(package, downscale=1)
    full, half = (ReceiverCodec.from_package(package, device="cpu", dtype=dtype) for dtype in ("float32", "bfloat16"))
    for level in (2, 5):
        stream = sender.encode(rgb, level)
        difference = np.abs(half.decode(stream).astype(int) - full.decode(stream).astype(int))
        assert 0 < difference.mean() < 3


def test_float16_on_the_cpu_is_refused_before_loading(package: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from aeic.receiver.decoder import ReceiverCodec

    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(tmp_path / "absent"))  # not read: refused before
    with pytest.raises(ValueError, match="^decoder_dtype float16 needs a GPU"):
        ReceiverCodec.from_package(package, device="cpu", dtype="float16")


def test_serve_refuses_float16_on_the_cpu_at_start(folder: Path, package: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Otherwise the receiver started and its decoder could never load (float16 and `device = "auto"` on a
    machine without a GPU, say); a value that is no dtype is refused as any other setting is."""
    from aeic.receiver import cli

    def bound(*args: object) -> None:
        raise AssertionError("the check passed: serve bound its port")

    monkeypatch.setattr(cli, "_listen", bound)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
    monkeypatch.setenv("AEIC_DECODER_DTYPE", "float16")
    serve = ["serve", "--data", str(tmp_path / "data"), "--model", str(package), "--port", "0"]
    assert cli.main(serve) == 2
    assert capsys.readouterr().err == (
        "aeic-receiver: invalid configuration: decoder_dtype float16 needs a GPU (on a CPU torch computes it far "
        "slower than float32): use bfloat16 or float32 there\n")
    monkeypatch.setenv("AEIC_DECODER_DTYPE", "half")
    assert cli.main(serve) == 2
    assert capsys.readouterr().err == ("aeic-receiver: invalid configuration: decoder_dtype: input should be "
                                       "'float32', 'float16' or 'bfloat16' (got 'half')\n")


def test_the_setting_reaches_the_decoder(folder: Path, package: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """decoder_dtype from the environment, through the app's registry, to the SD-Turbo weights it loads."""
    from aeic.receiver.api import create_app
    from aeic.receiver.decoder import ReceiverCodec
    from aeic.receiver.settings import load_settings
    from fastapi.testclient import TestClient

    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
    monkeypatch.setenv("AEIC_DECODER_DTYPE", "bfloat16")
    settings = load_settings(data_dir=tmp_path / "data", model_packages=[package], device="cpu", worker=False)
    with TestClient(create_app(settings)) as client:
        codec = client.app.state.receiver.registry.get(ModelPackage.load(package).model_id)
    assert isinstance(codec, ReceiverCodec)
    assert codec.model.decoder.unet.conv_in.weight.dtype == torch.bfloat16
    assert {p.dtype for p in codec.model.synthesis.parameters()} == {torch.float32}


def test_nano_packages_ignore_the_decoder_dtype(tmp_path: Path) -> None:
    """The setting concerns SD-Turbo's weights: a nano decoder, made for the CPU, stays float32 (float16 too)."""
    from aeic.codec.testing import make_tiny_package
    from aeic.receiver.decoder import ReceiverCodec

    package = make_tiny_package(tmp_path / "nano")
    for dtype in ("bfloat16", "float16"):
        model = ReceiverCodec.from_package(package, device="cpu", dtype=dtype).model
        assert {p.dtype for p in model.parameters()} == {torch.float32}
