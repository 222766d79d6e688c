"""`aeic decode` of a full-profile (SD-Turbo) package as a GPU user runs it.

- `aeic decode` had no way to pick what the SD-Turbo UNet and VAE compute in, which the receiver sets with
  `decoder_dtype` (float32, bfloat16, float16): a decode on a smaller GPU needed a Python script.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from aeic.codec import cli as codec_cli
from aeic.receiver.decoder import DECODER_DTYPES, ReceiverCodec
from PIL import Image
from sd_turbo_support import write_tiny_full_stream


@pytest.fixture(scope="module")
def full_stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(SD-Turbo folder, a tiny-full package trained on it, a stream it coded)."""
    root = tmp_path_factory.mktemp("full")
    photo = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)).save(photo)
    return write_tiny_full_stream(root, photo)


def test_decode_takes_the_receivers_decoder_dtype(
    full_stream: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--decoder-dtype bfloat16` decodes in bfloat16 (the picture the receiver's setting gives, not float32's)."""
    folder, package, stream = full_stream
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
    out = tmp_path / "half.png"
    argv = ["decode", str(stream), "--model", str(package), "--device", "cpu"]
    assert codec_cli.main([*argv, "--decoder-dtype", "bfloat16", "-o", str(out)]) == 0
    assert codec_cli.main([*argv, "-o", str(tmp_path / "float32.png")]) == 0
    receiver = ReceiverCodec.from_package(package, device="cpu", dtype="bfloat16")
    expected = receiver.decode(stream.read_bytes())
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "float32.png")), expected)


def test_decode_offers_the_receivers_decoder_dtypes() -> None:
    parser = codec_cli.build_parser()
    assert parser.parse_args(["decode", "s.aeic"]).decoder_dtype == "float32"
    for dtype in DECODER_DTYPES:
        assert parser.parse_args(["decode", "s.aeic", "--decoder-dtype", dtype]).decoder_dtype == dtype


@pytest.mark.parametrize(("value", "fragment"), [
    ("float16", "decoder_dtype float16 needs a GPU"),
    ("half", "invalid choice: 'half'"),
])
def test_a_decoder_dtype_that_cannot_run_is_one_line(
    full_stream: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], value: str, fragment: str,
) -> None:
    folder, package, stream = full_stream
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
    out = tmp_path / "out.png"
    try:
        status = codec_cli.main(["decode", str(stream), "--model", str(package), "--device", "cpu",
                                 "--decoder-dtype", value, "-o", str(out)])
    except SystemExit as exc:  # argparse's refusal
        status = exc.code  # type: ignore[assignment]  # argparse exits with an int
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert status == 2 and "Traceback" not in err and len(errors) == 1 and fragment in errors[0], err
    assert not out.exists()
