"""Multiply-accumulate counting with torch's FLOP counter (``torch.utils.flop_counter``).

torch counts each matrix product at the operator level (a FLOP is half a MAC): convolutions (the codec's
fake-quantized ``QConv2d`` and transposed ones included), the matrix products of ``Linear`` layers, and
attention's score and value products (batched products, or fused scaled-dot-product attention), which no
layer hook sees. Not counted: biases, normalizations, activations, pixel (un)shuffles, resampling and
element-wise arithmetic (all O(elements), small next to the products above). Run on the ``meta``
device (as ``model_bench`` does), a count at any size computes and allocates nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

# the operators torch counts, by the kind of product they are here
_KINDS = {"convolution": "conv", "mm": "linear", "addmm": "linear", "bmm": "attention_products",
          "baddbmm": "attention_products"}  # fmt: skip


def _kind(operator: Any) -> str:
    """``aten.convolution`` -> ``conv``; an operator this table does not know keeps its own name."""
    name = str(operator).split(".")[1]
    return "attention_products" if "attention" in name else _KINDS.get(name, name)


def count_macs(run: Callable[[], Any]) -> dict[str, int]:
    """MACs of ``run()``, by kind of product, and their ``total``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    totals = {"conv": 0, "linear": 0, "attention_products": 0}
    for operator, flops in counter.get_flop_counts()["Global"].items():
        kind = _kind(operator)
        totals[kind] = totals.get(kind, 0) + flops // 2
    totals["total"] = sum(totals.values())
    return totals
