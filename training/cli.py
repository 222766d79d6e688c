"""``aeic-train CONFIG``: run (or resume) one training stage described by a TOML file."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .config import TrainConfig
from .decoder_finetune import DecoderFinetuner
from .trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aeic-train", description=__doc__)
    parser.add_argument("config", type=Path, help="a TOML file, e.g. training/configs/nano-se-pretrain.toml")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--out", type=Path, help="override the run folder")
    parser.add_argument("--device", help="cpu, cuda or auto")
    parser.add_argument("--data", type=Path, help="override the training photo folder")
    parser.add_argument("--cache", type=Path, help="override the cache folder of downsampled photos (and latents)")
    parser.add_argument("--minutes", type=float, help="override the wall-clock budget")
    parser.add_argument("--batch", type=int, help="override the crops per step (a GPU config on a CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--profile", type=int, metavar="STEPS",
                        help="profile this many steps into OUT/profile.json instead of training (nothing is saved)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig.from_file(args.config, steps=args.steps, out=args.out, device=args.device,
                                   data=args.data, cache=args.cache, minutes=args.minutes, batch=args.batch)
    if args.profile is not None and (args.profile < 1 or config.stage == "calibrate"):
        parser.error("--profile takes a positive number of steps of a training stage (not calibrate)")
    stage = DecoderFinetuner(config) if config.stage == "decoder" else Trainer(config)
    stage.profile_steps = args.profile
    written = stage.run()
    print(f"{'profile' if args.profile else 'checkpoint'}: {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
