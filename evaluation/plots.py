"""Rate-distortion curves and side-by-side crops, as PNG files (matplotlib, headless).

:func:`rd_curves` draws one figure per metric from a ``summary.json`` (mean bpp vs mean metric per method,
one marker per rate point) with the paper's published points where the paper gives that metric.
:func:`side_by_side` puts the same crop of the original and of each reconstruction next to each other;
:func:`side_by_side_from_run` builds it from the reconstructions an eval run saved under ``OUT/recon``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from aeic.evaluation import images
from aeic.evaluation.paper_points import PAPER_POINTS
from PIL import Image

LABELS = {
    "psnr": "PSNR (dB, RGB)",
    "ms_ssim": "MS-SSIM",
    "texture": "texture retention min(r, 1/r)",
    "haarpsi": "HaarPSI",
    "vif": "VIF-p",
    "fsim": "FSIM",
    "gmsd": "GMSD (lower is better)",
    "lpips": "LPIPS (lower is better)",
    "dists": "DISTS (lower is better)",
}
STYLE = {
    "aeic": ("tab:red", "o", 2.2), "best": ("black", "s", 1.6), "jpeg": ("tab:blue", ".", 1.2),
    "webp": ("tab:orange", ".", 1.2), "avif": ("tab:green", ".", 1.2), "jxl": ("tab:brown", ".", 1.2),
}  # fmt: skip
PAPER_COLOR = "tab:purple"
# Compared runs' curves, in turn: matplotlib's own cycle would give the fourth curve AEIC's red.
OTHER_COLORS = ("tab:pink", "tab:cyan", "tab:olive", "tab:gray")


def _series(means: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[float, float]]]:
    """Method -> (mean bpp, mean metric) sorted by bpp, over the rate points where it reached any image."""
    out: dict[str, list[tuple[float, float]]] = {}
    for entry in means:
        if entry.get("bpp") is not None and entry.get(metric) is not None:
            out.setdefault(entry["method"], []).append((entry["bpp"], entry[metric]))
    return {method: sorted(points) for method, points in out.items()}


def _unreachable(means: list[dict[str, Any]]) -> dict[str, int]:
    """Method -> (image, point) pairs it could not reach, over every rate point."""
    out: dict[str, int] = {}
    for entry in means:
        out[entry["method"]] = out.get(entry["method"], 0) + entry["n_unreachable"]
    return out


def legend_label(summary: dict[str, Any], method: str, unreachable: int) -> str:
    """A method's name in the RD plots, with its unreachable count; ``best`` names its codecs when one was
    missing on the machine, so the curve is not read as the best of all four."""
    label = method.upper() if method == "aeic" else method
    config = summary.get("config", {})
    if method == "best" and config.get("skipped_baselines") and len(config.get("baselines", [])) > 1:
        label += f" of {', '.join(config['baselines'])}"
    return label + (f" ({unreachable} unreachable)" if unreachable else "")


def rd_curves(summary: dict[str, Any], out_dir: Path, title: str = "") -> list[Path]:
    """One ``rd_<metric>.png`` per metric in the summary; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in summary["metrics"]:
        series = _series(summary["means"], metric)
        unreachable = _unreachable(summary["means"])
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        others = iter(OTHER_COLORS * len(series))
        for method, points in series.items():
            color, marker, width = STYLE.get(method) or (next(others), "x", 1.2)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, lw=width,
                    label=legend_label(summary, method, unreachable.get(method, 0)))  # fmt: skip
        for name, curves in PAPER_POINTS.items():
            if metric in curves:
                bpp, value = zip(*curves[metric])
                ax.plot(bpp, value, "--^", color=PAPER_COLOR, lw=1.2, label=name)
        ax.set_xlabel("bits per pixel (whole file)")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title or f"rate-distortion: {metric}")
        fig.tight_layout()
        path = out_dir / f"rd_{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def center_crop_box(height: int, width: int, size: int = 256) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a centred square crop of at most ``size`` px."""
    side = min(size, height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return top, left, top + side, left + side


def side_by_side(
    original: np.ndarray,
    columns: dict[str, np.ndarray],
    out_path: Path,
    crop: tuple[int, int, int, int] | None = None,
) -> Path:
    """Original then each named reconstruction, same crop, pixels shown unscaled-nearest; one PNG."""
    top, left, bottom, right = crop or center_crop_box(*original.shape[:2])
    panels = {"original": original, **columns}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.9), dpi=120)
    for ax, (name, img) in zip(np.atleast_1d(axes), panels.items()):
        if img.shape != original.shape:
            raise ValueError(f"{name}: shape {img.shape} differs from the original's {original.shape}")
        ax.imshow(img[top:bottom, left:right], interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, bbox_inches="tight")
    plt.close(fig)
    return out_path


