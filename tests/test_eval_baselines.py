"""Classic codecs at equal bytes: the whole file always fits the budget; unreachable budgets are reported."""

from __future__ import annotations

import io
import itertools
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


def _score(result: baselines.BaselineResult) -> float:
    """A reachable result's score."""
    assert result.score is not None, f"{result.method or result.codec} did not fit {result.budget_bytes} bytes"
    return result.score


@pytest.mark.parametrize("codec", AVAILABLE)
@pytest.mark.parametrize("budget", [150, 400, 1500])
def test_budget_is_respected_exactly(codec: str, budget: int) -> None:
    for rgb in _images():
        result = baselines.compress_to_budget(rgb, budget, codec)
        if not result.reachable:
            assert result.reconstruction is None and result.num_bytes is None
            continue
        assert result.num_bytes is not None and result.data is not None and result.reconstruction is not None
        assert result.num_bytes <= budget
        side = 0 if result.factor == 1.0 else baselines.SIZE_SIDE_INFO_BYTES
        assert len(result.data) + side == result.num_bytes
        assert result.reconstruction.shape == rgb.shape and result.reconstruction.dtype == np.uint8
        assert result.factor in baselines.DOWNSCALE_FACTORS
        spec = baselines.CODECS[codec]
        assert result.quality is not None and spec.q_min <= result.quality <= spec.q_max
        # The bytes are a real file of that codec at the downscaled size.
        decoded = spec.decode(result.data)
        h, w = rgb.shape[:2]
        assert decoded.size == baselines._scaled_size(w, h, result.factor)


def test_generous_budget_reaches_full_size_and_high_quality() -> None:
    rgb = _synthetic()
    result = baselines.compress_to_budget(rgb, 200_000, "jpeg")
    assert result.factor == 1.0 and result.quality == baselines.CODECS["jpeg"].q_max
    assert _score(result) > _score(baselines.compress_to_budget(rgb, 600, "jpeg")) + 1.0


def test_more_bytes_never_score_worse() -> None:
    rgb = _synthetic()
    scores = [_score(baselines.compress_to_budget(rgb, b, "webp")) for b in (300, 800, 3000)]
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
    assert best.score == max(_score(r) for r in per_codec)
    assert best.method == "best" and best.codec in AVAILABLE


def test_ms_ssim_criterion_and_determinism() -> None:
    rgb = _synthetic()
    a = baselines.compress_to_budget(rgb, 500, "jpeg", criterion="ms_ssim")
    b = baselines.compress_to_budget(rgb, 500, "jpeg", criterion="ms_ssim")
    assert a.reachable and a.criterion == "ms_ssim" and 0.0 < _score(a) <= 1.0
    assert a.data == b.data and a.factor == b.factor and a.quality == b.quality


def test_size_side_info_is_charged_when_downscaled() -> None:
    rgb = _synthetic()
    result = baselines.compress_to_budget(rgb, 450, "jpeg", factors=(1 / 4,))
    assert result.reachable and result.factor == 1 / 4 and result.data is not None
    assert result.num_bytes == len(result.data) + baselines.SIZE_SIDE_INFO_BYTES
    with Image.open(io.BytesIO(result.data)) as im:
        assert im.format == "JPEG"


@pytest.mark.parametrize("codec", AVAILABLE)
def test_search_finds_the_best_single_factor(codec: str) -> None:
    """The pruned search (smallest size first, stop at the first that cannot fit) loses nothing."""
    crop = _real_crop()
    rgb = crop if crop is not None else _synthetic()
    full = baselines.compress_to_budget(rgb, 700, codec)
    singles = [
        baselines.compress_to_budget(rgb, 700, codec, factors=(f,)) for f in baselines.DOWNSCALE_FACTORS
    ]
    reachable = [r for r in singles if r.reachable]
    assert full.reachable == bool(reachable)
    if reachable:
        assert full.score == max(_score(r) for r in reachable)


