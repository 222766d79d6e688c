"""Tone oracle: corrected cell means match the original's, the grid's cost is counted exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from aeic.evaluation import metrics, tone_oracle
from aeic.evaluation.images import recon_name
from PIL import Image


def _photo_like(seed: int, height: int = 192, width: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([70 + 100 * xx / width, 80 + 90 * yy / height, 120 + 40 * np.sin(xx / 23.0)], axis=-1)
    return np.clip(base + rng.uniform(-20, 20, base.shape), 0, 255).astype(np.uint8)


def _tone_shifted(img: np.ndarray) -> np.ndarray:
    """A regional tone error: the left half darker, the right half warmer."""
    out = img.astype(np.float64)
    out[:, : img.shape[1] // 2] -= 25
    out[:, img.shape[1] // 2 :, 0] += 20
    return np.clip(out, 0, 255).astype(np.uint8)


def _ycc(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ tone_oracle._YCBCR.T


def test_exp_golomb_counts_each_code() -> None:
    # one row [3, 3, 1]: differences 3 (from 0), 0, -2 -> zigzag 6, 0, 3 -> 5 + 1 + 5 bits
    assert tone_oracle.exp_golomb_bytes(np.array([[[3, 3, 1]]])) == 11 / 8


def test_exact_means_undo_a_regional_tone_error() -> None:
    ref = _photo_like(0)
    rec = _tone_shifted(ref)
    out, side_bytes = tone_oracle.corrected(ref, rec, cell=64, step=0)
    assert np.isnan(side_bytes)
    assert metrics.psnr(ref, out) > metrics.psnr(ref, rec) + 5
    gap = (tone_oracle.cell_means(_ycc(out), 64) - tone_oracle.cell_means(_ycc(ref), 64)).abs().max()
    assert float(gap) < 3.0  # rounding, clipping and the smooth upsampling leave a little


def test_quantized_means_cost_bytes_and_keep_most_of_the_gain(tmp_path: Path) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    (run / "recon" / "bpp0.05" / "aeic").mkdir(parents=True)
    images.mkdir()
    ref = _photo_like(1)
    Image.fromarray(ref).save(images / "a.png")
    Image.fromarray(_tone_shifted(ref)).save(run / "recon" / "bpp0.05" / "aeic" / "a.png")
    out = tmp_path / "oracle.json"
    tone_oracle.main([str(run), str(images), "--cells", "64,128", "--step", "4", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["cell"] for r in rows] == [64, 128]
    assert all(r["psnr_gain_db"] > 3 and r["side_percent_of_budget"] > 0 for r in rows)
    # a finer grid costs more
    assert rows[0]["side_percent_of_budget"] > rows[1]["side_percent_of_budget"]


def test_a_jpeg_original_is_found_from_its_reconstructions_name(tmp_path: Path) -> None:
    images, recon = tmp_path / "images", tmp_path / "run" / "recon" / "bpp0.01" / "aeic"
    recon.mkdir(parents=True)
    images.mkdir()
    ref = _photo_like(2)
    Image.fromarray(ref).save(images / "b.jpg", quality=95)
    Image.fromarray(_tone_shifted(ref)).save(recon / recon_name("b.jpg"))
    [row] = tone_oracle.oracle_gains(tmp_path / "run", images, [64], step=0)
    assert row["images"] == 1 and row["psnr_gain_db"] > 3


def test_a_run_without_budget_reconstructions_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run" / "recon" / "rate0" / "aeic").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        tone_oracle.main([str(tmp_path / "run"), str(tmp_path)])
    assert stop.value.code == 2 and "no reconstructions of AEIC at byte budgets" in capsys.readouterr().err
