"""The RD plots tell every curve apart: with matplotlib's default cycle the fourth classic codec (JPEG XL) was
drawn in AEIC's red, and a compared run could take the paper's purple."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.colors as mcolors
import pytest
from aeic.evaluation import plots
from matplotlib.figure import Figure


def test_every_curve_of_an_rd_plot_has_its_own_colour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    methods = ["aeic", "jpeg", "webp", "avif", "jxl", "best", "previous package", "mse-only"]
    means = [{"point": p, "method": m, "n_unreachable": 0, "bpp": b, "psnr": 20.0 + b * 100}
             for m in methods for p, b in (("bpp0.01", 0.01), ("bpp0.02", 0.02))]  # fmt: skip
    drawn: list[Figure] = []
    close = plots.plt.close

    def keep(fig: Any = None) -> None:
        drawn.append(fig)
        close(fig)

    monkeypatch.setattr(plots.plt, "close", keep)
    plots.rd_curves({"metrics": ["psnr"], "means": means}, tmp_path)
    lines = drawn[0].axes[0].get_lines()
    colours = {str(line.get_label()): mcolors.to_hex(line.get_color()) for line in lines}
    assert len(colours) == len(methods) + 1  # and the paper's curve
    assert len(set(colours.values())) == len(colours), colours
