"""A user's own photo folder and config: bad files are skipped with a warning each, a dataset or config that
cannot train is one line at the start, and an interrupted run keeps what it had."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from aeic.training import cli as train_cli
from aeic.training.schedule import resolve_device
from training_support import write_training_photos

CONFIG = """name = "t"
model = "tiny-se"
data = "{data}"
cache = "{cache}"
short_side = 160
batch = 1
steps = 1
log_every = 1
out = "{out}"
"""


def _config(tmp_path: Path, data: Path, extra: str = "") -> str:
    path = tmp_path / "run.toml"
    defaults = "".join(line for line in ('device = "cpu"\n', "crop = 128\n") if line.split()[0] not in extra)
    path.write_text(CONFIG.format(data=data, cache=tmp_path / "cache", out=tmp_path / "out") + defaults + extra)
    return str(path)


def _photos(tmp_path: Path, count: int) -> Path:
    (tmp_path / "photos").mkdir()
    return write_training_photos(tmp_path / "photos", count)


def _one_line_error(capsys: pytest.CaptureFixture, status: int, fragment: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "aeic-train: error" in line]
    assert status == 2 and "Traceback" not in err and len(lines) == 1, err
    assert fragment in lines[0], err


@pytest.mark.parametrize(("extra", "fragment"), [
    ("lambda_scale = -1", "lambda_scale: Input should be greater than 0"),  # was: a NaN loss, trained for hours
    ("lr = 0", "lr: Input should be greater than 0"),
    ("lr_final_fraction = -0.5", "lr_final_fraction: Input should be greater than or equal to 0"),
    ("texture_weight = -0.1", "texture_weight: Input should be greater than or equal to 0"),
    ("max_level = -1", "max_level: Input should be greater than or equal to 0"),
    ("crop = 200", "crop: must be a multiple of 128"),  # was: a traceback in the first step, after the cache
    ("crop = 256", "no 256 px crop fits in photos downsampled to short_side 160"),
    ('device = "mps"', "device 'mps': training runs on cpu, cuda, cuda:N or auto"),  # was: a traceback
    ('init = "{tmp}/nowhere.pt"', "nowhere.pt"),
    ('stage = "decoder"\npackage = "{tmp}/nowhere"', "nowhere"),
])
def test_a_bad_value_or_missing_file_in_a_config_is_one_line(tmp_path, capsys, extra, fragment) -> None:
    config = _config(tmp_path, _photos(tmp_path, 1), extra.format(tmp=tmp_path))
    _one_line_error(capsys, train_cli.main([config]), fragment)


def test_minutes_and_steps_must_be_positive(tmp_path, capsys) -> None:
    config = _config(tmp_path, tmp_path)
    _one_line_error(capsys, train_cli.main([config, "--minutes", "0"]), "minutes: Input should be greater than 0")
    _one_line_error(capsys, train_cli.main([config, "--steps", "-3"]), "steps: Input should be greater than or equal to 1")


def test_a_cuda_device_the_machine_lacks_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available here"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="this machine has 1 CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"  # the documented fallback