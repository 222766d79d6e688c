"""Network interpolation: a receiver half between two fine-tunes that decode the same streams.

Two `decoder`-stage fine-tunes of one package (say, one that keeps more texture and one with a higher
PSNR) share the sender files, so their receiver weights can be mixed linearly into a decoder whose
trade-off lies between them, without another training run. The sender files, and so every stream,
stay byte for byte those of both packages.
"""

from __future__ import annotations

from pathlib import Path

import torch
from aeic.shared import model_package as pkg
from safetensors.torch import load_file

from .export import RECEIVER_FILE, SENDER_FILES, write_receiver_update
from .full_profile import FINGERPRINT


def interpolate_receivers(first: Path, second: Path, weight: float, out: Path) -> Path:
    """A package whose receiver weights are ``(1 - weight) * first + weight * second``, written to ``out``.

    Refused unless both packages have the same sender files (the same streams) and receiver tensors."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    manifests = [pkg.ModelPackage.load(path).manifest for path in (first, second)]
    if any(manifests[0]["files"][name] != manifests[1]["files"][name] for name in SENDER_FILES):
        raise ValueError(f"{first} and {second} code different streams (their sender files differ)")
    weights = [load_file(str(path / RECEIVER_FILE)) for path in (first, second)]
    if {k: v.shape for k, v in weights[0].items()} != {k: v.shape for k, v in weights[1].items()}:
        raise ValueError(f"{first} and {second} have receivers of different architectures")
    fingerprint = f"decoder.{FINGERPRINT}"  # a mix of two would name neither base, and decode on none
    if fingerprint in weights[0] and not torch.equal(weights[0][fingerprint], weights[1][fingerprint]):
        raise ValueError(f"{first} and {second} were fine-tuned on different SD-Turbo base weights")
    mixed = {
        name: ((1.0 - weight) * tensor.float() + weight * weights[1][name].float()).to(tensor.dtype).contiguous()
        for name, tensor in weights[0].items()
    }
    return write_receiver_update(second, mixed, out)
