"""Which model ids this receiver accepts, and their decoders (loaded on first use).

Why lazy: the API must validate a model id on upload without loading a diffusion decoder into memory;
only the worker needs the decoder itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
from aeic.shared.decode_limits import TILE_PIXELS

__all__ = ["CodecRegistry", "DecoderLike"]


class DecoderLike(Protocol):
    """The part of the ReceiverCodec contract the service uses."""

    @property
    def model_id(self) -> bytes: ...  # read-only: a property (ReceiverCodec) or a plain attribute

    def decode_batch(self, items: list[bytes]) -> list[np.ndarray]: ...


class CodecRegistry:
    """model id -> decoder, each built once by its loader, thread-safely."""

    def __init__(self, loaders: dict[bytes, Callable[[], DecoderLike]],
                 levels: dict[bytes, int] | None = None) -> None:
        self._loaders = dict(loaders)
        self._levels = dict(levels or {})
        self._loaded: dict[bytes, DecoderLike] = {}
        self._failed: dict[bytes, str] = {}  # model id -> the type of its last load's exception
        self._lock = threading.Lock()

    @classmethod
    def from_codecs(cls, codecs: Iterable[DecoderLike]) -> CodecRegistry:
        """Wrap decoders that already exist (tests, benchmarks, an embedding application)."""
        registry = cls({})
        for codec in codecs:
            registry._loaders[bytes(codec.model_id)] = partial(_same, codec)
            registry._loaded[bytes(codec.model_id)] = codec
            package = getattr(codec, "package", None)
            if package is not None:
                registry._levels[bytes(codec.model_id)] = int(package.num_levels)
        return registry

    @classmethod
    def from_packages(cls, paths: Sequence[Path], device: str = "auto",
                      tile_pixels: int = TILE_PIXELS, dtype: str = "float32") -> CodecRegistry:
        """Read each package's manifest now; load its ReceiverCodec when first needed.

        An empty `paths` means the default shipped model directory."""
        from aeic.shared.model_package import ModelPackage, default_model_dir

        loaders: dict[bytes, Callable[[], DecoderLike]] = {}
        levels: dict[bytes, int] = {}
        for path in paths or [default_model_dir()]:
            package = ModelPackage.load(path)
            loaders[bytes(package.model_id)] = partial(_load_receiver_codec, Path(path), device, tile_pixels, dtype)
            levels[bytes(package.model_id)] = package.num_levels
        return cls(loaders, levels)

    def model_ids(self) -> frozenset[bytes]:
        """Every model id an upload may carry."""
        return frozenset(self._loaders)

    def knows(self, model_id: bytes) -> bool:
        """Whether uploads for `model_id` are accepted."""
        return bytes(model_id) in self._loaders

    def num_levels(self, model_id: bytes) -> int | None:
        """How many rate levels the model has (None when the decoder did not say)."""
        return self._levels.get(bytes(model_id))

    def get(self, model_id: bytes) -> DecoderLike:
        """The decoder for `model_id`, loading it on first use; KeyError when unknown. A load that raises is
        remembered (`load_failures`) until one succeeds, and tried again at the next call."""
        key = bytes(model_id)
        with self._lock:
            if key not in self._loaded:
                load = self._loaders[key]
                try:
                    self._loaded[key] = load()
                except Exception as exc:
                    self._failed[key] = type(exc).__name__
                    raise
                self._failed.pop(key, None)
            return self._loaded[key]

    def load_failures(self) -> dict[bytes, str]:
        """Models whose decoder failed to load at its last try, each with the exception's type: a full-profile
        package without its SD-Turbo folder, say. The receiver's configuration, not any image's fault. Without
        the lock, which a load holds for as long as it takes (a minute for SD-Turbo): a readiness probe must not
        wait for it (copying a dict is one step under the interpreter lock)."""
        return dict(self._failed)


def _same(codec: DecoderLike) -> DecoderLike:
    return codec


def _load_receiver_codec(path: Path, device: str, tile_pixels: int, dtype: str) -> DecoderLike:
    from aeic.receiver.decoder import ReceiverCodec

    codec: DecoderLike = ReceiverCodec.from_package(path, device=device, tile_pixels=tile_pixels, dtype=dtype)
    return codec
