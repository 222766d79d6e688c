"""Rate-distortion rounding at the sender: fewer bits, the same format, a setting carried by the package."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from aeic.codec.cli import main as aeic_main
from aeic.codec.rounding_setting import set_rounding_weight
from aeic.codec.testing import make_tiny_package
from aeic.receiver.decoder import ReceiverCodec
from aeic.sender.encoder import SenderCodec
from aeic.sender.rate_distortion_rounding import (
    RateDistortionRounding,
    parse_rounding,
    rounding_for,
    symbol_bits,
)
from aeic.shared import bitstream
from aeic.shared.entropy_coding import gaussian_scale_table
from aeic.shared.entropy_model import nearest_rounding, scale_table
from aeic.shared.model_package import ModelPackage, ModelPackageError, default_model_dir, write_manifest

TABLES = gaussian_scale_table(scale_table())


def _residuals(seed: int, size: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    indices = rng.integers(1, TABLES.num_tables, size=size)
    return rng.normal(size=size) * scale_table()[indices], indices


def test_each_symbol_is_the_cheaper_neighbour() -> None:
    residual, indices = _residuals(0)
    rounding = RateDistortionRounding(8.0)
    chosen = rounding(residual, indices, TABLES)
    low = np.floor(residual).astype(np.int64)
    assert np.all((chosen == low) | (chosen == low + 1))

    def cost(symbols: np.ndarray) -> np.ndarray:
        return 8.0 * (residual - symbols) ** 2 + symbol_bits(TABLES, indices, symbols)[0]

    assert np.all(cost(chosen) <= np.minimum(cost(low), cost(low + 1)) + 1e-12)


def test_it_saves_bits_for_a_little_error_and_tends_to_nearest() -> None:
    residual, indices = _residuals(1)
    nearest = nearest_rounding(residual, indices, TABLES)
    rd = RateDistortionRounding(2.0)(residual, indices, TABLES)
    assert symbol_bits(TABLES, indices, rd)[0].sum() < 0.97 * symbol_bits(TABLES, indices, nearest)[0].sum()
    assert np.mean((residual - rd) ** 2) < 1.5 * np.mean((residual - nearest) ** 2)
    assert np.array_equal(RateDistortionRounding(1e9)(residual, indices, TABLES), nearest)


def test_residuals_beyond_the_table_round_to_the_nearest() -> None:
    indices = np.array([1, 1, 1])
    beyond = TABLES.offsets[1] + np.array([0.6, 5.4, 40.5])
    assert np.array_equal(RateDistortionRounding(0.01)(beyond, indices, TABLES), np.floor(beyond + 0.5))


@pytest.mark.parametrize("weight", [0.0, -1.0, float("inf"), float("nan")])
def test_weights_must_be_positive_and_finite(weight: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        RateDistortionRounding(weight)


def test_command_line_choices() -> None:
    assert parse_rounding("package") == "package"
    assert parse_rounding("nearest") == "nearest"
    assert parse_rounding("64") == 64.0
    for bad in ("-3", "zero", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rounding(bad)
    assert rounding_for(None) is nearest_rounding
    assert rounding_for(64.0, "nearest") is nearest_rounding
    assert rounding_for(64.0) == RateDistortionRounding(64.0)
    assert rounding_for(None, 16.0) == RateDistortionRounding(16.0)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("rounding")
    plain = make_tiny_package(base / "plain")
    return base, plain, set_rounding_weight(plain, base / "rd", 4.0)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped package with a strong weight: a trained model codes real symbols (random ones barely any)."""
    return set_rounding_weight(default_model_dir(), tmp_path_factory.mktemp("shipped") / "rd", 16.0)


def _photo(height: int = 96, width: int = 160) -> np.ndarray:
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows / height, cols / width, ((rows * cols) % 97) / 97], -1) * 220
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def test_the_setting_changes_only_the_manifest(packages: tuple[Path, Path, Path]) -> None:
    _, plain, rd = packages
    before, after = ModelPackage.load(plain), ModelPackage.load(rd)
    assert before.manifest["files"] == after.manifest["files"]
    assert before.model_id != after.model_id
    assert (before.rounding_weight, after.rounding_weight) == (None, 4.0)


def test_the_package_weight_gives_smaller_streams_that_decode(shipped: Path) -> None:
    rgb = _photo(128, 192)
    sender = SenderCodec.from_package(shipped, downscale=1)
    assert sender.rounding == RateDistortionRounding(16.0)
    level = sender.num_levels * 3 // 4
    rounded = sender.encode(rgb, level)
    nearest = SenderCodec.from_package(shipped, downscale=1, rounding="nearest").encode(rgb, level)
    assert len(bitstream.unpack(rounded).payload) < len(bitstream.unpack(nearest).payload)
    assert ReceiverCodec.from_package(shipped).decode(rounded).shape == rgb.shape


def test_the_decoder_reads_back_exactly_the_rounded_latent(shipped: Path) -> None:
    sender = SenderCodec.from_package(shipped, downscale=1)
    analysed = sender.analyse(_photo(128, 192), 1)
    payload, fixed = sender._entropy_code(analysed, sender.num_levels // 2)
    assert np.array_equal(sender.package.entropy_model.decode(payload, fixed.shape), fixed)


def test_nearest_removes_the_setting_and_bad_weights_are_refused(packages: tuple[Path, Path, Path]) -> None:
    base, plain, rd = packages
    back = set_rounding_weight(rd, base / "back", None)
    assert ModelPackage.load(back).manifest == ModelPackage.load(plain).manifest
    with pytest.raises(ValueError, match="positive"):
        set_rounding_weight(plain, base / "bad", -2.0)


def test_a_malformed_weight_in_a_manifest_is_a_clear_error(
    packages: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, plain, _ = packages
    for name in ModelPackage.load(plain).manifest["files"]:
        (tmp_path / name).write_bytes((plain / name).read_bytes())
    manifest = json.loads((plain / "manifest.json").read_text())
    write_manifest(tmp_path, {**manifest, "encoder": {"rounding_weight": "lots"}})
    with pytest.raises(ModelPackageError, match="rounding_weight"):
        SenderCodec.from_package(tmp_path)


def test_set_rounding_command(packages: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, plain, _ = packages
    assert aeic_main(["set-rounding", str(plain), str(base / "cli"), "--weight", "32"]) == 0
    assert ModelPackage.load(base / "cli").rounding_weight == 32.0
    assert "rounding 32.0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        aeic_main(["set-rounding", str(plain), str(base / "cli2"), "--weight", "package"])
