"""Receiver interpolation: a decoder between two fine-tunes of one sender, streams unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from aeic.codec.cli import main as aeic_main
from aeic.codec.export import RECEIVER_FILE, SENDER_FILES, export_receiver_update
from aeic.codec.interpolation import interpolate_receivers
from aeic.codec.testing import make_tiny_model, make_tiny_package
from aeic.receiver.decoder import ReceiverCodec
from aeic.sender.encoder import SenderCodec
from aeic.shared import bitstream
from aeic.shared.model_package import ModelPackage
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two receivers for one sender: the exported one and a perturbed one."""
    base = tmp_path_factory.mktemp("interpolate")
    first = make_tiny_package(base / "first")
    model = make_tiny_model()
    with torch.no_grad():
        for parameter in [*model.synthesis.parameters(), *model.decoder.parameters()]:
            parameter.add_(0.05 * torch.randn_like(parameter))
    second = export_receiver_update(first, model, base / "second")
    return base, first, second


def _receiver(path: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in load_file(str(path / RECEIVER_FILE)).items()}


def test_ends_give_each_receiver_and_the_middle_lies_between(fine_tunes: tuple[Path, Path, Path]) -> None:
    base, first, second = fine_tunes
    a, b = _receiver(first), _receiver(second)
    for weight, expected in ((0.0, a), (1.0, b)):
        mixed = _receiver(interpolate_receivers(first, second, weight, base / f"w{weight}"))
        assert all(np.array_equal(mixed[k], expected[k]) for k in a)
    middle = _receiver(interpolate_receivers(first, second, 0.5, base / "middle"))
    assert all(np.allclose(middle[k], (a[k] + b[k]) / 2, atol=2e-3, rtol=2e-3) for k in a)
    assert any(not np.array_equal(middle[k], a[k]) for k in a)


def test_streams_stay_byte_for_byte_and_decode(fine_tunes: tuple[Path, Path, Path]) -> None:
    base, first, second = fine_tunes
    out = interpolate_receivers(first, second, 0.5, base / "decodes")
    assert all((out / name).read_bytes() == (first / name).read_bytes() for name in SENDER_FILES)
    assert ModelPackage.load(out).model_id not in {ModelPackage.load(p).model_id for p in (first, second)}
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    stream = SenderCodec.from_package(out).encode(rgb, 2)
    assert bitstream.unpack(stream).payload == bitstream.unpack(SenderCodec.from_package(first).encode(rgb, 2)).payload
    assert ReceiverCodec.from_package(out, device="cpu").decode(stream).shape == rgb.shape


def test_refuses_other_streams_and_weights_outside_the_range(
    fine_tunes: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, first, _ = fine_tunes
    other = make_tiny_package(base / "other-sender", seed=1)
    with pytest.raises(ValueError, match="different streams"):
        interpolate_receivers(first, other, 0.5, base / "refused")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_receivers(first, first, 1.5, base / "refused")
    assert aeic_main(["interpolate", str(first), str(other), str(base / "refused")]) == 2
    assert "different streams" in capsys.readouterr().err


def test_command_writes_a_package(
    fine_tunes: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, first, second = fine_tunes
    assert aeic_main(["interpolate", str(first), str(second), str(base / "cli"), "--weight", "0.25"]) == 0
    assert f"id {ModelPackage.load(base / 'cli').model_id.hex()}" in capsys.readouterr().out


def test_fine_tunes_on_different_sd_turbo_bases_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-profile receivers hold only what training changed: a mix of two trained on different SD-Turbo
    base weights named neither base (its fingerprint a blend of both) and decoded on none."""
    from aeic.codec.export import export_package
    from aeic.codec.model import AEICModel
    from aeic.codec.presets import preset
    from sd_turbo_support import write_other_base, write_tiny_sd_turbo

    packages = []
    for name, folder in (("a", write_tiny_sd_turbo(tmp_path / "sd-a")), ("b", write_other_base(tmp_path / "sd-b", "reseeded"))):
        monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
        torch.manual_seed(0)  # the same sender: only the base weights differ
        packages.append(export_package(AEICModel(preset("tiny-full")), tmp_path / name))
    with pytest.raises(ValueError, match="fine-tuned on different SD-Turbo base weights"):
        interpolate_receivers(packages[0], packages[1], 0.5, tmp_path / "mix")
