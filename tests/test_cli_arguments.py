"""`aeic encode` / `aeic decode` given what a user mistypes or has at hand: one line, exit status 2.

- `aeic decode --device cuda` on a machine without CUDA (or `cuda:3` with one GPU, or `--device gpu`) was a
  torch traceback after the command had started; `--tile-pixels -5` failed every stream with "isqrt()
  argument must be nonnegative", `--tile-pixels 0` was taken; `aeic encode --threads -3` was taken.
- `aeic encode photo.png -o photo.aeic` made a folder called photo.aeic (decode's `-o x.png` is the picture).
- A full-profile package decoded on an SD-Turbo folder of another model (SDXL, other channel counts) or
  other weights was a traceback, or, on another revision of the same shapes, a silently wrong picture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from aeic.codec import cli as codec_cli
from aeic.codec.testing import make_tiny_package
from aeic.shared import model_package as pkg
from PIL import Image
from sd_turbo_support import write_other_base, write_tiny_full_stream


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("package") / "tiny-se")


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> None:
    """argparse's refusal (SystemExit 2) or the command's own: either way one error line, no traceback."""
    try:
        status = codec_cli.main(argv)
    except SystemExit as exc:
        status = exc.code  # type: ignore[assignment]  # argparse exits with an int
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert status == 2 and "Traceback" not in err and len(errors) == 1, err
    assert all(fragment in errors[0] for fragment in fragments), err


@pytest.mark.parametrize(("device", "fragment"), [
    ("gpu", "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("cuda", "cuda: this machine's torch has no cuda device") if not torch.cuda.is_available() else
    (f"cuda:{torch.cuda.device_count()}", f"this machine has {torch.cuda.device_count()} cuda device(s)"),
    ("meta", "meta: this machine's torch has no meta device"),
])
def test_a_device_this_machine_lacks_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str, fragment: str
) -> None:
    stream = tmp_path / "s.aeic"
    stream.write_bytes(b"not read")
    _refused(capsys, ["decode", str(stream), "--model", str(tmp_path / "absent"), "--device", device],
             f"argument --device: {fragment}")


@pytest.mark.parametrize(("argv", "fragment"), [
    (["decode", "s.aeic", "--tile-pixels", "-5"], "argument --tile-pixels: at least 4096, got -5"),
    (["decode", "s.aeic", "--tile-pixels", "0"], "argument --tile-pixels: at least 4096, got 0"),
    (["decode", "s.aeic", "--tile-pixels", "1e6"], "argument --tile-pixels: expected a whole number, got '1e6'"),
    (["encode", "p.png", "--threads", "-3"], "argument --threads: at least 1, got -3"),
    (["encode", "p.png", "--threads", "0"], "argument --threads: at least 1, got 0"),
])
def test_a_count_out_of_range_is_refused(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    _refused(capsys, argv, fragment)


def test_encode_to_a_named_stream_writes_that_file(photo: Path, package: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "named.aeic"
    assert codec_cli.main(["encode", str(photo), "--model", str(package), "-o", str(out)]) == 0
    assert out.is_file() and out.read_bytes()[:2] == b"\xae\x1c"
    _refused(capsys, ["encode", str(photo), str(photo), "--model", str(package), "-o", str(tmp_path / "two.aeic")],
             "names one stream, but 2 images were given")
    _refused(capsys, ["encode", str(photo), "--model", str(package), "-o", str(photo)],
             f"-o {photo} is a file: give a folder, or a .aeic file for one image")
    assert not (tmp_path / "two.aeic").exists()


@pytest.fixture(scope="module")
def full_stream(tmp_path_factory: pytest.TempPathFactory, photo: Path) -> tuple[Path, Path, Path]:
    """(SD-Turbo folder, tiny-full package trained on it, a stream of it)."""
    return write_tiny_full_stream(tmp_path_factory.mktemp("full"), photo)


@pytest.mark.parametrize(("kind", "fragment"), [
    ("reseeded", "trained on other base weights"),
    ("latent16", "trained on other base weights"),
    ("sdxl", "SDXL text-time"),
])
def test_decode_on_an_sd_turbo_folder_of_another_model_is_one_line(
    full_stream: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], kind: str, fragment: str,
) -> None:
    folder, package, stream = full_stream
    other = write_other_base(tmp_path / kind, kind)
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(other))
    out = tmp_path / "out.png"
    _refused(capsys, ["decode", str(stream), "--model", str(package), "--device", "cpu", "-o", str(out)],
             fragment, str(other))
    assert not out.exists()
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(folder))
    assert codec_cli.main(["decode", str(stream), "--model", str(package), "--device", "cpu", "-o", str(out)]) == 0
    assert Image.open(out).size == (56, 40)


def test_a_package_of_another_version_is_one_line(package: Path, photo: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A sealed package whose configuration has a field this version lacks: `aeic decode` was a TypeError
    traceback (the sender, which does not read that configuration, still codes with it)."""
    other = tmp_path / "other"
    shutil.copytree(package, other)
    manifest = json.loads((other / pkg.MANIFEST).read_text())
    manifest["config"]["attention"] = "global"
    pkg.write_manifest(other, {k: v for k, v in manifest.items() if k not in ("files", "model_id")})
    stream = tmp_path / "photo.aeic"
    assert codec_cli.main(["encode", str(photo), "--model", str(other), "-o", str(stream)]) == 0
    _refused(capsys, ["decode", str(stream), "--model", str(other), "--device", "cpu", "-o", str(tmp_path / "out")],
             f"error: {other}: its model configuration is not this version's", "attention", "another version of aeic")


