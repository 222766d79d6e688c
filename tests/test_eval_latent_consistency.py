"""Latent consistency: an original is on its own bins under nearest rounding; the table is per budget."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from aeic.codec import testing
from aeic.evaluation import latent_consistency
from aeic.sender.encoder import SenderCodec
from PIL import Image


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(testing.make_tiny_package(tmp_path_factory.mktemp("tiny-package")))


def _photo_like(seed: int, height: int = 96, width: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([60 + 120 * xx / width, 90 + 80 * yy / height, 128 + 50 * np.sin(xx / 9.0)], axis=-1)
    return np.clip(base + rng.uniform(-25, 25, base.shape), 0, 255).astype(np.uint8)


def test_an_original_lies_within_half_a_step_of_its_nearest_rounded_symbols(tiny_package: Path) -> None:
    sender = SenderCodec.from_package(tiny_package, rounding="nearest", downscale=1)
    model = sender.package.entropy_model  # skipped coefficients sit at their mean: none here, so every one is coded
    sender.package = replace(sender.package, entropy_model=replace(model, y_tables=replace(model.y_tables, skip_index=None)))
    rgb = _photo_like(0)
    analysed = sender.analyse(rgb)
    level = sender.num_levels - 1
    steps = latent_consistency.distance_in_steps(sender, rgb, sender.quantized_latent(analysed, level), level, 1)
    assert steps.max() <= 0.5 + 1e-5
    assert steps.mean() > 0.05  # not trivially zero: the symbols really quantize


def test_table_has_one_row_per_budget(tiny_package: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(2):
        Image.fromarray(_photo_like(seed)).save(images / f"{seed}.png")
    out = tmp_path / "consistency.json"
    latent_consistency.main([str(images), "--budgets-bpp", "0.5,2", "--package", str(tiny_package), "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["bpp"], r["images"]) for r in rows] == [(0.5, 2), (2.0, 2)]
    for row in rows:
        assert 0 <= row["original_off_bin"] <= row["reconstruction_off_bin"] <= 1
        assert row["reconstruction_rms_steps"] > 0


def test_an_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        latent_consistency.main([str(tmp_path)])
    assert exit_info.value.code == 2
