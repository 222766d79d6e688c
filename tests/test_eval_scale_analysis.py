"""Scale analysis: its MS-SSIM terms recompose the evaluation's MS-SSIM; block means see tone, not texture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from aeic.evaluation import metrics, scale_analysis
from PIL import Image


def _photo_like(seed: int, height: int = 192, width: int = 224) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([80 + 90 * xx / width, 80 + 90 * yy / height, 120 + 40 * np.sin(xx / 17.0)], axis=-1)
    return np.clip(base + rng.uniform(-25, 25, base.shape), 0, 255).astype(np.uint8)


def _degraded(img: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 12, img.shape)
    return np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)


def test_terms_recompose_the_reported_ms_ssim() -> None:
    ref = _photo_like(0)
    rec = _degraded(ref, 1)
    terms = scale_analysis.ms_ssim_terms(ref, rec)
    assert len(terms) == 5 and all(0 < t <= 1 for t in terms)
    recomposed = float(np.prod(np.array(terms) ** np.array(scale_analysis.MS_SSIM_WEIGHTS)))
    assert recomposed == pytest.approx(metrics.ms_ssim(ref, rec), abs=2e-4)
    assert scale_analysis.ms_ssim_terms(ref, ref) == pytest.approx([1.0] * 5)


def test_block_means_separate_texture_from_tone() -> None:
    ref = _photo_like(0)
    noisy = _degraded(ref, 1)  # fine error: block means nearly exact
    toned = ref.copy()
    toned[:96, :112] = np.clip(ref[:96, :112].astype(int) - 12, 0, 255)  # regional error
    fine, coarse = scale_analysis.block_mean_psnr(ref, noisy), scale_analysis.block_mean_psnr(ref, toned)
    assert fine[-1] > fine[0] + 25  # the noise averages out in 32x32 blocks
    assert coarse[-1] == pytest.approx(coarse[0], abs=1.0)  # the tone error does not


def test_analyse_run_reads_an_eval_run_and_writes_json(tmp_path: Path) -> None:
    originals, run = tmp_path / "images", tmp_path / "run"
    originals.mkdir()
    for method in ("aeic", "webp"):
        (run / "recon" / "bpp0.01" / method).mkdir(parents=True)
    for seed in (0, 1):
        ref = _photo_like(seed)
        Image.fromarray(ref).save(originals / f"p{seed}.png")
        Image.fromarray(_degraded(ref, 5)).save(run / "recon" / "bpp0.01" / "aeic" / f"p{seed}.png")
        Image.fromarray(ref).save(run / "recon" / "bpp0.01" / "webp" / f"p{seed}.png")
    scale_analysis.main([str(run), str(originals), "--out", str(tmp_path / "scales.json")])
    rows = json.loads((tmp_path / "scales.json").read_text())
    assert [(r["point"], r["method"], r["images"]) for r in rows] == [("bpp0.01", "aeic", 2), ("bpp0.01", "webp", 2)]
    assert rows[0]["ms_ssim"] < 1.0 and rows[1]["ms_ssim"] == pytest.approx(1.0)
    assert set(rows[0]["block_mean_psnr"]) == {"1", "2", "4", "8", "16", "32"}
