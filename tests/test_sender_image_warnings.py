"""Pillow's warnings about a photo's odd metadata (a camera writing EXIF orientation with two values: "tag 274
had too many entries") reached the agent's log as raw two-line Python warnings, naming a file of Pillow's and
not the photo. ``aeic-send`` now tells each as one line naming the photo; other callers of ``open_image``
still get them as Python warnings, so nothing is hidden."""

from __future__ import annotations

import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from aeic.sender.images import open_image
from PIL import Image
from sender_support import ContainerCodec

_TIFF_HEADER = b"II*\x00" + struct.pack("<I", 8)


def _odd_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF orientation (tag 274, one SHORT) holds two values, 6 and 6, as some cameras write."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 274, 3, 2, 6, 6) + struct.pack("<I", 0)
    Image.fromarray(np.full((16, 24, 3), 120, np.uint8)).save(path, exif=b"Exif\x00\x00" + _TIFF_HEADER + ifd)
    return path


def test_open_image_tells_a_metadata_warning_as_one_line_naming_the_photo(tmp_path: Path) -> None:
    photo = _odd_exif_jpeg(tmp_path / "odd.jpg")
    told: list[str] = []
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        picture = open_image(photo, on_warning=told.append)
    assert escaped == []
    assert told == [f"{photo}: Metadata Warning, tag 274 had too many entries: 2, expected 1"]
    assert picture.shape == (24, 16, 3)  # read anyway, upright by its first value


def test_without_a_listener_the_warning_stays_a_python_warning(tmp_path: Path) -> None:
    photo = _odd_exif_jpeg(tmp_path / "odd.jpg")
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(photo))}: Metadata Warning, tag 274 had too many entries"):
        open_image(photo)


def test_a_clean_photo_tells_nothing(tmp_path: Path) -> None:
    photo = tmp_path / "clean.jpg"
    Image.fromarray(np.full((16, 24, 3), 120, np.uint8)).save(photo)
    told: list[str] = []
    open_image(photo, on_warning=told.append)
    assert told == []


def test_aeic_send_logs_the_warning_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("aeic.sender.encoder")  # the command layer catches the encoder's BudgetError
    from aeic.sender import cli

    photo = _odd_exif_jpeg(tmp_path / "odd.jpg")
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        code = cli.main(["encode", str(photo), "-o", str(tmp_path / "out"), "--rate", "0"],
                        codec_factory=lambda config, reporter: ContainerCodec())  # fmt: skip
    err = capsys.readouterr().err
    assert code == cli.EXIT_OK and escaped == []
    told = [line for line in err.splitlines() if "tag 274" in line]
    assert told == [f"warning: {photo}: Metadata Warning, tag 274 had too many entries: 2, expected 1"]
    assert (tmp_path / "out" / "odd.aeic").is_file()  # read anyway
