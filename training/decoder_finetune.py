"""Stage ``decoder``: fine-tune a model package's receiver half in the pixel domain.

Pretraining against the teacher's latent (cheap on a CPU) leaves blurred decoder latents, which the
frozen TAEF2 decoder renders as a regular grid. This stage trains the synthesis transform and the
one-step UNet through that frozen pixel decoder on pixel losses, while the sender half stays
byte-identical: every crop is coded by the package's own sender path (ONNX analysis, integer
entropy model), so the decoder learns from exactly the ŷ a receiver gets, and rates and bitstream
sizes do not move. A package with an internal pixel decoder trains that decoder too.
``texture_weight`` adds a patch-wise gradient-energy term: the texture that the blur of MSE and
MS-SSIM removes; with ``texture_weight_top`` it changes with the rate, since the UNet knows the rate
and the budgets trade texture against PSNR differently (low rates lose texture first).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from aeic.codec.checkpoint import load_fitting, read_checkpoint
from aeic.receiver.decoder import ReceiverModel, load_receiver_model
from aeic.sender.encoder import SenderCodec
from aeic.shared.model_package import ModelPackage

from .config import TrainConfig
from .data import LATENT_STRIDE, NO_TEACHER, CropSampler, build_cache
from .losses import batch_texture_retention, pixel_distortion
from .schedule import ScheduledRun, adam, resolve_device, seed_everything

WINDOW_MARGIN = 1  # latent cells decoded around the judged window (TAEF2's border effects)
MIN_JUDGED_CELLS = 13  # 104 px: MS-SSIM's five scales with a 7-pixel window need more than 96


class SenderLatents:
    """Training batches (images, ŷ, rate positions): random crops coded by the package's sender path."""

    def __init__(self, package: Path, sampler: CropSampler, rng: np.random.Generator, levels: int) -> None:
        # crops are coded whole, on as many threads as torch has (--threads), not onnxruntime's every core
        self.codec = SenderCodec.from_package(package, threads=torch.get_num_threads(), downscale=1)
        self.sampler = sampler
        self.rng = rng  # draws the rate levels (a checkpointed stream, apart from the crops')
        self.levels = levels  # rate levels 0 .. levels - 1

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, _ = self.sampler.batch(size)
        levels = self.rng.integers(0, self.levels, size).tolist()
        latents = []
        for image, level in zip(images, levels, strict=True):
            rgb = (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            latents.append(torch.from_numpy(self.codec.quantized_latent(self.codec.analyse(rgb), level)))
        positions = torch.tensor([self.codec.package.level_position(level) for level in levels])
        return images, torch.stack(latents), positions


class DecoderFinetuner(ScheduledRun):
    """The ``decoder`` stage: trains a package's synthesis and UNet; the sender half is frozen by construction."""

    def __init__(self, config: TrainConfig) -> None:
        if config.package is None:
            raise ValueError("the decoder stage needs `package`, the model package whose receiver half it trains")
        super().__init__()
        self.config = config
        seed_everything(config.seed)
        self.package = ModelPackage.load(config.package)
        self.device = resolve_device(config.device)
        self.model: ReceiverModel = load_receiver_model(self.package).to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub of Module.to has no memory_format
        if self.model.pixel_decoder is not None:  # TAEF2, frozen and outside the module tree: .to() above skips it
            self.model.pixel_decoder.to(self.device)
        every = self.package.num_levels
        self.levels = every if config.max_level is None else min(config.max_level + 1, every)  # trained: 0 .. levels-1
        if config.init is not None:
            load_fitting(self.model, read_checkpoint(config.init, needs=("model",))["model"], config.init)
        self.optimizer = adam(self.model.parameters(), config.lr)
        self.crops, self.rate_levels = self.random_stream(config.seed), self.random_stream(config.seed + 1)
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._resume()

    def _run_identity(self) -> dict[str, str]:
        """The package too: a fine-tune resumed on another package's streams would start from weights that
        learned the first one's."""
        return {"stage": "decoder", "package_id": self.package.model_id.hex()}

    def save(self) -> None:
        self._write_checkpoint({"stage": "decoder", "package": str(self.config.package),
                                "package_id": self.package.model_id.hex(),
                                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})

    def _resume(self) -> None:
        state = self._read_checkpoint()
        if state is not None:
            load_fitting(self.model, state["model"], f"{self.checkpoint_path} (resumed)")
            self.optimizer.load_state_dict(state["optimizer"])

    def _decoded_window(
        self, y_hat: torch.Tensor, positions: torch.Tensor, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, original) of one random window: TAEF2 decodes a part of the latent, not all of it."""
        unet_input, residual = self.model.synthesis(y_hat)
        latent = self.model.decoder.refine(unet_input, residual, positions)
        cells = min(self.config.window + 2 * WINDOW_MARGIN, latent.shape[-1], latent.shape[-2])
        top = random.randint(0, latent.shape[-2] - cells)
        left = random.randint(0, latent.shape[-1] - cells)
        pixels = self.model.decoder.decode_pixels(latent[..., top : top + cells, left : left + cells])
        margin = WINDOW_MARGIN * LATENT_STRIDE if cells - 2 * WINDOW_MARGIN >= MIN_JUDGED_CELLS else 0
        inner = slice(margin, cells * LATENT_STRIDE - margin)
        rows = slice(top * LATENT_STRIDE + margin, (top + cells) * LATENT_STRIDE - margin)
        cols = slice(left * LATENT_STRIDE + margin, (left + cells) * LATENT_STRIDE - margin)
        return pixels[..., inner, inner], images[..., rows, cols]

    def texture_weights(self, positions: torch.Tensor) -> torch.Tensor:
        """Each sample's texture weight: ``texture_weight`` at rate position 0, ``texture_weight_top`` at the top."""
        c = self.config
        if c.texture_weight_top is None:
            return torch.full(positions.shape, c.texture_weight, device=positions.device)
        fraction = positions.float() / max(self.package.level_position(self.levels - 1), 1e-9)
        return c.texture_weight + (c.texture_weight_top - c.texture_weight) * fraction

    def train_step(self, images: torch.Tensor, y_hat: torch.Tensor, positions: torch.Tensor) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate()
        reconstruction, original = self._decoded_window(y_hat, positions, images)
        c = self.config
        terms = {k: v.mean() for k, v in pixel_distortion(reconstruction, original, c.mse_weight, c.msssim_weight,
                                                            self.texture_weights(positions), c.lowpass_weight).items()}  # fmt: skip
        loss = terms["total"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return {
            "loss": float(loss.detach()),
            "psnr": float(-10 * torch.log10(terms["mse"].detach().clamp_min(1e-10))),
            "ms_ssim": float(terms["ms_ssim"].detach()),
            "texture_loss": float(terms["texture"].detach()),
            "lowpass_psnr": float(-10 * torch.log10(terms["lowpass"].detach().clamp_min(1e-10))),
            "texture": float(batch_texture_retention(reconstruction.detach(), original)),
        }

    def run(self) -> Path:
        if self.finished:
            return self.checkpoint_path
        items = build_cache(self.config.data, self.config.cache, self.config.short_side, NO_TEACHER, self.config.crop)
        assert self.config.package is not None  # __init__ refuses a config without one
        source = SenderLatents(self.config.package, CropSampler(items, self.config.crop, self.crops),
                               self.rate_levels, self.levels)  # fmt: skip
        self.model.train()
        def step() -> dict:
            images, y_hat, positions = source.batch(self.config.batch)  # made on the CPU (the sender's ONNX path)
            return self.train_step(images.to(self.device), y_hat.to(self.device, memory_format=torch.channels_last),
                                   positions.to(self.device))

        return self.loop(step, dict,
                         lambda logs: {"psnr": f"{logs['psnr']:.2f}", "tex": f"{logs['texture']:.2f}"},
                         f"{self.config.name}:decoder")
