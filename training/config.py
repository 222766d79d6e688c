"""Training run configuration, read from a TOML file under version control."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from aeic.shared.padding import ALIGNMENT
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


# the smallest decoder-stage window, in latent cells: decoded with a cell of margin each side (judged whole
# below 13 cells), 13 cells are 104 px, and MS-SSIM's five scales with a 7-pixel window need more than 96
MIN_WINDOW = 11

# keys that one stage alone reads: set in another, the run would quietly not do what they ask
STAGE_KEYS = {"teacher": "distil", "distil_encoder_weight": "distil", "distil_decoder_weight": "distil",
              "adversarial_weight": "adversarial", "package": "decoder", "window": "decoder", "max_level": "decoder",
              "texture_weight_top": "decoder"}  # fmt: skip


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    stage: Literal["pretrain", "adversarial", "pixel_decoder", "distil", "decoder", "encoder", "calibrate"] = "pretrain"
    model: str = "nano-se"  # a preset of aeic.codec.presets
    data: Path = Path("../shared/data/train")
    cache: Path = Path("runs/cache/train-512")  # one file per photo
    short_side: int = Field(512, ge=8)
    crop: int = Field(256, ge=ALIGNMENT)  # a multiple of ALIGNMENT: the hyper-latent's grid
    batch: int = Field(6, ge=1)
    steps: int = Field(4000, ge=1)
    minutes: float | None = Field(None, gt=0)  # a wall-clock budget: the run ends (and the LR decays) by time or steps
    lr: float = Field(2e-4, gt=0)
    lr_final_fraction: float = Field(0.1, ge=0, le=1)  # the last step's learning rate over `lr`
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's global seed takes no more (a wrong one was numpy's line, unnamed)
    out: Path = Path("runs/default")
    init: Path | None = None  # weights to start from: a previous stage's checkpoint or a model package folder
    # or the weighted mean of several checkpoints of one lineage ("model soup"): {path = weight, ...}
    init_mean: dict[Path, float] = {}
    teacher: Path | None = None  # distillation: the moderate-encoder model checkpoint
    device: str = "auto"
    checkpoint_minutes: float = Field(4.0, gt=0)
    rate_adapt: float = Field(0.01, ge=0)  # step size of the per-rate gain control (log gain per log bpp error, per sample)
    lambda_scale: float = Field(200.0, gt=0)  # the fixed multipliers: nominal bpp x this (~2 suits the pixel distortion)
    # each sample's R + lambda D is scaled by (geometric-mean lambda / its lambda) ** rate_balance: at 0 the
    # distortion of the highest rate point weighs 32x the lowest's in the shared weights (nano-se-wide),
    # at 1 every rate point's distortion weighs the same; the optimum of each point is unchanged
    rate_balance: float = 0.0
    unet: bool = True  # False: pretrain the regression only (the UNet learns in the adversarial stage)
    adversarial_weight: float = Field(0.0, ge=0)
    pixel_weight: float = Field(0.0, ge=0)  # MS-SSIM/MSE through the pixel decoder, on a sub-batch
    # what rate-distortion training measures with TAEF2: its latent (cheap on a CPU) or, end to end
    # through the frozen decoder, the pixels (mse/msssim/texture weights below, plus latent_weight x
    # the latent MSE); a model with an internal pixel decoder always measures pixels
    distortion: Literal["latent", "pixel"] = "latent"
    latent_weight: float = Field(0.0, ge=0)
    distil_encoder_weight: float = Field(1.0, ge=0)
    distil_decoder_weight: float = Field(1.0, ge=0)
    log_every: int = Field(20, ge=1)
    # pixel losses (pixel distortion, decoder stage)
    mse_weight: float = Field(100.0, ge=0)
    msssim_weight: float = Field(1.0, ge=0)
    texture_weight: float = Field(0.0, ge=0)
    lowpass_weight: float = Field(0.0, ge=0)  # MSE of 8x/16x block means: MS-SSIM's coarse scales (regional colour, tone)
    # the decoder stage: a package's receiver half trained on pixel losses through its frozen pixel decoder
    package: Path | None = None
    window: int = 16  # latent cells (8 px each) of the window the pixel decoder renders per step
    # the highest rate level it trains on (None: all); budgets of 0.005-0.05 bpp never pick the top ones
    max_level: int | None = Field(None, ge=0)
    # the texture weight at that level's rate position, `texture_weight` at position 0 and linear between
    # (None: `texture_weight` at every rate): low rates lose texture first, high rates PSNR
    texture_weight_top: float | None = Field(None, ge=0)

    @field_validator("data", "cache", "out", "init", "teacher", "package")
    @classmethod
    def _home(cls, path: Path | None) -> Path | None:
        """`~` as a shell reads it: TOML leaves it to the program, and `out = "~/runs/x"` made a folder named `~`."""
        return None if path is None else path.expanduser()

    @field_validator("init_mean")
    @classmethod
    def _homes(cls, weights: dict[Path, float]) -> dict[Path, float]:
        return {path.expanduser(): weight for path, weight in weights.items()}

    @field_validator("model")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        from aeic.codec.presets import preset

        preset(name)  # an unknown one is a ValueError, reported against this key
        return name

    @field_validator("crop")
    @classmethod
    def _whole_hyper_cells(cls, crop: int) -> int:
        """Checked here: a crop off the grid fails only in the first step, after the whole cache was built."""
        if crop % ALIGNMENT:
            raise ValueError(f"must be a multiple of {ALIGNMENT} (the hyper-latent sits at 1/{ALIGNMENT}), got {crop}")
        return crop

    @field_validator("window")
    @classmethod
    def _ms_ssim_fits(cls, window: int) -> int:
        """Checked here: a smaller window failed in pytorch_msssim's assertion at the first step, after the
        photos were cached and coded."""
        if window < MIN_WINDOW:
            raise ValueError(f"at least {MIN_WINDOW} latent cells ({MIN_WINDOW * 8} px), got {window}: MS-SSIM's "
                             "five scales need a window whose side, with its margin, is above 96 px")
        return window

    @model_validator(mode="after")
    def _one_starting_point(self) -> TrainConfig:
        if self.init is not None and self.init_mean:
            raise ValueError("set `init` or `init_mean`, not both")
        return self

    @model_validator(mode="after")
    def _keys_of_the_stage(self) -> TrainConfig:
        """A key set away from its default that only another stage reads: `teacher` without `stage = "distil"`, or
        `package` meant as the weights to start from (that is `init`), trained from scratch in the default stage."""
        for key, stage in STAGE_KEYS.items():
            if stage != self.stage and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"{key} is read by the {stage} stage only; this config trains stage {self.stage!r}: "
                                 f"set `stage = \"{stage}\"` or remove {key} (`init` starts from a checkpoint or package)")
        return self

    @model_validator(mode="after")
    def _crop_fits(self) -> TrainConfig:
        """Photos are downsampled to at most ``short_side``: a larger crop never fits, known before any caching."""
        if self.crop > self.short_side:
            raise ValueError(f"no {self.crop} px crop fits in photos downsampled to short_side {self.short_side}")
        return self

    @classmethod
    def from_file(cls, path: Path, **overrides: object) -> TrainConfig:
        try:
            text = Path(path).read_bytes().decode("utf-8-sig")  # the byte-order mark some Windows editors write
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text, as TOML must be: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)
