"""A flat original has no texture to retain: its texture is undefined, left out of the texture mean and named,
as unreachable images are, instead of a 0 that pulled the mean down for a near-perfect reconstruction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from aeic.evaluation import cli, summary
from aeic.evaluation.runner import RatePoint
from PIL import Image


def _photo(height: int = 64, width: int = 96) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([255 * xx / width, 255 * yy / height, 128 + 60 * np.sin(xx / 5.0)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _row(image: str, texture: str) -> dict[str, str]:
    return {"image": image, "point": "bpp1", "method": "jpeg", "status": "ok", "detail": "", "psnr": "30.0",
            "texture": texture}  # fmt: skip


def test_the_mean_leaves_an_undefined_texture_out_and_names_the_image() -> None:
    rows = [_row("photo.png", "0.5"), _row("flat.png", "nan"), _row("photo2.png", "0.25")]
    (entry,) = summary.means(rows, ["psnr", "texture"], [RatePoint("budget", 1.0)], ["jpeg"])
    assert entry["texture"] == pytest.approx(0.375) and entry["psnr"] == 30.0 and entry["n_ok"] == 3
    assert entry["undefined_images"] == {"texture": ["flat.png"]}
    assert summary.typed_row(_row("flat.png", "nan"))["texture"] is None  # JSON null, not NaN


def test_a_flat_photo_in_a_run_is_counted_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_photo()).save(images / "photo.png")
    Image.fromarray(np.full((64, 96, 3), 120, np.uint8)).save(images / "flat.png")
    out = tmp_path / "out"
    argv = ["--images", str(images), "--out", str(out), "--budgets-bpp", "2", "--baselines-only", "--baseline",
            "jpeg", "--metrics", "psnr,texture", "--no-progress", "--no-plots"]  # fmt: skip
    assert cli.main_eval(argv) == 0
    result = json.loads((out / "summary.json").read_text())
    rows = {r["image"]: r for r in result["rows"]}
    assert rows["flat.png"]["texture"] is None and rows["flat.png"]["psnr"] > 40
    (mean,) = result["means"]
    assert mean["n_ok"] == 2 and mean["texture"] == rows["photo.png"]["texture"] > 0
    assert mean["undefined_images"] == {"texture": ["flat.png"]}
    assert "texture undefined (flat original) for 1 image(s), left out of its mean: flat.png" in capsys.readouterr().out
    assert math.isnan(float(next(line for line in (out / "results.csv").read_text().splitlines()
                                 if line.startswith("flat.png")).split(",")[-1]))  # fmt: skip
