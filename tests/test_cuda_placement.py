"""CUDA device placement, checked on a machine without a GPU.

Every training stage of both profiles (at test size), rate calibration and the receiver's decoding run on
``cuda:0`` under :class:`FakeCuda`, torch's FakeTensorMode: what would live on the GPU is a fake tensor
(shape, dtype, device, no data), so an operation that meets a CPU tensor there (a module left on the CPU, a
constant made without ``device=``) raises as CUDA would, and so does ``.numpy()`` of a device tensor. Host
work (photos, numpy, the sender's ONNX path, building and loading models) runs for real. A step must not
wait for the GPU before its optimizer step, and checkpoints cross between CUDA and the CPU both ways.

Not checked: kernels (numerics, cuDNN's choices, memory), and whatever depends on device values (a value
read back is 1, a tensor copied back holds zeros; decoded pictures are blank).
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.optim.optimizer as optimizer_module
from aeic.codec import taesd
from aeic.codec.checkpoint import load_checkpoint_model
from aeic.codec.export import export_package
from aeic.codec.testing import make_tiny_model
from aeic.receiver.decoder import ReceiverCodec
from aeic.sender.encoder import SenderCodec
from aeic.training import rate_calibration
from aeic.training.config import TrainConfig
from aeic.training.decoder_finetune import DecoderFinetuner
from aeic.training.schedule import ScheduledRun, TrainingDiverged
from aeic.training.trainer import Trainer
from sd_turbo_support import write_tiny_sd_turbo
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from training_support import write_training_photos

CUDA = "cuda:0"  # with its index: for a bare "cuda", Tensor.to asks the CUDA runtime (absent) for the device
STAND_IN = torch.device("lazy", 0)  # where FakeCuda makes the fake CUDA tensors
TORCH_DIR = Path(torch.__file__).parent
ROOT = Path(__file__).resolve().parents[1]
ALLOWED_WAITS = (("upload", "pytorch_msssim/ssim.py:", " in ms_ssim"),)  # its level weights, made per call
aten = torch.ops.aten
TRANSFERS = (aten._to_copy.default, aten.copy_.default)
INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)
HARNESS = ("_site", "_wait", "__torch_dispatch__")  # FakeCuda's own frames


def _site() -> str:
    """``file:line in function`` of the innermost caller outside torch and FakeCuda."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if TORCH_DIR in path.parents or (path == Path(__file__) and frame.name in HARNESS):
            continue
        parts = path.parts
        where = "/".join(parts[parts.index("site-packages") + 1 :]) if "site-packages" in parts else path.relative_to(ROOT)
        return f"{where}:{frame.lineno} in {frame.name}"
    return "?"


