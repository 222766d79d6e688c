"""A local SD-Turbo diffusers folder (``unet/``, ``vae/``): where it is configured, and its two components
loaded as they are stored, with nothing downloaded.

Users point at such folders in several near-miss ways (one component, a Hugging Face cache root, a
single-file checkpoint, an fp16-only copy, a truncated download); each is one line naming the folder and
what to give instead, not diffusers' guesses or traceback. :func:`check_folder` says so without torch, so a
receiver refuses a wrong folder at start-up before the seconds torch's import takes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel

_WEIGHTS_PREFIX = "diffusion_pytorch_model"


def configured_folder() -> Path:
    """The folder ``AEIC_SD_TURBO_DIR`` names: the ``full`` profile's base weights. A leading ``~`` is the home
    folder, as in a shell: none expands it in a compose file's or a systemd unit's environment."""
    configured = os.environ.get("AEIC_SD_TURBO_DIR")
    if not configured:
        raise FileNotFoundError("the full profile needs AEIC_SD_TURBO_DIR: a local SD-Turbo diffusers folder")
    return Path(configured).expanduser()


# The weight files diffusers reads, in our order of preference: (file or shard index, variant, safetensors).
_WEIGHT_FILES = (
    (f"{_WEIGHTS_PREFIX}.safetensors", None, True),
    (f"{_WEIGHTS_PREFIX}.safetensors.index.json", None, True),
    (f"{_WEIGHTS_PREFIX}.bin", None, False),
    (f"{_WEIGHTS_PREFIX}.bin.index.json", None, False),
    (f"{_WEIGHTS_PREFIX}.fp16.safetensors", "fp16", True),
    (f"{_WEIGHTS_PREFIX}.safetensors.index.fp16.json", "fp16", True),
    (f"{_WEIGHTS_PREFIX}.fp16.bin", "fp16", False),
)


def _layout_hint(folder: Path) -> str:
    """What the folder is instead, for the two near misses: one component, or a Hugging Face cache root."""
    if (folder / "config.json").is_file():
        return " (it is one component: give the folder holding unet/ and vae/)"
    if (folder / "snapshots").is_dir():
        return f" (a Hugging Face cache: give {folder / 'snapshots'}/<revision>)"
    return ""


def _component_weights(folder: Path, name: str) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that load ``folder/name``'s weights as they are stored
    (safetensors or .bin, whole or the fp16 variant only), so diffusers neither guesses aloud
    nor reports a missing ``.bin`` for a folder that holds only ``*.fp16.safetensors``."""
    component = folder / name
    if not (component / "config.json").is_file():
        raise FileNotFoundError(f"SD-Turbo folder {folder}: missing {component / 'config.json'}{_layout_hint(folder)}")
    for file, variant, safetensors in _WEIGHT_FILES:
        if (component / file).is_file():
            return {"variant": variant, "use_safetensors": safetensors}
    raise FileNotFoundError(f"SD-Turbo folder {folder}: no weights in {component} (expected {_WEIGHTS_PREFIX}"
                            ".safetensors, .bin or their fp16 variant)")


_Component = TypeVar("_Component", "UNet2DConditionModel", "AutoencoderKL")


def _load_component(kind: type[_Component], folder: Path, name: str) -> _Component:
    """``folder/name`` in float32 (an fp16 variant computes in float32 too); a damaged file (a truncated
    download, a config that is not JSON) is an OSError that names the SD-Turbo folder, and so are weights
    that are not its config's: diffusers refuses other shapes in a line naming neither, and fills tensors
    the file lacks with random values, only warning, which a run would train on as SD-Turbo's."""
    import torch

    files = _component_weights(folder, name)
    try:
        component, info = kind.from_pretrained(folder, subfolder=name, local_files_only=True,
                                               torch_dtype=torch.float32, output_loading_info=True, **files)
    except OSError as exc:
        raise OSError(f"SD-Turbo folder {folder}: {name}/ cannot be read, corrupt or truncated? ({_one_line(exc)})") from exc
    except (ValueError, RuntimeError) as exc:
        raise OSError(f"SD-Turbo folder {folder}: {name}/ holds weights its config.json does not describe "
                      f"({_one_line(exc).split('. ')[0]})") from exc  # not diffusers' advice to load them at random
    absent = sorted(info["missing_keys"]) + [key for key, *_ in info["mismatched_keys"]]
    if absent:
        raise OSError(f"SD-Turbo folder {folder}: {name}/ lacks {len(absent)} tensors its config.json describes "
                      f"(first {absent[0]}): an incomplete or another model's weights file")
    return component


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def check_folder(folder: Path) -> None:
    """A FileNotFoundError saying why ``folder`` is no SD-Turbo folder (not one, a file, a component without
    its config or weights); reads no weights and imports no torch. Weights of another model are found only
    when they load (:class:`~aeic.codec.full_profile.BaseWeightsError`)."""
    folder = Path(folder)
    if folder.is_file():
        raise FileNotFoundError(f"SD-Turbo folder {folder} is a file (a single-file checkpoint?): give a local "
                                "diffusers folder with unet/ and vae/")
    if not folder.is_dir():
        raise FileNotFoundError(f"SD-Turbo folder not found: {folder} (a local diffusers folder with unet/ and vae/)")
    for name in ("unet", "vae"):
        _component_weights(folder, name)


def load_unet_and_vae(folder: Path) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The folder's UNet and VAE in float32; a path that is no such folder is a FileNotFoundError saying so."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    check_folder(folder)
    return _load_component(UNet2DConditionModel, folder, "unet"), _load_component(AutoencoderKL, folder, "vae")
