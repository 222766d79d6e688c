"""A photo read strip by strip from its decoded file (``open_image``) is the array ``read_image`` gives, row for
row, and codes to the same streams; the encoder then never holds it whole as an array (the 48 MP photo's
second 144 MB copy, docs/sender.md "Resources on the device")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from aeic.sender.encoder import SenderCodec, SourceFacts, is_grey
from aeic.sender.images import ImageReadError, open_image, read_image
from aeic.sender.pipeline import RateControl, encode_image
from aeic.sender.rows import ArrayRows, row_strips
from aeic.sender.tiled_analysis import CodedPicture
from aeic.shared.model_package import SENDER_FILES, ModelPackage
from aeic.shared.padding import colour_statistics
from PIL import Image, ImageOps
from sender_support import traced_peak

SHIPPED = Path(__file__).resolve().parents[1] / "aeic" / "models" / "nano-se"


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour with noise: an image the codec codes to different streams wherever a row is wrong."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 200 / width, y * 200 / height, (x + y) * 100 / (width + height)], axis=2)
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def _save(path: Path, image: Image.Image, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return path


def _over_white(image: Image.Image) -> np.ndarray:
    rgba = image.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))


def _reference(image: Image.Image) -> np.ndarray:
    """The whole picture turned upright by Pillow and then converted whole, as the reader did before strips."""
    upright = ImageOps.exif_transpose(image)
    if upright.mode == "I;16":
        grey = ((np.asarray(upright).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if upright.mode == "RGBA" or "transparency" in upright.info:
        return _over_white(upright)
    return np.asarray(upright.convert("RGB"))


def _modes(rgb: np.ndarray) -> dict[str, Image.Image]:
    alpha = (np.arange(rgb.shape[1]) * 7 % 256).astype(np.uint8)[None, :].repeat(rgb.shape[0], 0)
    palette = Image.fromarray(rgb).quantize(64)
    palette.info["transparency"] = 3
    return {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, alpha])),
        "P": palette,
        "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257 + 100),
    }


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16"])
def test_upright_rows_are_the_rows_of_the_whole_converted_picture(tmp_path: Path, orientation: int, mode: str) -> None:
    """Every EXIF orientation and conversion applied to a strip gives that strip of the whole picture, on
    both sides of every seam (odd bounds, a single row, the last row), and the array equals it whole."""
    image = _modes(_photo(37, 300, seed=orientation))[mode]
    path = _save(tmp_path / "photo.png", image, orientation)
    with Image.open(path) as opened:
        expected = _reference(opened)
    picture = open_image(path)
    assert picture.shape == expected.shape
    height = expected.shape[0]
    for start, stop in [(0, height), (0, 1), (5, 29), (height - 1, height), (17, height)]:
        np.testing.assert_array_equal(picture.rows(start, stop), expected[start:stop])
    np.testing.assert_array_equal(picture.array(), expected)
    np.testing.assert_array_equal(read_image(path), expected)


def test_an_unsupported_mode_fails_when_the_file_is_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first row is converted as the file is read: a conversion that fails is a read error there, not mid-encode."""
    path = tmp_path / "cmyk.tiff"  # not YCbCr: Pillow 12 (Python 3.10's) writes a YCbCr TIFF it cannot read back
    Image.fromarray(_photo(8, 8, seed=1)).convert("CMYK").save(path)

    def refuse(self: Image.Image, mode: str | None = None, *args: object, **kwargs: object) -> Image.Image:
        raise ValueError("conversion not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    with pytest.raises(ImageReadError, match="unsupported pixel mode 'CMYK'"):
        open_image(path)


def test_header_facts_are_counted_strip_by_strip() -> None:
    rgb = _photo(600, 70, seed=2)
    facts = SourceFacts(ArrayRows(rgb))
    assert facts.colour_stats == colour_statistics(rgb)
    assert not facts.grey
    grey = np.repeat(rgb[..., :1], 3, axis=2)
    assert is_grey(grey)
    grey[599, 69, 2] += 1  # in the last strip only
    assert not is_grey(grey)


def test_the_encoder_reads_a_photo_without_holding_it_as_an_array(tmp_path: Path) -> None:
    """The header's facts and the coded picture's strips from the opened file: numpy never holds more than a
    few strips (tracemalloc sees numpy's arrays, not Pillow's decoded picture). Before, the encoder took only
    the whole HxWx3 array (``read_image``), 144 MB for a 48 MP photo beside Pillow's 192 MB."""
    rgb = _photo(8192, 96, seed=3)
    path = tmp_path / "tall.png"
    Image.fromarray(rgb).save(path, compress_level=0)
    picture = open_image(path)

    def read_as_the_encoder_does() -> tuple[tuple[int, ...], bool]:
        facts = SourceFacts(picture)
        coded = CodedPicture(picture, 2, 128)
        for top in range(0, coded.height, 192):
            coded.rows(top, min(top + 192, coded.height))
        return facts.colour_stats, facts.grey

    (stats, grey), peak = traced_peak(read_as_the_encoder_does)
    assert (stats, grey) == (colour_statistics(rgb), False)
    assert peak < rgb.nbytes / 4
    assert sum(rows.shape[0] for rows in row_strips(picture, 1000)) == 8192


@pytest.fixture(scope="module")
def shipped() -> SenderCodec:
    return SenderCodec(ModelPackage.load(SHIPPED, needs=SENDER_FILES))


@pytest.mark.parametrize(("name", "orientation"), [("RGB", 6), ("RGBA", 3), ("P", 8), ("I;16", 1)])
def test_a_photo_opened_codes_to_the_streams_of_its_array(tmp_path: Path, shipped: SenderCodec, name: str,
                                                          orientation: int) -> None:
    """Byte-identical streams (a rate level and a budget, through ``encode_image`` as the commands call it)."""
    image = _modes(_photo(333, 517, seed=orientation))[name]
    path = _save(tmp_path / "photo.png", image, orientation)
    for control in (RateControl(rate=20), RateControl(target_bytes=400)):
        from_array = encode_image(shipped, read_image(path), control)
        from_file = encode_image(shipped, open_image(path), control)
        assert (from_file.data, from_file.rate_index, from_file.width, from_file.height) == (
            from_array.data, from_array.rate_index, from_array.width, from_array.height)


@pytest.mark.parametrize(("control", "analyses"), [(RateControl(rate=20), 1), (RateControl(target_bytes=60), 2),
                                                   (RateControl(target_bytes=45), 3)])
def test_an_opened_photo_is_released_before_the_analysis(tmp_path: Path, shipped: SenderCodec,
                                                          monkeypatch: pytest.MonkeyPatch, control: RateControl,
                                                          analyses: int) -> None:
    """Its decoded picture (192 MB at 48 MP) goes once the header's facts and the coded pictures are read: the
    analysis (a few hundred MB of activations) runs without it, at each downscale a budget tries (measured: 60 bytes
    falls back from whole to 1/2, 45 bytes to 1/4, the fallbacks made from the whole photo's array). Encoding it
    again is a clear error, not a stream of nothing."""
    path = tmp_path / "photo.png"
    Image.fromarray(_photo(300, 420, seed=9)).save(path)
    expected = encode_image(shipped, read_image(path), control)
    picture = open_image(path)
    analysis, seen = shipped.analysis, []

    def checking(coded: np.ndarray, downscale: int, multiple: int) -> np.ndarray:
        with pytest.raises(ValueError, match="released"):
            picture.rows(0, 1)
        seen.append(downscale)
        return analysis(coded, downscale, multiple)

    monkeypatch.setattr(shipped, "analysis", checking)
    assert encode_image(shipped, picture, control).data == expected.data
    assert len(seen) == analyses and picture.shape == (300, 420, 3)
    with pytest.raises(ValueError, match="open it again"):
        shipped.encode(picture, 20)