class FakeCuda(FakeTensorMode):
    """CUDA tensors as fake tensors, host tensors real; each wait for the GPU in a step's forward and backward
    pass counted by kind and site.

    The fake tensors' device is "lazy:0", not "cuda:0": autograd asks a tensor's device for its stream, and a
    CPU build of torch has a device guard for lazy and none for cuda (the process aborts). A wait is a value
    read back (``float()``, ``.tolist()``), a copy to the host, or a copy to the device, after which PyTorch
    synchronises the CUDA stream."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.in_step = False  # from the start of a train_step to its optimizer step
        self.waits: Counter[tuple[str, str]] = Counter()  # (kind, site)
        self.float64: Counter[str] = Counter()  # sites of float64 arithmetic on the device

    @property
    def avoid_device_init(self) -> bool:  # CUDA is reported present: still never compute a copy to the device
        return True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = {k: STAND_IN if isinstance(v, torch.device) and v.type == "cuda" else v for k, v in (kwargs or {}).items()}
        if kwargs.get("device") != STAND_IN and not any(isinstance(t, FakeTensor) for t in pytree.tree_leaves((args, kwargs))):
            return func(*args, **kwargs)  # host work runs for real
        if func is aten._local_scalar_dense.default:
            self._wait("read")
            return 1
        direction = _direction(func, args, kwargs)
        if direction == "download":
            self._wait("download")
            return args[0].zero_() if func is aten.copy_.default else torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if direction == "upload":
            self._wait("upload")
        else:
            _check_one_device(func, args, kwargs)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.in_step and func not in TRANSFERS and any(isinstance(t, FakeTensor) and t.dtype == torch.float64
                                                          for t in pytree.tree_leaves(out)):  # fmt: skip
            self.float64[_site()] += 1
        return out

    def _wait(self, kind: str) -> None:
        if self.in_step:
            self.waits[kind, _site()] += 1

    def unexpected_waits(self) -> list[str]:
        return [f"{kind} at {site} x{count}" for (kind, site), count in self.waits.items()
                if not any(kind == k and site.startswith(file) and site.endswith(name) for k, file, name in ALLOWED_WAITS)]  # fmt: skip


def _check_one_device(func: Any, args: Any, kwargs: dict) -> None:
    """Raise as CUDA does for tensors on two devices, a CPU scalar (0-dim) or index aside: FakeTensorMode's
    own check misses some operations, a convolution with CPU weights among them."""
    indices = args[1] if func in INDEXING else ()
    devices = {t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
               and not (t.device.type == "cpu" and (t.dim() == 0 or any(t is i for i in indices)))}  # fmt: skip
    if len(devices) > 1:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found {sorted(map(str, devices))} in {func}")


def _direction(func: Any, args: Any, kwargs: dict) -> str | None:
    """"upload", "download" or None: whether ``func`` copies between host and device."""
    if func is aten._to_copy.default and "device" in kwargs:
        source, target = args[0].device, kwargs["device"]
    elif func is aten.copy_.default:
        source, target = args[1].device, args[0].device
    else:
        return None
    return {(torch.device("cpu"), STAND_IN): "upload", (STAND_IN, torch.device("cpu")): "download"}.get((source, target))


def _save_as_cuda(save: Callable, obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
    """``torch.save`` of fake tensors as zeros recorded on ``cuda:0``: the file a CUDA run writes."""
    on_device: set[int] = set()

    def real(t: object) -> object:
        if not isinstance(t, FakeTensor):
            return t
        with unset_fake_temporarily():
            host = torch.zeros(t.shape, dtype=t.dtype)
        on_device.add(host.untyped_storage().data_ptr())
        return host

    tag = torch.serialization.location_tag
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda s: "cuda:0" if s.data_ptr() in on_device else tag(s))
        save(pytree.tree_map(real, obj), f, *args, **kwargs)


def _load_on_host(load: Callable, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` as on a CUDA machine: real tensors (in a fake mode torch loads fake ones)."""
    with unset_fake_temporarily():
        return load(*args, **kwargs)


def _step_marked(train_step: Callable, mode: FakeCuda) -> Callable:
    """``train_step`` that marks its forward and backward pass (until the optimizer step) and counts afresh."""

    @functools.wraps(train_step)
    def marked(self: ScheduledRun, *args: Any) -> dict:
        mode.in_step = True
        mode.waits.clear()
        mode.float64.clear()
        try:
            return train_step(self, *args)
        finally:
            mode.in_step = False

    return marked


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """``cuda:0`` for the code inside: CUDA reported present, its generator state a host tensor, fused Adam
    let onto the stand-in device, checkpoints read on the host and written as CUDA ones."""
    mode = FakeCuda()
    with pytest.MonkeyPatch.context() as patch:
        supported = optimizer_module._get_fused_kernels_supported_devices
        patch.setattr(optimizer_module, "_get_fused_kernels_supported_devices", lambda: [*supported(), STAND_IN.type])
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "device_count", lambda: 1)
        patch.setattr(torch.cuda, "get_rng_state", lambda device=CUDA: torch.get_rng_state())
        patch.setattr(torch.cuda, "set_rng_state", lambda state, device=CUDA: None)
        patch.setattr(torch, "save", functools.partial(_save_as_cuda, torch.save))
        patch.setattr(torch, "load", functools.partial(_load_on_host, torch.load))
        handle = optimizer_module.register_optimizer_step_pre_hook(lambda *_: setattr(mode, "in_step", False))
        for stage in (Trainer, DecoderFinetuner):
            patch.setattr(stage, "train_step", _step_marked(stage.train_step, mode))
        flags = _cuda_flags()  # the training device sets them: put back after
        try:
            with mode:
                yield mode
        finally:
            handle.remove()
            _cuda_flags(*flags)


def _cuda_flags(*values: bool) -> tuple[bool, bool, bool]:
    """cuDNN autotuning and TF32 (cuDNN, cuBLAS), set to ``values`` if given; their previous values."""
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if values:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = values
    return before


def _on_device(module: torch.nn.Module) -> set[torch.device]:
    return {t.device for t in (*module.parameters(), *module.buffers())}


