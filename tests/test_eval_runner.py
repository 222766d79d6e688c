"""The eval loop end to end: real bitstreams, rows, means, baselines at equal bytes, resume, determinism."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aeic.evaluation import cli, plots, runner
from aeic.evaluation.images import load_rgb
from aeic.sender.images import IMAGE_SUFFIXES
from aeic.shared import bitstream
from PIL import Image


class WebPContainerCodec:
    """Stand-in codec for the runner: WebP of a 1/4-scale image inside AEIC's real container v1.

    Rate index i uses quality 10 + 30 * i, so higher rates are bigger, like the model's rate points.
    """

    model_id = b"TWBP"
    rates = (0, 1, 2)
    num_levels = 3

    def encode(self, rgb: np.ndarray, rate_index: int) -> bytes:
        h, w = rgb.shape[:2]
        small = Image.fromarray(rgb).resize((max(1, w // 4), max(1, h // 4)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, "WEBP", quality=10 + 30 * rate_index, method=4)
        header = bitstream.Header(self.model_id, w, h, rate_index)
        return bitstream.pack(bitstream.Bitstream(header, buf.getvalue()))

    def decode(self, data: bytes) -> np.ndarray:
        stream = bitstream.unpack(data)
        with Image.open(io.BytesIO(stream.payload)) as im:
            size = (stream.header.width, stream.header.height)
            return np.asarray(im.convert("RGB").resize(size, Image.Resampling.LANCZOS))

    def encode_to_budget(self, rgb: np.ndarray, target_bytes: int) -> tuple[bytes, int]:
        for rate in reversed(self.rates):
            data = self.encode(rgb, rate)
            if len(data) <= target_bytes:
                return data, rate
        raise runner.BudgetUnreachable(f"lowest rate needs {len(data)} bytes > {target_bytes}")


def _write_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:64, 0:96]
    for i in range(2):
        base = np.stack([xx * 2.5, yy * 3.5, 128 + 80 * np.sin((xx + yy) / (4.0 + i))], axis=-1)
        img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    return _write_images(tmp_path / "images")


def _config(images: Path, out: Path, **kw: Any) -> runner.EvalConfig:  # EvalConfig's fields
    kw.setdefault("points", runner.parse_points("0,2", None))
    kw.setdefault("metrics", ["psnr", "ms_ssim", "texture", "gmsd"])
    return runner.EvalConfig(images=images, out=out, **kw)


def test_rate_points_with_baselines_at_equal_bytes(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    codec = WebPContainerCodec()
    metric_names = ["psnr", "ms_ssim", "texture", "gmsd", "lpips", "fid"]
    config = _config(images, out, baselines=["jpeg", "webp"], metrics=metric_names)
    summary = runner.Evaluator(codec, config).run(progress=False)
    rows = summary["rows"]
    assert len(rows) == 2 * 2 * 4  # images x points x (aeic, jpeg, webp, best)
    for row in (r for r in rows if r["method"] == "aeic"):
        rgb = load_rgb(images / row["image"])
        data = codec.encode(rgb, row["rate_index"])
        assert row["bytes"] == len(data)  # the whole container, header and CRC included
        assert row["bpp"] == pytest.approx(len(data) * 8 / (64 * 96))
        assert row["encode_ms"] > 0 and row["decode_ms"] > 0
        assert 0 < row["texture"] <= 1 and 0 < row["ms_ssim"] <= 1 and row["psnr"] > 10
        for other in (r for r in rows if (r["image"], r["point"]) == (row["image"], row["point"])):
            if other["method"] != "aeic":
                assert other["budget_bytes"] == row["bytes"]
                assert other["status"] == "unreachable" or other["bytes"] <= row["bytes"]
    means = {(m["point"], m["method"]): m for m in summary["means"]}
    assert set(means) == {(p, m) for p in ("rate0", "rate2") for m in ("aeic", "jpeg", "webp", "best")}
    assert means[("rate2", "aeic")]["bpp"] > means[("rate0", "aeic")]["bpp"]
    assert means[("rate0", "aeic")]["n_ok"] == 2
    for entry in summary["means"]:
        assert entry["n_ok"] + entry["n_unreachable"] == 2
    assert summary["metrics"][:4] == ["psnr", "ms_ssim", "texture", "gmsd"]
    for name in ("lpips", "fid"):  # computed when the weights are cached, else a clear skip
        assert name in summary["metrics"] or summary["skipped_metrics"][name].startswith(
            "skipped: weights not available offline"
        )
    assert json.loads((out / "summary.json").read_text()) == summary
    with (out / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert (out / "recon" / "rate0" / "aeic" / "img0.png").is_file()  # first image saved
    assert not (out / "recon" / "rate0" / "aeic" / "img1.png").exists()


def test_budget_points_count_unreachable_images(images: Path, tmp_path: Path) -> None:
    # 0.002 bpp of 64x96 is 1 byte: nothing fits; 0.5 bpp is 384 bytes.
    config = _config(
        images, tmp_path / "out", points=runner.parse_points(None, "0.002,0.5"), baselines=["jpeg"]
    )
    summary = runner.Evaluator(WebPContainerCodec(), config).run(progress=False)
    means = {(m["point"], m["method"]): m for m in summary["means"]}
    low = means[("bpp0.002", "aeic")]
    assert (
        low["n_ok"] == 0
        and low["n_unreachable"] == 2
        and low["unreachable_images"] == ["img0.png", "img1.png"]
    )
    assert means[("bpp0.002", "jpeg")]["n_unreachable"] == 2
    high = [r for r in summary["rows"] if r["point"] == "bpp0.5"]
    for row in high:
        assert row["budget_bytes"] == 384
        if row["status"] == "ok":
            assert row["bytes"] <= 384


def test_resume_skips_existing_rows_and_is_deterministic(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = _config(images, out, baselines=["jpeg"], limit=1)
    first = runner.Evaluator(WebPContainerCodec(), config).run(progress=False)
    assert {r["image"] for r in first["rows"]} == {"img0.png"}

    class Counting(WebPContainerCodec):
        calls = 0

        def encode(self, rgb: np.ndarray, rate_index: int) -> bytes:
            Counting.calls += rgb.shape == (64, 96, 3)  # not the untimed warm-up picture
            return super().encode(rgb, rate_index)

    config.limit = None
    second = runner.Evaluator(Counting(), config).run(progress=False)
    assert Counting.calls == 2  # only img1 at two rate points
    assert len(second["rows"]) == 2 * 2 * 2
    again = runner.Evaluator(Counting(), config).run(progress=False)
    assert Counting.calls == 2  # nothing left to do

    fresh = runner.Evaluator(
        WebPContainerCodec(), _config(images, tmp_path / "fresh", baselines=["jpeg"])
    ).run(progress=False)
    timing = {"encode_ms", "decode_ms"}

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert strip(fresh["rows"]) == strip(again["rows"])


def test_unreadable_image_is_reported(images: Path, tmp_path: Path) -> None:
    (images / "broken.png").write_bytes(b"not a png")
    summary = runner.Evaluator(WebPContainerCodec(), _config(images, tmp_path / "out")).run(progress=False)
    broken = [r for r in summary["rows"] if r["image"] == "broken.png"]
    assert len(broken) == 2 and all(r["status"] == "error" for r in broken)
    assert "unreadable image" in broken[0]["detail"]
    means = {(m["point"], m["method"]): m for m in summary["means"]}
    assert means[("rate0", "aeic")]["n_error"] == 1 and means[("rate0", "aeic")]["n_ok"] == 2


def test_changed_columns_refuse_to_mix(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    runner.Evaluator(WebPContainerCodec(), _config(images, out, limit=1)).run(progress=False)
    with pytest.raises(ValueError, match="other columns"):
        runner.Evaluator(WebPContainerCodec(), _config(images, out, metrics=["psnr"]))


@pytest.mark.parametrize(
    ("rates", "budgets"), [(None, None), ("-1", None), (None, "0"), ("x", None), (None, "30")]
)
def test_bad_points_are_rejected(rates: str | None, budgets: str | None) -> None:
    with pytest.raises(ValueError):
        runner.parse_points(rates, budgets)


def test_point_labels_and_budgets() -> None:
    rate, budget = runner.parse_points("1", "0.02")
    assert (rate.label, budget.label) == ("rate1", "bpp0.02")
    assert rate.budget_bytes(768, 512) is None
    assert budget.budget_bytes(768, 512) == 983  # floor(0.02 * 768 * 512 / 8)


def test_budget_points_need_encode_to_budget(images: Path, tmp_path: Path) -> None:
    class RateOnly:
        def encode(self, rgb: np.ndarray, rate_index: int) -> bytes:
            return b""

        def decode(self, data: bytes) -> np.ndarray:
            return np.zeros((1, 1, 3), np.uint8)

    config = _config(images, tmp_path / "out", points=runner.parse_points(None, "0.01"))
    with pytest.raises(TypeError, match="encode_to_budget"):
        runner.Evaluator(RateOnly(), config)
    with pytest.raises(TypeError):
        runner.Evaluator(object(), config)  # type: ignore[arg-type]  # the wrong type is the point


def test_cli_writes_results_plots_and_side_by_side(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["--images", str(images), "--rates", "0,1", "--baseline", "jpeg", "--out", str(out)]
    argv += ["--metrics", "psnr,ms_ssim,texture", "--no-progress"]
    assert cli.main_eval(argv, codec_factory=lambda model: WebPContainerCodec()) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["baselines"] == ["jpeg"] and summary["codec"] == {"codec": "WebPContainerCodec"}
    for name in ("rd_psnr.png", "rd_ms_ssim.png", "rd_texture.png", "side_by_side_img0_rate0.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 300
    printed = capsys.readouterr().out
    assert "rate0" in printed and "aeic" in printed and "jpeg" in printed


def test_cli_compare_adds_another_runs_reconstruction_to_the_side_by_side(images: Path, tmp_path: Path) -> None:
    base = ["--images", str(images), "--rates", "0", "--baseline", "none", "--metrics", "psnr", "--no-progress"]
    assert cli.main_eval([*base, "--out", str(tmp_path / "mse")], codec_factory=lambda model: WebPContainerCodec()) == 0
    columns = plots.compared_reconstructions({"MSE-only": tmp_path / "mse", "absent": tmp_path / "nope"}, "img0.png", "rate0")
    assert list(columns) == [next(iter(columns))] and next(iter(columns)).startswith("MSE-only\n")
    widths = {}
    for name, extra in (("plain", []), ("compared", ["--compare", f"MSE-only={tmp_path / 'mse'}"])):
        out = tmp_path / name
        assert cli.main_eval([*base, "--out", str(out), *extra], codec_factory=lambda model: WebPContainerCodec()) == 0
        with Image.open(out / "side_by_side_img0_rate0.png") as im:
            widths[name] = im.width
    assert widths["compared"] > widths["plain"] * 1.3
    merged = plots.with_compared_means(json.loads((tmp_path / "plain" / "summary.json").read_text()),
                                       {"MSE-only": tmp_path / "mse"})  # fmt: skip
    assert [m["method"] for m in merged["means"]] == ["aeic", "MSE-only"]
    with pytest.raises(SystemExit):
        cli.main_eval([*base, "--out", str(tmp_path / "x"), "--compare", "no-equals-sign"],
                      codec_factory=lambda model: WebPContainerCodec())  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [[], ["--rates", "0", "--limit", "0"], ["--rates", "-2"], ["--rates", "0", "--baseline", "gif"]],
)
def test_cli_rejects_bad_arguments(images: Path, tmp_path: Path, extra: list[str]) -> None:
    argv = ["--images", str(images), "--out", str(tmp_path / "o"), *extra]
    with pytest.raises(SystemExit) as exc:
        cli.main_eval(argv, codec_factory=lambda model: WebPContainerCodec())
    assert exc.value.code == 2


def test_cli_missing_image_folder_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--images", str(tmp_path / "nope"), "--rates", "0", "--out", str(tmp_path / "o")]
    assert cli.main_eval(argv, codec_factory=lambda model: WebPContainerCodec()) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_baselines_only_needs_budgets_and_scores_best_once(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--images", str(images), "--budgets-bpp", "0.6", "--baselines-only", "--out", str(out)]
    argv += ["--metrics", "psnr,texture", "--no-progress", "--no-plots"]
    assert cli.main_eval(argv) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"jpeg", "webp", "avif", "jxl", "best"}
    for image in ("img0.png", "img1.png"):
        by_method = {r["method"]: r for r in rows if r["image"] == image}
        best = by_method["best"]
        assert best["psnr"] == max(
            r["psnr"] for m, r in by_method.items() if m != "best" and r["status"] == "ok"
        )
        assert best["bytes"] == by_method[best["detail"]]["bytes"] <= 460  # floor(0.6 * 64 * 96 / 8)
    bad = ["--images", str(images), "--rates", "0", "--baselines-only", "--out", str(tmp_path / "o2")]
    assert cli.main_eval(bad) == 2


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    testing = pytest.importorskip(
        "aeic.codec.testing", reason="aeic.codec.testing (tiny model) not available"
    )
    return Path(testing.make_tiny_package(tmp_path_factory.mktemp("tiny-package")))


def test_end_to_end_with_the_tiny_model_package(tiny_package: Path, images: Path, tmp_path: Path) -> None:
    """aeic eval on two small images with a real (tiny, random) model: SenderCodec -> bitstream -> ReceiverCodec."""
    from aeic.sender.encoder import SenderCodec
    from aeic.shared.model_package import ModelPackage

    out = tmp_path / "out"
    argv = [
        "--images",
        str(images),
        "--model",
        str(tiny_package),
        "--rates",
        "0,1",
        "--budgets-bpp",
        "0.001,0.2",
    ]
    argv += [
        "--baseline",
        "jpeg",
        "--out",
        str(out),
        "--metrics",
        "psnr,ms_ssim,texture,haarpsi",
        "--no-progress",
    ]
    assert cli.main_eval(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["codec"]["model_id"] == ModelPackage.load(tiny_package).model_id.hex()
    sender = SenderCodec.from_package(tiny_package)
    aeic_rows = [r for r in summary["rows"] if r["method"] == "aeic"]
    assert len(aeic_rows) == 2 * 4
    for row in aeic_rows:
        if row["point"] == "bpp0.001":  # 0 bytes for 64x96: below any container
            assert row["status"] == "unreachable"
            continue
        assert row["status"] == "ok" and row["psnr"] > 0 and 0 <= row["texture"] <= 1
        rgb = load_rgb(images / row["image"])
        assert row["bytes"] == len(sender.encode(rgb, row["rate_index"]))  # deterministic, container included
        assert row["bpp"] == pytest.approx(row["bytes"] * 8 / (64 * 96))
    assert (out / "recon" / "rate0" / "aeic" / "img0.png").is_file()
    assert summary["codec"]["sender_downscale"] == "auto"
    assert {row["factor"] for row in aeic_rows if row["status"] == "ok"} == {1.0}  # small images: coded whole


def test_a_fixed_coding_downscale_is_recorded_per_row(tiny_package: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "half"
    argv = ["--images", str(images), "--model", str(tiny_package), "--rates", "1", "--baseline", "none",
            "--downscale", "2", "--metrics", "psnr", "--no-plots", "--no-progress", "--out", str(out)]
    assert cli.main_eval(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["codec"]["sender_downscale"] == 2
    assert [row["factor"] for row in summary["rows"] if row["method"] == "aeic"] == [0.5, 0.5]


def test_cli_rejects_rate_indices_the_model_lacks(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--images", str(images), "--rates", "0,3", "--out", str(tmp_path / "o")]
    assert cli.main_eval(argv, codec_factory=lambda model: WebPContainerCodec()) == 2
    assert "rate indices 0..2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rd_curves_and_side_by_side_inputs(tmp_path: Path) -> None:
    means = [
        {
            "point": "bpp0.01",
            "method": "aeic",
            "n_unreachable": 0,
            "bpp": 0.009,
            "psnr": 21.0,
            "texture": 0.7,
        },
        {
            "point": "bpp0.01",
            "method": "best",
            "n_unreachable": 1,
            "bpp": 0.0095,
            "psnr": 21.5,
            "texture": None,
        },
        {
            "point": "bpp0.02",
            "method": "best",
            "n_unreachable": 0,
            "bpp": 0.019,
            "psnr": 22.8,
            "texture": None,
        },
    ]
    summary = {"metrics": ["psnr", "texture", "ms_ssim"], "means": means}
    written = plots.rd_curves(summary, tmp_path)
    assert [p.name for p in written] == ["rd_psnr.png", "rd_texture.png"]  # no MS-SSIM values: no plot
    assert plots._series(means, "psnr")["best"] == [(0.0095, 21.5), (0.019, 22.8)]
    assert plots._unreachable(means) == {"aeic": 0, "best": 1}
    original = np.zeros((40, 60, 3), np.uint8)
    assert plots.center_crop_box(40, 60, 256) == (0, 10, 40, 50)
    with pytest.raises(ValueError, match="differs"):
        plots.side_by_side(original, {"small": np.zeros((20, 60, 3), np.uint8)}, tmp_path / "s.png")
    path = plots.side_by_side(original, {"same": original, "MSE-only": original}, tmp_path / "s.png")
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_help_names_every_metric_and_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    """--help said only "comma list" for --metrics, so the names it takes were found by trial."""
    with pytest.raises(SystemExit):
        cli.main_eval(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in ("psnr", "ms_ssim", "texture", "haarpsi", "vif", "fsim", "gmsd", "lpips", "dists", "fid", "kid"):
        assert name in text
    assert runner.metric_functions(list(cli.METRIC_NAMES))[0]  # every listed name is accepted
    assert "1 some image failed" in text and "130 interrupted" in text
    assert all(suffix in text for suffix in IMAGE_SUFFIXES)  # --images named six formats when the sender read seven


def test_an_out_that_is_a_file_or_a_compare_run_without_summary_is_refused_first(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both were tracebacks: --out naming a file on creating the folder, --compare naming a folder without a
    summary.json only after every image had been measured."""
    (tmp_path / "a_file").write_text("not a folder")
    base = ["--images", str(images), "--rates", "0", "--baseline", "none", "--metrics", "psnr", "--no-progress"]
    for extra, said in (
        (["--out", str(tmp_path / "a_file")], "is not a folder"),
        (["--out", str(tmp_path / "o"), "--compare", f"prev={tmp_path / 'nope'}"], "no summary.json"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main_eval([*base, *extra], codec_factory=lambda model: WebPContainerCodec())
        assert exc.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was measured


def test_a_second_run_into_a_folder_in_use_is_refused(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs into one --out (the same command started twice, a requeued job) each measured every row and
    appended it: the summary counted each image twice, and a start-up rewrite of a half-written row could
    cut into the other's writes."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    argv = ["--images", str(images), "--rates", "0", "--baseline", "none", "--out", str(out), "--no-progress"]
    with open(out / "eval.lock", "a") as held:  # as the other run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli.main_eval(argv, codec_factory=lambda model: WebPContainerCodec()) == 2
        assert "another aeic eval is writing to" in capsys.readouterr().err
        assert not (out / "results.csv").exists()
    assert cli.main_eval([*argv, "--no-plots"], codec_factory=lambda model: WebPContainerCodec()) == 0


def test_plots_without_psnr_among_the_metrics(images: Path, tmp_path: Path) -> None:
    """The side-by-side captions read each row's PSNR: --metrics ms_ssim ended the run in a KeyError."""
    out = tmp_path / "out"
    argv = ["--images", str(images), "--rates", "0", "--baseline", "webp", "--metrics", "ms_ssim", "--no-progress"]
    assert cli.main_eval([*argv, "--out", str(out)], codec_factory=lambda model: WebPContainerCodec()) == 0
    assert (out / "side_by_side_img0_rate0.png").is_file() and (out / "rd_ms_ssim.png").is_file()
    columns = plots.saved_reconstructions(out, "img0.png", "rate0", ("aeic", "webp"))
    assert [name.split("\n")[1].split(", ")[1].split(" ")[0] for name in columns] == ["MS-SSIM", "MS-SSIM"]


def test_the_eval_keeps_freed_memory_for_speed_while_a_sender_hands_it_back(
        tiny_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device's encoder maps every large buffer afresh (its peak); the eval, a batch tool, keeps them: with
    the device's setting a 12 MP photo's eval spent half its time in the kernel (docs/evaluation.md)."""
    from aeic.evaluation.codec_adapter import PackageCodec
    from aeic.sender import encoder

    calls: list[str] = []
    monkeypatch.setattr(encoder, "limit_heap_retention", lambda: calls.append("frugal"))
    monkeypatch.setattr(encoder, "favour_heap_speed", lambda: calls.append("fast"))
    encoder.SenderCodec.from_package(tiny_package)
    PackageCodec.from_package(tiny_package, device="cpu")
    assert calls == ["frugal", "fast"]
