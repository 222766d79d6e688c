"""Metrics against known values: identical images, a known noise level, blur and noise against texture."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aeic.evaluation import learned, metrics, runner
from PIL import Image, ImageFilter


def _textured(height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth colour ramp with fine random texture, values kept inside 40..215 (no clipping later)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([60 + 100 * xx / width, 60 + 100 * yy / height, 128 + 0 * xx], axis=-1)
    return np.clip(base + rng.uniform(-20, 20, base.shape), 40, 215).astype(np.uint8)


def _perceptual(ref: np.ndarray, rec: np.ndarray) -> dict[str, float]:
    return {name: metrics.perceptual_metric_fn(name)(ref, rec) for name in metrics.PERCEPTUAL_METRICS}


def _add_noise(img: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(img + rng.normal(0.0, sigma, img.shape)), 0, 255).astype(np.uint8)


def test_identical_images_hit_the_ideal_values() -> None:
    img = _textured()
    assert metrics.psnr(img, img) == metrics.PSNR_CAP_DB
    assert metrics.ms_ssim(img, img) == pytest.approx(1.0, abs=1e-6)
    assert metrics.texture_retention(img, img) == 1.0
    perceptual = _perceptual(img, img)
    assert set(perceptual) == set(metrics.PERCEPTUAL_METRICS)
    for name in ("haarpsi", "vif", "fsim"):
        assert perceptual[name] == pytest.approx(1.0, abs=1e-4), name
    assert perceptual["gmsd"] == pytest.approx(0.0, abs=1e-6)


def test_gaussian_noise_gives_the_expected_psnr() -> None:
    # 256x384x3 samples: the MSE estimate is within ~0.3 % of sigma^2, i.e. ~0.015 dB.
    img = _textured(256, 384)
    sigma = 8.0
    noisy = _add_noise(img, sigma)
    expected = 10 * math.log10(255.0**2 / (sigma**2 + 1 / 12))  # + rounding to integers
    assert metrics.psnr(img, noisy) == pytest.approx(expected, abs=0.05)


def test_psnr_of_a_constant_offset_is_exact() -> None:
    img = _textured()
    shifted = (img.astype(np.int16) + 5).astype(np.uint8)
    assert metrics.psnr(img, shifted) == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)


def test_blur_loses_texture_and_noise_adds_it() -> None:
    img = _textured()
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(2)))
    blur_score = metrics.texture_retention(img, blurred)
    assert 0.0 < blur_score < 0.3
    smooth = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(3)))
    noisy_smooth = _add_noise(smooth, 10.0)
    assert metrics.texture_retention(smooth, noisy_smooth) < 0.2  # excess energy counts too
    assert metrics.texture_retention(img, blurred) == pytest.approx(metrics.texture_retention(blurred, img))


def test_texture_of_a_flat_original_is_undefined_not_zero() -> None:
    """An original with (almost) no gradient energy has no texture to keep: a near-perfect copy scored 0
    through min(r, 1/r) of a tiny energy; its texture is now NaN, which the means leave out and count."""
    flat = np.full((32, 32, 3), 90, np.uint8)
    assert math.isnan(metrics.texture_retention(flat, flat))
    almost = flat.copy()
    almost[::7, ::5] = 91  # a few one-level specks: a near-perfect reconstruction, or an almost flat original
    assert metrics.gradient_energy(almost) < metrics.FLAT_GRADIENT_ENERGY
    assert math.isnan(metrics.texture_retention(flat, almost))
    assert math.isnan(metrics.texture_retention(almost, flat))
    assert math.isnan(metrics.texture_retention(almost, _textured(32, 32)))
    assert metrics.texture_retention(_textured(32, 32), flat) == 0.0  # texture lost entirely is still 0


def test_gradient_energy_uses_bt601_luma() -> None:
    img = np.zeros((2, 2, 3), np.uint8)
    img[:, 1] = (100, 0, 0)  # red step along x only: luma step 29.9
    assert metrics.gradient_energy(img) == pytest.approx(29.9**2)


def test_metrics_order_with_distortion_on_small_images() -> None:
    """64x96 is below MS-SSIM's 161 px minimum: the mirror-pad fallback still ranks distortions."""
    img = _textured()
    light, heavy = _add_noise(img, 4.0), _add_noise(img, 20.0)
    assert metrics.psnr(img, light) > metrics.psnr(img, heavy)
    assert 1.0 > metrics.ms_ssim(img, light) > metrics.ms_ssim(img, heavy) > 0.0
    p_light, p_heavy = _perceptual(img, light), _perceptual(img, heavy)
    for name, (_, _, _, higher_better) in metrics.PERCEPTUAL_METRICS.items():
        assert (p_light[name] > p_heavy[name]) == higher_better, name


def test_every_metric_runs_in_the_order_of_the_columns() -> None:
    """results.csv's header follows this order, and a resume refuses a header in another."""
    img = _textured()
    functions, skipped = runner.metric_functions(None)
    assert not skipped
    assert list(functions) == ["psnr", "ms_ssim", "texture", *metrics.PERCEPTUAL_METRICS]
    assert all(math.isfinite(fn(img, _add_noise(img, 6.0))) for fn in functions.values())