def test_the_fake_device_catches_what_cuda_would_refuse() -> None:
    """The checks are live: a module left on the CPU, ``.numpy()`` of a device tensor, a host-made constant."""
    with fake_cuda() as mode:
        on_cpu = torch.nn.Conv2d(3, 4, 3)
        image = torch.rand(1, 3, 8, 8).to(CUDA)
        with pytest.raises(RuntimeError, match="same device"):
            on_cpu(image)
        with pytest.raises(RuntimeError, match="numpy"):
            on_cpu.to(CUDA)(image).detach().numpy()
        mode.in_step = True
        image * torch.tensor([1.0, 2.0, 3.0], device=CUDA)[:, None, None]  # made on the host, then copied
    assert [kind for kind, _ in mode.waits] == ["upload"]
    assert mode.unexpected_waits()[0].endswith("in test_the_fake_device_catches_what_cuda_would_refuse x1")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_training_photos(tmp_path_factory.mktemp("photos"), 2)


@pytest.fixture(scope="module")
def sd_turbo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_turbo(tmp_path_factory.mktemp("sd_turbo"))


@pytest.fixture(scope="module")
def taef2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random TAEF2 weights: the nano presets' pretrained pixel decoder and latent teacher, at no cost."""
    folder = tmp_path_factory.mktemp("taef2")
    torch.manual_seed(0)
    for part, build in (("encoder", taesd.build_encoder), ("decoder", taesd.build_decoder)):
        torch.save(build().state_dict(), folder / f"taef2_{part}.pth")
    return folder