def test_two_inputs_for_one_output_file_are_refused(package: Path, photo: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`a/photo.png b/photo.png -o out/`, or `photo.png photo.jpg` beside each other: the second stream (or
    picture) overwrote the first without a word, and the command succeeded."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(photo, tmp_path / folder / "photo.png")
    Image.open(photo).save(tmp_path / "a" / "photo.jpg")
    first, second = tmp_path / "a" / "photo.png", tmp_path / "b" / "photo.png"
    _refused(capsys, ["encode", str(first), str(second), "--model", str(package), "-o", str(tmp_path / "out")],
             f"{first} and {second} would both be written to {tmp_path / 'out' / 'photo.aeic'}")
    _refused(capsys, ["encode", str(first), str(tmp_path / "a" / "photo.jpg"), "--model", str(package)],
             "would both be written to", "give them separate output folders")
    assert not (tmp_path / "out").exists() and not (tmp_path / "a" / "photo.aeic").exists()
    assert codec_cli.main(["encode", str(first), str(second), "--model", str(package)]) == 0  # beside each: apart
    streams = [str(first.with_suffix(".aeic")), str(second.with_suffix(".aeic"))]
    _refused(capsys, ["decode", *streams, "--model", str(package), "--device", "cpu", "-o", str(tmp_path / "out")],
             f"would both be written to {tmp_path / 'out' / 'photo.png'}")


def test_decode_beside_the_photo_keeps_the_original(package: Path, photo: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`aeic encode photo.png` then `aeic decode photo.aeic` wrote the decoded picture over the original photo.
    A picture an earlier decode wrote is replaced as before, and so is one named by -o."""
    original = tmp_path / "photo.png"
    shutil.copy(photo, original)
    before = original.read_bytes()
    assert codec_cli.main(["encode", str(original), "--model", str(package)]) == 0
    stream = tmp_path / "photo.aeic"
    decode = ["decode", str(stream), "--model", str(package), "--device", "cpu"]
    _refused(capsys, decode, f"{original} exists and is not a picture aeic decode wrote", f"-o {original} to replace it")
    _refused(capsys, [*decode, "-o", str(tmp_path)], f"{original} exists")
    assert original.read_bytes() == before
    assert codec_cli.main([*decode, "-o", str(original)]) == 0 and original.read_bytes() != before
    assert codec_cli.main(decode) == 0  # its own earlier output
    (tmp_path / "notes").write_text("x")
    _refused(capsys, [*decode, "-o", str(tmp_path / "notes")], "is a file: give a folder, or a .png/")


def test_a_stream_out_of_gpu_memory_is_one_line_and_the_next_decodes(
    package: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A picture too large for the GPU (the SD-Turbo decoder on a small card) was a traceback that also
    dropped every stream after it."""
    from aeic.receiver.decoder import ReceiverCodec

    streams = []
    for name in ("big", "small"):
        shutil.copy(photo, tmp_path / f"{name}.png")
        assert codec_cli.main(["encode", str(tmp_path / f"{name}.png"), "--model", str(package), "-o", str(tmp_path / "s")]) == 0
        streams.append(str(tmp_path / "s" / f"{name}.aeic"))
    decode = ReceiverCodec.decode
    calls: list[bytes] = []

    def small_gpu(self: ReceiverCodec, data: bytes) -> np.ndarray:
        calls.append(data)
        if len(calls) == 1:  # the first stream does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return decode(self, data)

    monkeypatch.setattr(ReceiverCodec, "decode", small_gpu)
    assert codec_cli.main(["decode", *streams, "--model", str(package), "--device", "cpu", "-o", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{streams[0]}: out of cpu memory; a smaller --tile-pixels" in err
    assert (tmp_path / "d" / "small.png").is_file() and not (tmp_path / "d" / "big.png").exists()


def test_ctrl_c_is_one_line_and_status_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(codec_cli, "cmd_info", interrupted)
    assert codec_cli.main(["info", "s.aeic"]) == 130
    assert capsys.readouterr().err == "aeic info: interrupted\n"


def test_a_stream_of_another_package_names_both_ids_and_the_package(
    package: Path, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_tiny_package(tmp_path / "other", seed=1)
    stream = tmp_path / "photo.aeic"
    assert codec_cli.main(["encode", str(photo), "--model", str(other), "-o", str(stream)]) == 0
    capsys.readouterr()
    assert codec_cli.main(["decode", str(stream), "--model", str(package), "--device", "cpu", "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    ids = [pkg.ModelPackage.load(path).model_id.hex() for path in (other, package)]
    assert err == (f"{stream}: bitstream made with model {ids[0]}, this receiver has {ids[1]} ({package}): decode it "
                   "with --model naming the package it was made with\n")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs a folder no one may write in: Linux's /sys/kernel")
def test_a_package_to_an_unwritable_place_names_it_not_the_staging_folder(
    package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path("/sys/kernel/aeic-package")
    _refused(capsys, ["set-rounding", str(package), str(out), "--weight", "2"], f"cannot write the package to {out}:")
