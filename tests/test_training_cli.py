"""`aeic-train`'s command-line overrides and config values, refused as what they are before any work.

- `aeic-train CONFIG --steps 0` (or `--batch 0`, `--minutes -1`) said "CONFIG: steps: Input should be greater
  than or equal to 1", sending the user to a config file that holds no such value.
- A `decoder` stage with `window` under 11 cells (88 px) passed the config, cached the photos, coded them with
  the package's sender and then died in the first step with pytorch_msssim's AssertionError traceback ("Image
  size should be larger than 96"): MS-SSIM's five scales need a side above 96 px.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aeic.training import cli as train_cli


@pytest.mark.parametrize(("option", "value", "key"), [("--steps", "0", "steps"), ("--batch", "0", "batch"),
                                                      ("--minutes", "-1", "minutes")])
def test_a_bad_override_is_named_as_the_option_not_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, key: str
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(f'name = "t"\nmodel = "tiny-se"\ndata = "{tmp_path}"\nout = "{tmp_path / "run"}"\n')
    assert train_cli.main([str(config), option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"aeic-train: error: {option}: ") and "\n" not in err, err
    assert str(config) not in err
    config.write_text(config.read_text() + f"{key} = {value}\n")  # the same value in the file names the file
    assert train_cli.main([str(config)]) == 2
    assert f"{config}: {key}: " in capsys.readouterr().err


@pytest.mark.parametrize("window", [1, 10])
def test_a_decoder_window_too_small_for_ms_ssim_is_refused_in_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], window: int
) -> None:
    config = tmp_path / "decoder.toml"
    config.write_text(f'name = "t"\nstage = "decoder"\nmodel = "tiny-se"\npackage = "{tmp_path}"\n'
                      f'data = "{tmp_path}"\nwindow = {window}\nout = "{tmp_path / "run"}"\n')  # fmt: skip
    assert train_cli.main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"aeic-train: error: {config}: window: ") and "MS-SSIM" in err and "\n" not in err, err
