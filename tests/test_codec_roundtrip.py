"""Sender path (ONNX + numpy) against the torch model, and encode -> decode of real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from aeic.codec.export import export_package
from aeic.codec.model import AEICModel
from aeic.codec.presets import preset
from aeic.codec.testing import make_tiny_model
from aeic.receiver.decoder import DecodeError, ImageTooLargeError, ReceiverCodec, UnknownModelError
from aeic.sender import coding_scale
from aeic.sender.encoder import BudgetError, SenderCodec
from aeic.shared import bitstream, decode_limits
from aeic.shared.entropy_coding import EntropyDecodeError
from aeic.shared.model_package import ModelPackage, ModelPackageError, compute_model_id, file_digest
from aeic.shared.padding import correct_colours, downscale_image, pad_to_multiple, padded_size, upscale_image
from PIL import Image


@pytest.fixture(scope="module", params=["tiny-se", "tiny-me"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[AEICModel, Path]:
    model = make_tiny_model(request.param)
    folder = export_package(model, tmp_path_factory.mktemp(request.param))
    return model, folder


@pytest.fixture(scope="module")
def codecs(exported: tuple[AEICModel, Path]) -> tuple[SenderCodec, ReceiverCodec]:
    _, folder = exported
    return SenderCodec.from_package(folder), ReceiverCodec.from_package(folder, device="cpu")


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like test image (gradients, edges and noise)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows / height, cols / width, ((rows + cols) % 64) / 64], -1) * 200
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def test_onnx_sender_and_torch_model_produce_identical_bitstreams(
    exported: tuple[AEICModel, Path], codecs: tuple[SenderCodec, ReceiverCodec]
) -> None:
    model, _ = exported
    sender, _ = codecs
    integer = model.entropy.export()
    for level in (0, sender.num_levels // 2, sender.num_levels - 1):
        rgb = _photo(130, 250, level)
        image = torch.from_numpy(pad_to_multiple(rgb, 128).astype(np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            y = model.analysis(image)
            gain = torch.from_numpy(sender.package.level_gains[level])[None, :, None, None]
            scaled = y * gain
            z = model.hyper_analysis(scaled)
        torch_payload, _ = integer.encode(scaled[0].numpy(), z[0].numpy())
        onnx_stream = bitstream.unpack(sender.encode(rgb, level))
        assert onnx_stream.payload == torch_payload


@pytest.mark.parametrize("name", ["nano-se", "nano-me"])
def test_onnx_sender_matches_torch_at_the_real_se_and_me_widths(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AEICModel(preset(name)).eval()
    with torch.no_grad():  # gains that make the random model code real symbols
        model.log_gains.copy_(torch.linspace(1.0, 4.0, model.config.num_rates)[:, None].expand_as(model.log_gains))
    sender = SenderCodec.from_package(export_package(model, tmp_path / name), downscale=1)
    rgb = _photo(128, 256, 3)
    image = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]
    level = sender.num_levels - 1
    with torch.no_grad():
        scaled = model.analysis(image) * torch.from_numpy(sender.package.level_gains[level])[None, :, None, None]
        torch_payload, _ = model.entropy.export().encode(scaled[0].numpy(), model.hyper_analysis(scaled)[0].numpy())
    assert len(torch_payload) > 10
    assert bitstream.unpack(sender.encode(rgb, level)).payload == torch_payload


@pytest.mark.parametrize("size", [(37, 53), (128, 128), (301, 163)])
def test_encode_decode_restores_true_size(
    codecs: tuple[SenderCodec, ReceiverCodec], size: tuple[int, int]
) -> None:
    sender, receiver = codecs
    rgb = _photo(*size)
    data = sender.encode(rgb, sender.num_levels - 1)
    header = bitstream.peek_header(data)
    assert (header.height, header.width) == size
    out = receiver.decode(data)
    assert out.shape == (*size, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("downscale", [2, 4])
def test_coding_downscale_codes_fewer_pixels_and_restores_true_size(
    exported: tuple[AEICModel, Path], downscale: int
) -> None:
    _, folder = exported
    sender = SenderCodec.from_package(folder, downscale=downscale)
    rgb = _photo(301, 163)
    analysed = sender.analyse(rgb)
    coded = padded_size(-(-301 // downscale), -(-163 // downscale), 128)
    assert analysed.latent.shape[2:] == (coded[0] // 32, coded[1] // 32)
    data = sender.encode_analysed(analysed, sender.num_levels - 1)
    header = bitstream.peek_header(data)
    assert (header.height, header.width, header.downscale) == (301, 163, downscale)
    out = ReceiverCodec.from_package(folder, device="cpu").decode(data)
    assert out.shape == rgb.shape and out.dtype == np.uint8


def test_downscale_and_upscale_are_inverse_on_smooth_images() -> None:
    rows, cols = np.mgrid[0:61, 0:83]
    smooth = np.stack([rows * 4, cols * 3, rows + cols], -1).astype(np.uint8)
    small = downscale_image(smooth, 2)
    assert small.shape == (31, 42, 3)
    assert small[0, 0, 0] == round(np.mean(smooth[:2, :2, 0]))
    back = upscale_image(small, 2, 61, 83).astype(float)
    assert back.shape == smooth.shape
    assert np.abs(back[2:-2, 2:-2] - smooth[2:-2, 2:-2]).mean() < 1.5
    with pytest.raises(ValueError, match="downscale must be 'auto' or one of"):
        SenderCodec.from_package(None, downscale=3)


@pytest.mark.parametrize("seed", range(3))
def test_colour_correction_by_lookup_table_equals_the_per_pixel_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rgb = np.clip(rng.normal(rng.uniform(40, 200), rng.uniform(5, 60), (67, 91, 3)), 0, 255).astype(np.uint8)
    stats = tuple(int(v) for v in rng.integers(0, 256, 6))
    pixels = rgb.reshape(-1, 3).astype(np.float64)
    means, stds = pixels.mean(0), pixels.std(0)
    gain = np.clip(np.asarray(stats[3:]) / np.maximum(stds, 1e-6), 0.8, 1.25)
    expected = np.clip(np.round((pixels - means) * gain + stats[:3]), 0, 255).astype(np.uint8).reshape(rgb.shape)
    assert np.array_equal(correct_colours(rgb, stats), expected)


def test_auto_downscale_for_a_rate_codes_large_images_near_the_training_scale(
    exported: tuple[AEICModel, Path]
) -> None:
    sizes = ((512, 768), (1080, 1920), (2160, 3840), (1023, 4000))
    assert [coding_scale.downscale_for_rate(h, w) for h, w in sizes] == [1, 2, 4, 1]
    _, folder = exported
    rgb = _photo(1030, 1100)
    data = SenderCodec.from_package(folder).encode(rgb, 0)
    assert bitstream.peek_header(data).downscale == 2
    assert SenderCodec.from_package(folder, downscale=1).analyse(rgb).downscale == 1


def test_auto_downscale_for_a_budget_codes_the_largest_picture_the_budget_can_feed(
    exported: tuple[AEICModel, Path]
) -> None:
    def bytes_at(bpp: float, height: int, width: int) -> int:
        return int(bpp * height * width / 8)

    assert coding_scale.downscale_for_budget(512, 768, bytes_at(0.005, 512, 768)) == 2
    assert coding_scale.downscale_for_budget(512, 768, bytes_at(0.01, 512, 768)) == 1
    assert coding_scale.downscale_for_budget(1080, 1920, bytes_at(0.002, 1080, 1920)) == 4
    assert coding_scale.downscale_for_budget(300, 900, bytes_at(0.001, 300, 900)) == 1  # half would be too small
    _, folder = exported
    rgb = _photo(1030, 1100)
    sender = SenderCodec.from_package(folder)
    data, level = sender.encode_to_budget(rgb, bytes_at(0.005, 1030, 1100))
    assert bitstream.peek_header(data).downscale == 2
    assert (data, level) == SenderCodec.from_package(folder, downscale=2).encode_to_budget(rgb, bytes_at(0.005, 1030, 1100))
    data, _ = sender.encode_to_budget(rgb, bytes_at(0.05, 1030, 1100))
    assert bitstream.peek_header(data).downscale == 1


def test_the_sender_codes_no_picture_a_receiver_would_refuse(
    exported: tuple[AEICModel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """48 MP is never coded whole by auto; asked for explicitly, it fails before any analysis."""
    assert coding_scale.downscale_for_budget(6000, 8000, 300_000) == 2  # whole would be 48 M coded pixels
    assert coding_scale.budget_downscales(6000, 8000, 300_000) == [2, 4]
    monkeypatch.setattr(decode_limits, "MAX_CODED_PIXELS", 256 * 256)
    _, folder = exported
    rgb = _photo(300, 400)
    assert SenderCodec.from_package(folder).analyse(rgb).downscale == 2
    with pytest.raises(ValueError, match="coded pixels"):
        SenderCodec.from_package(folder, downscale=1).analyse(rgb)


def test_real_photo_round_trip(codecs: tuple[SenderCodec, ReceiverCodec], tmp_path: Path) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    sender, receiver = codecs
    rgb = skimage_data.astronaut()[:333, :257]
    data = sender.encode(rgb, 2)
    assert receiver.decode(data).shape == rgb.shape
    assert len(data) * 8 / (rgb.shape[0] * rgb.shape[1]) < 1.0


def test_batched_decode_equals_single_decodes(codecs: tuple[SenderCodec, ReceiverCodec]) -> None:
    sender, receiver = codecs
    streams = [sender.encode(_photo(96, 160, seed), seed % sender.num_levels) for seed in range(3)]
    batched = receiver.decode_batch(streams)
    for stream, image in zip(streams, batched, strict=True):
        np.testing.assert_allclose(image.astype(int), receiver.decode(stream).astype(int), atol=1)


def test_byte_budget_is_respected(codecs: tuple[SenderCodec, ReceiverCodec]) -> None:
    sender, _ = codecs
    rgb = _photo(200, 300)
    sizes = [len(sender.encode(rgb, level)) for level in range(sender.num_levels)]
    budget = sizes[len(sizes) // 2]
    data, level = sender.encode_to_budget(rgb, budget)
    assert len(data) <= budget
    assert all(size > budget for size in sizes[level + 1 :]) or sizes[level] == max(s for s in sizes if s <= budget)
    with pytest.raises(BudgetError, match="lowest rate"):
        sender.encode_to_budget(rgb, bitstream.HEADER_SIZE)


def test_a_budget_under_every_level_at_its_scale_falls_back_to_a_smaller_one(
        codecs: tuple[SenderCodec, ReceiverCodec]) -> None:
    """With the automatic downscale, a budget that even the lowest level overflows at the preferred scale is
    met at 1/2 or 1/4 (a 333x257 photo at 0.01 bpp needed 126 bytes whole, 99 at half size)."""
    sender, _ = codecs
    rgb = _photo(200, 300)
    smallest = min(len(sender.encode(rgb, level)) for level in range(sender.num_levels))
    data, _ = sender.encode_to_budget(rgb, smallest - 1)
    assert len(data) <= smallest - 1
    assert bitstream.peek_header(data).downscale > 1


def test_a_budget_level_0_overflows_is_met_by_a_higher_low_level(
    codecs: tuple[SenderCodec, ReceiverCodec], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below the second trained rate point sizes are not monotone in the level (measured on photos:
    104, 102, 101, ... bytes at levels 0, 1, 2): a 101-byte budget must get level 2, not an error."""
    sender, _ = codecs
    sizes = [104, 102, 101, 103, 105] + list(range(110, 110 + 4 * (sender.num_levels - 5), 4))
    monkeypatch.setattr(sender, "encode_analysed", lambda analysed, level: bytes(sizes[level]))
    assert sender.encode_to_budget(_photo(64, 64), 101) == (bytes(101), 2)
    assert sender.encode_to_budget(_photo(64, 64), 103)[1] == 3
    with pytest.raises(BudgetError, match="lowest rate needs 101 bytes"):
        sender.encode_to_budget(_photo(64, 64), 100)


