"""aeic eval against hostile inputs: odd image files and names, budgets, panoramas, killed and mixed runs."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aeic.evaluation import baselines, cli, metrics, plots, results_file, runner
from aeic.evaluation.images import load_rgb, recon_name
from aeic.sender.images import read_image
from PIL import Image


class StrideCodec:
    """Stand-in codec: every 8th pixel (a few hundred bytes); refuses sides over 256 px as the sender does."""

    num_levels = 1

    def encode(self, rgb: np.ndarray, rate_index: int) -> bytes:
        if max(rgb.shape[:2]) > 256:
            raise ValueError(f"image size {rgb.shape[1]}x{rgb.shape[0]} outside 1..256")
        small = rgb[::8, ::8]
        return struct.pack(">HH", *rgb.shape[:2]) + bytes(small.shape[:2]) + small.tobytes()

    def encode_to_budget(self, rgb: np.ndarray, target_bytes: int) -> tuple[bytes, int]:
        data = self.encode(rgb, 0)
        if len(data) > target_bytes:
            raise runner.BudgetUnreachable(f"needs {len(data)} bytes > {target_bytes}")
        return data, 0

    def decode(self, data: bytes) -> np.ndarray:
        h, w = struct.unpack(">HH", data[:4])
        small = np.frombuffer(data[6:], np.uint8).reshape(data[4], data[5], 3)
        return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)[:h, :w]


def _picture(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 3.0, yy * 4.0, 128 + 60 * np.sin((xx + yy) / 5.0)], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 8, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _evaluator(images: Path, out: Path, **kw: Any) -> runner.Evaluator:  # EvalConfig's fields
    kw.setdefault("points", runner.parse_points("0", None))
    kw.setdefault("metrics", ["psnr"])
    return runner.Evaluator(StrideCodec(), runner.EvalConfig(images=images, out=out, **kw))


def _cli(images: Path, out: Path, *extra: str) -> int:
    argv = ["--images", str(images), "--out", str(out), "--metrics", "psnr", "--no-progress", *extra]
    return cli.main_eval(argv, codec_factory=lambda model: StrideCodec())


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_picture()).save(folder / "img0.png")
    return folder


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_bad_chunk_inside_idat() -> bytes:
    """A PNG whose image data is split by a chunk of invalid type: Pillow raises SyntaxError on load."""
    buf = io.BytesIO()
    Image.fromarray(_picture(8, 8)).save(buf, "PNG")
    data = buf.getvalue()
    start = data.index(b"IDAT") - 4
    size = struct.unpack(">I", data[start : start + 4])[0]
    idat = data[start + 8 : start + 8 + size]
    split = _chunk(b"IDAT", idat[:5]) + _chunk(b"\x01\x02\x03\x04", b"abc") + _chunk(b"IDAT", idat[5:])
    return data[:start] + split + data[start + 12 + size :]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` (Pillow refuses over 179 Mpx before decoding anything)."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def test_broken_chunk_and_decompression_bomb_are_error_rows(images: Path, tmp_path: Path) -> None:
    (images / "chunk.png").write_bytes(_png_with_bad_chunk_inside_idat())
    (images / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    summary = _evaluator(images, tmp_path / "out").run(progress=False)
    status = {r["image"]: (r["status"], r["detail"]) for r in summary["rows"]}
    assert status["img0.png"][0] == "ok"
    assert status["chunk.png"][0] == "error" and "broken PNG" in status["chunk.png"][1]
    assert status["bomb.png"][0] == "error" and "decompression bomb" in status["bomb.png"][1]
    assert summary["means"][0]["error_images"] == ["bomb.png", "chunk.png"]


def test_sixteen_bit_grayscale_keeps_its_tones(tmp_path: Path) -> None:
    values = np.array([[0, 0x4000, 0x8000, 0xFFFF]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")  # a 16-bit grayscale PNG (mode I;16)
    rgb = load_rgb(tmp_path / "g16.png")
    assert rgb[0, :, 0].tolist() == [0, 0x40, 0x80, 0xFF] and (rgb == rgb[..., :1]).all()


def test_non_utf8_names_and_shared_stems_keep_their_own_rows_and_reconstructions(
    images: Path, tmp_path: Path
) -> None:
    Image.fromarray(_picture(seed=1)).save(images / "img0.jpg", quality=90)  # same stem as img0.png
    odd = images / os.fsdecode(b"\xff\xfeodd.png")  # not UTF-8
    Image.fromarray(_picture(seed=2)).save(odd)
    out = tmp_path / "out"
    summary = _evaluator(images, out, save_recon=3).run(progress=False)
    names = [r["image"] for r in summary["rows"]]
    assert sorted(names) == sorted(["img0.jpg", "img0.png", odd.name]) and len(set(names)) == 3
    assert all(r["status"] == "ok" for r in summary["rows"])
    saved = {p.name for p in (out / "recon" / "rate0" / "aeic").iterdir()}
    assert saved == {"img0.jpg.png", "img0.png", odd.name}
    for name in ("img0.jpg", "img0.png"):  # each reconstruction is its own image's
        with Image.open(out / "recon" / "rate0" / "aeic" / recon_name(name)) as im:
            expected = StrideCodec().decode(StrideCodec().encode(load_rgb(images / name), 0))
            assert np.array_equal(np.asarray(im), expected)
    again = _evaluator(images, out, save_recon=3)  # the CSV reads back with the odd name intact
    assert len(again.results.done) == 3


def test_an_exif_rotated_first_image_gets_its_side_by_side(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    im = Image.fromarray(_picture(30, 50))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(folder / "a_rotated.jpg", exif=exif)
    assert _cli(folder, tmp_path / "out", "--rates", "0", "--baseline", "none") == 0
    with Image.open(tmp_path / "out" / "side_by_side_a_rotated_rate0.png") as side:
        assert side.format == "PNG"


def test_a_panorama_wider_than_webp_allows_is_coded_at_the_factors_that_fit() -> None:
    wide = np.tile(_picture(8, 64), (1, 260, 1))  # 8 x 16640: WebP writes at most 16383 px
    result = baselines.compress_to_budget(wide, 20000, "webp")
    assert result.reachable and result.factor is not None and result.num_bytes is not None and result.data is not None
    assert result.factor < 1 and result.num_bytes <= 20000
    with Image.open(io.BytesIO(result.data)) as im:
        assert max(im.size) <= 16383


def test_an_image_the_codec_refuses_is_an_error_row_not_a_crash(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Image.fromarray(_picture(8, 300)).save(images / "wide.png")  # StrideCodec refuses sides over 256
    out = tmp_path / "out"
    assert _cli(images, out, "--rates", "0", "--budgets-bpp", "2", "--baseline", "jpeg", "--no-plots") == 1
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["point"], r["method"]): r for r in summary["rows"] if r["image"] == "wide.png"}
    assert rows[("rate0", "aeic")]["status"] == "error" and "cannot code" in rows[("rate0", "aeic")]["detail"]
    assert rows[("rate0", "jpeg")]["status"] == "error"  # no AEIC byte count to give it
    assert rows[("bpp2", "jpeg")]["status"] == "ok"  # a bpp budget does not need AEIC's bytes
    for entry in summary["means"]:
        assert entry["n_ok"] + entry["n_unreachable"] + entry["n_error"] == 2
    printed = capsys.readouterr().out
    assert " err " in printed.splitlines()[0] and "error: wide.png: AEIC cannot code" in printed


def test_identical_black_images_score_finite_ideal_values() -> None:
    black = np.zeros((20, 20, 3), np.uint8)
    scores = {name: metrics.perceptual_metric_fn(name)(black, black) for name in metrics.PERCEPTUAL_METRICS}
    assert scores == {"haarpsi": 1.0, "vif": 1.0, "fsim": 1.0, "gmsd": 0.0}


def test_a_row_cut_short_by_a_killed_run_is_measured_again(images: Path, tmp_path: Path) -> None:
    Image.fromarray(_picture(seed=3)).save(images / "img1.png")
    out = tmp_path / "out"
    _evaluator(images, out).run(progress=False)
    path = out / "results.csv"
    text = path.read_text()
    path.write_text(text[: text.rindex(",ok,") + 2])  # killed while writing img1's row: "...,o"
    summary = _evaluator(images, out).run(progress=False)
    assert [(r["image"], r["status"]) for r in summary["rows"]] == [("img0.png", "ok"), ("img1.png", "ok")]
    assert summary["means"][0]["n_ok"] == 2 and all(r["psnr"] > 10 for r in summary["rows"])
    with path.open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2


def test_rows_written_twice_count_once(images: Path, tmp_path: Path) -> None:
    """Two runs at once into one folder (before OUT/eval.lock) left every row twice in results.csv, and every
    later summary counted each image twice."""
    out = tmp_path / "out"
    _evaluator(images, out).run(progress=False)
    path = out / "results.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines + lines[1:]))
    summary = _evaluator(images, out).run(progress=False)
    assert summary["means"][0]["n_ok"] == 1 and len(summary["rows"]) == 1
    with path.open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 1


def test_another_images_folder_does_not_resume_into_the_same_out(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _evaluator(images, out).run(progress=False)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(_picture(seed=9)).save(other / "img0.png")  # same name, another picture
    with pytest.raises(ValueError, match=r"other pictures named \['img0.png'\]"):
        _evaluator(other, out)
    Image.fromarray(_picture(seed=9)).save(other / "img1.png")
    _evaluator(images, out).run(progress=False)  # the same pictures still resume


def test_budget_strings(images: Path) -> None:
    points = runner.parse_points("0,0", "0.01,0.010,0.02")
    assert [p.label for p in points] == ["rate0", "bpp0.01", "bpp0.02"]
    with pytest.raises(ValueError, match=r"--budgets-bpp: '0x1' is not a float"):
        runner.parse_points(None, "0.01,0x1")
    with pytest.raises(ValueError, match=r"--rates: '1.5' is not a int"):
        runner.parse_points("1.5", None)


def test_summary_holds_only_this_runs_points(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _evaluator(images, out, points=runner.parse_points(None, "2,4")).run(progress=False)
    summary = _evaluator(images, out, points=runner.parse_points(None, "2")).run(progress=False)
    assert {r["point"] for r in summary["rows"]} == {"bpp2"}


def test_a_missing_codec_plugin_is_skipped_with_a_note(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = {"jpeg": None, "webp": None, "avif": "Pillow built without AVIF", "jxl": "no plugin"}
    monkeypatch.setattr(baselines, "available_codecs", lambda: absent)
    out = tmp_path / "out"
    assert _cli(images, out, "--budgets-bpp", "2", "--baselines-only", "--no-plots") == 0
    printed = capsys.readouterr()
    assert "baseline avif skipped: Pillow built without AVIF" in printed.err
    # said again under the table, which a long run's progress bar has scrolled the first note away from
    assert "best: of jpeg, webp only; not run here: avif (Pillow built without AVIF), jxl (no plugin)" in printed.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["skipped_baselines"] == {"avif": "Pillow built without AVIF", "jxl": "no plugin"}
    assert [r["method"] for r in summary["rows"]] == ["jpeg", "webp", "best"]
    assert plots.legend_label(summary, "best", 0) == "best of jpeg, webp"  # the RD plots' curve too
    assert plots.legend_label(summary, "webp", 2) == "webp (2 unreachable)"


def test_ctrl_c_keeps_the_rows_and_the_same_command_resumes(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.fromarray(_picture(seed=4)).save(images / "img1.png")
    encode, seen = StrideCodec.encode, []

    def interrupted(codec: StrideCodec, rgb: np.ndarray, rate_index: int) -> bytes:
        seen.append(rgb.shape == (48, 64, 3))  # not the untimed warm-up picture
        if sum(seen) == 2:  # Ctrl-C while coding img1
            raise KeyboardInterrupt
        return encode(codec, rgb, rate_index)

    monkeypatch.setattr(StrideCodec, "encode", interrupted)
    out = tmp_path / "out"
    assert _cli(images, out, "--rates", "0", "--baseline", "none", "--no-plots") == 130
    assert [r["image"] for r in results_file.ResultsFile(out / "results.csv", runner.BASE_COLUMNS + ["psnr"]).rows] == [
        "img0.png"
    ]
    monkeypatch.undo()
    assert _cli(images, out, "--rates", "0", "--baseline", "none", "--no-plots") == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["image"], r["status"]) for r in rows] == [("img0.png", "ok"), ("img1.png", "ok")]


def test_eval_scores_the_pixels_the_sender_codes(tmp_path: Path) -> None:
    """Eval read RGBA by dropping alpha and ignored colour profiles, while the sender composites over white
    and converts to sRGB: a transparent area was scored against the colour hidden under it."""
    rgba = np.dstack([_picture(), np.full((48, 64), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # transparent left part over a picture's colours
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(_picture()).quantize(16).save(tmp_path / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(_picture()).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    for name in ("rgba.png", "palette.png", "rotated.jpg"):
        np.testing.assert_array_equal(load_rgb(tmp_path / name), read_image(tmp_path / name))
    assert (load_rgb(tmp_path / "rgba.png")[:, :20] == 255).all()


def test_every_format_the_sender_reads_is_evaluated(tmp_path: Path) -> None:
    """Only .png/.jpg/.jpeg were listed: a folder of WebP (or TIFF, BMP, GIF) photos was refused as empty."""
    folder = tmp_path / "images"
    folder.mkdir()
    for suffix in (".webp", ".tif", ".bmp", ".gif"):
        Image.fromarray(_picture()).save(folder / f"photo{suffix}")
    (folder / "notes.txt").write_text("not an image")
    summary = _evaluator(folder, tmp_path / "out").run(progress=False)
    assert sorted(r["image"] for r in summary["rows"]) == ["photo.bmp", "photo.gif", "photo.tif", "photo.webp"]
    assert all(r["status"] == "ok" for r in summary["rows"])


def _side_by_side_columns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Records the columns of every side-by-side picture drawn, by file name."""
    drawn: dict[str, list[str]] = {}
    draw = plots.side_by_side

    def recording(original: np.ndarray, columns: dict[str, np.ndarray], out_path: Path, crop: Any = None) -> Path:
        drawn[out_path.name] = [name.split("\n")[0] for name in columns]
        return draw(original, columns, out_path, crop)

    monkeypatch.setattr(plots, "side_by_side", recording)
    return drawn


