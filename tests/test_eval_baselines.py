"""Classic codecs at equal bytes: the whole file always fits the budget; unreachable budgets are reported."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from aeic.evaluation import baselines
from PIL import Image

AVAILABLE = [name for name, reason in baselines.available_codecs().items() if reason is None]
KODAK = [Path(__file__).resolve().parents[2] / "shared/data/kodak", Path("/work/shared/data/kodak")]


def _synthetic(height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([255 * xx / width, 255 * yy / height, 128 + 60 * np.sin(xx / 5.0)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _real_crop() -> np.ndarray | None:
    """A 96x128 crop of a Kodak photo when the shared data is present (it is for CI and developers)."""
    for folder in KODAK:
        path = folder / "kodim23.png"
        if path.is_file():
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))[200:296, 300:428].copy()
    return None


def _images() -> list[np.ndarray]:
    images = [_synthetic(), _synthetic(48, 40, seed=3)]
    real = _real_crop()
    if real is not None:
        images.append(real)
    return images


def test_all_four_codecs_are_available_here() -> None:
    assert AVAILABLE == ["jpeg", "webp", "avif", "jxl"]


@pytest.mark.parametrize("codec", AVAILABLE)
@pytest.mark.parametrize("budget", [150, 400, 1500])
def test_budget_is_respected_exactly(codec: str, budget: int) -> None:
    for rgb in _images():
        result = baselines.compress_to_budget(rgb, budget, codec)
        if not result.reachable:
            assert result.reconstruction is None and result.num_bytes is None
            continue
        assert result.num_bytes <= budget
        side = 0 if result.factor == 1.0 else baselines.SIZE_SIDE_INFO_BYTES
        assert len(result.data) + side == result.num_bytes
        assert result.reconstruction.shape == rgb.shape and result.reconstruction.dtype == np.uint8
        assert result.factor in baselines.DOWNSCALE_FACTORS
        spec = baselines.CODECS[codec]
        assert spec.q_min <= result.quality <= spec.q_max
        # The bytes are a real file of that codec at the downscaled size.
        decoded = spec.decode(result.data)
        h, w = rgb.shape[:2]
        assert decoded.size == baselines._scaled_size(w, h, result.factor)


def test_generous_budget_reaches_full_size_and_high_quality() -> None:
    rgb = _synthetic()
    result = baselines.compress_to_budget(rgb, 200_000, "jpeg")
    assert result.factor == 1.0 and result.quality == baselines.CODECS["jpeg"].q_max
    assert result.score > baselines.compress_to_budget(rgb, 600, "jpeg").score + 1.0


def test_more_bytes_never_score_worse() -> None:
    rgb = _synthetic()
    scores = [baselines.compress_to_budget(rgb, b, "webp").score for b in (300, 800, 3000)]
    assert scores == sorted(scores)


def test_unreachable_budget_is_reported_not_dropped() -> None:
    rgb = _synthetic()
    results = baselines.compress_all(rgb, 20, AVAILABLE)
    assert set(results) == {*AVAILABLE, "best"}
    for name, result in results.items():
        assert not result.reachable, name
        assert result.budget_bytes == 20
    assert results["best"].method == "best"


def test_best_is_the_highest_scoring_reachable_codec() -> None:
    rgb = _synthetic()
    results = baselines.compress_all(rgb, 600, AVAILABLE)
    per_codec = [results[name] for name in AVAILABLE if results[name].reachable]
    assert per_codec, "at 600 bytes at least one codec must fit a 64x96 image"
    best = results["best"]
    assert best.score == max(r.score for r in per_codec)
    assert best.method == "best" and best.codec in AVAILABLE


def test_ms_ssim_criterion_and_determinism() -> None:
    rgb = _synthetic()
    a = baselines.compress_to_budget(rgb, 500, "jpeg", criterion="ms_ssim")
    b = baselines.compress_to_budget(rgb, 500, "jpeg", criterion="ms_ssim")
    assert a.reachable and a.criterion == "ms_ssim" and 0.0 < a.score <= 1.0
    assert a.data == b.data and a.factor == b.factor and a.quality == b.quality


def test_size_side_info_is_charged_when_downscaled() -> None:
    rgb = _synthetic()
    result = baselines.compress_to_budget(rgb, 450, "jpeg", factors=(1 / 4,))
    assert result.reachable and result.factor == 1 / 4
    assert result.num_bytes == len(result.data) + baselines.SIZE_SIDE_INFO_BYTES
    with Image.open(io.BytesIO(result.data)) as im:
        assert im.format == "JPEG"


@pytest.mark.parametrize("codec", AVAILABLE)
def test_search_finds_the_best_single_factor(codec: str) -> None:
    """The pruned search (smallest size first, stop at the first that cannot fit) loses nothing."""
    rgb = _real_crop() if _real_crop() is not None else _synthetic()
    full = baselines.compress_to_budget(rgb, 700, codec)
    singles = [
        baselines.compress_to_budget(rgb, 700, codec, factors=(f,)) for f in baselines.DOWNSCALE_FACTORS
    ]
    reachable = [r for r in singles if r.reachable]
    assert full.reachable == bool(reachable)
    if reachable:
        assert full.score == max(r.score for r in reachable)