@pytest.mark.parametrize(
    ("ref", "rec"),
    [
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)),
    ],
)
def test_bad_inputs_raise_value_error(ref: np.ndarray, rec: np.ndarray) -> None:
    with pytest.raises(ValueError):
        metrics.psnr(ref, rec)
    with pytest.raises(ValueError):
        metrics.texture_retention(ref, rec)


def test_learned_metrics_probe_never_downloads(tmp_path: Path) -> None:
    status = learned.probe(checkpoint_dir=tmp_path)  # an empty cache: nothing can be available
    assert set(status) == {"lpips", "dists", "fid", "kid"}
    for entry in status.values():
        assert not entry.available
        assert entry.message.startswith("skipped: weights not available offline (missing: ")
        assert str(tmp_path) in entry.message


def test_fid_patches_follow_the_shifted_grid_protocol() -> None:
    img = np.arange(512 * 768 * 3, dtype=np.uint32).reshape(512, 768, 3).astype(np.uint8)
    ps = learned.patches(img)
    assert len(ps) == 2 * 3 + 1 * 2  # the grid, then the grid shifted by 128 px
    assert all(p.shape == (256, 256, 3) for p in ps)
    assert np.array_equal(ps[6], img[128:384, 128:384])
    assert learned.patches(img[:200, :200]) == []


@pytest.mark.parametrize("shape", [(161, 161), (200, 333), (517, 163), (40, 20), (384, 1024)])
def test_ms_ssim_equals_pytorch_msssim(shape: tuple[int, int]) -> None:
    """The banded MS-SSIM is pytorch_msssim's number: odd sides (padded pooling), tiny images, wide ones."""
    import torch
    from pytorch_msssim import ms_ssim as reference

    ref = _textured(*shape, seed=3)
    rec = _add_noise(ref, 12.0)
    padded = [metrics._pad_to_min(img, metrics.MS_SSIM_MIN_SIDE) for img in (ref, rec)]
    x, y = (torch.from_numpy(img.transpose(2, 0, 1).copy()).float()[None] for img in padded)
    assert metrics.ms_ssim(ref, rec) == pytest.approx(float(reference(x, y, data_range=255.0)), abs=2e-6)


@pytest.mark.parametrize("shape", [(161, 161), (517, 163), (200, 333), (333, 200)])
def test_ms_ssim_in_small_bands_equals_pytorch_msssim(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of 500 pixels: the full-size scale read from the 8-bit pictures a few rows at a time, and the pooling
    to each next scale (odd sides: a zero row above the first band and below the last) made band by band."""
    monkeypatch.setattr(metrics, "SSIM_BAND_PIXELS", 500)
    test_ms_ssim_equals_pytorch_msssim(shape)


def test_ms_ssim_of_a_large_photo_holds_little_memory() -> None:
    """pytorch_msssim held about 20 float32 copies of the picture at once (6.6 GB for a 24 MP photo, over a
    minute); the banded MS-SSIM holds the quarter-size float pictures and a band, reading the full-size scale
    from the 8-bit pictures. Measured in a child process, whose peak RSS is its own: 1500x2000 (3 Mpx, 36 MB per
    float copy) added 638 MB, 160 with both full-size float pictures, now 105; at most 130."""
    child = (
        "import resource, numpy as np\n"
        "from aeic.evaluation import metrics\n"
        "rng = np.random.default_rng(0)\n"
        "ref = rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)\n"
        "rec = np.clip(ref.astype(np.int16) + rng.integers(-9, 10, ref.shape), 0, 255).astype(np.uint8)\n"
        "metrics.ms_ssim(ref[:200, :200], rec[:200, :200])\n"  # torch's own start-up, not the metric's
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "metrics.ms_ssim(ref, rec)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    grown_mb = int(subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True).stdout)
    assert grown_mb <= 130


def _growth_mb(call: str, warm_up: str = "") -> int:
    """Peak RSS a metric call adds in a child process, on a 1500x2000 pair (3 Mpx: 72 MB per float64 copy),
    after ``warm_up`` (lazy imports whose memory is not the call's)."""
    child = (
        "import resource, numpy as np\n"
        "from aeic.evaluation import metrics\n"
        "rng = np.random.default_rng(0)\n"
        "ref = rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)\n"
        "rec = ref ^ np.uint8(5)\n"  # no temporary larger than the pictures before the baseline
        f"{warm_up}\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"{call}\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    return int(subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True).stdout)


def test_psnr_and_texture_of_a_large_photo_hold_little_memory() -> None:
    """The classic search scores every downscale factor's full-size picture by PSNR: each call held four float64
    copies of the photo (PSNR +137 MB here, +890 MB at 24 MP; texture +92 MB); both now go in bands of rows."""
    assert _growth_mb("metrics.psnr(ref, rec)") <= 40
    assert _growth_mb("metrics.texture_retention(ref, rec)") <= 40


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (300, 7), (1031, 517)])
def test_banded_psnr_and_gradient_energy_equal_the_whole_picture_formulas(shape: tuple[int, int]) -> None:
    ref = _textured(*shape, seed=5)
    rec = _add_noise(ref, 9.0)
    mse = np.mean((ref.astype(np.float64) - rec.astype(np.float64)) ** 2)
    expected = 10 * math.log10(255**2 / mse) if mse else metrics.PSNR_CAP_DB
    assert metrics.psnr(ref, rec) == pytest.approx(expected, rel=1e-12)
    y = ref.astype(np.float64) @ metrics.BT601_LUMA
    energy = (np.mean(np.diff(y, axis=1) ** 2) if shape[1] > 1 else 0.0) + (
        np.mean(np.diff(y, axis=0) ** 2) if shape[0] > 1 else 0.0
    )
    assert metrics.gradient_energy(ref) == pytest.approx(energy, rel=1e-12, abs=1e-12)


