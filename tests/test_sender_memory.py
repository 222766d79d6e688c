"""The sender's memory-lean computations give what the direct ones give.

The strip-wise stem equals the whole-image analysis (float rounding aside); the strip-wise trunk
and coded picture give the whole trunk's latent bit for bit, so the streams are byte-identical to
those of the whole-picture analysis, which no longer allocates whole-picture intermediates; the
colour statistics from histograms equal those from a float copy of the image.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from aeic.codec.analysis import BAND
from aeic.codec.export import export_package
from aeic.codec.model import AEICModel
from aeic.codec.testing import make_tiny_model
from aeic.sender import tiled_analysis
from aeic.sender.encoder import SenderCodec
from aeic.sender.rows import Picture, as_rows
from aeic.sender.tiled_analysis import (
    DEFAULT_STEM_CELLS,
    DEFAULT_TRUNK_CELLS,
    CodedPicture,
    TiledAnalysis,
    trunk_tiling,
)
from aeic.shared import padding
from aeic.shared.model_package import SENDER_FILES, ModelPackage
from aeic.shared.padding import colour_statistics, correct_colours, downscale_image, pad_to_multiple
from sender_support import traced_peak

SHIPPED = Path(__file__).resolve().parents[1] / "aeic" / "models" / "nano-se"


@pytest.fixture(scope="module", params=["tiny-se", "tiny-me"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[AEICModel, ModelPackage]:
    model = make_tiny_model(request.param)
    return model, ModelPackage.load(export_package(model, tmp_path_factory.mktemp(request.param)))


def _analysis(package: ModelPackage, strip_rows: int, halo: int | None = None, trunk_halo: int | None = None,
              trunk_cells: int = DEFAULT_TRUNK_CELLS) -> TiledAnalysis:
    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(package.file(name)), providers=["CPUExecutionProvider"])

    factor, needed = package.analysis_tiling
    trunk_factor, trunk_needed = _trunk_tiling(package)
    return TiledAnalysis(session("analysis_stem.onnx"), session("analysis_trunk.onnx"), factor,
                         needed if halo is None else halo, trunk_factor,
                         trunk_needed if trunk_halo is None else trunk_halo, strip_rows, trunk_cells)


def _trunk_tiling(package: ModelPackage) -> tuple[int, int]:
    return trunk_tiling(package.manifest["config"]["analysis"], package.analysis_tiling[0])


def _whole_trunk(analysis: TiledAnalysis, picture: Picture, downscale: int = 1, multiple: int = 1) -> np.ndarray:
    """The analysis as the sender ran it before: the whole coded picture, its whole features, the trunk once."""
    source = as_rows(picture)  # the encoder passes its pictures as row sources
    rgb = source.rows(0, source.shape[0])
    features = analysis.features(pad_to_multiple(downscale_image(rgb, downscale), multiple))
    (latent,) = analysis.trunk.run(["latent"], {"features": features})
    return latent


def _trunk_strip_cells(analysis: TiledAnalysis, feature_width: int, latent_rows: int) -> int:
    """``trunk_cells`` giving trunk strips of ``latent_rows`` latent rows on features ``feature_width`` wide."""
    return (2 * analysis.trunk_halo + latent_rows * analysis.trunk_factor) * feature_width


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


def test_the_trunk_halo_follows_the_analysis_band() -> None:
    """The sender cannot import the codec (torch): its copy of the band length must be the codec's."""
    assert tiled_analysis.BAND == BAND


