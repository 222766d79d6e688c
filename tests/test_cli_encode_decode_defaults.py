"""`aeic encode` / `aeic decode` as a new user types them.

- `aeic encode photo.jpg` coded at rate level 4 while `aeic-send encode photo.jpg` coded at level 0: the
  two front ends of one sender path gave different bitstreams for the same image by default.
- `aeic encode --target-bytes 0` coded at level 0 as if no budget were given (a stream over it).
- `aeic decode s.aeic -o x.gif` (a format decode does not write) made a folder called `x.gif` with the PNG
  inside; it is one line and exit status 2 now, before the model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from aeic.codec import cli as codec_cli
from aeic.sender import cli as sender_cli
from PIL import Image


def test_encode_default_rate_is_the_senders() -> None:
    args = codec_cli.build_parser().parse_args(["encode", "photo.jpg"])
    assert args.rate == sender_cli.DEFAULT_RATE


def test_aeic_encode_and_aeic_send_encode_give_the_same_bitstream(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(photo)
    assert codec_cli.main(["encode", str(photo), "-o", str(tmp_path / "a")]) == 0
    assert sender_cli.main(["encode", str(photo), "-o", str(tmp_path / "b")]) == 0
    first, second = (tmp_path / "a" / "photo.aeic").read_bytes(), (tmp_path / "b" / "photo.aeic").read_bytes()
    assert first == second


@pytest.mark.parametrize("name", ["x.gif", "x.bmp", "x.TIF", "x.avif"])
def test_decode_to_a_format_it_does_not_write_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    stream = tmp_path / "s.aeic"
    stream.write_bytes(b"not read: refused before the model loads")
    output = tmp_path / name
    assert codec_cli.main(["decode", str(stream), "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -o {output}:") and ".png" in err and ".webp" in err and "folder" in err
    assert not output.exists()


def test_an_existing_folder_with_a_picture_suffix_is_still_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "out.gif"
    folder.mkdir()
    assert not codec_cli._names_another_picture_format(folder)
    assert not codec_cli._names_another_picture_format(tmp_path / "plain-folder")
    assert not codec_cli._names_another_picture_format(tmp_path / "x.webp")


@pytest.mark.parametrize("budget", ["0", "-3"])
def test_a_byte_budget_under_one_byte_is_refused_not_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], budget: str
) -> None:
    """`--target-bytes 0` (0.01 bpp of a 16x16 image, rounded down) was read as no budget: the image was
    coded at level 0 into a stream over the budget (35 bytes here), and the command succeeded."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(photo)
    with pytest.raises(SystemExit) as exit_info:
        codec_cli.main(["encode", str(photo), "--target-bytes", budget, "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"--target-bytes: a byte budget is at least 1, got {budget}" in err
    assert not (tmp_path / "out").exists()