def _piq_whole(name: str, ref: np.ndarray, rec: np.ndarray) -> float:
    """piq's function on the whole (mirror-padded) picture, the reconstruction as its input and the original as
    its target (reference), as piq's functions take them."""
    module, function, min_side, _ = metrics.PERCEPTUAL_METRICS[name]
    piq_function = getattr(metrics._piq_module(module), function)
    x, y = (metrics._to_tensor(metrics._pad_to_min(img, min_side), 1.0 / 255.0) for img in (rec, ref))
    with metrics._single_thread():
        return float(piq_function(x, y, data_range=1.0))


def test_without_piq_the_perceptual_metrics_are_skipped_not_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where piq cannot be imported the runner lists each metric as skipped; it must not fail on every image."""
    for module in [name for name in sys.modules if name == "piq" or name.startswith("piq.")] + ["piq"]:
        monkeypatch.setitem(sys.modules, module, None)  # None: "import piq..." raises ImportError
    functions, skipped = runner.metric_functions(None)
    assert set(skipped) == set(metrics.PERCEPTUAL_METRICS) and not set(functions) & set(skipped)
    assert all(reason.startswith("skipped: piq not importable") for reason in skipped.values())


@pytest.mark.parametrize("shape", [(8, 8), (9, 13), (300, 7), (41, 41), (517, 163), (390, 1031)])
@pytest.mark.parametrize("name", list(metrics.PERCEPTUAL_METRICS))
def test_banded_perceptual_metrics_equal_piq(name: str, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of a few hundred pixels (many bands, one or two rows each, odd sides, the mirror-pad fallback):
    piq's whole-picture number within float32 rounding (HaarPSI's logit of a float32 sum moves it most)."""
    monkeypatch.setattr(metrics, "PIQ_BAND_PIXELS", 300)
    ref = _textured(*shape, seed=7)
    rec = _add_noise(ref, 12.0)
    tolerance = 1e-5 if name == "haarpsi" else 1e-6
    assert metrics.perceptual_metric_fn(name)(ref, rec) == pytest.approx(_piq_whole(name, ref, rec), abs=tolerance)


def test_vif_takes_the_original_as_its_reference() -> None:
    """VIF counts the reference's information that survives in the reconstruction: a contrast-stretched
    reconstruction gains apparent information (above 1, as piq documents), a flattened one loses it. With the
    arguments the other way round (as before) both sides of 1 swapped."""
    ref = _textured(128, 160, seed=3)
    mean = ref.mean()
    stretched = np.clip(np.rint(mean + 1.4 * (ref - mean)), 0, 255).astype(np.uint8)
    flattened = np.clip(np.rint(mean + 0.6 * (ref - mean)), 0, 255).astype(np.uint8)
    vif = metrics.perceptual_metric_fn("vif")
    assert vif(ref, stretched) > 1.0 > vif(ref, flattened)


@pytest.mark.parametrize(("name", "bound_mb"), [("haarpsi", 60), ("vif", 60), ("fsim", 130), ("gmsd", 60)])
def test_perceptual_metrics_of_a_large_photo_hold_little_memory(name: str, bound_mb: int) -> None:
    """piq held its whole-picture maps: on this 3 Mpx pair (after a warm-up call on a crop, so that torch's start-up
    is not counted) HaarPSI added 295 MB, VIF-p 453 (3.4 GB at 24 MP), FSIM and GMSD 180 each. Bands of 64 K pixels
    (to a 3 Mpx picture what the default 1 M band is to a 48 Mpx one) leave HaarPSI 38, VIF-p 38 and GMSD 24 MB:
    the half-size or luma pictures and a band. FSIM's 99 MB are piq's filter bank for its pooled ~256 px picture,
    the same at any photo size."""
    warm_up = (
        "metrics.PIQ_BAND_PIXELS = 1 << 16\n"
        f"metrics.perceptual_metric_fn({name!r})(ref[:64, :64], rec[:64, :64])"
    )
    assert _growth_mb(f"metrics.perceptual_metric_fn({name!r})(ref, rec)", warm_up) <= bound_mb
