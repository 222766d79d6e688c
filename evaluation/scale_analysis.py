"""Where a codec's error lies across scales, from the reconstructions an ``aeic eval`` run saved.

Two views of one question (is the loss fine texture, or regional colour and tone?):

- :func:`block_mean_psnr`: PSNR of the images' ``k x k`` block means for k = 1 ... 32;
- :func:`ms_ssim_terms`: MS-SSIM's five per-scale terms (contrast-structure at scales 1-4, full SSIM at
  scale 5), the evaluation's own, whose weighted geometric mean is the MS-SSIM it reports.

``python -m aeic.evaluation.scale_analysis RUN IMAGES`` prints, per budget and method of ``RUN/recon``,
the means over images, and ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from aeic.evaluation.images import load_rgb, original_of
from aeic.evaluation.metrics import MS_SSIM_WEIGHTS, ms_ssim_scale_terms

BLOCK_SIZES = (1, 2, 4, 8, 16, 32)
PEAK = 255.0


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).double().unsqueeze(0)


def block_mean_psnr(ref: np.ndarray, rec: np.ndarray, sizes: tuple[int, ...] = BLOCK_SIZES) -> list[float]:
    """PSNR (dB, peak 255) between the ``k x k`` block means of two HxWx3 uint8 images, one per ``k``."""
    x, y = _tensor(ref), _tensor(rec)
    out = []
    for k in sizes:
        mse = float((F.avg_pool2d(x, k) - F.avg_pool2d(y, k)).pow(2).mean())
        out.append(10 * np.log10(PEAK**2 / max(mse, 1e-12)))
    return out


def ms_ssim_terms(ref: np.ndarray, rec: np.ndarray) -> list[float]:
    """[cs_1, cs_2, cs_3, cs_4, ssim_5], each the mean over channels of the evaluation's own terms
    (:func:`aeic.evaluation.metrics.ms_ssim_scale_terms`)."""
    return ms_ssim_scale_terms(ref, rec).mean(dim=1).tolist()


def analyse_run(run: Path, images: Path) -> list[dict]:
    """Mean block-mean PSNRs and MS-SSIM terms per (budget, method) of ``run/recon``."""
    rows = []
    for budget in sorted(p for p in (run / "recon").iterdir() if p.is_dir()):
        for method in sorted(p for p in budget.iterdir() if p.is_dir()):
            pairs = [(load_rgb(original_of(images, f)), load_rgb(f)) for f in sorted(method.glob("*.png"))]
            if not pairs:
                continue
            terms = np.array([ms_ssim_terms(ref, rec) for ref, rec in pairs])
            rows.append({
                "point": budget.name,
                "method": method.name,
                "images": len(pairs),
                "block_mean_psnr": dict(zip(map(str, BLOCK_SIZES), np.mean([block_mean_psnr(r, c) for r, c in pairs], 0).round(3).tolist(), strict=True)),
                "ms_ssim_terms": terms.mean(0).round(4).tolist(),
                "ms_ssim": float(np.mean(np.prod(terms ** np.array(MS_SSIM_WEIGHTS), axis=1)).round(4)),
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an `aeic eval` output folder run with --save-recon N")
    parser.add_argument("images", type=Path, help="the folder of originals that run used")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    if not (args.run / "recon").is_dir():
        parser.exit(2, f"scale_analysis: {args.run} holds no reconstructions (run `aeic eval ... --save-recon N`)\n")
    rows = analyse_run(args.run, args.images)
    for row in rows:
        psnrs = " ".join(f"{k}x {v:.2f}" for k, v in row["block_mean_psnr"].items())
        terms = " ".join(f"{t:.4f}" for t in row["ms_ssim_terms"])
        print(f"{row['point']} {row['method']:8s} block-mean PSNR {psnrs} | MS-SSIM terms {terms} = {row['ms_ssim']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
