"""What every training stage shares: a step or wall-clock budget, a cosine learning rate, the logged loop.

A run resumes where its checkpoint left it, and its time budget counts training time across
sessions (``previous_minutes``), so a CPU run split over several sessions decays its learning rate
as one run would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aeic.codec.checkpoint import CheckpointError, read_checkpoint
from aeic.shared.durable import exclusive_lock, fsync_path
from tqdm import tqdm

from .config import TrainConfig
from .step_profile import write_profile


def adam(parameters: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam with its fused kernels (CPU and CUDA): the per-tensor update launches about ten operations
    for each of the nano model's 284 parameter tensors every step, a seventh of all a step launches."""
    return torch.optim.Adam(parameters, lr=lr, betas=betas, fused=True)


def resolve_device(name: str, on_command_line: bool = False) -> torch.device:
    """The training device; on CUDA, TF32 matrix units and cuDNN autotuning (crops have one size).
    ``on_command_line``: the name came from --device, so a refusal names that option, not the config's line."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a torch device (cpu, cuda, cuda:N or auto)") from exc
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: the stages are written and tested for these two
        raise ValueError(f"device {name!r}: training runs on cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        fix = "--device cpu or --device auto" if on_command_line else 'device = "cpu" or "auto" in the config'
        raise ValueError(f"device {name!r}: CUDA is not available here ({fix})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 on")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


NOT_A_TERMINAL_REFRESH_S = 30.0  # a progress line at most this often when stderr is a file or a pipe


class _Lines:
    """tqdm's output where stderr is no terminal (nohup, docker logs, a batch job's file): each refresh is a
    line of its own, where tqdm's carriage returns would put every refresh of a run on one growing line."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def progress_bar(**options: Any) -> tqdm:
    """A tqdm bar on stderr: redrawn in place on a terminal, else whole lines every half minute."""
    if sys.stderr.isatty():
        return tqdm(**options)
    return tqdm(file=_Lines(), mininterval=NOT_A_TERMINAL_REFRESH_S, **options)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _logged_step(line: str) -> float:
    """The step a log line records: 0 for a line without one, infinity for a line cut short (never kept)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    if not line.endswith("\n") or not isinstance(entry, dict):
        return math.inf
    return entry.get("step", 0)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run after the step in progress; its checkpoint holds every step done."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint} saved: run the same command to resume")
        self.step, self.checkpoint = step, checkpoint


class TrainingDiverged(ValueError):
    """The loss or the weights are no longer finite: every later step would train and save NaN."""


def out_of_memory_detail(exc: torch.OutOfMemoryError) -> str:
    """The first sentences of torch's out-of-memory message (what was asked, what is free), without its advice."""
    return ". ".join(str(exc).splitlines()[0].split(". ")[:3]).rstrip(".") + "."


class StepOutOfMemory(MemoryError):
    """A step, or a photo's teacher latent while the cache fills, did not fit in the device's memory: a batch, crop
    or photo too large for this machine."""


_DEFAULT_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class _StopOnInterrupt:
    """While training, the first Ctrl-C (SIGINT) or SIGTERM (`docker stop`, Slurm, systemd) asks the loop to
    stop after the step in progress (then it checkpoints), so a stopped job loses no finished step; a second
    one raises KeyboardInterrupt at once. Only Python's default handlers in the main thread are replaced: an
    ignored signal or another handler stays as it is."""

    def __enter__(self) -> _StopOnInterrupt:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self.requested = False
        self.previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum, default in _DEFAULT_HANDLERS.items():
                if signal.getsignal(signum) is default:
                    self.previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _folder_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """One run at a time in an ``out`` folder: two (a batch job requeued while the first still runs, a command
    started in two terminals) would overwrite each other's checkpoint and interleave their logs."""
    return exclusive_lock(out / "run.lock", OSError(f"another aeic-train is training in {out} (it holds "
                                                    f"{out / 'run.lock'}): wait for it, or stop it first"))


