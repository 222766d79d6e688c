"""A grey original is coded grey by the classic codecs that have a grey mode (JPEG, AVIF, JPEG XL), as AEIC
codes it with its grey flag, and scored against the same RGB original; colour originals are coded as before."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from aeic.evaluation import baselines
from PIL import Image

AVAILABLE = [name for name, reason in baselines.available_codecs().items() if reason is None]
GREY_CODECS = [name for name in AVAILABLE if name != "webp"]
FACTORS = (1 / 2, 1.0)  # two sizes of the search's 13 keep AVIF's tests at a few seconds


def _picture(height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([255 * xx / width, 255 * yy / height, 128 + 60 * np.sin(xx / 5.0)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _grey(rgb: np.ndarray) -> np.ndarray:
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    return np.repeat(luma[:, :, None], 3, axis=2)


def test_the_formats_with_a_grey_mode_are_named() -> None:
    assert [n for n, c in baselines.CODECS.items() if c.grey_mode] == ["jpeg", "avif", "jxl"]
    assert all(s["grey_mode"] == baselines.CODECS[n].grey_mode for n, s in baselines.encoder_settings().items())


@pytest.mark.parametrize("codec", GREY_CODECS)
def test_a_grey_original_is_coded_as_one_grey_channel(codec: str) -> None:
    rgb = _grey(_picture())
    result = baselines.compress_to_budget(rgb, 800, codec, factors=FACTORS)
    assert result.data is not None and result.reconstruction is not None
    with Image.open(io.BytesIO(result.data)) as im:
        assert im.mode == "L"  # the file itself is grey, not three equal channels
    assert result.reconstruction.shape == rgb.shape  # scored as RGB against the same original
    assert result.score == baselines.metrics.psnr(rgb, result.reconstruction)


@pytest.mark.parametrize("codec", GREY_CODECS)
def test_coding_grey_is_never_much_worse_than_three_channels(codec: str) -> None:
    """JPEG gains most (three channels' headers and chroma blocks spent on nothing); JPEG XL about nothing."""
    rgb = _grey(_picture())
    spec = baselines.CODECS[codec]
    as_grey = baselines.compress_to_budget(rgb, 800, spec, factors=FACTORS)
    as_rgb = baselines.compress_to_budget(rgb, 800, replace(spec, grey_mode=False), factors=FACTORS)
    assert as_grey.score is not None and as_rgb.score is not None
    assert as_grey.score > as_rgb.score - 0.05
    if codec == "jpeg":
        assert as_grey.score > as_rgb.score + 0.1


@pytest.mark.parametrize("codec", AVAILABLE)
def test_colour_originals_are_coded_byte_for_byte_as_before(codec: str) -> None:
    almost_grey = _grey(_picture())
    almost_grey[5, 7, 2] ^= 1  # one sample off grey: a colour picture
    spec = baselines.CODECS[codec]
    for rgb in (_picture(), almost_grey):
        now = baselines.compress_to_budget(rgb, 800, spec, factors=FACTORS)
        before = baselines.compress_to_budget(rgb, 800, replace(spec, grey_mode=False), factors=FACTORS)
        assert now.data is not None and now.data == before.data
        assert now.factor == before.factor and now.score == before.score
