"""The decoder stage: trains a package's receiver half on the sender's true ŷ; the sender half never moves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from aeic.codec.cli import main as aeic_main
from aeic.codec.testing import make_tiny_package
from aeic.receiver.decoder import ReceiverCodec
from aeic.sender.encoder import SenderCodec
from aeic.shared import bitstream
from aeic.shared.model_package import PACKAGE_FILES
from aeic.training.config import TrainConfig
from aeic.training.data import NO_TEACHER, CropSampler, build_cache
from aeic.training.decoder_finetune import DecoderFinetuner, SenderLatents
from PIL import Image
from training_support import kill_after_the_first_checkpoint, logged_steps, same_state, write_training_photos


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("pkg") / "tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_training_photos(tmp_path_factory.mktemp("photos"), 2)


def _config(package: Path, photos: Path, out: Path, **kwargs: object) -> TrainConfig:
    base: dict[str, object] = {"name": "t", "stage": "decoder", "package": package, "data": photos, "cache": out.parent / "cache",
            "short_side": 160, "crop": 128, "window": 12, "batch": 2, "steps": 2, "log_every": 1, "out": out,
            "texture_weight": 0.1}
    base.update(kwargs)
    return TrainConfig(**base)


def test_quantized_latent_is_what_the_receiver_decodes(package: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    sender, receiver = SenderCodec.from_package(package), ReceiverCodec.from_package(package, device="cpu")
    analysed = sender.analyse(rgb)
    for level in (0, sender.num_levels - 1):
        decoded = receiver._latent(receiver.parse(sender.encode_analysed(analysed, level)))
        assert np.array_equal(decoded.numpy(), sender.quantized_latent(analysed, level))


def test_decoder_stage_trains_resumes_and_exports_with_the_sender_unchanged(
    package: Path, photos: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    stage = DecoderFinetuner(_config(package, photos, tmp_path / "run"))
    before = {k: v.clone() for k, v in stage.model.state_dict().items()}
    checkpoint = stage.run()
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"psnr"' in log[0] and '"texture"' in log[0]
    assert any(not torch.equal(before[k], v) for k, v in stage.model.state_dict().items())
    resumed = DecoderFinetuner(_config(package, photos, tmp_path / "run", steps=3))
    assert resumed.step == 2
    resumed.run()
    assert torch.load(checkpoint, weights_only=False)["step"] == 3

    out = tmp_path / "tuned"
    assert aeic_main(["export", str(checkpoint), str(out)]) == 0
    for name in PACKAGE_FILES:
        same = (out / name).read_bytes() == (package / name).read_bytes()
        assert same == (name != "receiver.safetensors"), name
    rgb = np.asarray(Image.open(photos / "0.png"))
    old, new = SenderCodec.from_package(package), SenderCodec.from_package(out)
    assert old.model_id != new.model_id
    old_stream, new_stream = bitstream.unpack(old.encode(rgb, 1)), bitstream.unpack(new.encode(rgb, 1))
    assert old_stream.payload == new_stream.payload
    assert ReceiverCodec.from_package(out, device="cpu").decode(new.encode(rgb, 1)).shape == rgb.shape


def test_decoder_stage_can_train_low_levels_only_with_a_rate_dependent_texture_weight(
    package: Path, photos: Path, tmp_path: Path
) -> None:
    stage = DecoderFinetuner(_config(package, photos, tmp_path / "run", max_level=2, texture_weight=0.3,
                                     texture_weight_top=0.1))  # fmt: skip
    assert stage.levels == 3 < stage.package.num_levels
    top = stage.package.level_position(2)
    weights = stage.texture_weights(torch.tensor([0.0, top / 2, top]))
    assert torch.allclose(weights, torch.tensor([0.3, 0.2, 0.1]))
    constant = DecoderFinetuner(_config(package, photos, tmp_path / "constant"))
    assert constant.levels == constant.package.num_levels
    assert torch.equal(constant.texture_weights(torch.tensor([0.0, top])), torch.tensor([0.1, 0.1]))


def test_sender_latents_sample_only_the_trained_levels(package: Path, photos: Path, tmp_path: Path) -> None:
    items = build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)
    source = SenderLatents(package, CropSampler(items, 128, 0), np.random.default_rng(1), levels=2)
    _, _, positions = source.batch(6)
    allowed = {source.codec.package.level_position(level) for level in range(2)}
    assert set(positions.tolist()) <= allowed


def test_a_killed_decoder_run_resumes_to_the_uninterrupted_weights_and_log(
    package: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crops and the rate levels drawn after a resume are the ones an uninterrupted run draws."""
    torch.set_num_threads(1)
    extra = {"steps": 3, "checkpoint_minutes": 1e-9}
    whole = torch.load(DecoderFinetuner(_config(package, photos, tmp_path / "whole", **extra)).run(), weights_only=False)
    kill_after_the_first_checkpoint(DecoderFinetuner, _config(package, photos, tmp_path / "killed", **extra), monkeypatch)
    resumed = torch.load(DecoderFinetuner(_config(package, photos, tmp_path / "killed", **extra)).run(), weights_only=False)
    assert same_state(whole, resumed) == []
    assert logged_steps(tmp_path / "killed") == logged_steps(tmp_path / "whole")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a CUDA device where there is none")
def test_decoder_stage_trains_on_the_configured_device(package: Path, photos: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):  # not quietly trained on the CPU
        DecoderFinetuner(_config(package, photos, tmp_path / "gpu", device="cuda"))
    stage = DecoderFinetuner(_config(package, photos, tmp_path / "cpu", device="cpu"))
    assert {p.device for p in stage.model.parameters()} == {torch.device("cpu")}
    on_another_device = torch.zeros(2, device="meta")  # a step's tensors stay on the batch's device
    assert stage.texture_weights(on_another_device).device == on_another_device.device


def test_export_names_the_fine_tuned_package_it_cannot_find(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A decoder-stage checkpoint records its package as its config named it (often relative to the
    repository): exported from another folder, the error says where that path came from."""
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"stage": "decoder", "package": "aeic/models/nano-se", "model": {}, "step": 1}, checkpoint)
    monkeypatch.chdir(tmp_path)
    assert aeic_main(["export", str(checkpoint), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "fine-tuned the package aeic/models/nano-se" in error and "relative to the folder training ran in" in error
    assert not (tmp_path / "out").exists()
