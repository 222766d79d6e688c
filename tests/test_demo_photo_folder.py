"""`make demo IMAGES=DIR` (`python -m aeic.demo --images DIR`) on a folder as a user has it.

A file in the folder that does not decode (a `.jpg` that is not one) ended the demo with a traceback from
`read_image`, and so did a folder name that does not exist; a folder of seven photos sent the first four
without a word about the other three. Now: one line per unreadable file, which is left out; one line for a
missing folder; and one line saying how many were left out by `--limit` (`LIMIT=N` in make)."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aeic import demo
from aeic.demo import load_photos


def _photo(path: Path, size: tuple[int, int] = (40, 30)) -> None:
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(path)


def test_unreadable_file_is_skipped_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.jpg").write_text("not an image")
    _photo(tmp_path / "b.png")
    _photo(tmp_path / "c.png")
    photos = load_photos(tmp_path, 4, 768)
    assert [name for name, _ in photos] == ["b.png", "c.png"]
    err = capsys.readouterr().err
    assert "skipped" in err and "a.jpg" in err and "not a recognised image format" in err
    assert "Traceback" not in err


def test_skipped_files_do_not_count_against_the_limit(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_text("not an image")
    for name in ("b.png", "c.png", "d.png"):
        _photo(tmp_path / name)
    assert [name for name, _ in load_photos(tmp_path, 2, 768)] == ["b.png", "c.png"]


def test_photos_left_out_by_the_limit_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for index in range(6):
        _photo(tmp_path / f"p{index}.png")
    photos = load_photos(tmp_path, 4, 768)
    assert len(photos) == 4
    err = capsys.readouterr().err
    assert "first 4 of 6" in err and "LIMIT=N" in err and "--limit" in err


def test_no_report_when_every_photo_is_sent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _photo(tmp_path / "only.png", (1000, 500))
    ((name, rgb),) = load_photos(tmp_path, 4, 768)
    assert name == "only.png" and rgb.shape == (384, 768, 3)  # downscaled to --max-side
    assert capsys.readouterr().err == ""


def test_missing_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        load_photos(tmp_path / "nope", 4, 768)
    assert str(exc.value) == f"demo: --images {tmp_path / 'nope'}: not a folder"


def test_folder_with_nothing_readable_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_text("not an image")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit) as exc:
        load_photos(tmp_path, 4, 768)
    assert "no readable images in" in str(exc.value)


def test_main_puts_the_callers_sigterm_handler_back() -> None:
    """`main` turns SIGTERM into a clean shutdown while the demo runs; called in a process that goes on (a
    test reading its parser), it left that process's SIGTERM raising KeyboardInterrupt from then on."""

    def callers(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGTERM, callers)
    try:
        with pytest.raises(SystemExit):
            demo.main(["--help"])
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("flag", [["--limit", "0"], ["--limit", "-1"], ["--max-side", "0"], ["--timeout", "0"]])
def test_a_count_below_one_is_refused_before_any_work(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`make demo LIMIT=0` sent nothing and LIMIT=-1 sent all samples but one (a slice); --max-side 0 made
    1-pixel photos; --timeout 0 gave up before the first decode. Each is a usage error now."""
    with pytest.raises(SystemExit) as exc:
        demo.main(flag)
    assert exc.value.code == 2
    assert flag[0] in capsys.readouterr().err


@pytest.mark.parametrize("rate", [-1, 10_000])
def test_a_rate_the_package_lacks_is_one_line(rate: int) -> None:
    """`make demo RATE=999` ended in the encoder's traceback; it names the package's levels now."""
    with pytest.raises(SystemExit, match=r"^demo: --rate .*: this package's rate levels are 0 to \d+$"):
        demo.encode_all([], None, rate)


def test_make_demo_passes_a_folder_with_spaces_as_one_argument() -> None:
    """`make demo IMAGES="$HOME/My Pictures"` ran `--images .../My Pictures`: two words, argparse refused it."""
    import shlex
    import shutil
    import subprocess

    make = shutil.which("make")
    if make is None:
        pytest.skip("needs make")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([make, "-n", "-o", ".venv/.installed", "demo", "IMAGES=/tmp/My Pictures", "LIMIT=2"],
                            cwd=root, capture_output=True, text=True, check=True)
    words = shlex.split(result.stdout.replace("\\\n", " "))
    assert words[words.index("--images") + 1] == "/tmp/My Pictures", result.stdout


def test_a_photo_named_with_spaces_or_accents_uploads() -> None:
    """The demo's Idempotency-Key held the file name: `cat one.png` or `café.png` got 400
    invalid_idempotency_key and stopped the demo. The key is the stream's SHA-256 now, as the sender's."""
    import hashlib
    import re

    import httpx

    keys: list[str] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        key = request.headers["Idempotency-Key"]
        keys.append(key)
        if not re.fullmatch(r"[\x21-\x7e]{1,255}", key):  # what the receiver accepts
            return httpx.Response(400, json={"error": {"code": "invalid_idempotency_key"}})
        return httpx.Response(202, json={"id": key[:8]})

    results = [demo.Result(name, np.zeros((1, 1, 3), np.uint8), name.encode() * 3, 0.0)
               for name in ("cat one.png", "café.png")]
    with httpx.Client(transport=httpx.MockTransport(receiver), base_url="http://receiver") as client:
        demo.upload_all(client, "token", results)
    assert keys == [hashlib.sha256(r.bitstream).hexdigest() for r in results]
    assert all(r.image_id for r in results)
