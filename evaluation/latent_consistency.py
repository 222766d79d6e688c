"""Is what a reconstruction misses still in the symbols? Re-encode it and count the symbols off their bins.

A receiver could refine its picture towards consistency with the stream (change it until the sender's
analysis of it quantizes to the received symbols, as projections onto quantization constraint sets do
for JPEG). That can only help where the reconstruction is inconsistent. This measures how often: each
image is coded to a byte budget with the real sender, decoded by the real receiver, and both the
original and the reconstruction are analysed again; a coefficient is off its bin when its scaled value
lies more than half a step from the received ŷ (the original is off only where rate-distortion rounding
moved a symbol or the entropy model skipped a coefficient, leaving it at its mean).

``python -m aeic.evaluation.latent_consistency IMAGES --budgets-bpp 0.01,0.05`` prints, per budget, the
mean share of coefficients off their bins and the RMS distance in steps; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from aeic.evaluation.images import load_rgb
from aeic.receiver.decoder import ReceiverCodec
from aeic.sender.encoder import SenderCodec


def distance_in_steps(sender: SenderCodec, rgb: np.ndarray, y_hat: np.ndarray, level: int, downscale: int) -> np.ndarray:
    """Per coefficient, how far the sender's analysis of ``rgb`` lies from ``y_hat``, in quantizer steps."""
    latent = sender.analyse(rgb, downscale).latent[0]
    gain = sender.package.level_gains[level][:, None, None]
    return np.abs(latent - y_hat) * gain


def image_consistency(sender: SenderCodec, receiver: ReceiverCodec, rgb: np.ndarray, budget: int) -> dict:
    """Off-bin share and RMS distance (steps) of the original and of its reconstruction at ``budget`` bytes."""
    stream, level = sender.encode_to_budget(rgb, budget)
    analysed = sender.analyse(rgb)
    y_hat = sender.quantized_latent(analysed, level)
    row: dict = {"bytes": len(stream), "level": level}
    for name, image in (("original", rgb), ("reconstruction", receiver.decode(stream))):
        steps = distance_in_steps(sender, image, y_hat, level, analysed.downscale)
        row[name] = {"off_bin": float((steps > 0.5).mean()), "rms_steps": float(np.sqrt((steps**2).mean()))}
    return row


def consistency(images: list[Path], budgets_bpp: list[float], package: Path | None = None) -> list[dict]:
    """Mean off-bin shares and RMS distances per budget over ``images``."""
    sender, receiver = SenderCodec.from_package(package), ReceiverCodec.from_package(package, device="cpu")
    rows = []
    for bpp in budgets_bpp:
        per_image = []
        for path in images:
            rgb = load_rgb(path)
            per_image.append(image_consistency(sender, receiver, rgb, int(bpp * rgb.shape[0] * rgb.shape[1] / 8)))
        row: dict = {"bpp": bpp, "images": len(per_image)}
        for name in ("original", "reconstruction"):
            for key in ("off_bin", "rms_steps"):
                row[f"{name}_{key}"] = round(float(np.mean([r[name][key] for r in per_image])), 4)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", type=Path, help="a folder of originals (PNG, JPEG, ...)")
    parser.add_argument("--budgets-bpp", default="0.01,0.02,0.03,0.05", help="byte budgets in bits per pixel")
    parser.add_argument("--package", type=Path, help="model package (default: the shipped one)")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.images.iterdir() if p.is_file()) if args.images.is_dir() else []
    if not files:
        parser.exit(2, f"latent_consistency: no images in {args.images}\n")
    rows = consistency(files, [float(b) for b in args.budgets_bpp.split(",")], args.package)
    for row in rows:
        print(f"{row['bpp']:.3f} bpp: off their bins: original {100 * row['original_off_bin']:.2f} %, "
              f"reconstruction {100 * row['reconstruction_off_bin']:.2f} % "
              f"(RMS {row['original_rms_steps']:.3f} / {row['reconstruction_rms_steps']:.3f} steps)")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