class ScheduledRun:
    """Budget, learning-rate schedule and the loop; a stage supplies ``save`` and its step."""

    config: TrainConfig
    out: Path
    device = torch.device("cpu")  # a stage that can train on a GPU sets its own
    profile_steps: int | None = None  # set: profile this many steps instead of training (step_profile.py)

    def __init__(self) -> None:
        self.step = 0
        self.previous_minutes = 0.0  # training time of earlier sessions of this run
        self.started = time.monotonic()
        self._streams: list[tuple[int, np.random.Generator]] = []
        self.saved_step: int | None = None  # the step of the checkpoint on disk, None before the first

    def random_stream(self, seed: int) -> np.random.Generator:
        """A numpy generator (the crops, the rate levels) whose state the checkpoint keeps, so a resumed run
        draws the data an uninterrupted one would. Create every stream before the checkpoint is read."""
        stream = np.random.default_rng(seed)
        self._streams.append((seed, stream))
        return stream

    def _device_rng_state(self) -> torch.Tensor | None:
        """The CUDA generator's state (rate indices, quantization noise on the GPU); None on a CPU."""
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        raise NotImplementedError

    def _kept(self) -> str:
        return "no checkpoint was written" if self.saved_step is None else f"the checkpoint of step {self.saved_step} is kept"

    def _diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(f"step {self.step}: {what}: training diverged (a learning rate too high for this "
                                f"data?); {self._kept()}: lower `lr` and run the same command again")

    def _out_of_memory(self, exc: torch.OutOfMemoryError) -> StepOutOfMemory:
        """One line for a step that did not fit on the device (the configs' batches are set for an 80 GB GPU)."""
        return StepOutOfMemory(f"step {self.step + 1}: out of memory ({out_of_memory_detail(exc)}); {self._kept()}: lower the "
                               f"batch ({self.config.batch} now; --batch) or the crop ({self.config.crop})")

    @contextlib.contextmanager
    def _step_stops_in_one_line(self) -> Iterator[None]:
        """A step (or the calibration) that runs out of device memory, or cannot read its data (a cache file
        deleted while the run trains), stops the run with one line naming the step and the checkpoint kept."""
        try:
            yield
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(exc) from None
        except OSError as exc:
            raise OSError(f"step {self.step + 1}: {exc}; {self._kept()}: run the same command to resume") from exc

    def _room_left(self) -> str:
        """The room left on the run folder's disk: what a full disk's error leaves unsaid (torch words it as
        'unexpected pos N vs M')."""
        return f"{shutil.disk_usage(self.out).free // 2**20} MiB free on its disk"

    def _write_checkpoint(self, state: dict) -> None:
        """Atomically save a stage's ``state`` with the step, the time spent and every random state; weights
        that are no longer finite are refused, so the last good checkpoint stays."""
        if not all(bool(value.isfinite().all()) for value in state["model"].values() if value.is_floating_point()):
            raise self._diverged("the weights are not finite")
        state.update(step=self.step, minutes=self._elapsed_minutes(),
                     rng=(random.getstate(), np.random.get_state(), torch.get_rng_state()),
                     device_rng=self._device_rng_state(),
                     streams=[stream.bit_generator.state for _, stream in self._streams])  # fmt: skip
        tmp = self.checkpoint_path.with_suffix(".tmp")
        try:
            torch.save(state, tmp)
        except (OSError, RuntimeError) as exc:  # a full disk reaches torch's writer as a RuntimeError
            tmp.unlink(missing_ok=True)
            kept = "the previous checkpoint is kept" if self.checkpoint_path.exists() else "no checkpoint was written"
            raise OSError(f"cannot write {self.checkpoint_path} (step {self.step}): {str(exc).splitlines()[0]} "
                          f"({self._room_left()}); {kept}") from exc
        fsync_path(tmp)  # else a power cut soon after the rename can leave an empty checkpoint behind it
        tmp.replace(self.checkpoint_path)
        fsync_path(self.checkpoint_path.parent)
        self.saved_step = self.step

    def _read_checkpoint(self) -> dict | None:
        """The saved state, with step, time spent and random states restored; None for a new run."""
        if not self.checkpoint_path.exists():
            return None
        try:
            state = read_checkpoint(self.checkpoint_path, needs=("model", "step", "rng"))
        except CheckpointError as exc:
            raise CheckpointError(f"cannot resume: {exc}; move it away to start the run over") from exc
        self._check_same_run(state)
        self.step, self.previous_minutes = state["step"], state.get("minutes", 0.0)
        self.saved_step = self.step
        random.setstate(state["rng"][0])
        np.random.set_state(state["rng"][1])
        torch.set_rng_state(state["rng"][2])
        if state.get("device_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["device_rng"], self.device)
        saved = state.get("streams")
        for index, (seed, stream) in enumerate(self._streams):
            # a checkpoint from before the streams were kept: reseeded by the step, as runs then were
            fallback = np.random.default_rng(seed + self.step).bit_generator.state
            stream.bit_generator.state = saved[index] if saved and index < len(saved) else fallback
        return state

    def _run_identity(self) -> dict[str, str]:
        """What a checkpoint in ``out`` must record to be resumed by this config."""
        return {"stage": self.config.stage}

    def _check_same_run(self, state: dict) -> None:
        """Refuse a checkpoint of another stage or preset: a config copied for the next stage with its ``out``
        left as it was would train on from the other run's weights, or do no step and relabel them as its own."""
        wanted = self._run_identity()
        if all(state.get(key, value) == value for key, value in wanted.items()):  # older checkpoints may lack a key
            return
        def run(facts: dict) -> str:
            return ", ".join(f"{key} {facts.get(key)!r}" for key in wanted)

        raise CheckpointError(f"{self.checkpoint_path} holds a run of {run(state)}; this config trains {run(wanted)}: "
                              "set another `out`, or move the checkpoint away to start over")

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    def _append_log(self, entry: dict) -> None:
        """One line on the log, written through with no buffer (a buffer that a full disk left unwritten would
        fail again, unnamed, when the file closes); a write that fails names the log and the room left. A line
        cut short is cut from the log when the run resumes (``_trim_log``)."""
        data = (json.dumps(entry) + "\n").encode()
        try:
            handle = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # as open(): less the umask
            try:
                while data:
                    data = data[os.write(handle, data):]
            finally:
                os.close(handle)
        except OSError as exc:
            raise OSError(f"cannot write {self.log_path} (step {self.step}): {exc.strerror or exc} "
                          f"({self._room_left()}); {self._kept()}") from exc

    def _trim_log(self) -> None:
        """Keep the log lines of the steps the checkpoint holds: a run killed after its last checkpoint
        (no Ctrl-C: a crash, a kill -9, a lost machine) logged steps that this session trains again, and
        may have left a line cut short. Lines without a step (calibration reports) stay."""
        if not self.log_path.exists():
            return
        lines = self.log_path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _logged_step(line) <= self.step]
        if kept != lines:
            tmp = self.log_path.with_suffix(".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(self.log_path)

    def _elapsed_minutes(self) -> float:
        return self.previous_minutes + (time.monotonic() - self.started) / 60

    def _progress(self) -> float:
        """Fraction of the run done: by steps, or by wall-clock time when the run has a time budget."""
        by_steps = self.step / max(1, self.config.steps)
        if self.config.minutes is None:
            return min(1.0, by_steps)
        return min(1.0, max(by_steps, self._elapsed_minutes() / self.config.minutes))

    @property
    def finished(self) -> bool:
        """A resumed run already at the end of its budget: its command run again keeps the checkpoint as it is,
        without reading the photos first (minutes for a large folder) or writing the checkpoint again."""
        return self.saved_step is not None and self.profile_steps is None and self._progress() >= 1.0

    def _projected_steps(self) -> int | None:
        """The step the run ends at, for the progress bar: ``steps``, or, with a time budget, the step where it
        runs out at the pace so far (None before a step has timed it), so the bar ends full and its time left
        is the budget's, not that of ``steps`` (an upper bound the configs set far past the budget)."""
        if self.config.minutes is None:
            return self.config.steps
        progress = self._progress()
        return max(self.step, min(self.config.steps, round(self.step / progress))) if self.step and progress else None

    def _learning_rate(self) -> float:
        floor = self.config.lr_final_fraction
        return self.config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * self._progress())))

    def once(self, work: Callable[[], dict]) -> Path:
        """A stage of one step (``calibrate``): ``work`` runs under the folder's lock, its failures are one line
        as a training step's are, the log line it returns is appended and it is checkpointed as step 1, so the
        same command run again keeps it (as a finished training stage is kept) instead of doing it twice."""
        if self.step >= 1:
            return self.checkpoint_path
        with _folder_lock(self.out):
            with self._step_stops_in_one_line():
                entry = work()
            self.step = 1
            self._append_log(entry)
            self.save()
        return self.checkpoint_path

    def loop(self, train_step: Callable[[], dict], log_extras: Callable[[], dict],
             postfix: Callable[[dict], dict], description: str) -> Path:
        """Run ``train_step`` until the budget is spent: log every ``log_every`` steps, checkpoint every few minutes.

        Ctrl-C ends the step in progress, checkpoints and raises :class:`TrainingInterrupted`; a loss that is no
        longer finite raises :class:`TrainingDiverged` without logging or saving the step."""
        if self.profile_steps:
            facts = {"config": self.config.name, "stage": self.config.stage, "model": self.config.model,
                     "batch": self.config.batch, "crop": self.config.crop}  # fmt: skip
            return write_profile(train_step, self.profile_steps, self.device, self.out, facts)
        last_save = time.monotonic()
        with contextlib.ExitStack() as held:
            held.enter_context(_folder_lock(self.out))
            self._trim_log()  # under the lock, before the first line is appended
            bar = held.enter_context(progress_bar(total=self._projected_steps(), initial=self.step, desc=description))
            interrupt = held.enter_context(_StopOnInterrupt())
            self.started = time.monotonic()  # the time budget counts training, not the data cache
            while self._progress() < 1.0 and not interrupt.requested:
                lr = self._learning_rate()  # the step's own (train_step sets it from the same step count)
                with self._step_stops_in_one_line():
                    logs = train_step()
                self.step += 1
                if not math.isfinite(logs["loss"]):  # checked before it is logged or saved
                    raise self._diverged(f"the loss is {logs['loss']}")
                bar.total = self._projected_steps()
                bar.update(1)
                if self.step % self.config.log_every == 0:
                    logs.update(step=self.step, lr=lr, minutes=round(self._elapsed_minutes(), 2),
                                **log_extras())  # fmt: skip
                    self._append_log(logs)
                    bar.set_postfix(postfix(logs), refresh=False)  # shown with the next step's refresh
                if time.monotonic() - last_save > 60 * self.config.checkpoint_minutes:
                    self.save()
                    last_save = time.monotonic()
            self.save()
        if interrupt.requested:
            raise TrainingInterrupted(self.step, self.checkpoint_path)
        return self.checkpoint_path
