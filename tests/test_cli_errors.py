"""Bad input to the training and packaging commands: one clear line, a non-zero status, nothing lost."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import pytest
import torch
from aeic.codec import cli as codec_cli
from aeic.codec import export as export_module
from aeic.codec.model import AEICModel
from aeic.codec.testing import make_tiny_model, make_tiny_package
from aeic.training import cli as train_cli
from aeic.training import schedule
from aeic.training.schedule import TrainingInterrupted
from aeic.training.trainer import Trainer
from training_support import write_training_photos

BASE = """name = "t"
model = "tiny-se"
data = "{data}"
cache = "{cache}"
short_side = 160
crop = 128
batch = 2
steps = 2
log_every = 1
device = "cpu"
out = "{out}"
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_training_photos(tmp_path_factory.mktemp("photos"), 2)


def _config(tmp_path: Path, photos: Path, extra: str = "", name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(BASE.format(data=photos, cache=tmp_path / "cache", out=tmp_path / "out") + extra)
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str], status: int, fragment: str) -> None:
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [line for line in err.splitlines() if "error" in line]  # progress bars share stderr
    assert "Traceback" not in err and len(lines) == 1, err
    assert fragment in lines[0], err


@pytest.mark.parametrize(("old", "new", "fragment"), [
    ("steps = 2", "steps = 2\nfoo = 1", "foo: unknown key"),
    ("batch = 2", 'batch = "two"', "batch:"),
    ("steps = 2", "steps = 0", "steps:"),
    ('"tiny-se"', '"tiny-xx"', "unknown model preset 'tiny-xx'"),
    ("steps = 2", "steps = ", "is not valid TOML"),
])
def test_a_bad_config_is_one_line(
    tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, fragment: str
) -> None:
    path = _config(tmp_path, photos)
    path.write_text(path.read_text().replace(old, new))
    _one_line_error(capsys, train_cli.main([str(path)]), fragment)


def test_missing_config_data_and_crops_are_one_line(
    tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _one_line_error(capsys, train_cli.main([str(tmp_path / "none.toml")]), "does not exist")
    config = str(_config(tmp_path, photos))
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, train_cli.main([config, "--data", str(tmp_path / "empty")]), "no training photos")
    _one_line_error(capsys, train_cli.main([config, "--data", str(tmp_path / "absent")]), "does not exist")
    small = _config(tmp_path, photos, name="small.toml")
    small.write_text(small.read_text().replace("short_side = 160", "short_side = 96"))
    _one_line_error(capsys, train_cli.main([str(small)]), "no 128 px crop fits")


def test_a_checkpoint_of_another_preset_or_a_corrupt_one_is_refused(
    tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    config = str(_config(tmp_path, photos))
    assert train_cli.main([config, "--steps", "1"]) == 0
    capsys.readouterr()
    checkpoint = tmp_path / "out" / "checkpoint.pt"
    other = _config(tmp_path, photos, name="other.toml")
    other.write_text(other.read_text().replace('"tiny-se"', '"tiny-me"').replace(str(tmp_path / "out"), str(tmp_path / "me"))
                     + f'init = "{checkpoint}"\n')
    _one_line_error(capsys, train_cli.main([str(other)]), "does not fit the model")
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2])
    _one_line_error(capsys, train_cli.main([config, "--steps", "3"]), "cannot resume")
    assert checkpoint.read_bytes() == whole[: len(whole) // 2]  # left for the user to look at
    _one_line_error(capsys, codec_cli.main(["export", str(checkpoint), str(tmp_path / "pkg")]), "not a readable checkpoint")
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize(("signum", "default"), [(signal.SIGINT, signal.default_int_handler),
                                                 (signal.SIGTERM, signal.SIG_DFL)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_finishes_the_step_checkpoints_and_resumes(
    tmp_path: Path,
    photos: Path,
    monkeypatch: pytest.MonkeyPatch,
    signum: signal.Signals,
    default: Callable[[int, FrameType | None], Any] | signal.Handlers,
) -> None:
    torch.set_num_threads(1)
    config = train_cli._load_config(_config(tmp_path, photos), steps=4)
    step = Trainer.train_step

    def interrupted_step(self: Trainer, *args: torch.Tensor) -> dict[str, float]:
        if self.step == 1:
            os.kill(os.getpid(), signum)  # arrives during the step: the step still completes
        return step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    # as in a terminal: a job started in the background (a CI runner's) inherits an ignored SIGINT
    previous = signal.signal(signum, default)
    try:
        with pytest.raises(TrainingInterrupted, match="step 2"):
            Trainer(config).run()
        assert signal.getsignal(signum) is default  # handed back after the run
    finally:
        signal.signal(signum, previous)
    monkeypatch.setattr(Trainer, "train_step", step)
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 2
    resumed = Trainer(config)
    assert resumed.step == 2
    resumed.run()
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 4


def test_a_failed_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    config = str(_config(tmp_path, photos))
    assert train_cli.main([config, "--steps", "1"]) == 0
    capsys.readouterr()
    before = (tmp_path / "out" / "checkpoint.pt").read_bytes()

    def full_disk(state: object, path: Path) -> NoReturn:
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3071616 vs 3071504")

    monkeypatch.setattr(schedule.torch, "save", full_disk)
    _one_line_error(capsys, train_cli.main([config, "--steps", "2"]), "the previous checkpoint is kept")
    assert (tmp_path / "out" / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "out" / "checkpoint.tmp").exists()


def test_a_package_write_that_fails_leaves_the_old_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    package = make_tiny_package(tmp_path / "pkg")
    before = {path.name: path.read_bytes() for path in package.iterdir()}
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"preset": "tiny-se", "model": make_tiny_model().state_dict()}, checkpoint)

    def failing_export(model: AEICModel, out: Path) -> NoReturn:
        (out / "analysis_stem.onnx").write_bytes(b"half")
        raise OSError(27, "File too large")

    monkeypatch.setattr(export_module, "export_package", failing_export)
    status = codec_cli.main(["export", str(checkpoint), str(package)])
    err = capsys.readouterr().err
    assert status == 2 and "is unchanged" in err and "Traceback" not in err
    assert {path.name: path.read_bytes() for path in package.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir() if "partial" in path.name] == []
    (tmp_path / "file").write_text("x")
    _one_line_error(capsys, codec_cli.main(["export", str(checkpoint), str(tmp_path / "file")]), "is not a folder")
    _one_line_error(capsys, codec_cli.main(["relevel", str(package), str(tmp_path / "r"), "--per-step", "0"]),
                    "must be at least 1")


def test_set_rounding_names_only_the_values_it_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        codec_cli.main(["set-rounding", str(tmp_path / "pkg"), str(tmp_path / "out"), "--weight", "-1"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "expected nearest or a positive number, got '-1'" in err and "package," not in err


def test_a_taef2_folder_without_the_weights_is_named_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AEIC_TAEF2_DIR set to a wrong folder: an error naming it, not a download with retries that ends
    telling the user to set the variable that is set."""
    import huggingface_hub
    from aeic.codec import taesd

    def no_download(*args, **kwargs):
        raise AssertionError("a configured TAEF2 folder must not fall back to the network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setenv("AEIC_TAEF2_DIR", str(tmp_path / "taef2"))
    named = re.escape(f"taef2_decoder.pth is not in AEIC_TAEF2_DIR={tmp_path / 'taef2'}:")
    with pytest.raises(FileNotFoundError, match=named):
        taesd.load_taef2("decoder")