def test_encoder_settings_audited_in_docs() -> None:
    """The settings docs/evaluation.md reports: JPEG baseline 4:2:0 with optimized Huffman tables, WebP at
    its strongest method, AVIF by libaom at speed 4 tuned for SSIM, JPEG XL on a quarter-step quality grid."""
    assert baselines.CODECS["jpeg"].options == {"optimize": True}
    assert baselines.CODECS["webp"].options == {"method": 6}
    avif = baselines.CODECS["avif"].options
    assert avif["codec"] == "aom" and avif["speed"] == 4 and avif["advanced"] == {"tune": "ssim"}
    assert baselines.CODECS["jxl"].q_step == 0.25
    settings = baselines.encoder_settings()
    assert set(settings) == set(baselines.CODECS) and settings["avif"]["options"] == avif


@pytest.mark.skipif("avif" not in AVAILABLE, reason="no AVIF encoder here")
def test_avif_tune_takes_effect() -> None:
    """Pillow 13's libavif tunes libaom for "iq" unless told otherwise (0.15-0.43 dB less PSNR at these
    rates): the SSIM tune must reach the encoder, so its file differs from the default's."""
    img = Image.fromarray(_synthetic())
    spec = baselines.CODECS["avif"]
    default_tune = {k: v for k, v in spec.options.items() if k != "advanced"}
    buf = io.BytesIO()
    img.save(buf, "AVIF", quality=30, **default_tune)
    assert spec.encode(img, 30) != buf.getvalue()


def test_quality_grids() -> None:
    for name, spec in baselines.CODECS.items():
        grid = list(spec.qualities)
        assert grid[0] == spec.q_min and grid[-1] == spec.q_max, name
        assert all(b - a == spec.q_step for a, b in itertools.pairwise(grid)), name
        if spec.q_step == 1:  # Pillow's AVIF plugin refuses a float quality
            assert all(isinstance(q, int) for q in grid), name
    assert len(baselines.CODECS["jxl"].qualities) == 397


class _SizedByQuality(baselines.ClassicCodec):
    """A fake codec whose file is ``10 * quality`` bytes long, so the largest fitting quality is known."""

    def encode(self, img: Image.Image, quality: float) -> bytes:
        return bytes(round(10 * quality))


@pytest.mark.parametrize("step", [1, 0.25])
def test_search_returns_the_largest_fitting_quality_on_the_grid(step: float) -> None:
    codec = _SizedByQuality("fake", "FAKE", 0, 99, q_step=step)
    img = Image.new("RGB", (4, 4))
    for budget in (0, 7, 10, 333, 456, 989, 990, 5000):
        found = baselines._largest_fitting_quality(codec, img, budget)
        fitting = [q for q in codec.qualities if round(10 * q) <= budget]
        assert found is not None and found[0] == max(fitting) and len(found[1]) <= budget
    assert baselines._largest_fitting_quality(_SizedByQuality("f", "F", 1, 99), img, 9) is None


@pytest.mark.parametrize("quality", [1, 40, 95])
def test_compact_jpeg_headers_is_lossless_and_34_bytes_smaller(quality: int) -> None:
    """libjpeg writes an optional JFIF APP0 segment and one segment per table; at 0.01 bpp (a few hundred
    bytes) those 34 bytes are worth 0.2-0.3 dB to the JPEG row, so the baseline sends the compact file."""
    img = Image.fromarray(_synthetic())
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True)
    plain = buf.getvalue()
    compact = baselines.compact_jpeg_headers(plain)
    assert len(plain) - len(compact) == 34 and b"JFIF" not in compact
    assert compact.count(b"\xff\xdb") == 1 and compact.count(b"\xff\xc4") == 1  # one DQT, one DHT segment
    with Image.open(io.BytesIO(plain)) as a, Image.open(io.BytesIO(compact)) as b:
        assert b.format == "JPEG" and np.array_equal(np.asarray(a), np.asarray(b))
    assert baselines.CODECS["jpeg"].encode(img, quality) == compact
    with pytest.raises(ValueError, match="not a JPEG"):
        baselines.compact_jpeg_headers(b"RIFF....")
