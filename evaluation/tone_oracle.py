"""What coarse tone side information could buy, measured before anyone builds it.

The scale analysis puts much of the error in regional colour and tone. This oracle asks what the receiver
would gain if the sender also sent the original's cell means (a coarse grid of Y, Cb, Cr averages): each
saved reconstruction is shifted so that its cell means match the original's (the difference field,
upsampled bicubically, added to the picture), and the gain in PSNR and MS-SSIM is set against what the
grid would cost, counted as exp-Golomb codes of the quantized means' left-neighbour differences and as a
share of the image's byte budget.

``python -m aeic.evaluation.tone_oracle RUN IMAGES --cells 64,128 --step 4`` prints, per budget, the
mean gains and costs over the images of ``RUN/recon/bpp*/aeic`` (a run of ``aeic eval --budgets-bpp ...
--save-recon N``); ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from aeic.evaluation import metrics
from aeic.evaluation.images import load_rgb, original_of

# JPEG's full-range RGB -> YCbCr (offsets left out: only differences of means matter)
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def cell_means(ycc: np.ndarray, cell: int) -> torch.Tensor:
    """1x3xGHxGW means of an HxWx3 float image over a grid of about ``cell``-pixel cells."""
    grid = (max(1, round(ycc.shape[0] / cell)), max(1, round(ycc.shape[1] / cell)))
    return F.adaptive_avg_pool2d(torch.from_numpy(ycc.transpose(2, 0, 1)).unsqueeze(0), grid)


def exp_golomb_bytes(values: np.ndarray) -> float:
    """Bytes of order-0 exp-Golomb codes of each row's left-neighbour differences (first column: from above)."""
    diffs = np.diff(values, axis=-1, prepend=values[..., :1])
    diffs[..., 0] = np.diff(values[..., 0], axis=-1, prepend=0)
    zigzag = np.where(diffs >= 0, 2 * diffs, -2 * diffs - 1)
    return float((2 * np.floor(np.log2(zigzag + 1)) + 1).sum() / 8)


def corrected(ref: np.ndarray, rec: np.ndarray, cell: int, step: float) -> tuple[np.ndarray, float]:
    """``rec`` with its cell means moved to ``ref``'s (quantized by ``step``; 0: exact), and the grid's bytes."""
    ref_ycc, rec_ycc = ref.astype(np.float64) @ _YCBCR.T, rec.astype(np.float64) @ _YCBCR.T
    target = cell_means(ref_ycc, cell)
    side_bytes = float("nan")
    if step:
        quantized = torch.round(target / step)
        side_bytes = exp_golomb_bytes(quantized[0].numpy().astype(np.int64))
        target = quantized * step
    shift = F.interpolate(target - cell_means(rec_ycc, cell), size=rec.shape[:2], mode="bicubic", align_corners=False)
    out = rec_ycc + shift[0].numpy().transpose(1, 2, 0)
    return np.clip(np.round(out @ np.linalg.inv(_YCBCR).T), 0, 255).astype(np.uint8), side_bytes


def oracle_gains(run: Path, images: Path, cells: list[int], step: float) -> list[dict]:
    """Mean PSNR / MS-SSIM gains and grid cost per (budget, cell size) over ``run/recon/<budget>/aeic``."""
    budgets = sorted(p for p in (run / "recon").glob("bpp*") if (p / "aeic").is_dir())
    if not budgets:
        raise ValueError(f"{run} holds no reconstructions of AEIC at byte budgets "
                         "(run `aeic eval --budgets-bpp ... --save-recon N` first)")  # fmt: skip
    rows = []
    for budget in budgets:
        bpp = float(budget.name.removeprefix("bpp"))
        pairs = [(load_rgb(original_of(images, f)), load_rgb(f)) for f in sorted((budget / "aeic").glob("*.png"))]
        for cell in cells:
            per_image = []
            for ref, rec in pairs:
                out, side = corrected(ref, rec, cell, step)
                per_image.append((metrics.psnr(ref, out) - metrics.psnr(ref, rec),
                                  metrics.ms_ssim(ref, out) - metrics.ms_ssim(ref, rec),
                                  100 * side * 8 / (bpp * ref.shape[0] * ref.shape[1])))  # fmt: skip
            psnr_gain, ms_ssim_gain, side_percent = np.mean(per_image, axis=0)
            rows.append({"point": budget.name, "cell": cell, "step": step, "images": len(pairs),
                         "psnr_gain_db": round(float(psnr_gain), 3), "ms_ssim_gain": round(float(ms_ssim_gain), 4),
                         "side_percent_of_budget": round(float(side_percent), 2) if step else None})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an `aeic eval` output folder run with --save-recon N")
    parser.add_argument("images", type=Path, help="the folder of originals that run used")
    parser.add_argument("--cells", default="32,64,128,256", help="cell sizes in pixels, comma-separated")
    parser.add_argument("--step", type=float, default=0.0, help="quantizer step of the sent means (0: exact, no cost)")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        rows = oracle_gains(args.run, args.images, [int(c) for c in args.cells.split(",")], args.step)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"tone_oracle: {exc}\n")
    for row in rows:
        cost = "exact means" if not args.step else f"grid {row['side_percent_of_budget']:.2f} % of the budget"
        print(f"{row['point']} cell {row['cell']:4d}: PSNR {row['psnr_gain_db']:+.3f} dB, "
              f"MS-SSIM {row['ms_ssim_gain']:+.4f}, {cost}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
