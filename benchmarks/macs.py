"""Multiply-accumulate counting with forward hooks.

Counted: every ``Conv2d`` (its subclasses included, e.g. the codec's fake-quantized ``QConv2d``)
as output elements x (input channels / groups) x kernel area; ``ConvTranspose2d`` as input
elements x (output channels / groups) x kernel area; ``Linear`` as output elements x input
features; and diffusers' ``Attention`` score and value products (2 x tokens^2 x inner dim per
batch item), which no layer hook sees. Not counted: biases, normalizations, activations,
pixel (un)shuffles, resampling and element-wise arithmetic (all O(elements), small next to the
products above).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kernel = module.kernel_size[0] * module.kernel_size[1]
    return output.numel() * (module.in_channels // module.groups) * kernel


def _transposed_macs(module: nn.ConvTranspose2d, inputs: torch.Tensor) -> int:
    kernel = module.kernel_size[0] * module.kernel_size[1]
    return inputs.numel() * (module.out_channels // module.groups) * kernel


def _attention_macs(module: nn.Module, inputs: torch.Tensor) -> int:
    tokens = inputs.shape[2] * inputs.shape[3] if inputs.ndim == 4 else inputs.shape[1]
    inner = cast(nn.Linear, module.to_q).out_features
    return 2 * inputs.shape[0] * tokens * tokens * inner


def _attention_type() -> type | None:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - diffusers is a receiver dependency
        return None
    return Attention


def count_macs(module: nn.Module, run: Callable[[], Any]) -> dict[str, int]:
    """MACs of ``run()`` (which must call ``module``), by kind of operation."""
    totals = {"conv": 0, "linear": 0, "attention_products": 0}
    attention = _attention_type()

    def hook(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if isinstance(layer, nn.ConvTranspose2d):
            totals["conv"] += _transposed_macs(layer, args[0])
        elif isinstance(layer, nn.Conv2d):
            totals["conv"] += _conv_macs(layer, output)
        elif isinstance(layer, nn.Linear):
            totals["linear"] += output.numel() * layer.in_features
        elif attention is not None and isinstance(layer, attention):
            totals["attention_products"] += _attention_macs(layer, args[0] if args else kwargs["hidden_states"])

    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear) + ((attention,) if attention else ())
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in module.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    totals["total"] = totals["conv"] + totals["linear"] + totals["attention_products"]
    return totals


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
