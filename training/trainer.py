"""The training loop shared by the stages of the paper, and the rate calibration after them.

* ``pretrain``: rate + distortion. With a pretrained pixel decoder (TAEF2, or the SD VAE of the
  paper-size ``full`` profile) the distortion is measured on its encoder's latent of the photo (cheap)
  or, with ``distortion = "pixel"``, end to end through the frozen decoder on the pixels (MSE,
  MS-SSIM, texture energy); with an internal pixel decoder it is always measured on the pixels.
* ``adversarial``: the encoder and entropy model are frozen (the rate stays where pretraining put
  it); synthesis and UNet learn texture against a latent-space discriminator, with the distortion
  kept as an anchor.
* ``pixel_decoder``: everything frozen but an internal pixel decoder, which learns to render the
  decoder latents of a model that was trained through TAEF2 (``init``, a checkpoint or package
  folder): the way from a TAEF2 model to one that needs no TAEF2 without starting over.
* ``encoder``: only the sender's analysis and hyper-analysis learn, on rate + pixel distortion through
  the frozen entropy model, gains and receiver (``init``: a model package): the bits go where the
  shipped decoder needs them, while its tables, rate levels and receiver weights stay byte-identical.
* ``calibrate``: every weight frozen, each rate point's gain moves until training crops code at
  its nominal bpp (after a fine-tune that moved the rate points).
* ``distil``: AEIC-SE learns from a trained AEIC-ME: its latent matches the teacher's latent
  (encoder side) and its decoder latent matches the teacher's (decoder side). Unless ``init`` says
  otherwise the student starts from the teacher's entropy model and decoder.

Each rate point has a fixed Lagrange multiplier, and its gains are steered so that its measured
bpp stays at the rate point's nominal bpp (in the ``encoder`` stage, whose gains are the package's,
the multiplier is steered instead). Checkpoints every few minutes; a run resumes from its
last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from aeic.codec import taesd
from aeic.codec.checkpoint import checkpoint_preset, load_fitting, read_checkpoint
from aeic.codec.model import AEICModel, ModelConfig
from aeic.codec.presets import preset
from aeic.shared.model_package import ModelPackage

from .config import TrainConfig
from .data import NO_TEACHER, CropSampler, LatentTeacher, build_cache
from .discriminator import LatentDiscriminator, hinge_discriminator_loss, hinge_generator_loss
from .init_weights import load_mean_weights, load_model_weights
from .losses import batch_texture_retention, msssim, pixel_distortion
from .rate_calibration import calibrate_log_gains
from .schedule import ScheduledRun, adam, resolve_device, seed_everything

GAIN_LR_SCALE = 20.0
RATE_FROZEN_STAGES = ("adversarial", "pixel_decoder")  # encoder and entropy model fixed: no rate term, no steering


def rate_weights(log_lambda: torch.Tensor, balance: float) -> torch.Tensor:
    """Per rate point, the factor on a sample's R + lambda D: (geometric mean lambda / lambda) ** balance.

    Each point's optimum stays where its lambda puts it; only how much each point pulls on the
    shared weights changes. The geometric mean keeps the loss near its unbalanced size, so the
    gradient clipping acts as before."""
    return torch.exp(balance * (log_lambda.mean() - log_lambda))


class Trainer(ScheduledRun):
    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.config = config
        self.device = resolve_device(config.device)
        seed_everything(config.seed)
        self.model_config = preset(config.model)
        if config.stage == "pixel_decoder" and self.model_config.pixel_decoder != "internal":
            raise ValueError(f"the pixel_decoder stage trains an internal pixel decoder; {config.model!r} uses "
                             f"{self.model_config.pixel_decoder!r}")
        # a pretrained pixel decoder comes with its encoder, whose latents are the cheap distortion target
        self.uses_teacher_latent = self.model_config.pixel_decoder in ("taef2", "vae")
        self.measures_pixels = config.distortion == "pixel" or not self.uses_teacher_latent
        # frozen and pretrained, so the student and a distillation teacher share one copy
        self.taef2_decoder = taesd.load_taef2("decoder").to(self.device) if self.model_config.pixel_decoder == "taef2" else None
        # channels-last convolutions: 20 % less time per step on this CPU (docs/training.md), the usual layout on GPUs
        self.model = AEICModel(self.model_config, self.taef2_decoder).to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub of Module.to has no memory_format
        targets = torch.tensor(self.model_config.rates_bpp, dtype=torch.float64)
        self.log_lambda = torch.log(targets * config.lambda_scale)  # the gains hold the rates (_steer_rates)
        self.ema_bpp = targets.clone()
        self.rate_weights = rate_weights(self.log_lambda, config.rate_balance).to(self.device, torch.float32)
        if config.stage == "encoder" and (config.init is None or not Path(config.init).is_dir()):
            raise ValueError("the encoder stage needs `init`, the model package whose sender half it trains")
        self.package_id = ModelPackage.load(config.init).model_id.hex() if config.stage == "encoder" else None
        if config.init is not None:
            fresh = "decoder.pixel_decoder." if config.stage == "pixel_decoder" else None
            self._adopt_rate_control(load_model_weights(self.model, config.init, fresh))
        elif config.init_mean:
            self._adopt_rate_control(load_mean_weights(self.model, config.init_mean))
        self.teacher = self._distillation_teacher() if config.stage == "distil" else None
        judged_channels = self.model_config.decoder.latent_channels if self.uses_teacher_latent else 3
        self.discriminator = (
            LatentDiscriminator(judged_channels, self.model_config.num_rates).to(self.device)
            if config.stage == "adversarial"
            else None
        )
        self.optimizer = adam(self._parameter_groups(), config.lr)
        self.d_optimizer = (
            adam(self.discriminator.parameters(), config.lr, betas=(0.5, 0.9)) if self.discriminator else None
        )
        self.crops = self.random_stream(config.seed)
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._resume()
        self._upload_multipliers()

    def _upload_multipliers(self) -> None:
        """The multipliers on the training device, copied when they move (the ``encoder`` stage's steering,
        at the end of a step): copied in every step's loss, the copy would wait for the GPU before the
        backward pass."""
        self.multipliers = self.log_lambda.exp().to(self.device, torch.float32)

    def _adopt_rate_control(self, state: dict) -> None:
        """Carry over the measured bpp of the run this one starts from, so the gain steering picks up
        where it was. The multipliers stay this run's own (``lambda_scale``): a stage that never used
        them (pixel_decoder) saved its config's default, and adopting that weighted distortion 100x."""
        if "ema_bpp" in state and len(state["ema_bpp"]) == len(self.ema_bpp):
            self.ema_bpp = state["ema_bpp"].clone()

    def _distillation_teacher(self) -> AEICModel:
        """The trained moderate-encoder model, frozen; without ``init`` the student starts from its
        entropy model and decoder, as in the paper (only the shallow encoder is new)."""
        if self.config.teacher is None:
            raise ValueError("the distil stage needs `teacher`, a trained moderate-encoder checkpoint")
        state = read_checkpoint(self.config.teacher, needs=("preset", "model"))
        teacher_config = checkpoint_preset(state, f"teacher {self.config.teacher}")
        check_distillable(teacher_config, self.model_config)
        teacher = AEICModel(teacher_config, self.taef2_decoder).to(self.device)
        load_fitting(teacher, state["model"], f"teacher {self.config.teacher}")
        if self.config.init is None:
            shared = {k: v for k, v in teacher.state_dict().items() if not k.startswith("analysis.")}
            self.model.load_state_dict(shared, strict=False)
            self._adopt_rate_control(state)
        return teacher.eval().requires_grad_(False)

    def _parameter_groups(self) -> list[dict]:
        """The rate gains learn faster: they set where each rate point lands and are few."""
        parameters = self._freeze_all_but_the_stage()
        gains = [p for p in parameters if p is self.model.log_gains]
        rest = [p for p in parameters if p is not self.model.log_gains]
        groups = [{"params": rest, "lr_scale": 1.0}]
        if gains:
            groups.append({"params": gains, "lr_scale": GAIN_LR_SCALE})
        return groups

    def _freeze_all_but_the_stage(self) -> list[torch.nn.Parameter]:
        """Freeze what this stage keeps fixed (``requires_grad``, so no gradient is even computed for it) and
        return the parameters that still learn."""
        if self.config.stage == "adversarial":
            frozen = (self.model.analysis, self.model.hyper_analysis, self.model.entropy)
            for module in frozen:
                module.requires_grad_(False)
            self.model.log_gains.requires_grad_(False)
        if self.config.stage == "pixel_decoder":
            self.model.requires_grad_(False)
            self.model.decoder.pixel_decoder.requires_grad_(True)
        if self.config.stage == "encoder":
            self.model.requires_grad_(False)
            self.model.analysis.requires_grad_(True)
            self.model.hyper_analysis.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        self._write_checkpoint({
            "preset": self.config.model,
            "stage": self.config.stage,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "log_lambda": self.log_lambda,
            "ema_bpp": self.ema_bpp,
            "discriminator": self.discriminator.state_dict() if self.discriminator else None,
            "d_optimizer": self.d_optimizer.state_dict() if self.d_optimizer else None,
            "package": str(self.config.init) if self.config.stage == "encoder" else None,  # what `aeic export` keeps
            "package_id": self.package_id,
        })

    def _run_identity(self) -> dict[str, str]:
        """The ``encoder`` stage's package too: its sender learns against that package's receiver and tables."""
        identity = {"stage": self.config.stage, "preset": self.config.model}
        return identity if self.package_id is None else {**identity, "package_id": self.package_id}

    def _resume(self) -> None:
        state = self._read_checkpoint()
        if state is None:
            return
        load_fitting(self.model, state["model"], f"{self.checkpoint_path} (resumed; preset {state.get('preset')!r})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.log_lambda, self.ema_bpp = state["log_lambda"], state["ema_bpp"]
        if self.discriminator and state["discriminator"]:
            assert self.d_optimizer is not None  # made with the discriminator
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])

    # -- one step ------------------------------------------------------------------------------
    def _distortion(self, out: dict, images: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample distortion of the stage (latent MSE, or the pixel losses) and its monitors, left on the
        device until the step is done (reading one back waits for the GPU)."""
        latent_mse = (out["latent"] - latents).pow(2).flatten(1).mean(1) if self.uses_teacher_latent else None
        if not self.measures_pixels:  # then the teacher latent is the target
            assert latent_mse is not None
            return latent_mse, {}
        c = self.config
        pixels = self.model.decoder.decode_pixels(out["latent"])
        terms = pixel_distortion(pixels, images, c.mse_weight, c.msssim_weight, c.texture_weight, c.lowpass_weight)
        total = terms["total"] + c.latent_weight * latent_mse if latent_mse is not None and c.latent_weight > 0 else terms["total"]
        monitors = {"psnr": -10 * torch.log10(terms["mse"].detach().mean().clamp_min(1e-10)),
                    "ms_ssim": terms["ms_ssim"].detach().mean(),
                    "texture": batch_texture_retention(pixels.detach(), images)}  # fmt: skip
        return total, monitors

    def _judged(self, out: dict, images: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, fake) in the domain the discriminator sees: teacher latents, else pixels."""
        if self.uses_teacher_latent:
            return latents, out["latent"]
        return images, self.model.decoder.decode_pixels(out["latent"])

    def _generator_extras(self, out: dict, images: torch.Tensor, latents: torch.Tensor, rates: torch.Tensor) -> dict:
        extras: dict[str, torch.Tensor] = {}
        if self.discriminator is not None:
            real, fake = self._judged(out, images, latents)
            out["judged"] = (real, fake)
            extras["adversarial"] = self.config.adversarial_weight * hinge_generator_loss(self.discriminator(fake, rates))
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out = self.teacher(images, rates)
            extras["distil_encoder"] = self.config.distil_encoder_weight * F.mse_loss(out["y"], teacher_out["y"])
            extras["distil_decoder"] = self.config.distil_decoder_weight * F.mse_loss(out["latent"], teacher_out["latent"])
        if self.config.pixel_weight > 0 and self.uses_teacher_latent:
            sub = slice(0, max(1, images.shape[0] // 3))
            pixels = self.model.decoder.decode_pixels(out["latent"][sub])
            extras["pixel"] = self.config.pixel_weight * (1 - msssim(pixels, images[sub]).mean())
        return extras

    def train_step(self, images: torch.Tensor, latents: torch.Tensor) -> dict[str, float]:
        rates = torch.randint(0, self.model_config.num_rates, (images.shape[0],), device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate() * group["lr_scale"]
        out = self._forward(images, rates)
        bpp = out["bits"] / (images.shape[2] * images.shape[3])
        distortion, monitors = self._distortion(out, images, latents)
        loss = self._rate_distortion(bpp, distortion, rates)
        extras = self._generator_extras(out, images, latents, rates)
        total = loss + sum(extras.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        d_loss = None
        if self.discriminator is not None:
            real, fake = out["judged"]
            d_loss = self._discriminator_step(fake.detach(), real, rates)
        self._steer_rates(rates, bpp.detach())
        logs = {"loss": float(total.detach()), "bpp": float(bpp.detach().mean()), "distortion": float(distortion.detach().mean()),
                **{k: float(v) for k, v in monitors.items()}}  # fmt: skip
        if self.uses_teacher_latent:
            logs["latent_texture"] = float(latent_texture(out["latent"].detach(), latents))
        logs.update({k: float(v.detach()) for k, v in extras.items()})
        if d_loss is not None:
            logs["discriminator"] = d_loss
        return logs

    def _rate_distortion(self, bpp: torch.Tensor, distortion: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
        """R + lambda_rate * D while the rate trains; D alone once it is frozen (adversarial, pixel_decoder).

        With the encoder frozen the per-rate multipliers would only rescale distortion against the
        adversarial term, differently at each rate; one weight keeps ``adversarial_weight`` meaningful."""
        if self.config.stage in RATE_FROZEN_STAGES:
            return distortion.mean()
        return (self.rate_weights[rates] * (bpp + self.multipliers[rates] * distortion)).mean()

    def _forward(self, images: torch.Tensor, rates: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model pass of this stage; a stage with a frozen sender half runs it without gradients."""
        if self.config.stage not in RATE_FROZEN_STAGES:
            return self.model(images, rates, refine=self.config.unet)
        with torch.no_grad():
            y = self.model.analysis(images)
            y_hat, y_bits, z_bits = self.model.entropy(*self.model.scale_latent(y, rates))
        bits = y_bits.flatten(1).sum(1) + z_bits.flatten(1).sum(1)
        with torch.set_grad_enabled(self.config.stage == "adversarial"):
            latent = self.model.decoder_latent(y_hat, rates)
        return {"y": y, "y_hat": y_hat, "bits": bits, "latent": latent}

    def _discriminator_step(self, fake: torch.Tensor, real: torch.Tensor, rates: torch.Tensor) -> float:
        assert self.discriminator is not None and self.d_optimizer is not None  # the adversarial stage's
        loss = hinge_discriminator_loss(self.discriminator(real, rates), self.discriminator(fake, rates))
        self.d_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.d_optimizer.step()
        return float(loss.detach())

    def _steer_rates(self, rates: torch.Tensor, bpp: torch.Tensor) -> None:
        """Hold each used rate point at its nominal bpp by moving all its gains together.

        The multipliers stay where they start. Steering them instead wound up: the gains learn slowly
        against the shared transforms, so a point that could not reach its rate drove its multiplier
        up without bound, its samples then dominated the shared weights, and every other point's rate
        rose (nano-se-joint-2's first 18 minutes: 0.01 bpp point at 0.023, multipliers 0.0008 to 0.39).
        Steering the gains keeps each point trained where it is deployed."""
        if self.config.stage in RATE_FROZEN_STAGES:
            return
        targets = torch.tensor(self.model_config.rates_bpp, dtype=torch.float64)
        with torch.no_grad():
            for rate, value in zip(rates.tolist(), bpp.double().cpu().tolist(), strict=True):
                self.ema_bpp[rate] = 0.95 * self.ema_bpp[rate] + 0.05 * max(value, 1e-5)
                error = math.log(targets[rate] / self.ema_bpp[rate])
                if self.config.stage == "encoder":  # the package's gains stay: only the multiplier can hold the rate
                    self.log_lambda[rate] += self.config.rate_adapt * error
                else:
                    self.model.log_gains[rate] += self.config.rate_adapt * error
        if self.config.stage == "encoder":
            self._upload_multipliers()

    # -- the loop ------------------------------------------------------------------------------
    def _calibrate(self, sampler: CropSampler) -> dict:
        """The ``calibrate`` stage's one step (``ScheduledRun.once``): one batch of crops, every rate point moved
        to its nominal bpp by its gain; returns its log line."""
        images, _ = sampler.batch(self.config.batch)
        self.model.eval()
        report = calibrate_log_gains(self.model, images.to(self.device), list(self.model_config.rates_bpp))
        return {"calibration": [{"nominal": t, "before": b, "after": a}
                                for t, (b, a) in zip(self.model_config.rates_bpp, report, strict=True)]}  # fmt: skip

    def _cache_teacher(self) -> LatentTeacher:
        """What fills the cache's latents: the encoder of the pretrained pixel decoder (TAEF2's, or the
        SD VAE's of the full profile) on the training device, else an empty latent."""
        if self.model_config.pixel_decoder == "vae":
            vae = self.model.decoder
            return LatentTeacher("sd-vae", lambda pixels: vae.encode_latent(pixels.to(self.device)).float().cpu())
        if not self.uses_teacher_latent:
            return NO_TEACHER
        encoder = taesd.load_taef2("encoder").to(self.device)
        return LatentTeacher("taef2", lambda pixels: encoder(pixels.to(self.device)).cpu())

    def run(self) -> Path:
        if self.finished:
            return self.checkpoint_path
        items = build_cache(self.config.data, self.config.cache, self.config.short_side, self._cache_teacher(), self.config.crop)
        sampler = CropSampler(items, self.config.crop, self.crops)
        if self.config.stage == "calibrate":
            return self.once(lambda: self._calibrate(sampler))
        self.model.train()

        def step() -> dict:
            images, latents = (t.to(self.device, memory_format=torch.channels_last) for t in sampler.batch(self.config.batch))
            return self.train_step(images, latents)

        return self.loop(step, lambda: {"ema_bpp": self.ema_bpp.tolist(), "lambda": self.log_lambda.exp().tolist()},
                         lambda logs: {"bpp": f"{logs['bpp']:.4f}", "d": f"{logs['distortion']:.4f}"},
                         f"{self.config.name}:{self.config.stage}")


def check_distillable(teacher: ModelConfig, student: ModelConfig) -> None:
    """Dual-side distillation compares latents and hands the student the teacher's decoder side:
    the two models may differ only in their analysis transform, which must end in the same latent."""
    if teacher.analysis.latent_channels != student.analysis.latent_channels:
        raise ValueError(f"teacher {teacher.name!r} has a {teacher.analysis.latent_channels}-channel latent, "
                         f"student {student.name!r} {student.analysis.latent_channels}: they must match")
    if dataclasses.replace(teacher, name=student.name, analysis=student.analysis) != student:
        raise ValueError(f"teacher {teacher.name!r} and student {student.name!r} differ beyond their analysis transform "
                         "(rate points, entropy model or decoder)")


def latent_texture(latent: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """min(r, 1/r), r = mean squared spatial gradient of the decoder latent over the teacher's: a cheap texture monitor."""
    def energy(x: torch.Tensor) -> torch.Tensor:
        return x.diff(dim=-1).pow(2).mean() + x.diff(dim=-2).pow(2).mean()

    ratio = energy(latent) / energy(teacher).clamp_min(1e-12)
    return torch.minimum(ratio, 1 / ratio.clamp_min(1e-12))
