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


def photo_feeds(images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Stem inputs: RGB photos as (1, 3, H, W) floats in [0, 1]."""
    return [{"image": np.ascontiguousarray(im.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0} for im in images]


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def dynamic_int8(source: Path, target: Path) -> Path:
    """Weights int8, activations quantized on the fly per tensor (ConvInteger): no calibration."""
    quantize_dynamic(source, target, weight_type=QuantType.QUInt8)
    return target


def static_int8(source: Path, target: Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    """QDQ int8 with per-channel weights, activation ranges calibrated (min/max) on real inputs."""
    prepared = target.with_suffix(".prep.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(prepared, target, _Feeds(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()
    return target