def test_an_unreadable_first_image_does_not_take_the_saved_reconstructions(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--save-recon 1 saved the first file's reconstructions; when it was unreadable none were saved and the
    side-by-side showed the original alone."""
    (images / "a_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    drawn = _side_by_side_columns(monkeypatch)
    out = tmp_path / "out"
    assert _cli(out.parent / "images", out, "--rates", "0", "--baseline", "webp") == 1
    assert (out / "recon" / "rate0" / "aeic" / "img0.png").is_file()
    assert drawn == {"side_by_side_img0_rate0.png": ["AEIC", "webp"]}


def test_a_single_classic_codec_is_in_the_side_by_side(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only AEIC and best were drawn, so --baselines-only --baseline webp gave a picture of the original alone."""
    drawn = _side_by_side_columns(monkeypatch)
    assert _cli(images, tmp_path / "out", "--budgets-bpp", "2", "--baselines-only", "--baseline", "webp") == 0
    assert drawn == {"side_by_side_img0_bpp2.png": ["webp"]}


def test_an_image_unreachable_at_a_point_leaves_its_side_by_side_to_the_next(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The side-by-side took the first image with an ok row at any point, though nothing of it was saved at
    the others."""
    Image.fromarray(_picture(8, 8)).save(images / "a_small.png")  # 9 bytes of stride code: over 0.5 bpp's 4
    drawn = _side_by_side_columns(monkeypatch)
    assert _cli(images, tmp_path / "out", "--budgets-bpp", "0.5,2", "--baseline", "none", "--save-recon", "2") == 0
    assert drawn == {"side_by_side_img0_bpp0.5.png": ["AEIC"], "side_by_side_a_small_bpp2.png": ["AEIC"]}


def test_a_run_killed_after_a_row_before_its_reconstruction_saves_it_on_resume(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = runner.Evaluator._save

    def killed(evaluator: runner.Evaluator, *args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Evaluator, "_save", killed)
    out = tmp_path / "out"
    assert _cli(images, out, "--rates", "0", "--baseline", "none", "--no-plots") == 130
    monkeypatch.setattr(runner.Evaluator, "_save", save)
    assert _cli(images, out, "--rates", "0", "--baseline", "none", "--no-plots") == 0
    assert (out / "recon" / "rate0" / "aeic" / "img0.png").is_file()


def test_a_fifo_in_place_of_a_photo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A FIFO swapped in for a photo after the folder was listed: ``Image.open`` blocked until some writer came."""
    import threading

    from aeic.sender.images import ImageReadError

    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            load_rgb(fifo)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)
        else:
            outcome.append(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader so the failure does not hang pytest
        with open(fifo, "wb"):
            pass
        reader.join(10)
        pytest.fail("load_rgb waited on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], ImageReadError) and "FIFO" in str(outcome[0])
