"""Re-spacing a package's rate levels: shared levels keep their streams, new ones sit between in size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from aeic.codec.cli import main as aeic_main
from aeic.codec.export import export_package
from aeic.codec.rate_levels import level_positions, relevel_package
from aeic.codec.testing import make_tiny_model
from aeic.receiver.decoder import ReceiverCodec
from aeic.sender.encoder import SenderCodec
from aeic.shared import bitstream
from aeic.shared.model_package import ModelPackage


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("levels")
    coarse = relevel_package(export_package(make_tiny_model("tiny-se"), base / "exported"), base / "coarse", 4)
    fine = relevel_package(coarse, base / "fine", 8)
    return coarse, fine


def _photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:96, 0:128]
    base = np.stack([rows * 2.0, cols * 1.5, (rows + cols) % 48 * 4.0], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def test_level_positions_keep_the_trained_points_and_fit_the_rate_index() -> None:
    positions = level_positions(6, 16)
    assert len(positions) == 81 and np.allclose(positions[::16], np.arange(6))
    with pytest.raises(ValueError, match="at most 256"):
        level_positions(6, 64)


def test_relevel_keeps_shared_levels_byte_for_byte(packages: tuple[Path, Path]) -> None:
    coarse, fine = packages
    coarse_sender, fine_sender = SenderCodec.from_package(coarse), SenderCodec.from_package(fine)
    assert fine_sender.num_levels == 2 * coarse_sender.num_levels - 1
    assert ModelPackage.load(fine).model_id != ModelPackage.load(coarse).model_id
    analysed = coarse_sender.analyse(_photo(0))
    for level in range(coarse_sender.num_levels):
        old = bitstream.unpack(coarse_sender.encode_analysed(analysed, level))
        new = bitstream.unpack(fine_sender.encode_analysed(analysed, 2 * level))
        assert new.payload == old.payload and new.header.rate_index == 2 * level


def test_new_levels_lie_between_their_neighbours(packages: tuple[Path, Path]) -> None:
    _, fine = packages
    package = ModelPackage.load(fine)
    log_gains = np.log(package.level_gains.astype(np.float64))
    middle = log_gains[1:-1:2]
    assert np.allclose(middle, (log_gains[0:-2:2] + log_gains[2::2]) / 2, atol=1e-6)
    assert np.all(np.diff(package.rates) > 0)


def test_finer_levels_fill_a_byte_budget_at_least_as_well_and_decode(packages: tuple[Path, Path]) -> None:
    coarse, fine = packages
    coarse_sender, fine_sender = SenderCodec.from_package(coarse), SenderCodec.from_package(fine)
    receiver = ReceiverCodec.from_package(fine, device="cpu")
    for seed in range(3):
        rgb = _photo(seed)
        budget = (len(coarse_sender.encode(rgb, 1)) + len(coarse_sender.encode(rgb, 2))) // 2
        coarse_stream, _ = coarse_sender.encode_to_budget(rgb, budget)
        fine_stream, _ = fine_sender.encode_to_budget(rgb, budget)
        assert len(coarse_stream) <= len(fine_stream) <= budget
        assert receiver.decode(fine_stream).shape == rgb.shape


def test_relevel_cli_writes_a_loadable_package_and_refuses_too_many_levels(
    packages: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coarse, _ = packages
    assert aeic_main(["relevel", str(coarse), str(tmp_path / "p"), "--per-step", "2"]) == 0
    assert ModelPackage.load(tmp_path / "p").num_levels == 2 * (ModelPackage.load(coarse).num_levels - 1) // 4 + 1
    assert aeic_main(["relevel", str(coarse), str(tmp_path / "q"), "--per-step", "300"]) == 2
    assert "at most 256" in capsys.readouterr().err


def test_level_for_bpp_names_the_same_rate_whatever_the_spacing(packages: tuple[Path, Path]) -> None:
    coarse, fine = (ModelPackage.load(p) for p in packages)
    assert coarse.level_for_bpp(0.03) == 4 and fine.level_for_bpp(0.03) == 8  # the tiny preset's middle point
    assert coarse.rates[coarse.level_for_bpp(0.0205)] == pytest.approx(fine.rates[fine.level_for_bpp(0.0205)], rel=0.15)
    assert fine.level_for_bpp(1e-6) == 0 and fine.level_for_bpp(10.0) == fine.num_levels - 1
