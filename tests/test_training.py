"""The three training stages run, checkpoint, resume, and export a working package (tiny models)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from aeic.codec import cli as codec_cli
from aeic.codec.checkpoint import load_checkpoint_model
from aeic.codec.export import export_package
from aeic.codec.presets import preset
from aeic.receiver.decoder import ReceiverCodec
from aeic.sender.encoder import SenderCodec
from aeic.training import cli as train_cli
from aeic.training.config import TrainConfig
from aeic.training.data import NO_TEACHER, LatentTeacher, build_cache
from aeic.training.rate_calibration import offset_for_target
from aeic.training.trainer import Trainer, check_distillable, latent_texture, rate_weights
from PIL import Image
from sd_turbo_support import write_tiny_sd_turbo
from training_support import kill_after_the_first_checkpoint, logged_steps, same_state, write_training_photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_training_photos(tmp_path_factory.mktemp("photos"), 3)


@pytest.fixture(scope="module")
def tiny_sd_turbo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random SD-Turbo folder at test size, for the tiny-full presets (AEIC_SD_TURBO_DIR)."""
    return write_tiny_sd_turbo(tmp_path_factory.mktemp("sd_turbo"))


def _config(photos: Path, out: Path, **kwargs: object) -> TrainConfig:
    base: dict[str, object] = {"name": "t", "model": "tiny-se", "data": photos, "cache": out.parent / "cache", "short_side": 160,
            "crop": 128, "batch": 2, "steps": 2, "log_every": 1, "out": out, "device": "cpu"}
    base.update(kwargs)
    return TrainConfig(**base)


