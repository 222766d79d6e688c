"""aeic eval on photos large enough that the classic search takes hours: the CLI says so before it starts, and
``--baseline-max-mpx`` bounds the search's largest pictures, recorded so that rows made either way never mix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from aeic.evaluation import baselines, cli, images
from PIL import Image


def _picture(height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([255 * xx / width, 255 * yy / height, 128 + 60 * np.sin(xx / 5.0)], axis=-1)
    return np.clip(base + np.random.default_rng(seed).normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "images"
    out.mkdir()
    Image.fromarray(_picture()).save(out / "big.png")
    return out


def _cli(folder: Path, out: Path, *extra: str) -> int:
    argv = ["--images", str(folder), "--out", str(out), "--budgets-bpp", "20", "--baselines-only",
            "--baseline", "jpeg", "--metrics", "psnr", "--no-progress", "--no-plots", *extra]  # fmt: skip
    return cli.main_eval(argv)


def test_the_search_never_codes_a_picture_over_the_cap_but_always_the_smallest() -> None:
    rgb = _picture()
    whole = baselines.compress_to_budget(rgb, 200_000, "jpeg")
    assert whole.factor == 1.0  # a generous budget: full size wins without a cap
    capped = baselines.compress_to_budget(rgb, 200_000, "jpeg", max_pixels=48 * 32)
    assert capped.factor == 1 / 2 and capped.num_bytes is not None and capped.num_bytes <= 200_000
    tiny_cap = baselines.compress_to_budget(rgb, 200_000, "jpeg", max_pixels=1)
    assert tiny_cap.reachable and tiny_cap.factor == min(baselines.DOWNSCALE_FACTORS)


def test_megapixels_reads_the_header_and_zero_for_a_file_it_cannot_read(folder: Path) -> None:
    assert images.megapixels(folder / "big.png") == 96 * 64 / 1e6
    (folder / "broken.png").write_bytes(b"not a png")
    assert images.megapixels(folder / "broken.png") == 0.0


def test_a_large_photo_is_warned_of_with_the_way_out(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "LARGE_PHOTO_MPX", 0.005)  # the 96x64 picture stands in for a 24 MP photo
    assert _cli(folder, tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "1 image(s) over 0.005 MP (largest big.png, 0.0 MP)" in err
    assert "--baseline-max-mpx 4" in err and "--baseline none" in err and "--compare classic=" in err
    assert _cli(folder, tmp_path / "b", "--baseline-max-mpx", "0.002") == 0  # the way out taken: no warning
    printed = capsys.readouterr()
    assert "over 0.005 MP" not in printed.err
    assert "classic codecs: downscale factors up to 0.002 MP only (--baseline-max-mpx)" in printed.out
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["config"]["baseline_max_mpx"] == 0.002
    assert [r["factor"] for r in summary["rows"]] == [0.5]  # 48x32 = 1536 pixels, under 2000; 60x40 is over
    assert summary["baseline_rows_at_cap"] == {"jpeg": ["big.png@bpp20"]}  # the cap, not the bytes, stopped it
    assert "jpeg: 1 row(s) at the largest factor the cap allows, perhaps held back by it: big.png@bpp20" in printed.out
    assert _cli(folder, tmp_path / "c", "--baseline-max-mpx", "1") == 0  # a cap over the picture holds nothing back
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["baseline_rows_at_cap"] == {}


def test_rows_searched_with_another_cap_are_not_resumed(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _cli(folder, out) == 0
    assert _cli(folder, out, "--baseline-max-mpx", "0.002") == 2  # uncapped rows: not passed off as capped
    assert "jpeg rows made with other encoder settings" in capsys.readouterr().err
    capped = tmp_path / "capped"
    assert _cli(folder, capped, "--baseline-max-mpx", "0.002") == 0
    assert _cli(folder, capped) == 2
    assert _cli(folder, capped, "--baseline-max-mpx", "0.002") == 0  # the same cap resumes


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_cap_that_is_not_a_positive_number_is_refused(folder: Path, tmp_path: Path, value: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        _cli(folder, tmp_path / "out", "--baseline-max-mpx", value)
    assert exit_.value.code == 2


def test_a_resume_with_every_classic_row_done_is_not_warned_of(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "LARGE_PHOTO_MPX", 0.005)
    Image.fromarray(_picture(seed=1)).save(folder / "big2.png")
    out = tmp_path / "out"
    assert _cli(folder, out, "--limit", "1") == 0
    assert "1 image(s) over 0.005 MP (largest big.png" in capsys.readouterr().err
    assert _cli(folder, out) == 0  # big.png's row is done: only big2.png is still to be searched
    assert "1 image(s) over 0.005 MP (largest big2.png" in capsys.readouterr().err
    assert _cli(folder, out) == 0  # every row done: nothing is searched, nothing to warn of
    assert "over 0.005 MP" not in capsys.readouterr().err