def test_receiver_refuses_other_models_and_bad_levels(codecs: tuple[SenderCodec, ReceiverCodec]) -> None:
    sender, receiver = codecs
    stream = bitstream.unpack(sender.encode(_photo(64, 64), 0))
    foreign = bitstream.Bitstream(
        bitstream.Header(b"\x00\x01\x02\x03", 64, 64, 0, stream.header.colour_stats), stream.payload
    )
    with pytest.raises(UnknownModelError):
        receiver.decode(bitstream.pack(foreign))
    bad_level = bitstream.Bitstream(
        bitstream.Header(sender.model_id, 64, 64, 250, stream.header.colour_stats), stream.payload
    )
    with pytest.raises(DecodeError):
        receiver.decode(bitstream.pack(bad_level))


def test_a_header_too_large_to_decode_is_refused_before_decoding(
    codecs: tuple[SenderCodec, ReceiverCodec], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 23-byte stream may claim 16384x16384 (hundreds of GB to synthesise): refused from the header alone."""
    from aeic.codec.cli import main

    sender, receiver = codecs
    stats = (120, 110, 100, 40, 40, 40)
    for width, height, downscale in ((16384, 16384, 4), (8192, 8192, 1), (6145, 4096, 1)):
        header = bitstream.Header(sender.model_id, width, height, 0, stats, downscale=downscale)
        data = bitstream.pack(bitstream.Bitstream(header, b""))
        with pytest.raises(ImageTooLargeError, match=f"too large to decode: {width}x{height}"):
            receiver.decode(data)
    assert isinstance(ImageTooLargeError(), DecodeError)  # the worker fails it at once, no retries
    assert receiver.parse(bitstream.pack(bitstream.Bitstream(
        bitstream.Header(sender.model_id, 8192, 8192, 0, stats, downscale=2), b""))).header.width == 8192
    stream = tmp_path / "huge.aeic"
    stream.write_bytes(data)
    assert main(["decode", str(stream), "--model", str(receiver.package.path), "--device", "cpu"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "too large to decode" in errors[0]


def test_a_batch_over_the_pixel_budget_is_split_with_the_same_images(
    codecs: tuple[SenderCodec, ReceiverCodec], monkeypatch: pytest.MonkeyPatch
) -> None:
    sender, receiver = codecs
    streams = [sender.encode(_photo(64, 64, seed), 1) for seed in range(3)]
    together = receiver.decode_batch(streams)
    monkeypatch.setattr(receiver, "max_coded_pixels", 128 * 128)  # one padded 64x64 image per pass
    calls: list[int] = []
    original = receiver.model.forward

    def counted(y: torch.Tensor, p: torch.Tensor, tile_pixels: int) -> torch.Tensor:
        calls.append(len(y))
        return original(y, p, tile_pixels)

    monkeypatch.setattr(receiver.model, "forward", counted)
    split = receiver.decode_batch(streams)
    assert calls == [1, 1, 1]
    assert all(np.array_equal(a, b) for a, b in zip(together, split, strict=True))


def test_corrupt_payload_with_valid_crc_gives_typed_error(codecs: tuple[SenderCodec, ReceiverCodec]) -> None:
    sender, receiver = codecs
    stream = bitstream.unpack(sender.encode(_photo(200, 300, 4), sender.num_levels - 1))
    for cut in (1, 3):
        broken = bitstream.Bitstream(stream.header, stream.payload[:-cut])
        with pytest.raises(EntropyDecodeError):
            receiver.decode(bitstream.pack(broken))


def _copy_package(folder: Path, copy: Path) -> Path:
    copy.mkdir()
    for item in folder.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    return copy


def test_package_tampering_is_detected(exported: tuple[AEICModel, Path], tmp_path: Path) -> None:
    _, folder = exported
    copy = _copy_package(folder, tmp_path / "copy")
    data = bytearray((copy / "entropy.npz").read_bytes())
    data[-100] ^= 0xFF
    (copy / "entropy.npz").write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="digest"):
        ModelPackage.load(copy)


def test_a_sender_needs_no_receiver_weights(
    exported: tuple[AEICModel, Path], codecs: tuple[SenderCodec, ReceiverCodec], tmp_path: Path
) -> None:
    """An edge device may carry the package without receiver.safetensors: same model id, same streams."""
    _, folder = exported
    copy = _copy_package(folder, tmp_path / "sender-only")
    (copy / "receiver.safetensors").unlink()
    rgb = _photo(40, 56)
    sender_only = SenderCodec.from_package(copy)
    assert sender_only.model_id == codecs[0].model_id
    assert sender_only.encode(rgb, 1) == codecs[0].encode(rgb, 1)
    with pytest.raises(ModelPackageError, match="receiver.safetensors is missing"):
        ReceiverCodec.from_package(copy, device="cpu")
    (copy / "hyper.onnx").write_bytes(b"not the hyper-analysis")
    with pytest.raises(ModelPackageError, match="hyper.onnx does not match"):
        SenderCodec.from_package(copy)


def test_package_of_an_older_layout_is_refused_clearly(
    exported: tuple[AEICModel, Path], tmp_path: Path
) -> None:
    _, folder = exported
    copy = _copy_package(folder, tmp_path / "old")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["analysis.onnx"] = manifest["files"].pop("analysis_stem.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="older package layout.*analysis_stem.onnx"):
        ModelPackage.load(copy)


def test_a_package_whose_tables_lack_an_array_is_one_line(exported: tuple[AEICModel, Path], tmp_path: Path) -> None:
    """A package exported by another version (digests and model id consistent, an array renamed) gave the
    sender and the receiver service a bare KeyError."""
    _, folder = exported
    copy = _copy_package(folder, tmp_path / "other-version")
    with np.load(copy / "entropy.npz") as data:
        arrays = {name: data[name] for name in data.files if name != "levels.gains"}
    np.savez(copy / "entropy.npz", **arrays)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["entropy.npz"] = file_digest(copy / "entropy.npz")
    manifest["model_id"] = compute_model_id(manifest).hex()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="entropy.npz lacks the array 'levels.gains': was the package exported by another"):
        ModelPackage.load(copy)


def test_a_package_with_a_configuration_of_another_version_is_one_line(
    exported: tuple[AEICModel, Path], tmp_path: Path
) -> None:
    """The receiver service loading a package that another version exported (a configuration field this
    version does not know) failed with a bare TypeError from the configuration's constructor."""
    _, folder = exported
    copy = _copy_package(folder, tmp_path / "newer")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["attention_heads"] = 8
    manifest["model_id"] = compute_model_id(manifest).hex()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="configuration is not this version's .*attention_heads"):
        ReceiverCodec.from_package(copy, device="cpu")