def test_pretrain_logs_checkpoints_and_resumes(photos: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    checkpoint = Trainer(_config(photos, tmp_path / "pre")).run()
    assert checkpoint.exists()
    lines = (tmp_path / "pre" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"bpp"' in lines[0]
    resumed = Trainer(_config(photos, tmp_path / "pre", steps=3))
    assert resumed.step == 2
    resumed.run()
    assert torch.load(checkpoint, weights_only=False)["step"] == 3


def _pretrained(photos: Path, out: Path, model: str = "tiny-se") -> Path:
    return Trainer(_config(photos, out, model=model, steps=1)).run()


def _without_pixel_decoder(photos: Path, root: Path) -> Path:
    """A tiny-se checkpoint without its internal pixel decoder: what a model trained through TAEF2 has."""
    state = torch.load(_pretrained(photos, root / "pre"), weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("decoder.pixel_decoder.")}
    torch.save(state, root / "taef2-like.pt")
    return root / "taef2-like.pt"


# what each stage's test-size run adds to _config, with the run it starts from (made under root); the
# tiny-full ones are the paper-size profile's stages (SD VAE latents, SD-Turbo UNet with LoRA adapters)
# with full-*.toml's settings, the pretrain one with the pixel term through the VAE decoder as well
STAGE_RUNS: dict[str, Callable[[Path, Path], dict[str, object]]] = {
    "pretrain": lambda photos, root: {},
    "adversarial": lambda photos, root: {"init": _pretrained(photos, root / "pre"), "adversarial_weight": 0.1},
    "distil": lambda photos, root: {"teacher": _pretrained(photos, root / "me", "tiny-me")},
    "pixel_decoder": lambda photos, root: {"init": _without_pixel_decoder(photos, root)},
    "encoder": lambda photos, root: {
        "init": export_package(load_checkpoint_model(_pretrained(photos, root / "pre")), root / "package")},
    "tiny-full-pretrain": lambda photos, root: {"model": "tiny-full-me", "pixel_weight": 0.5},
    "tiny-full-adversarial": lambda photos, root: {
        "model": "tiny-full-me", "init": _pretrained(photos, root / "pre", "tiny-full-me"), "distortion": "pixel",
        "mse_weight": 100.0, "msssim_weight": 2.0, "latent_weight": 1.0, "adversarial_weight": 0.1},
    "tiny-full-distil": lambda photos, root: {
        "model": "tiny-full", "teacher": _pretrained(photos, root / "me", "tiny-full-me")},
}  # fmt: skip


@pytest.mark.parametrize("run", list(STAGE_RUNS))
def test_a_run_repeats_and_a_killed_run_resumes_to_the_same_weights_state_and_log(photos: Path, tiny_sd_turbo: Path, tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch, run: str) -> None:
    """Weights, optimizers, discriminator, rate steering (gains, running bpp, the encoder stage's
    multipliers), random states and the data order all come back: two runs and a resumed one end bit for
    bit alike, each step logged once."""
    torch.set_num_threads(1)
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(tiny_sd_turbo))
    stage = run.removeprefix("tiny-full-")
    extra = {"stage": stage, "steps": 3, "batch": 1, "checkpoint_minutes": 1e-9, **STAGE_RUNS[run](photos, tmp_path)}
    first, second = (torch.load(Trainer(_config(photos, tmp_path / name, **extra)).run(), weights_only=False)
                     for name in ("first", "second"))  # fmt: skip
    assert same_state(first, second) == [] and logged_steps(tmp_path / "first") == logged_steps(tmp_path / "second")
    kill_after_the_first_checkpoint(Trainer, _config(photos, tmp_path / "killed", **extra), monkeypatch)
    assert (tmp_path / "killed" / "log.jsonl").read_text().count('"step"') == 2
    resumed = torch.load(Trainer(_config(photos, tmp_path / "killed", **extra)).run(), weights_only=False)
    assert same_state(first, resumed) == []
    assert logged_steps(tmp_path / "killed") == logged_steps(tmp_path / "first")
    assert first["step"] == 3 and first["stage"] == stage
    assert (stage == "adversarial") == (first["discriminator"] is not None)


def test_init_mean_starts_from_the_weighted_mean_of_checkpoints(photos: Path, tmp_path: Path) -> None:
    first = Trainer(_config(photos, tmp_path / "a", seed=1)).run()
    second = Trainer(_config(photos, tmp_path / "b", seed=2)).run()
    mean = Trainer(_config(photos, tmp_path / "mean", init_mean={first: 3.0, second: 1.0}))
    a, b = (torch.load(path, weights_only=False)["model"] for path in (first, second))
    key = "analysis.stages.0.weight"
    assert not torch.equal(a[key], b[key])
    assert torch.allclose(mean.model.state_dict()[key], 0.75 * a[key] + 0.25 * b[key], atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        _config(photos, tmp_path / "both", init=first, init_mean={second: 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        Trainer(_config(photos, tmp_path / "zero", init_mean={first: 0.0}))


def test_adversarial_stage_freezes_the_sender_half(photos: Path, tmp_path: Path) -> None:
    pre = Trainer(_config(photos, tmp_path / "pre")).run()
    trainer = Trainer(_config(photos, tmp_path / "adv", stage="adversarial", init=pre, adversarial_weight=0.1))
    assert torch.equal(trainer.ema_bpp, torch.load(pre, weights_only=False)["ema_bpp"])
    before = trainer.model.analysis.stages[0].weight.clone()
    trainer.run()
    assert torch.equal(before, trainer.model.analysis.stages[0].weight)
    assert '"discriminator"' in (tmp_path / "adv" / "log.jsonl").read_text()


def test_encoder_stage_trains_the_sender_only_and_keeps_tables_levels_and_receiver(
    photos: Path, tmp_path: Path
) -> None:
    shipped = export_package(load_checkpoint_model(Trainer(_config(photos, tmp_path / "pre")).run()), tmp_path / "v1")
    trainer = Trainer(_config(photos, tmp_path / "enc", stage="encoder", init=shipped, lowpass_weight=50.0, lr=1e-2))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    multipliers = trainer.log_lambda.clone()
    checkpoint = trainer.run()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("analysis.", "hyper_analysis.")) for k in changed)
    assert not torch.equal(multipliers, trainer.log_lambda)  # the rates are held by the multipliers instead
    assert codec_cli.main(["export", str(checkpoint), str(tmp_path / "v2")]) == 0
    old, new = (json.loads((p / "manifest.json").read_text()) for p in (shipped, tmp_path / "v2"))
    assert {k: v for k, v in old.items() if k not in ("files", "model_id")} == {
        k: v for k, v in new.items() if k not in ("files", "model_id")
    }
    for name in ("entropy.npz", "receiver.safetensors"):
        assert old["files"][name] == new["files"][name]
    assert old["files"]["analysis_trunk.onnx"] != new["files"]["analysis_trunk.onnx"]
    SenderCodec.from_package(tmp_path / "v2")  # a package that loads (digests verified)
    with pytest.raises(ValueError, match="model package"):
        Trainer(_config(photos, tmp_path / "bad", stage="encoder", init=checkpoint))


def test_pixel_decoder_stage_trains_only_a_new_internal_pixel_decoder(photos: Path, tmp_path: Path) -> None:
    taef2_like = _without_pixel_decoder(photos, tmp_path)
    state = torch.load(taef2_like, weights_only=False)
    trainer = Trainer(_config(photos, tmp_path / "pixels", stage="pixel_decoder", init=taef2_like))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("decoder.pixel_decoder.") for k in changed)
    next_stage = Trainer(_config(photos, tmp_path / "joint", init=trainer.checkpoint_path, lambda_scale=2.0))
    assert torch.allclose(next_stage.log_lambda.exp(), torch.tensor([0.02, 0.06, 0.12], dtype=torch.float64))
    del state["model"]["analysis.stages.0.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="does not fit the model"):
        Trainer(_config(photos, tmp_path / "broken", stage="pixel_decoder", init=tmp_path / "broken.pt"))
    with pytest.raises(ValueError, match="internal pixel decoder"):
        Trainer(_config(photos, tmp_path / "taef2", stage="pixel_decoder", model="nano-se-wide"))


def test_distillation_from_a_moderate_teacher_and_export(photos: Path, tmp_path: Path) -> None:
    teacher = Trainer(_config(photos, tmp_path / "me", model="tiny-me")).run()
    trainer = Trainer(_config(photos, tmp_path / "se", stage="distil", teacher=teacher))
    assert trainer.teacher is not None
    taught = trainer.teacher.state_dict()
    decoder_side = {name: value for name, value in trainer.model.state_dict().items() if not name.startswith("analysis.")}
    assert all(torch.equal(value, taught[name]) for name, value in decoder_side.items())  # only the encoder is new
    first = "analysis.stages.0.weight"  # the encoder's first convolution
    assert not torch.equal(trainer.model.state_dict()[first], taught[first])
    student = trainer.run()
    assert '"distil_encoder"' in (tmp_path / "se" / "log.jsonl").read_text()
    package = export_package(load_checkpoint_model(student), tmp_path / "package")
    rgb = np.asarray(Image.open(next(photos.iterdir())).convert("RGB"))
    assert len(SenderCodec.from_package(package).encode(rgb, 0)) > 17


def test_distillation_refuses_a_teacher_with_another_latent_or_decoder(photos: Path, tmp_path: Path) -> None:
    teacher = Trainer(_config(photos, tmp_path / "me", model="tiny-me")).run()
    with pytest.raises(ValueError, match="32-channel latent"):
        Trainer(_config(photos, tmp_path / "se", model="nano-se-wide-internal", stage="distil", teacher=teacher))
    with pytest.raises(ValueError, match="beyond their analysis"):
        check_distillable(preset("nano-me"), preset("nano-se-wide-internal"))


@pytest.mark.parametrize(("teacher", "student"), [("nano-me", "nano-se"), ("nano-me-wide-internal", "nano-se-wide-internal")])
def test_shipped_sizes_can_be_distilled(teacher: str, student: str) -> None:
    check_distillable(preset(teacher), preset(student))
    assert preset(teacher).analysis.blocks_per_stage > preset(student).analysis.blocks_per_stage


def test_latent_texture_monitor_penalises_blur_and_excess_alike() -> None:
    teacher = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert float(latent_texture(teacher, teacher)) == pytest.approx(1.0)
    assert float(latent_texture(teacher * 0.5, teacher)) == pytest.approx(0.25)
    assert float(latent_texture(teacher * 2.0, teacher)) == pytest.approx(0.25)


def test_pixel_distortion_logs_pixel_monitors_and_weighs_texture(photos: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    plain = Trainer(_config(photos, tmp_path / "plain", distortion="pixel", steps=1))
    textured = Trainer(_config(photos, tmp_path / "tex", distortion="pixel", steps=1, texture_weight=5.0))
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    rates = torch.tensor([0, 2])
    with torch.no_grad():
        out = plain.model(images, rates)
        base, monitors = plain._distortion(out, images, torch.zeros(2, 1, 16, 16))
        weighted, _ = textured._distortion(out, images, torch.zeros(2, 1, 16, 16))
    assert base.shape == (2,) and set(monitors) == {"psnr", "ms_ssim", "texture"}
    assert torch.all(weighted > base)
    plain.run()
    assert '"psnr"' in (tmp_path / "plain" / "log.jsonl").read_text()


def test_calibration_moves_each_rate_point_to_its_nominal_bpp(photos: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    pre = Trainer(_config(photos, tmp_path / "pre", steps=1)).run()
    calibrated = Trainer(_config(photos, tmp_path / "cal", stage="calibrate", init=pre, batch=4)).run()
    report = json.loads((tmp_path / "cal" / "log.jsonl").read_text())["calibration"]
    assert [r["nominal"] for r in report] == [0.01, 0.03, 0.06]
    assert all(abs(r["after"] / r["nominal"] - 1) < 0.15 for r in report)
    before, after = (torch.load(p, weights_only=False)["model"]["log_gains"] for p in (pre, calibrated))
    assert not torch.equal(before, after)
    Trainer(_config(photos, tmp_path / "cal", stage="calibrate", init=pre, batch=4)).run()  # the command again: kept
    assert torch.equal(torch.load(calibrated, weights_only=False)["model"]["log_gains"], after)
    assert len((tmp_path / "cal" / "log.jsonl").read_text().splitlines()) == 1


def test_calibration_stays_on_the_rising_branch_of_a_rate_curve_with_a_floor() -> None:
    # bits fall with the offset down to a floor at -1, then climb to a plateau: the shape a rate
    # point shows when every symbol rounds to zero
    def bpp_at(offset: float) -> float:
        return 0.004 * math.exp(offset) + 0.003 if offset > -1 else 0.0045 - 0.0005 * (offset + 1)

    found = offset_for_target(bpp_at, 0.005)
    assert found > -1 and abs(bpp_at(found) - 0.005) < 1e-6
    assert offset_for_target(bpp_at, 0.002) == min(torch.linspace(-3, 3, 25).tolist(), key=bpp_at)


def test_rate_control_moves_the_gains_of_an_overshooting_point_only(photos: Path, tmp_path: Path) -> None:
    trainer = Trainer(_config(photos, tmp_path / "steer"))
    gains, multipliers = trainer.model.log_gains.detach().clone(), trainer.log_lambda.clone()
    trainer._steer_rates(torch.tensor([0]), torch.tensor([10.0]))
    moved = trainer.model.log_gains.detach()
    assert torch.all(moved[0] < gains[0]) and torch.equal(moved[1:], gains[1:])
    assert torch.equal(trainer.log_lambda, multipliers)


def test_rate_balance_weighs_every_rate_points_distortion_alike(photos: Path, tmp_path: Path) -> None:
    log_lambda = torch.log(torch.tensor([0.01, 0.04, 0.16]))
    assert torch.equal(rate_weights(log_lambda, 0.0), torch.ones(3))
    balanced = rate_weights(log_lambda, 1.0) * log_lambda.exp()  # the weight each point's distortion gets
    assert torch.allclose(balanced, balanced[0].expand(3))
    assert math.isclose(float(rate_weights(log_lambda, 1.0).log().sum()), 0.0, abs_tol=1e-6)
    trainer = Trainer(_config(photos, tmp_path / "balance", rate_balance=1.0))
    no_bits, distortion = torch.zeros(1), torch.ones(1)
    losses = [trainer._rate_distortion(no_bits, distortion, torch.tensor([rate])) for rate in range(trainer.model_config.num_rates)]
    assert torch.allclose(torch.stack(losses), losses[0].expand(len(losses)))
    assert not torch.allclose(trainer.rate_weights, torch.ones_like(trainer.rate_weights))


CONFIG_DIR = Path(__file__).resolve().parents[1] / "training" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_under_version_control_parses_and_names_a_known_preset(path: Path) -> None:
    config = TrainConfig.from_file(path)
    assert preset(config.model).name.startswith(("nano-", "full-"))


FULL_PIPELINE = ("full-me-pretrain", "full-me-adversarial", "full-se-distil", "full-se-calibrate")
TEST_SIZES = {"full-me": "tiny-full-me", "full-se": "tiny-full"}


def test_the_paper_size_pipeline_runs_its_configs_at_test_size(
    photos: Path, tiny_sd_turbo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU configs of the SD-Turbo model, in order, with test-sized models, data and random SD-Turbo
    weights: each stage starts from the one before, the cache holds SD VAE latents, and the result
    exports to a package that codes and decodes."""
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(tiny_sd_turbo))

    def moved(path: Path | None) -> Path | None:
        return None if path is None else tmp_path / Path(path).relative_to("runs")

    for name in FULL_PIPELINE:
        config = TrainConfig.from_file(CONFIG_DIR / f"{name}.toml")
        test_size = {"model": TEST_SIZES[config.model], "data": photos, "cache": tmp_path / "cache", "short_side": 160,
                     "crop": 128, "batch": 2, "steps": 2, "log_every": 1, "device": "cpu", "out": moved(config.out),
                     "init": moved(config.init), "teacher": moved(config.teacher)}  # fmt: skip
        checkpoint = Trainer(TrainConfig(**{**config.model_dump(), **test_size})).run()
    assert '"adversarial"' in (tmp_path / "full-me-adversarial" / "log.jsonl").read_text()
    assert '"distil_decoder"' in (tmp_path / "full-se-distil" / "log.jsonl").read_text()
    cached = torch.load(next((tmp_path / "cache").glob("*.pt")), weights_only=False)
    assert cached.latent.shape[0] == 4 and cached.latent.abs().max() > 0  # the SD VAE's latent
    package = export_package(load_checkpoint_model(checkpoint), tmp_path / "package")
    rgb = np.asarray(Image.open(next(photos.iterdir())).convert("RGB"))
    stream = SenderCodec.from_package(package).encode(rgb, 0)
    assert ReceiverCodec.from_package(package, device="cpu").decode(stream).shape == rgb.shape


def test_the_cache_keeps_each_teachers_latents_apart(photos: Path, tmp_path: Path) -> None:
    def two_channels(pixels: torch.Tensor) -> torch.Tensor:
        return torch.ones(1, 2, pixels.shape[2] // 8, pixels.shape[3] // 8)

    without = build_cache(photos, tmp_path, 160, NO_TEACHER, 128)
    with_teacher = build_cache(photos, tmp_path, 160, LatentTeacher("two", two_channels), 128)
    assert {item.load().latent.shape[0] for item in without} == {1}
    assert {item.load().latent.shape[0] for item in with_teacher} == {2}
    assert len(list(tmp_path.glob("*.pt"))) == 2 * len(without)


def test_profile_reports_a_step_and_saves_nothing(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(f'name = "t"\nmodel = "tiny-se"\ndata = "{photos}"\ncache = "{tmp_path / "cache"}"\nshort_side = 160\n'
                      f'crop = 128\nbatch = 2\ndevice = "cpu"\nout = "{tmp_path / "run"}"\n')  # fmt: skip
    assert train_cli.main([str(config), "--profile", "2"]) == 0
    report = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert report["steps"] == 2 and report["seconds_per_step"] > 0 and report["aten_ops_per_step"] > 100
    assert report["top"][0]["self_cpu_ms_per_step"] >= report["top"][-1]["self_cpu_ms_per_step"]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert "profile:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_cli.main([str(config), "--profile", "0"])