@pytest.fixture()
def environment(sd_turbo: Path, taef2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AEIC_SD_TURBO_DIR", str(sd_turbo))
    monkeypatch.setenv("AEIC_TAEF2_DIR", str(taef2))
    torch.set_num_threads(1)


def _config(photos: Path, out: Path, **kwargs: Any) -> TrainConfig:
    base = {"name": "t", "model": "tiny-se", "data": photos, "cache": out.parent / "cache", "short_side": 160,
            "crop": 128, "batch": 1, "steps": 1, "log_every": 1, "out": out, "device": "cpu"}  # fmt: skip
    return TrainConfig(**{**base, **kwargs})


@pytest.fixture(scope="module")
def starts(photos: Path, sd_turbo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the stages start from, made on the CPU: one-step checkpoints, a checkpoint without its pixel
    decoder (a model trained through TAEF2) and packages."""
    root = tmp_path_factory.mktemp("starts")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AEIC_SD_TURBO_DIR", str(sd_turbo))
        made = {model: Trainer(_config(photos, root / model, model=model)).run()
                for model in ("tiny-se", "tiny-me", "tiny-full", "tiny-full-me")}  # fmt: skip
        state = torch.load(made["tiny-se"], weights_only=False)
        state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("decoder.pixel_decoder.")}
        torch.save(state, root / "taef2-like.pt")
        made["taef2-like"] = root / "taef2-like.pt"
        for model in ("tiny-se", "tiny-full"):
            made[f"{model}-package"] = export_package(load_checkpoint_model(made[model]), root / f"{model}-package")
    return made


# each stage at test size: its stage class and what it adds to _config, given the starts; the full profile's
# with full-*.toml's settings (and the pixel term of pretrain), the nano pretrain with TAEF2 as well
STAGES: dict[str, tuple[type[Trainer | DecoderFinetuner], Callable[[dict[str, Path]], dict]]] = {
    "pretrain": (Trainer, lambda s: {"stage": "pretrain"}),
    "pretrain-taef2": (Trainer, lambda s: {"model": "nano-se", "pixel_weight": 0.5}),
    "adversarial": (Trainer, lambda s: {"stage": "adversarial", "init": s["tiny-se"], "adversarial_weight": 0.1}),
    "distil": (Trainer, lambda s: {"stage": "distil", "teacher": s["tiny-me"]}),
    "pixel_decoder": (Trainer, lambda s: {"stage": "pixel_decoder", "init": s["taef2-like"]}),
    "encoder": (Trainer, lambda s: {"stage": "encoder", "init": s["tiny-se-package"], "lowpass_weight": 50.0}),
    "decoder": (DecoderFinetuner, lambda s: {"stage": "decoder", "package": s["tiny-se-package"], "texture_weight": 0.3,
                                             "texture_weight_top": 0.1}),
    "full-pretrain": (Trainer, lambda s: {"model": "tiny-full-me", "pixel_weight": 0.5}),
    "full-adversarial": (Trainer, lambda s: {"model": "tiny-full-me", "stage": "adversarial", "init": s["tiny-full-me"],
                                             "distortion": "pixel", "mse_weight": 100.0, "msssim_weight": 2.0,
                                             "latent_weight": 1.0, "adversarial_weight": 0.1}),
    "full-distil": (Trainer, lambda s: {"model": "tiny-full", "stage": "distil", "teacher": s["tiny-full-me"]}),
    "full-decoder": (DecoderFinetuner, lambda s: {"model": "tiny-full", "stage": "decoder",
                                                  "package": s["tiny-full-package"], "texture_weight": 0.3}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_trains_on_cuda_without_waiting_for_it_and_its_checkpoints_cross_devices(
    name: str, photos: Path, starts: dict[str, Path], environment: None, tmp_path: Path
) -> None:
    """Resumed on CUDA from a CPU checkpoint (weights, optimizer, random states), two steps; the second
    step's forward and backward pass never wait for the GPU and compute nothing in float64 there; the CUDA
    checkpoint then resumes on the CPU."""
    stage, extra = STAGES[name][0], STAGES[name][1](starts)
    run = tmp_path / "run"
    stage(_config(photos, run, **extra)).run()
    with fake_cuda() as mode:
        on_cuda = stage(_config(photos, run, **extra, steps=3, device=CUDA))
        assert on_cuda.step == 1 and _on_device(on_cuda.model) == {STAND_IN}
        on_cuda.run()
    assert mode.unexpected_waits() == [] and mode.float64 == Counter()
    with pytest.raises(RuntimeError, match="CUDA"):  # a CUDA checkpoint, as a GPU writes it
        torch.load(run / "checkpoint.pt", weights_only=False)
    on_cpu = stage(_config(photos, run, **extra, steps=4))
    assert on_cpu.step == 3 and _on_device(on_cpu.model) == {torch.device("cpu")}
    try:
        on_cpu.run()
    except TrainingDiverged:  # the step ran; on the stand-in zeros a spectral norm (the discriminator's) is 0 / 0
        assert name.endswith("adversarial")


@pytest.mark.parametrize("model", ["tiny-se", "tiny-full"])
def test_calibration_runs_on_cuda(model: str, photos: Path, starts: dict[str, Path], environment: None,
                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rate_calibration, "SCAN_POINTS", 3)  # device values are stand-ins: no search to check
    monkeypatch.setattr(rate_calibration, "BISECTION_STEPS", 1)
    with fake_cuda():
        checkpoint = Trainer(_config(photos, tmp_path / "cal", model=model, stage="calibrate", init=starts[model],
                                     device=CUDA)).run()  # fmt: skip
    assert '"calibration"' in (tmp_path / "cal" / "log.jsonl").read_text()
    assert Trainer(_config(photos, tmp_path / "cal", model=model, stage="calibrate", init=starts[model])).step == 1
    assert checkpoint.exists()


@pytest.mark.parametrize("model", ["tiny-se", "tiny-full"])
def test_the_receiver_decodes_on_cuda_without_waiting_inside_its_model(model: str, starts: dict[str, Path],
                                                                       environment: None) -> None:
    """Two streams, decoded twice: the second time the synthesis, UNet and pixel decoder pass waits for
    nothing (the entropy decoding, driven by the host, and the copies in and out do)."""
    rgb = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    sender = SenderCodec.from_package(starts[f"{model}-package"])
    streams = [sender.encode(rgb, 0), sender.encode(rgb, 3)]
    with fake_cuda() as mode:
        receiver = ReceiverCodec.from_package(starts[f"{model}-package"], device=CUDA)
        assert _on_device(receiver.model) == {STAND_IN}
        receiver.model.register_forward_pre_hook(lambda *_: setattr(mode, "in_step", True))
        receiver.model.register_forward_hook(lambda *_: setattr(mode, "in_step", False))
        receiver.decode_batch(streams)
        mode.waits.clear()
        decoded = receiver.decode_batch(streams)
    assert [image.shape for image in decoded] == [rgb.shape, rgb.shape]
    assert mode.unexpected_waits() == []


def test_the_integer_entropy_model_exports_from_a_model_on_cuda() -> None:
    with fake_cuda():
        model = make_tiny_model().to(CUDA)
        integer = model.entropy.export()
    assert integer.latent_channels == model.config.analysis.latent_channels
