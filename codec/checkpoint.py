"""Training checkpoints read back: what ``aeic-train`` writes and resumes from, and ``aeic export`` packages.

Every failure is one line naming the file (a corrupt or foreign file, weights of another model, a preset this
version lacks), never torch's unpickling traceback or its list of every tensor of another shape.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .model import AEICModel, ModelConfig
from .presets import UnknownPresetError, preset

# Beside tensors and plain values a checkpoint holds numpy's global random state, an ndarray of uint32:
# the functions and classes that rebuild one, allowed by name (numpy 1 and 2 keep them in other modules).
_NUMPY_ARRAY: tuple[Any, ...] = (np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32)))


def load_data_only(path: Path, allowed: Sequence[type] = (), mmap: bool = False) -> object:
    """``torch.load`` that runs no code from the file (``weights_only``): tensors, plain values, numpy
    arrays and the ``allowed`` classes. A checkpoint is passed round (an ``init`` or ``teacher`` from
    elsewhere, a shared cache folder), and a full unpickling lets such a file run any code it holds."""
    with torch.serialization.safe_globals([*_NUMPY_ARRAY, *allowed]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


class CheckpointError(ValueError):
    """A file that should be a training checkpoint cannot be read as one (corrupt, truncated, another kind)."""


def read_checkpoint(path: Path, needs: tuple[str, ...] = ()) -> dict:
    """The contents of the training checkpoint ``path``, a dict holding ``needs``; a missing file is an
    OSError, anything else unreadable a :class:`CheckpointError` that names the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    try:
        state = load_data_only(path)
    except OSError:
        raise
    except Exception as exc:  # torch and pickle report a corrupt or foreign file in many ways
        detail = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0]  # torch's first sentence
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt, truncated or another kind of "
                              f"file): {detail}") from exc
    if not isinstance(state, dict) or any(key not in state for key in needs):
        lacking = [key for key in needs if not isinstance(state, dict) or key not in state]
        raise CheckpointError(f"{path} is not a training checkpoint (it lacks {', '.join(lacking) or 'a dict'})")
    return state


# A full-profile decoder says itself when its SD-Turbo UNet's or VAE's tensors misfit (another SD-Turbo folder)
_BASE_WEIGHTS = ("decoder.unet.", "decoder.vae.")


def load_fitting(module: nn.Module, weights: dict, source: object, strict: bool = True) -> tuple[list[str], list[str]]:
    """``module.load_state_dict``; weights of other shapes are a CheckpointError naming ``source``, not
    torch's list of every tensor. Shapes that misfit outside the base weights are checked first: another
    preset's weights (a nano package as a full run's ``init``) were reported as another SD-Turbo folder."""
    own = module.state_dict()
    other = [key for key, value in weights.items()
             if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape)]
    if any(not key.startswith(_BASE_WEIGHTS) for key in other):
        raise CheckpointError(_misfit(module, weights, source, other))
    try:
        return module.load_state_dict(weights, strict=strict)
    except RuntimeError as exc:
        missing = [key for key in own if key not in weights] if strict else []
        unexpected = [key for key in weights if key not in own] if strict else []
        raise CheckpointError(_misfit(module, weights, source, other, missing, unexpected)) from exc


def _misfit(module: nn.Module, weights: dict, source: object, other: list[str], missing: Sequence[str] = (),
            unexpected: Sequence[str] = ()) -> str:
    """The one line saying how ``weights`` misfit ``module``, another preset's tensors named before SD-Turbo's."""
    own = module.state_dict()
    other = sorted(other, key=lambda key: key.startswith(_BASE_WEIGHTS))
    detail = (f"{len(other)} tensors of other shapes ({other[0]}: {tuple(weights[other[0]].shape)} there, "
              f"{tuple(own[other[0]].shape)} here)" if other else f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return f"{source} does not fit the model ({type(module).__name__}): {detail}; is it from another model preset?"


def checkpoint_preset(state: dict, source: object) -> ModelConfig:
    """The preset a checkpoint records; one this version lacks is a CheckpointError naming ``source``."""
    try:
        return preset(state["preset"])
    except UnknownPresetError:
        raise CheckpointError(f"{source} is of model preset {state['preset']!r}, unknown here") from None


def load_checkpoint_model(checkpoint: Path) -> AEICModel:
    """A model from a training checkpoint (its preset is recorded in the checkpoint)."""
    state = read_checkpoint(checkpoint, needs=("preset", "model"))
    model = AEICModel(checkpoint_preset(state, checkpoint))
    load_fitting(model, state["model"], f"{checkpoint} (preset {state['preset']!r})")
    return model