@pytest.mark.parametrize("latent_rows", [1, 3, 64])
def test_trunk_strips_give_the_whole_trunks_latent_bit_for_bit(
    exported: tuple[AEICModel, ModelPackage], latent_rows: int
) -> None:
    """Exact equality, not a tolerance: any flipped latent bit could change a quantised symbol and the stream."""
    _, package = exported
    rgb = _image(1280, 64, seed=latent_rows)
    analysis = _analysis(package, 64)
    analysis.trunk_cells = _trunk_strip_cells(analysis, 64 // analysis.factor, latent_rows)
    assert np.array_equal(analysis(rgb), _whole_trunk(analysis, rgb))


def test_a_short_trunk_halo_is_caught(exported: tuple[AEICModel, ModelPackage]) -> None:
    """The halo is no longer than needed: one trunk step less changes the latent (so the bit-exact test is not vacuous)."""
    _, package = exported
    rgb = _image(1280, 64, seed=2)
    trunk_factor, trunk_halo = _trunk_tiling(package)
    analysis = _analysis(package, 64, trunk_halo=trunk_halo - trunk_factor)
    analysis.trunk_cells = _trunk_strip_cells(analysis, 64 // analysis.factor, 1)
    assert not np.array_equal(analysis(rgb), _whole_trunk(analysis, rgb))


class _Recorded:
    """An onnxruntime session that notes the (rows, columns) of every input it runs on."""

    def __init__(self, session: Any) -> None:
        self.session, self.sizes = session, list[tuple[int, int]]()

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> Any:
        (tensor,) = feeds.values()
        self.sizes.append(tensor.shape[2:])
        return self.session.run(names, feeds)


def _record(analysis: TiledAnalysis) -> tuple[_Recorded, _Recorded]:
    stem, trunk = _Recorded(analysis.stem), _Recorded(analysis.trunk)
    analysis.stem, analysis.trunk = stem, trunk
    return stem, trunk


def _band_cells(analysis: TiledAnalysis, band_width: int) -> int:
    """``trunk_cells`` whose strips keep one latent row on a band ``band_width`` feature columns wide, halos included."""
    return (2 * analysis.trunk_halo + analysis.trunk_factor) * band_width


def test_a_wide_picture_runs_in_tiles_within_the_cells_and_gives_the_same_latent(
    exported: tuple[AEICModel, ModelPackage],
) -> None:
    """The defect: the stem ran strips of the whole width (226 MB of activations at a coded width of 4,096) and
    the trunk strips of the whole width too, which a wide picture's halos fill (at least one latent row each, over
    the cells). Now both run in tiles of columns as well, none over its cells, and the latent is bit for bit the
    whole trunk's, from a picture in several bands."""
    _, package = exported
    analysis = _analysis(package, 64)
    analysis.stem_cells = (64 + 2 * analysis.halo) * 600
    feature_width = 2048 // analysis.factor
    analysis.trunk_cells = _band_cells(analysis, feature_width // 4 + 2 * analysis.trunk_halo)
    height = -(-(analysis.trunk_cells // feature_width + analysis.trunk_factor) * analysis.factor // 32) * 32
    rgb = _image(height, 2048, seed=4)  # too tall for one trunk strip of the whole width
    stem, trunk = _record(analysis)
    latent = analysis(rgb)
    assert max(rows * columns for rows, columns in stem.sizes) <= analysis.stem_cells
    assert max(rows * columns for rows, columns in trunk.sizes) <= analysis.trunk_cells
    assert len(analysis.bands(height // analysis.factor, feature_width)) > 1
    assert np.array_equal(latent, _whole_trunk(analysis, rgb))


def test_the_shipped_models_bands_give_the_same_streams() -> None:
    """Byte-identical streams with the shipped model's trunk in bands of columns and the whole-picture analysis."""
    codec = SenderCodec(ModelPackage.load(SHIPPED, needs=SENDER_FILES), downscale=1)
    analysis = codec.analysis
    analysis.trunk_cells = _band_cells(analysis, 1024 // analysis.factor // 3 + 2 * analysis.trunk_halo)
    assert len(analysis.bands(704 // analysis.factor, 1024 // analysis.factor)) > 1
    rgb = _image(704, 1023, seed=6)  # too tall for one trunk strip of the whole width
    target = len(codec.encode(rgb, 20))
    bands = codec.encode_to_budget(rgb, target)
    codec.analysis = lambda picture, factor, multiple: _whole_trunk(analysis, picture, factor, multiple)  # type: ignore[assignment]
    assert codec.encode_to_budget(rgb, target) == bands


def test_the_stems_strips_and_tiles_give_the_whole_stems_features_bit_for_bit() -> None:
    """The stem's tile geometry changes no feature bit, so no stream: strips of rows cut into tiles of columns
    (with the shipped model, whose strips were only said to match the whole stem up to float rounding)."""
    analysis = SenderCodec(ModelPackage.load(SHIPPED, needs=SENDER_FILES), downscale=1).analysis
    rgb = _image(384, 1024, seed=7)
    (whole,) = analysis.stem.run(["features"], {"image": tiled_analysis.to_float(rgb)})
    analysis.strip_rows, analysis.stem_cells = 64, (64 + 2 * analysis.halo) * 300
    assert analysis.stem_columns() < 1024 // 3
    assert np.array_equal(analysis.features(rgb), whole)


@pytest.mark.parametrize(("height", "width"), [(3072, 4096), (1152, 1920), (4096, 4096), (128, 8192)])
def test_the_default_tiles_of_large_pictures_keep_within_their_cells(height: int, width: int) -> None:
    """The shipped defaults at the coded sizes the memory figures are for (12 MP and 1080p coded whole) and beyond:
    every trunk strip and stem tile within its cells (what bounds the analysis' peak)."""
    codec = SenderCodec(ModelPackage.load(SHIPPED, needs=SENDER_FILES), downscale=1)
    analysis = codec.analysis
    assert (analysis.stem_cells, analysis.trunk_cells) == (DEFAULT_STEM_CELLS, DEFAULT_TRUNK_CELLS)
    assert (analysis.strip_rows + 2 * analysis.halo) * (analysis.stem_columns() + 2 * analysis.halo) <= analysis.stem_cells
    rows, columns = height // analysis.factor, width // analysis.factor
    bands = analysis.bands(rows, columns)
    kept = [(left, right) for left, right, _, _ in bands]
    assert kept[0][0] == 0 and kept[-1][1] == columns
    assert all(right == left for (_, right), (left, _) in pairwise(kept))  # side by side, in order
    for _, _, start, stop in bands:
        strip_rows = min(analysis.trunk_rows(stop - start, rows) + 2 * analysis.trunk_halo, rows)
        assert strip_rows * (stop - start) <= analysis.trunk_cells


@pytest.mark.parametrize(("height", "width"), [(1001, 77), (130, 257), (3, 5)])
@pytest.mark.parametrize("downscale", [1, 2, 4])
def test_coded_picture_rows_equal_the_whole_coded_picture(height: int, width: int, downscale: int) -> None:
    rgb = _image(height, width, seed=height + downscale)
    whole = pad_to_multiple(downscale_image(rgb, downscale), 128)
    picture = CodedPicture(rgb, downscale, 128)
    assert (picture.height, picture.width) == whole.shape[:2]
    for start, stop in [(0, 7), (0, picture.height), (5, 97), (picture.height - 3, picture.height)]:
        assert np.array_equal(picture.rows(start, stop), whole[start:stop])


@pytest.mark.parametrize("downscale", [1, 2])
def test_budget_streams_are_those_of_the_whole_picture_analysis(
    exported: tuple[AEICModel, ModelPackage], downscale: int
) -> None:
    """Byte-identical streams and levels with the trunk in several strips and the whole-picture analysis."""
    _, package = exported
    codec = SenderCodec(package, downscale=downscale)
    codec.analysis.trunk_cells = _trunk_strip_cells(codec.analysis, 384 // downscale // codec.analysis.factor, 2)
    rgb = _image(1300, 383, seed=downscale)
    target = len(codec.encode(rgb, codec.num_levels // 2))
    strips = codec.encode_to_budget(rgb, target)
    whole = codec.analysis
    codec.analysis = lambda picture, factor, multiple: _whole_trunk(whole, picture, factor, multiple)  # type: ignore[assignment]
    assert codec.encode_to_budget(rgb, target) == strips


def test_the_shipped_models_streams_are_those_of_the_whole_picture_analysis() -> None:
    """The same with the shipped model, whose trunk halo (80 feature rows) was measured short by one step at 72."""
    codec = SenderCodec(ModelPackage.load(SHIPPED, needs=SENDER_FILES), downscale=1)
    codec.analysis.trunk_cells = _trunk_strip_cells(codec.analysis, 256 // codec.analysis.factor, 1)
    rgb = _image(768, 255, seed=5)
    target = len(codec.encode(rgb, 20))
    strips = codec.encode_to_budget(rgb, target)
    whole = codec.analysis
    codec.analysis = lambda picture, factor, multiple: _whole_trunk(whole, picture, factor, multiple)  # type: ignore[assignment]
    assert codec.encode_to_budget(rgb, target) == strips


def test_the_analysis_holds_no_whole_picture_intermediate(exported: tuple[AEICModel, ModelPackage]) -> None:
    """The defect: a budget's large coded picture had whole features and a whole trunk (1 GB for 12 MP). Now
    what numpy holds at once is about two trunk strips' inputs however tall the picture: here under half the
    whole features (before: more than all of them). onnxruntime's own activations are not traced."""
    _, package = exported
    analysis = _analysis(package, 64)
    rgb = _image(8192, 64, seed=3)
    feature_rows, feature_width = 8192 // analysis.factor, 64 // analysis.factor
    analysis.trunk_cells = _trunk_strip_cells(analysis, feature_width, 1)
    latent, peak = traced_peak(lambda: analysis(rgb, 1, 32))
    channels = analysis.features(rgb[:64]).shape[1]
    assert peak < channels * feature_rows * feature_width * 4 / 2
    assert np.array_equal(latent, _whole_trunk(analysis, rgb, 1, 32))


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


def test_colour_histograms_counted_in_bands_match_and_stay_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: one `np.bincount` per channel of the whole picture, which widens it to 8-byte integers (366 MB
    at 48 MP, the sender's peak there; 537 MB for the receiver's colour correction of an 8192x8192
    picture); now bands of rows, with the same counts."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (4096, 4096, 3), dtype=np.uint8)
    stats, peak = traced_peak(lambda: colour_statistics(rgb))
    assert peak < rgb.nbytes / 4
    _, peak = traced_peak(lambda: correct_colours(rgb, stats))
    assert peak < rgb.nbytes * 1.5  # its output and one mapped channel (no widened copy: 4x that before)
    pixels = rgb[::7, ::5].reshape(-1, 3)  # a band split that does not fall on rows of whole bands
    monkeypatch.setattr(padding, "_HISTOGRAM_BAND_PIXELS", 37)
    banded = colour_statistics(rgb[::7, ::5])
    monkeypatch.undo()
    assert banded == colour_statistics(np.ascontiguousarray(rgb[::7, ::5]))
    direct = pixels.astype(np.float64)
    assert banded == tuple(int(v) for v in (*np.round(direct.mean(0)), *np.round(direct.std(0))))
