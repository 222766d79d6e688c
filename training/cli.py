"""``aeic-train CONFIG``: run (or resume) one training stage described by a TOML file."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import torch
from aeic.shared.model_package import ModelPackageError
from pydantic import ValidationError

from .config import TrainConfig
from .data import relative_to_here
from .decoder_finetune import DecoderFinetuner
from .schedule import StepOutOfMemory, TrainingInterrupted, resolve_device
from .trainer import Trainer


def _config_error(path: Path, exc: ValidationError, overrides: dict[str, object]) -> str:
    """Pydantic's report as one line: each wrong key with what is wrong with it; a value given on the
    command line (``--steps 0``) as that option, not as the config file, which does not hold it."""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "config"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":  # a typo, most often: name the key it is most like
            like = difflib.get_close_matches(key, TrainConfig.model_fields, n=1)
            message = f"unknown key ({like[0]}?)" if like else "unknown key"
        if overrides.get(key) is not None:
            return f"--{key}: {message}"
        problems.append(f"{key}: {message}")
    return f"{path}: {'; '.join(problems)}"


def _load_config(path: Path, **overrides: object) -> TrainConfig:
    if not path.is_file():
        raise FileNotFoundError(f"config {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        return TrainConfig.from_file(path, **overrides)
    except ValidationError as exc:
        raise ValueError(_config_error(path, exc, overrides)) from None


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
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads takes a positive number, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = _load_config(args.config, steps=args.steps, out=args.out, device=args.device, data=args.data,
                              cache=args.cache, minutes=args.minutes, batch=args.batch)
        if args.device is not None:
            resolve_device(args.device, on_command_line=True)
        if args.profile is not None and (args.profile < 1 or config.stage == "calibrate"):
            parser.error("--profile takes a positive number of steps of a training stage (not calibrate)")
        if Path(config.out).exists() and not Path(config.out).is_dir():
            raise NotADirectoryError(f"run folder {config.out} is a file")
        stage = DecoderFinetuner(config) if config.stage == "decoder" else Trainer(config)
        stage.profile_steps = args.profile
        written = stage.run()
    except TrainingInterrupted as exc:
        print(f"aeic-train: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside the steps (the data cache, loading) or a second Ctrl-C: stop at once
        print("aeic-train: interrupted; the cached photos and the last checkpoint written are kept: "
              "run the same command to go on", file=sys.stderr)
        return 130
    except FileNotFoundError as exc:  # a file the config names (init, teacher)
        missing = f"{relative_to_here(Path(exc.filename))} does not exist" if exc.filename else exc
        print(f"aeic-train: error: {missing}", file=sys.stderr)
        return 2
    except (OSError, ValueError, StepOutOfMemory, ModelPackageError) as exc:  # a mistake in the config, its files
        # or its batch for this machine: nothing was lost
        print(f"aeic-train: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'profile' if args.profile else 'checkpoint'}: {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
