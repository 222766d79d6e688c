"""Turn one RGB image into a bitstream at the requested rate or byte budget, timed.

Why here and not in the CLI: the encode commands, the folder watcher and the camera all
need the same step with the same summary numbers (bytes, bits per pixel, encode time).
The codec itself (ONNX session, entropy model, rANS, rate control) is
:class:`aeic.sender.encoder.SenderCodec`; this module only calls it through its contract.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from aeic.sender.rows import Picture, as_rows
from aeic.sender.spool import idempotency_key


class Codec(Protocol):
    """The part of ``SenderCodec`` the sender uses."""

    def encode(self, rgb: Picture, rate_index: int) -> bytes: ...
    def encode_to_budget(self, rgb: Picture, target_bytes: int) -> tuple[bytes, int]: ...


@dataclass(frozen=True)
class RateControl:
    """Either a fixed rate index or a byte budget (the codec picks the best rate that fits)."""

    rate: int | None = None
    target_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.target_bytes is None):
            raise ValueError("give exactly one of a rate index or a byte budget")


@dataclass(frozen=True)
class Encoded:
    """A bitstream and the numbers the per-image summary line reports."""

    data: bytes
    rate_index: int
    width: int
    height: int
    encode_ms: float

    @property
    def bpp(self) -> float:
        return len(self.data) * 8 / (self.width * self.height)

    @property
    def key(self) -> str:
        return idempotency_key(self.data)


def encode_image(codec: Codec, rgb: Picture, control: RateControl) -> Encoded:
    """Encode with the codec; raises the codec's ``BudgetError`` if no rate fits the budget. ``rgb``: an HxWx3
    uint8 array, or a photo read from its file by :func:`aeic.sender.images.open_image` (never whole in memory)."""
    height, width, _ = as_rows(rgb).shape
    start = time.perf_counter()
    if control.rate is not None:
        data, rate_index = codec.encode(rgb, control.rate), control.rate
    else:
        assert control.target_bytes is not None  # RateControl holds exactly one of the two
        data, rate_index = codec.encode_to_budget(rgb, control.target_bytes)
    elapsed_ms = (time.perf_counter() - start) * 1000.0
    return Encoded(bytes(data), int(rate_index), width, height, elapsed_ms)
