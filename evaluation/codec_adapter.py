"""AEIC's real sender and receiver as one codec object for the evaluation loop.

Encoding goes through ``aeic.sender.encoder.SenderCodec`` (ONNX + numpy entropy coder, exactly what an
edge device runs) and decoding through ``aeic.receiver.decoder.ReceiverCodec``, so every number comes from
a real bitstream that crossed the same container a device would upload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from aeic.evaluation.runner import BudgetUnreachable


def resolve_model(model: str | None) -> Path | None:
    """A model package folder from a path, or the name of a package shipped under ``aeic/models/``."""
    if model is None:
        return None
    path = Path(model)
    if path.is_dir():
        return path
    from aeic.shared.model_package import models_root

    shipped = models_root() / model
    if shipped.is_dir():
        return shipped
    raise FileNotFoundError(f"model package not found: {model} (neither a folder nor a shipped model name)")


class PackageCodec:
    """``encode``/``encode_to_budget`` on the sender, ``decode`` on the receiver, one model package."""

    def __init__(self, sender: Any, receiver: Any, package: Path | None = None) -> None:
        if sender.model_id != receiver.model_id:
            raise ValueError(
                f"sender model {sender.model_id!r} differs from receiver model {receiver.model_id!r}"
            )
        self.sender, self.receiver, self.package = sender, receiver, package

    @classmethod
    def from_package(
        cls,
        path: Path | None = None,
        provider: str | None = None,
        threads: int | None = None,
        device: str = "auto",
        downscale: int | str = "auto",
        rounding: float | str = "package",
    ) -> PackageCodec:
        from aeic.receiver.decoder import ReceiverCodec
        from aeic.sender.encoder import SenderCodec

        # a batch tool on a workstation: speed before the device's frugal heap (1.6x at 12 MP, docs/evaluation.md)
        sender = SenderCodec.from_package(path, provider=provider, threads=threads, downscale=downscale, rounding=rounding,
                                          frugal_heap=False)
        receiver = ReceiverCodec.from_package(path, device=device)
        return cls(sender, receiver, path)

    @property
    def num_levels(self) -> int:
        """How many rate indices the package has (0 .. num_levels - 1)."""
        return int(self.sender.num_levels)

    def encode(self, rgb: np.ndarray, rate_index: int) -> bytes:
        return self.sender.encode(rgb, rate_index)

    def encode_to_budget(self, rgb: np.ndarray, target_bytes: int) -> tuple[bytes, int]:
        from aeic.sender.encoder import BudgetError

        try:
            return self.sender.encode_to_budget(rgb, target_bytes)
        except BudgetError as exc:
            raise BudgetUnreachable(str(exc)) from exc

    def decode(self, data: bytes) -> np.ndarray:
        return self.receiver.decode(data)

    def info(self) -> dict[str, Any]:
        """What goes into summary.json about the codec under test."""
        return {
            "package": str(self.package) if self.package else "default",
            "model_id": bytes(self.sender.model_id).hex(),
            "sender_provider": getattr(self.sender, "provider", None),
            "sender_downscale": getattr(self.sender, "downscale", None),
            "sender_rounding": getattr(getattr(self.sender, "rounding", None), "weight", "nearest"),
            "receiver_device": str(getattr(self.receiver, "device", "")) or None,
        }
