"""The sender's reader on files an outside user feeds it that are not the benchmark photos.

AVIF (read by this Pillow, listed nowhere), a phone's HEIC or a JPEG XL file under any suffix, an empty
file, a symbolic link loop: each is read, or is one line naming the file and saying what it is.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from aeic.sender import images
from aeic.sender.images import IMAGE_SUFFIXES, ImageReadError, read_image
from aeic.sender.watch import FolderWatcher
from PIL import Image

HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"
# a HEIF file whose major brand is the generic mif1 (Pillow's AVIF plugin tries, and fails, to read it)
HEIF_MIF1_HEAD = b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic"
JXL_CODESTREAM = b"\xff\x0a"
JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"

needs_avif = pytest.mark.skipif(not images.pillow_reads_avif(), reason="this Pillow has no AVIF support")


def _photo(height: int = 48, width: int = 64) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 5 % 256, cols * 4 % 256, (rows + cols) * 2 % 256], -1).astype(np.uint8)


def _one_line_naming(error: pytest.ExceptionInfo[ImageReadError], path: Path) -> str:
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


@needs_avif
def test_avif_is_listed_and_read(tmp_path: Path) -> None:
    """This Pillow reads AVIF, but no reader listed it: the watcher (and training, eval, the demo) passed
    .avif photos over."""
    assert ".avif" in IMAGE_SUFFIXES
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = _photo()
    Image.fromarray(rgb).save(folder / "photo.avif", quality=95)
    out = read_image(folder / "photo.avif")
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 12
    watcher = FolderWatcher(folder, tmp_path / "state.json")
    watcher.scan()
    assert [c.name for c in watcher.scan()] == ["photo.avif"]


@needs_avif
def test_avif_without_pillow_support_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Pillow built without AVIF (or before 11.2, as pyproject allows) gave "not a recognised image format"
    and printed Pillow's own warning besides."""
    from PIL import AvifImagePlugin

    path = tmp_path / "photo.avif"
    Image.fromarray(_photo()).save(path)
    monkeypatch.setattr(AvifImagePlugin, "SUPPORTED", False)
    monkeypatch.setattr(images, "pillow_reads_avif", lambda: False)
    with warnings.catch_warnings(record=True) as shown, pytest.raises(ImageReadError) as error:
        warnings.simplefilter("always")
        read_image(path)
    assert "AVIF image, and this Pillow has no AVIF support" in _one_line_naming(error, path)
    assert not shown


@pytest.mark.parametrize(
    ("name", "head", "expected"),
    [
        ("IMG_0001.HEIC", HEIC_HEAD, "HEIC/HEIF image, which Pillow does not read"),
        ("IMG_0002.jpg", HEIC_HEAD, "HEIC/HEIF image, which Pillow does not read"),  # the suffix lies
        ("IMG_0003.heif", HEIF_MIF1_HEAD, "HEIC/HEIF image, which Pillow does not read"),
        ("photo.jxl", JXL_CODESTREAM, "JPEG XL image, which Pillow does not read"),
        ("photo.jxl", JXL_CONTAINER, "JPEG XL image, which Pillow does not read"),
        ("empty.jpg", b"", "empty file (0 bytes)"),
    ],
)
def test_a_format_pillow_does_not_read_is_named(tmp_path: Path, name: str, head: bytes, expected: str) -> None:
    """Each was "not a recognised image format", which a user who sees a photo in their viewer does not believe."""
    path = tmp_path / name
    path.write_bytes(head + bytes(200) if head else b"")
    if expected.startswith("JPEG XL") and ".jxl" in Image.registered_extensions():
        expected = "cannot decode image"  # a JPEG XL plugin is registered (aeic eval's, imported by an earlier test)
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    assert expected in _one_line_naming(error, path)


def test_a_decoder_plugins_message_of_several_lines_is_one_line(tmp_path: Path) -> None:
    """With pillow-jxl registered (aeic eval imports it for its JPEG XL baseline), a damaged JPEG XL file's
    error carried the plugin's three-line message into the sender's one-line error."""
    pytest.importorskip("pillow_jxl")
    path = tmp_path / "photo.jxl"
    path.write_bytes(JXL_CODESTREAM + bytes(200))
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    assert "cannot decode image" in _one_line_naming(error, path)


@pytest.mark.parametrize(
    ("reads_avif", "expected"),
    [(True, "corrupt or unsupported AVIF image"), (False, "AVIF image, and this Pillow has no AVIF support")],
)
def test_an_unread_avif_is_told_by_what_this_pillow_reads(
        monkeypatch: pytest.MonkeyPatch, reads_avif: bool, expected: str) -> None:
    """A damaged AVIF file is not blamed on the Pillow build, nor an AVIF file in a Pillow before 11.2 on the file."""
    monkeypatch.setattr(images, "pillow_reads_avif", lambda: reads_avif)
    head = b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf"  # an AVIF file may name mif1 first
    assert images.unidentified_reason(head).startswith(expected)


def test_a_symbolic_link_loop_is_not_called_corrupt_data(tmp_path: Path) -> None:
    """It was "corrupt or truncated image data ([Errno 40] Too many levels of symbolic links)"."""
    path = tmp_path / "loop.jpg"
    os.symlink("loop.jpg", path)
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    assert _one_line_naming(error, path) == f"{path}: symbolic link loop, not an image file"


@needs_avif
@pytest.mark.parametrize(("orientation", "upright"), [(6, Image.Transpose.ROTATE_270), (5, Image.Transpose.TRANSPOSE)])
def test_an_oriented_avif_is_turned_upright_once(tmp_path: Path, orientation: int, upright: Image.Transpose) -> None:
    """Pillow carries an AVIF file's orientation (irot/imir boxes) as an EXIF tag: turned once, not twice or never."""
    rgb = _photo(48, 64)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "photo.avif", exif=exif.tobytes(), quality=95)
    out = read_image(tmp_path / "photo.avif")
    want = np.asarray(Image.fromarray(rgb).transpose(upright))
    assert out.shape == want.shape == (64, 48, 3) and np.abs(out.astype(int) - want).mean() < 12


def test_an_eps_drawing_without_ghostscript_is_not_called_corrupt(tmp_path: Path) -> None:
    """It was "corrupt or truncated image data (Unable to locate Ghostscript on paths)" for a whole file."""
    from PIL import EpsImagePlugin

    if EpsImagePlugin.has_ghostscript():
        pytest.skip("Ghostscript is installed: Pillow renders EPS")
    path = tmp_path / "logo.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 80\nnewpath 10 10 moveto 90 70 lineto stroke\n")
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    message = _one_line_naming(error, path)
    assert message.startswith(f"{path}: EPS drawing, which this Pillow cannot render (") and "corrupt" not in message
