"""A picture the encoder reads a strip of rows at a time, whether an array or the decoded file itself.

Why: a 48 MP photo decoded by Pillow is 192 MB (4 bytes a pixel) and as the HxWx3 array the codec took,
144 MB more; with the runtime's 85 MB that is over a 512 MB device's free memory at any budget. The
encoder only ever needs a few rows at a time (the analysis' strips, the header's colour statistics and
grey test), so it takes any :class:`RowSource`: an array (:class:`ArrayRows`, as the evaluation and the
camera pass) or the opened file (:class:`aeic.sender.images.UprightImage`, converted strip by strip).
numpy only: the command line's modules import this without onnxruntime.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, TypeAlias

import numpy as np


class RowSource(Protocol):
    """A picture read a strip of rows at a time: what the encoder needs of a photo, so that the photo need
    not exist whole as an array (see :class:`aeic.sender.images.UprightImage`). One that also has a
    ``release()`` method is read once by ``encode``/``encode_to_budget``, which then call it so that its
    pixels go before the analysis (:meth:`aeic.sender.encoder.SenderCodec._analyses`)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, 3), as an HxWx3 array's."""
        ...

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` (``stop`` at most the height) as (stop - start, width, 3) uint8 RGB."""
        ...


class ArrayRows:
    """An HxWx3 uint8 array as a :class:`RowSource` (its rows are views, not copies)."""

    def __init__(self, rgb: np.ndarray) -> None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got {rgb.shape} {rgb.dtype}")
        self.rgb = rgb

    @property
    def shape(self) -> tuple[int, int, int]:
        height, width, channels = self.rgb.shape
        return height, width, channels

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.rgb[start:stop]


# What the encoder takes: an HxWx3 uint8 RGB array (the evaluation's, the camera's frames) or a row source
Picture: TypeAlias = "np.ndarray | RowSource"


def as_rows(picture: Picture) -> RowSource:
    """``picture`` as a :class:`RowSource` (an array is checked to be HxWx3 uint8)."""
    return ArrayRows(picture) if isinstance(picture, np.ndarray) else picture


def row_strips(source: RowSource, rows: int) -> Iterator[np.ndarray]:
    """The source's rows, ``rows`` at a time, top to bottom."""
    height = source.shape[0]
    for top in range(0, height, rows):
        yield source.rows(top, min(top + rows, height))
