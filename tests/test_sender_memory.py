"""The sender's memory-lean computations give what the direct ones give.

The strip-wise analysis equals the whole-image analysis (float rounding aside); the colour
statistics from histograms equal those from a float copy of the image.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from aeic.codec.export import export_package
from aeic.codec.model import AEICModel
from aeic.codec.testing import make_tiny_model
from aeic.sender.tiled_analysis import TiledAnalysis
from aeic.shared.model_package import ModelPackage
from aeic.shared.padding import colour_statistics


@pytest.fixture(scope="module", params=["tiny-se", "tiny-me"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[AEICModel, ModelPackage]:
    model = make_tiny_model(request.param)
    return model, ModelPackage.load(export_package(model, tmp_path_factory.mktemp(request.param)))


def _analysis(package: ModelPackage, strip_rows: int, halo: int | None = None) -> TiledAnalysis:
    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(package.file(name)), providers=["CPUExecutionProvider"])

    factor, needed = package.analysis_tiling
    return TiledAnalysis(session("analysis_stem.onnx"), session("analysis_trunk.onnx"), factor,
                         needed if halo is None else halo, strip_rows)


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _whole(model: AEICModel, rgb: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.analysis(torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]).numpy()


def _relative_error(latent: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(latent - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize(("size", "strip_rows"), [((256, 96), 32), ((224, 64), 64), ((160, 128), 96), ((64, 32), 256)])
def test_strips_equal_the_whole_image(
    exported: tuple[AEICModel, ModelPackage], size: tuple[int, int], strip_rows: int
) -> None:
    model, package = exported
    rgb = _image(*size, seed=size[0])
    latent = _analysis(package, strip_rows)(rgb)
    expected = _whole(model, rgb)
    assert latent.shape == expected.shape
    assert _relative_error(latent, expected) < 1e-5  # a halo one unshuffle step short errs by ~5e-5


def test_a_short_halo_is_caught(exported: tuple[AEICModel, ModelPackage]) -> None:
    """The comparison above is sensitive: strips without the halo differ from the whole image."""
    model, package = exported
    rgb = _image(256, 64, seed=1)
    assert _relative_error(_analysis(package, 32, halo=0)(rgb), _whole(model, rgb)) > 1e-3


def test_strips_must_start_on_unshuffle_phases(exported: tuple[AEICModel, ModelPackage]) -> None:
    _, package = exported
    factor, halo = package.analysis_tiling
    with pytest.raises(ValueError, match="multiples"):
        _analysis(package, factor + 1)
    assert halo % factor == 0


def test_colour_statistics_from_histograms_match_the_direct_computation() -> None:
    rng = np.random.default_rng(0)
    for n in range(200):
        height, width = rng.integers(1, 40, 2)
        if n % 2:
            rgb = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        else:
            rgb = np.clip(rng.normal(rng.uniform(0, 255), rng.uniform(0, 40), (height, width, 3)), 0, 255).astype(np.uint8)
        pixels = rgb.reshape(-1, 3).astype(np.float64)
        direct = (*np.clip(np.round(pixels.mean(0)), 0, 255).astype(int), *np.clip(np.round(pixels.std(0)), 0, 255).astype(int))
        assert colour_statistics(rgb) == tuple(int(v) for v in direct)
