"""Resuming an --out folder: rows made with another baseline criterion or another codec are not mixed in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from aeic.evaluation import baselines, resume, runner
from PIL import Image


class TinyCodec:
    """Stand-in codec: the raw pixels of every 8th row and column (290 bytes, within a 0.6 bpp budget)."""

    def encode(self, rgb: np.ndarray, rate_index: int) -> bytes:
        small = rgb[::8, ::8]
        return bytes(small.shape[:2]) + small.tobytes()

    def encode_to_budget(self, rgb: np.ndarray, target_bytes: int) -> tuple[bytes, int]:
        return self.encode(rgb, 0), 0

    def decode(self, data: bytes) -> np.ndarray:
        small = np.frombuffer(data[2:], np.uint8).reshape(data[0], data[1], 3)
        return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    yy, xx = np.mgrid[0:64, 0:96]
    img = np.stack([xx * 2.5, yy * 3.5, (xx + yy) * 1.5], axis=-1).astype(np.uint8)
    Image.fromarray(img).save(folder / "img0.png")
    return folder


def _baselines_only(images: Path, out: Path, criterion: str) -> runner.Evaluator:
    config = runner.EvalConfig(
        images=images, out=out, points=runner.parse_points(None, "0.6"), baselines=["webp"],
        criterion=criterion, metrics=["psnr"],
    )  # fmt: skip
    return runner.Evaluator(None, config)


def _with_codec(images: Path, out: Path, model_id: str, baselines: list[str]) -> runner.Evaluator:
    config = runner.EvalConfig(
        images=images, out=out, points=runner.parse_points(None, "0.6"), baselines=baselines,
        metrics=["psnr"],
    )  # fmt: skip
    info = {"package": f"/somewhere/{model_id}", "model_id": model_id, "sender_provider": "CPU"}
    return runner.Evaluator(TinyCodec(), config, info)


def test_another_criterion_does_not_resume(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _baselines_only(images, out, "psnr").run(progress=False)
    with pytest.raises(ValueError, match="criterion 'psnr', not 'ms_ssim'"):
        _baselines_only(images, out, "ms_ssim")
    _baselines_only(images, out, "psnr").run(progress=False)  # the same settings resume


def test_a_folder_from_before_run_json_is_checked_against_its_summary(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _baselines_only(images, out, "psnr").run(progress=False)
    (out / resume.RUN_IDENTITY_FILE).unlink()
    with pytest.raises(ValueError, match="criterion"):
        _baselines_only(images, out, "ms_ssim")


def test_another_model_does_not_resume_but_a_baseline_folder_can_be_completed(
    images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    _baselines_only(images, out, "psnr").run(progress=False)
    summary = _with_codec(images, out, "aaaa", ["webp"]).run(progress=False)
    assert {r["method"] for r in summary["rows"]} == {"aeic", "webp"}
    _with_codec(images, out, "aaaa", []).run(progress=False)  # another provider/path, same model: fine
    with pytest.raises(ValueError, match="codec"):
        _with_codec(images, out, "bbbb", ["webp"])
    identity = json.loads((out / resume.RUN_IDENTITY_FILE).read_text())
    assert identity["criterion"] == "psnr" and identity["codec"]["model_id"] == "aaaa"


def test_a_new_folder_ignores_a_stale_identity(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / resume.RUN_IDENTITY_FILE).write_text(json.dumps({"criterion": "ms_ssim", "codec": None}))
    _baselines_only(images, out, "psnr").run(progress=False)  # no rows yet: nothing to mix with
    assert json.loads((out / resume.RUN_IDENTITY_FILE).read_text())["criterion"] == "psnr"  # this run's, recorded


def test_rows_of_other_encoder_settings_do_not_resume(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _baselines_only(images, out, "psnr").run(progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["baseline_encoders"]["webp"]["options"] == {"method": 6}
    webp = baselines.CODECS["webp"]
    changed = dict(baselines.CODECS, webp=dataclasses.replace(webp, options={"method": 4}))
    monkeypatch.setattr(baselines, "CODECS", changed)
    with pytest.raises(ValueError, match="webp rows made with other encoder settings"):
        _baselines_only(images, out, "psnr")


def test_best_rows_over_other_codecs_do_not_resume(images: Path, tmp_path: Path) -> None:
    """A folder whose best rows were chosen among JPEG and WebP (AVIF missing on that machine) resumed on one
    with JPEG, WebP and JPEG XL mixed best-of-two and best-of-three rows in one mean."""
    out = tmp_path / "out"
    _with_codec(images, out, "m1", ["jpeg", "webp"]).run(progress=False)
    with pytest.raises(ValueError, match="best"):
        _with_codec(images, out, "m1", ["jpeg", "webp", "jxl"])
    _with_codec(images, out, "m1", ["jpeg", "webp"]).run(progress=False)  # the same codecs resume
    _with_codec(images, out, "m1", []).run(progress=False)  # and rows without classic codecs join
