"""The training-stage tests' synthetic photos (gradients, a texture and noise) and run comparisons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
from aeic.training.config import TrainConfig
from aeic.training.decoder_finetune import DecoderFinetuner
from aeic.training.trainer import Trainer
from PIL import Image

# A training stage (each has its own train_step signature, so a union would not do)
Stage = TypeVar("Stage", Trainer, DecoderFinetuner)


def write_training_photos(folder: Path, count: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        rows, cols = np.mgrid[0:200, 0:300]
        image = np.stack([rows, cols, (rows * cols) % 255], -1) % 255 + rng.normal(0, 10, (200, 300, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def same_state(a: object, b: object, path: str = "") -> list[str]:
    """Where two checkpoints (nested dicts, lists, tensors, arrays) differ, bit for bit; the wall-clock
    ``minutes`` are left out."""
    if path.endswith("/minutes"):
        return []
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(np.asarray(a), np.asarray(b)) else [path]  # as array_equal converts them
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in a.keys() | b.keys() for d in same_state(a.get(key), b.get(key), f"{path}/{key}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in same_state(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def logged_steps(run: Path) -> list[dict]:
    """A run's log lines without their wall-clock ``minutes``."""
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "minutes"} for line in lines]


def kill_after_the_first_checkpoint(
    stage: type[Stage], config: TrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run ``config`` as a run that checkpointed after step 1, logged step 2 and died in step 3 (a crash or a
    kill -9: no Ctrl-C, so no last checkpoint), its last log line cut short."""
    save, train_step = stage.save, stage.train_step

    def save_after_step_one(self: Stage) -> None:
        if self.step == 1:
            save(self)

    def die_in_step_three(self: Stage, *args: torch.Tensor) -> dict[str, float]:
        if self.step == 2:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write('{"loss": 1.')
            raise RuntimeError("killed")
        return train_step(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(stage, "save", save_after_step_one)
        patch.setattr(stage, "train_step", die_in_step_three)
        with pytest.raises(RuntimeError, match="killed"):
            stage(config).run()
