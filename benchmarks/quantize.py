"""int8 versions of the sender's analysis graphs (stem and trunk) with onnxruntime's quantization tools."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def dynamic_int8(source: Path, target: Path) -> Path:
    """Weights int8, activations quantized on the fly per tensor (ConvInteger): no calibration."""
    quantize_dynamic(source, target, weight_type=QuantType.QUInt8)
    return target


def first_conv(model: Path) -> list[str]:
    """The first Conv node (the one reading the image), kept in float by :func:`static_int8`.

    Quantizing it (per-tensor 8-bit input and output) moved the latent to 1.4 dB SNR against float;
    in float, with every other convolution quantized, 21 dB (symmetric int8 activations, nano-se
    25ed5240; docs/benchmarks.md).
    """
    import onnx

    convs = [node.name for node in onnx.load(str(model), load_external_data=False).graph.node if node.op_type == "Conv"]
    return convs[:1]


def static_int8(source: Path, target: Path, calibration: list[dict[str, np.ndarray]], exclude: list[str] | None = None) -> Path:
    """QDQ int8: per-channel 7-bit weights, uint8 activations calibrated (min/max) on real inputs.

    Weights in 7 bits (``reduce_range``) because on CPUs without VNNI (AVX2, like this machine)
    onnxruntime's uint8 x int8 products go through 16-bit intermediate sums that saturate with full
    8-bit weights. Measured on nano-se's analysis (1080p calibration, first conv in float; latent
    SNR against float / bytes / 1080p analysis time on one thread): 7-bit weights 22 dB / +1.7 % /
    0.65x float, uint8 weights 22 dB / +2.0 % / 0.97x float, symmetric int8 activations 21 dB /
    +2.6 % / 1.2x float; full 8-bit weights 13 dB (previous package). ``exclude`` names nodes kept
    in float (default: :func:`first_conv`).
    """
    prepared = target.with_suffix(".prep.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(prepared, target, _Feeds(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=first_conv(source) if exclude is None else exclude)
    prepared.unlink()
    return target
