"""What the exact integer entropy model costs in rate, against a float reference on the same weights.

For each photo and rate point: the bytes the integer model really codes (payload of the exported
integer model, the one sender and receiver run) against the ideal information content of a float
model with the *same* trained weights (no fixed point, continuous means and scales). Training
photos are used (never Kodak). Needs a training checkpoint (weights of the float entropy model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from aeic.codec.checkpoint import load_checkpoint_model
from aeic.codec.quantization import float_reference
from aeic.shared.padding import pad_to_multiple
from aeic.training.data import list_images, load_downsampled

from .machine import machine_info


def measure(checkpoint: Path, images: list[Path], short_side: int) -> dict:
    model = load_checkpoint_model(checkpoint).eval()
    integer = model.entropy.export()
    rows = []
    for path in images:
        rgb = pad_to_multiple(load_downsampled(path, short_side), 128)
        pixels = rgb.shape[0] * rgb.shape[1]
        image = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            y = model.analysis(image)
            for rate in range(model.config.num_rates):
                scaled, z = model.scale_latent(y, torch.tensor([rate]))
                payload, _ = integer.encode(scaled[0].numpy(), z[0].numpy())
                with float_reference():
                    _, y_bits, z_bits = model.entropy(scaled, z)
                rows.append({
                    "image": path.name, "rate": rate,
                    "integer_bpp": len(payload) * 8 / pixels,
                    "float_bpp": float(y_bits.sum() + z_bits.sum()) / pixels,
                })
    means = {}
    for rate in range(model.config.num_rates):
        subset = [r for r in rows if r["rate"] == rate]
        integer_bpp = float(np.mean([r["integer_bpp"] for r in subset]))
        float_bpp = float(np.mean([r["float_bpp"] for r in subset]))
        means[rate] = {"integer_bpp": integer_bpp, "float_bpp": float_bpp, "overhead": integer_bpp / float_bpp - 1}
    return {"checkpoint": str(checkpoint), "images": len(images), "means": means, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/nano-se-pretrain/checkpoint.pt"))
    parser.add_argument("--images", type=Path, default=Path("../shared/data/train"))
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--short-side", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/integer_cost.json"))
    args = parser.parse_args(argv)
    if not args.checkpoint.exists():
        print(f"skipped: no checkpoint at {args.checkpoint} (the float weights are not in a model package)")
        return 0
    images = list_images(args.images)[:: max(1, len(list_images(args.images)) // args.count)][: args.count]
    result = {"machine": machine_info(), **measure(args.checkpoint, images, args.short_side)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for rate, m in result["means"].items():
        print(f"rate {rate}: integer {m['integer_bpp']:.5f} bpp, float {m['float_bpp']:.5f} bpp, overhead {m['overhead']:+.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