def test_a_package_whose_analysis_configuration_is_another_versions_is_one_line(
    exported: tuple[AEICModel, Path], tmp_path: Path
) -> None:
    """`aeic-send` on a package another version exported (its analysis configuration renamed) stopped with a
    bare KeyError; only `aeic encode` caught it, in a catch-all of its own."""
    _, folder = exported
    copy = _copy_package(folder, tmp_path / "renamed")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["analysis"]["stage_widths"] = manifest["config"]["analysis"].pop("widths")
    manifest["model_id"] = compute_model_id(manifest).hex()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="analysis configuration is not this version's .*'widths'"):
        SenderCodec.from_package(copy)


def test_model_id_is_reproducible(exported: tuple[AEICModel, Path], tmp_path: Path) -> None:
    model, folder = exported
    again = export_package(model, tmp_path / "again")
    assert ModelPackage.load(again).model_id == ModelPackage.load(folder).model_id


def test_every_package_file_gets_the_same_mode(exported: tuple[AEICModel, Path]) -> None:
    """A receiver running as another user (a container) must be able to read the weights too."""
    _, folder = exported
    modes = {item.name: item.stat().st_mode & 0o777 for item in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_png_written_by_cli_round_trip(exported: tuple[AEICModel, Path], tmp_path: Path) -> None:
    from aeic.codec.cli import main

    _, folder = exported
    source = tmp_path / "photo.png"
    Image.fromarray(_photo(90, 140)).save(source)
    assert main(["encode", str(source), "--model", str(folder), "--rate", "1", "-o", str(tmp_path / "out")]) == 0
    stream = tmp_path / "out" / "photo.aeic"
    assert main(["info", str(stream)]) == 0
    assert main(["decode", str(stream), "--model", str(folder), "--device", "cpu"]) == 0
    assert Image.open(stream.with_suffix(".png")).size == (140, 90)
    (tmp_path / "garbage.aeic").write_bytes(b"\xae\x1c\x01" + b"\x00" * 30)
    assert main(["decode", str(tmp_path / "garbage.aeic"), "--model", str(folder), "--device", "cpu"]) == 1


def test_info_and_decode_refuse_a_file_too_large_to_be_a_stream(
    exported: tuple[AEICModel, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wrong path (a disk image, /dev/zero) must not be read into memory whole."""
    from aeic.codec import cli

    monkeypatch.setattr(cli, "MAX_STREAM_BYTES", 1000)
    _, folder = exported
    big = tmp_path / "big.aeic"
    big.write_bytes(b"\xae\x1c\x01" + b"\x00" * 2000)
    assert cli.main(["info", str(big)]) == 1
    assert cli.main(["decode", str(big), "--model", str(folder), "--device", "cpu"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("not an AEIC bitstream" in line for line in errors)


def test_cli_reports_unreadable_images_in_one_line_and_codes_the_rest(
    exported: tuple[AEICModel, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aeic.codec.cli import main

    _, folder = exported
    good, broken, missing = tmp_path / "good.png", tmp_path / "broken.jpg", tmp_path / "missing.png"
    Image.fromarray(_photo(40, 56)).save(good)
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    status = main(["encode", str(broken), str(missing), str(good), "--model", str(folder), "--rate", "1"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert errors == [f"{broken}: not a recognised image format", f"{missing}: no such file"]
    assert good.with_suffix(".aeic").stat().st_size > 0


def test_cli_refuses_a_missing_model_or_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aeic.codec.cli import main

    source = tmp_path / "photo.png"
    Image.fromarray(_photo(40, 56)).save(source)
    assert main(["encode", str(source), "--model", str(tmp_path / "nowhere")]) == 2
    assert main(["export", str(tmp_path / "none.pt"), str(tmp_path / "package")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert "not a model package" in errors[0] and "none.pt" in errors[1]


def test_a_budget_the_rules_downscale_cannot_meet_falls_back_to_a_larger_one(
    exported: tuple[AEICModel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coding_scale, "MIN_CODED_BPP", 0.0)  # the rule always asks for the whole picture
    _, folder = exported
    rgb = _photo(1030, 1100)
    whole_minimum = len(SenderCodec.from_package(folder, downscale=1).encode(rgb, 0))
    half_minimum = len(SenderCodec.from_package(folder, downscale=2).encode(rgb, 0))
    assert half_minimum < whole_minimum
    data, _ = SenderCodec.from_package(folder).encode_to_budget(rgb, whole_minimum - 1)
    assert bitstream.peek_header(data).downscale == 2 and len(data) < whole_minimum


def test_decode_output_is_a_folder_or_for_one_stream_the_picture_named(
    exported: tuple[AEICModel, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o y.png` made a folder called y.png; now it is that picture, and a folder for several streams."""
    from aeic.codec.cli import main

    _, folder = exported
    for name in ("a", "b"):
        Image.fromarray(_photo(64, 96)).save(tmp_path / f"{name}.png")
    assert main(["encode", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", str(folder),
                 "--rate", "1", "-o", str(tmp_path / "streams")]) == 0  # fmt: skip
    streams = [str(tmp_path / "streams" / "a.aeic"), str(tmp_path / "streams" / "b.aeic")]
    decode = ["decode", "--model", str(folder), "--device", "cpu", "-o"]
    assert main([*decode, str(tmp_path / "one.webp"), streams[0]]) == 0
    assert Image.open(tmp_path / "one.webp").format == "WEBP"
    assert main([*decode, str(tmp_path / "two.png"), *streams]) == 2
    assert "names one picture" in capsys.readouterr().err and not (tmp_path / "two.png").exists()
    assert main([*decode, str(tmp_path / "out"), *streams]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