def _caption(row: dict[str, Any]) -> str:
    """Method, bpp and PSNR (MS-SSIM when the run measured no PSNR; neither when it measured neither)."""
    text = "AEIC" if row["method"] == "aeic" else row["method"]
    if row["method"] == "best":
        text += f" = {row['detail']}"
    text += f"\n{row['bpp']:.4f} bpp"
    if row.get("psnr") is not None:
        return text + f", {row['psnr']:.2f} dB"
    if row.get("ms_ssim") is not None:
        return text + f", MS-SSIM {row['ms_ssim']:.3f}"
    return text


def _compared_name(label: str, method: str) -> str:
    """A compared run's AEIC rows take the run's label; its classic codecs keep their names."""
    return label if method == "aeic" else method


def with_compared_means(summary: dict[str, Any], runs: dict[str, Path]) -> dict[str, Any]:
    """``summary`` plus the means of other runs (e.g. an MSE-only model, a ``--baselines-only`` run) for the RD plots.

    A method this run measured itself is not taken again from another run."""
    means = list(summary["means"])
    present = {m["method"] for m in means}
    for label, run in runs.items():
        other = json.loads((run / "summary.json").read_text())["means"]
        for entry in other:
            name = _compared_name(label, entry["method"])
            if name not in present:
                means.append({**entry, "method": name})
        present |= {_compared_name(label, e["method"]) for e in other}
    return {**summary, "means": means}


def saved_reconstructions(run: Path, image: str, point: str, methods: tuple[str, ...] = ("aeic", "best"),
                          aeic_label: str = "AEIC") -> dict[str, np.ndarray]:
    """Captioned reconstructions of ``image`` at ``point`` that a run saved (``RUN/recon/<point>/<method>/``).

    Methods without a saved reconstruction (unreachable, failed or not saved) are left out."""
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        return {}
    rows = {r["method"]: r for r in json.loads(summary_path.read_text())["rows"]
            if r["image"] == image and r["point"] == point}  # fmt: skip
    columns: dict[str, np.ndarray] = {}
    for method in methods:
        path = run / "recon" / point / method / images.recon_name(image)
        if method in rows and rows[method]["status"] == "ok" and path.is_file():
            with Image.open(path) as im:
                columns[_caption(rows[method]).replace("AEIC", aeic_label, 1)] = np.asarray(im.convert("RGB"))
    return columns


def first_saved_image(run: Path, rows: list[dict[str, Any]], point: str, methods: tuple[str, ...]) -> str | None:
    """The first image by name with an ok row of one of ``methods`` at ``point`` whose reconstruction the run
    saved: the image a side-by-side at that point can show (None when there is none)."""
    saved = [
        r["image"] for r in rows
        if r["point"] == point and r["method"] in methods and r["status"] == "ok"
        and (run / "recon" / point / r["method"] / images.recon_name(r["image"])).is_file()
    ]  # fmt: skip
    return min(saved, default=None)


def compared_reconstructions(runs: dict[str, Path], image: str, point: str) -> dict[str, np.ndarray]:
    """Saved AEIC and best-classic reconstructions of other runs, their AEIC captioned with the run's label."""
    columns: dict[str, np.ndarray] = {}
    for label, run in runs.items():
        columns.update(saved_reconstructions(run, image, point, aeic_label=label))
    return columns


def side_by_side_from_run(
    out_dir: Path,
    images_dir: Path,
    image: str,
    point: str,
    methods: tuple[str, ...] = ("aeic", "best"),
    extra: dict[str, np.ndarray] | None = None,
    crop: tuple[int, int, int, int] | None = None,
) -> Path:
    """Crops of original / AEIC / best classic (and ``extra`` columns, e.g. an MSE-only decoder) at one point.

    Uses ``OUT/summary.json`` for captions and ``OUT/recon/<point>/<method>/<image>.png``; methods without
    a saved reconstruction (unreachable, or not saved) are left out.
    """
    original = images.load_rgb(images_dir / image)  # EXIF-rotated as the rows were measured
    columns = saved_reconstructions(out_dir, image, point, methods)
    columns.update(extra or {})
    return side_by_side(original, columns, out_dir / f"side_by_side_{Path(image).stem}_{point}.png", crop)
