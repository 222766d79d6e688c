"""What a GPU user hands the full (SD-Turbo) profile's training by mistake, each refused in one line naming it.

- `init` naming a package or checkpoint of another preset (the shipped nano package, say) in a full-profile
  run blamed the SD-Turbo folder: "decoder tensors ... do not fit the UNet in SD-Turbo folder ...: it is
  another model", sending the user to check a folder that was right.
- An SD-Turbo component whose config.json is not its weights' (another VAE's config beside these weights)
  was diffusers' "Cannot load  because ..." naming neither the folder nor the component.
- One whose weights file lacks tensors its config asks for loaded: diffusers filled them with random values
  and only warned, so a run trained on (and a package fingerprinted) a partly random UNet.
- `init` naming a full-profile package was "only nano packages can be imported, not 'full'": a GPU user
  could go on from a package only through its training checkpoint, which a package handed on lacks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from aeic.codec.export import export_package
from aeic.codec.full_profile import FullDecoder
from aeic.codec.model import AEICModel
from aeic.codec.package_import import model_from_package
from aeic.codec.presets import preset
from aeic.codec.sd_turbo_folder import load_unet_and_vae
from aeic.codec.testing import make_tiny_package
from aeic.training import cli as train_cli
from safetensors.torch import load_file, save_file
from sd_turbo_support import write_other_base, write_tiny_sd_turbo
from training_support import write_training_photos


@pytest.fixture(scope="module")
def sd_turbo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_turbo(tmp_path_factory.mktemp("sd_turbo"))


def _one_line_refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def test_init_of_another_preset_is_named_as_such_not_as_the_sd_turbo_folder(
    sd_turbo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(sd_turbo))
    (tmp_path / "photos").mkdir()
    photos = write_training_photos(tmp_path / "photos", 1)
    nano = make_tiny_package(tmp_path / "nano")
    config = tmp_path / "run.toml"
    config.write_text(f'name = "t"\nmodel = "tiny-full-me"\ndata = "{photos}"\ncache = "{tmp_path / "cache"}"\n'
                      f'short_side = 160\ncrop = 128\nbatch = 1\nsteps = 1\ndevice = "cpu"\ninit = "{nano}"\n'
                      f'out = "{tmp_path / "run"}"\n')  # fmt: skip
    line = _one_line_refusal(capsys, [str(config)])
    assert str(nano) in line and "another model preset" in line and "SD-Turbo" not in line, line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _copy(folder: Path, to: Path) -> Path:
    for name in ("unet", "vae"):
        (to / name).mkdir(parents=True)
        for file in (folder / name).iterdir():
            (to / name / file.name).write_bytes(file.read_bytes())
    return to


def test_a_component_config_that_is_not_its_weights_is_one_line_naming_it(sd_turbo: Path, tmp_path: Path) -> None:
    folder = _copy(sd_turbo, tmp_path / "mixed")
    config = (folder / "vae" / "config.json").read_text()
    (folder / "vae" / "config.json").write_text(config.replace('"latent_channels": 4', '"latent_channels": 16'))
    with pytest.raises(OSError, match="vae/") as refusal:
        load_unet_and_vae(folder)
    assert str(folder) in str(refusal.value) and "\n" not in str(refusal.value)


def test_weights_lacking_tensors_of_their_config_are_refused_not_filled_at_random(sd_turbo: Path,
                                                                                  tmp_path: Path) -> None:
    folder = _copy(sd_turbo, tmp_path / "partial")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    dropped = min(tensors)
    save_file({name: tensor for name, tensor in tensors.items() if name != dropped}, str(weights))
    with pytest.raises(OSError, match="unet/") as refusal:
        load_unet_and_vae(folder)
    assert str(folder) in str(refusal.value) and dropped in str(refusal.value)
    unet, _ = load_unet_and_vae(sd_turbo)  # the whole folder still loads
    assert torch.isfinite(next(unet.parameters())).all()


def test_a_full_package_starts_a_run(
    sd_turbo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its trained decoder weights come back (fp16-exact, as the receiver stores them), the base weights from
    the SD-Turbo folder the package's fingerprint names, and a run trains on from them."""
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(sd_turbo))
    torch.manual_seed(2)
    original = AEICModel(preset("tiny-full-me"))
    assert isinstance(original.decoder, FullDecoder)
    with torch.no_grad():  # as after training: adapters and rate embedding away from their start
        for parameter in original.decoder.trainable_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    package = export_package(original, tmp_path / "package")
    imported = model_from_package(package).decoder
    assert isinstance(imported, FullDecoder)
    trained, back = original.decoder.trainable_state_dict(), imported.trainable_state_dict()
    assert trained.keys() == back.keys()
    for name, tensor in trained.items():
        assert torch.equal(back[name], tensor.half().float()), name
    (tmp_path / "photos").mkdir()
    photos = write_training_photos(tmp_path / "photos", 1)
    config = tmp_path / "run.toml"
    config.write_text(f'name = "t"\nmodel = "tiny-full-me"\ndata = "{photos}"\ncache = "{tmp_path / "cache"}"\n'
                      f'short_side = 160\ncrop = 128\nbatch = 1\nsteps = 1\ndevice = "cpu"\ninit = "{package}"\n'
                      f'out = "{tmp_path / "run"}"\n')  # fmt: skip
    assert train_cli.main([str(config)]) == 0, capsys.readouterr().err
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(write_other_base(tmp_path / "reseeded", "reseeded")))
    config.write_text(config.read_text().replace(str(tmp_path / "run"), str(tmp_path / "other")))
    line = _one_line_refusal(capsys, [str(config)])  # another revision's weights: said so, not "another version"
    assert "trained on other base weights" in line and str(tmp_path / "reseeded") in line, line
