"""The analysis transform in bounded memory: the stem and the trunk in tiles (strips of rows, cut into columns).

At 1080p the first analysis stages hold hundreds of megabytes of activations (stage 1 expands
32 channels to 128 at half resolution). The stem graph (image -> features at 1/``factor``) is
therefore run on strips of ``strip_rows`` image rows plus ``halo`` rows above and below, the halo
covering the stem's receptive field, and only each strip's interior is kept. A strip wider than
``stem_cells`` allows is cut into tiles of columns with the same halo at their sides (a whole strip
4,096 columns wide held 226 MB of activations). Tiles start on multiples of ``factor`` so the
pixel-unshuffle phases line up with the whole image's: the features are bit for bit those of the
whole-image stem (onnxruntime's graph; against torch's, float rounding apart).

The trunk (features -> latent) is convolution-only too, and whole it is what a large coded picture
cannot afford: a 4000x3000 picture coded whole has 192 MB of features and the trunk holds about 3.5
times its input on top (over 1 GB in all, against a service capped at 768 MB). So it runs in strips
of feature rows as well, with its own halo (:func:`trunk_tiling`), fed from the stem strip by strip:
no whole-picture features exist, only the rows one trunk strip reads. Its strips are sized by
feature cells (``trunk_cells``: rows x width, halos included), so a small picture still runs the trunk in
one piece. On a wide picture a strip of the whole width keeps few rows besides its halos (or none), so the
features are cut into bands of columns (:meth:`TiledAnalysis.bands`), each run top to bottom in its own
strips with the trunk's halo at its sides too; the stem runs again on the columns two bands share, and the
count of bands is the one of least estimated CPU. With the full halo every latent value comes out bit for
bit as from the whole trunk (onnxruntime's convolutions compute each output from the same inputs in the
same order; checked in ``tests/test_sender_memory.py``), so the streams are byte-identical to the
whole-trunk ones.

The coded picture (the photo reduced by the coding downscale and edge-padded to the latent grid) is made
strip by strip as well (:class:`CodedPicture`): whole, reducing a 48 MP photo took about 550 MB on top of
the photo (a padded copy and its sums in 32 bits), and the padded picture stayed alive through the analysis.
Its photo rows come from a :class:`RowSource`: an array, or the decoded file itself
(:class:`aeic.sender.images.UprightImage`; :mod:`aeic.sender.rows`), so a 48 MP photo need not exist as an HxWx3 array (144 MB)
besides Pillow's decoded picture (192 MB).

Peak memory is then the largest of the phases (a strip, the trunk, the entropy model) only if
freed tensors really go back to the system: :func:`limit_heap_retention` sees to that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
from aeic.shared.padding import downscale_image, padded_size

from .rows import Picture, as_rows

DEFAULT_STRIP_ROWS = 192  # the halos add ~1.3x stem work at 1080p
# Image pixels a stem tile reads, halos included: 264 rows of 1,488 columns, ~90 MB of activations (measured
# 224 bytes a pixel); a 1080p strip is two tiles. Narrower tiles ran no slower: the stem of a 4096x3072 picture
# took 9.7 s of CPU in strips of the whole width, 8.5 s in tiles of 2,048 columns and 8.1 s of 1,024.
DEFAULT_STEM_CELLS = 384 * 1024
# Feature cells (rows x width) a trunk strip reads, halos included: 128 Ki cells are 32 MB of input and 112 MB of
# trunk activations (896 bytes a cell). A 12 MP photo coded whole (features 1024 wide) runs in 3 bands of strips of
# 96-152 rows; with 256 Ki cells in whole-width strips of 96 rows it peaked at 465 MB, now about 310 MB, for more
# CPU (the halos, the stem's overlaps: docs/sender.md, Peak memory). 1080p coded whole (480 x 272 cells) is one strip.
DEFAULT_TRUNK_CELLS = 128 * 1024
# CPU of a stem output cell (16 pixels of stem work, one feature cell) against a trunk input cell, from the stem's
# and the trunk's CPU on a 4000x3000 picture: 0.45 us a stem pixel with its halos, 5.7 us a trunk cell whole.
STEM_CELL_COST = 1.3
BAND = 11  # the depthwise band's length in the analysis' star blocks (aeic.codec.analysis.BAND)
MMAP_THRESHOLD = 1 << 20
PHOTO_ROWS = 256  # photo rows read and reduced at a time for a downscaled coded picture (:class:`CodedPicture`)
FAST_MMAP_THRESHOLD, FAST_TRIM_THRESHOLD = 64 << 20, 256 << 20  # :func:`favour_heap_speed`
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def trunk_tiling(analysis_config: dict[str, Any], stem_factor: int) -> tuple[int, int]:
    """(factor, halo) of the trunk, in feature rows, from the manifest's analysis config.

    The stages after the stem, at feature scale ``s`` = 1, 2, 4, ..., each reach ``s`` rows with their
    3x3 convolution and ``2 s * (BAND // 2)`` per star block (the rule of ``aeic.codec.export.stem_tiling``);
    the halo is that reach rounded up to the trunk's downsampling factor, so strips keep its unshuffle phases.
    """
    stages = len(analysis_config["widths"]) - (stem_factor.bit_length() - 1)
    factor = 2**stages
    reach = sum(2**s * (1 + 2 * int(analysis_config["blocks_per_stage"]) * (BAND // 2)) for s in range(stages))
    return factor, -(-reach // factor) * factor


def strips(height: int, rows: int, halo: int) -> list[tuple[int, int, int, int]]:
    """``(top, bottom, start, stop)`` per strip of ``rows``: the rows kept, and the rows run with the halo."""
    return spans(0, height, rows, halo, height)


def spans(first: int, last: int, size: int, halo: int, limit: int) -> list[tuple[int, int, int, int]]:
    """``(top, bottom, start, stop)`` per span of ``size`` from ``first`` to ``last``: kept, and read with the halo
    (within 0 to ``limit``)."""
    bounds = []
    for top in range(first, last, size):
        bottom = min(top + size, last)
        bounds.append((top, bottom, max(top - halo, 0), min(bottom + halo, limit)))
    return bounds


class CodedPicture:
    """``rgb`` reduced by ``downscale`` and edge-padded to ``multiple``: the picture the analysis codes, as
    ``pad_to_multiple(downscale_image(rgb, downscale), multiple)`` would give it whole, made a few rows at a time.

    A strip of coded rows needs only its own photo rows (the box filter's blocks do not straddle strips),
    and padding replicates the last row and column, so every row equals the whole picture's.
    """

    def __init__(self, rgb: Picture, downscale: int = 1, multiple: int = 1) -> None:
        self.source, self.downscale = as_rows(rgb), downscale
        photo_height, photo_width, _ = self.source.shape
        self.photo_height = photo_height
        self.coded_height, self.coded_width = -(-photo_height // downscale), -(-photo_width // downscale)
        self.height, self.width = padded_size(self.coded_height, self.coded_width, multiple)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` (h, width, 3) uint8."""
        first = min(start, self.coded_height - 1)  # a strip wholly in the padding repeats the last row
        last = min(stop, self.coded_height)
        coded = self._coded(first, last)
        rows = np.minimum(np.arange(start, stop), self.coded_height - 1) - first
        return np.pad(coded[rows], ((0, 0), (0, self.width - self.coded_width), (0, 0)), mode="edge")


    def reduced(self) -> np.ndarray:
        """The whole photo reduced by the downscale, unpadded: what the encoder keeps of a photo it releases."""
        return self._coded(0, self.coded_height)

    def _coded(self, first: int, last: int) -> np.ndarray:
        """Coded rows ``first`` to ``last``, reduced from :data:`PHOTO_ROWS` photo rows at a time: a stem strip of a
        48 MP photo coded at 1/4 spans 1,056 photo rows, 85 MB as Pillow's strip, its array and its padded copy."""
        scale = self.downscale
        coded = np.empty((last - first, self.coded_width, 3), np.uint8)
        step = max(PHOTO_ROWS // scale, 1)
        for top in range(first, last, step):
            bottom = min(top + step, last)
            photo_rows = self.source.rows(top * scale, min(bottom * scale, self.photo_height))
            coded[top - first : bottom - first] = downscale_image(photo_rows, scale)
        return coded


class TiledAnalysis:
    """Coded picture (H, W multiples of 32) -> latent (1, C, H/32, W/32) float32."""

    def __init__(self, stem: ort.InferenceSession, trunk: ort.InferenceSession, factor: int, halo: int,
                 trunk_factor: int, trunk_halo: int, strip_rows: int = DEFAULT_STRIP_ROWS,
                 trunk_cells: int = DEFAULT_TRUNK_CELLS, stem_cells: int = DEFAULT_STEM_CELLS) -> None:
        if strip_rows <= 0 or strip_rows % factor or halo % factor:
            raise ValueError(f"strip rows ({strip_rows}) and halo ({halo}) must be positive multiples of {factor}")
        if trunk_halo % trunk_factor:
            raise ValueError(f"the trunk's halo ({trunk_halo}) must be a multiple of its factor ({trunk_factor})")
        self.stem, self.trunk = stem, trunk
        self.factor, self.halo, self.strip_rows = factor, halo, strip_rows
        self.trunk_factor, self.trunk_halo, self.trunk_cells = trunk_factor, trunk_halo, trunk_cells
        self.stem_cells = stem_cells

    def __call__(self, rgb: Picture, downscale: int = 1, multiple: int = 1) -> np.ndarray:
        """The latent of ``rgb`` (H, W, 3) uint8 coded at 1/``downscale``, padded to ``multiple`` (:class:`CodedPicture`)."""
        picture = CodedPicture(rgb, downscale, multiple)
        height, width = picture.height // self.factor, picture.width // self.factor
        latent: np.ndarray | None = None
        for left, right, start, stop in self.bands(height, width):
            band = self._band_latent(picture, start, stop)
            if latent is None:
                latent = np.empty((1, band.shape[1], band.shape[2], width // self.trunk_factor), np.float32)
            skip = (left - start) // self.trunk_factor
            latent[:, :, :, left // self.trunk_factor : right // self.trunk_factor] = band[:, :, :, skip : skip + (right - left) // self.trunk_factor]
            del band  # not held through the next band
        if latent is None:
            raise ValueError("an image of no rows has no latent")
        return latent

    def _band_latent(self, picture: CodedPicture, first: int, last: int) -> np.ndarray:
        """The latent of feature columns ``first`` to ``last`` (a band, halos included), its trunk run in strips of rows."""
        height, width = picture.height // self.factor, last - first
        rows = _FeatureRows(self, picture, first, last)
        latent: np.ndarray | None = None
        features, covered = None, (0, 0)  # the last trunk strip's input and its feature rows
        for top, bottom, start, stop in strips(height, self.trunk_rows(width, height), self.trunk_halo):
            strip_input = np.empty((1, rows.channels, stop - start, width), np.float32)
            reused = max(covered[1] - start, 0)  # the halo rows both strips read, computed once
            if features is not None and reused:
                strip_input[:, :, :reused] = features[:, :, start - covered[0] :]
            features = None  # before the stem runs again
            rows.take(strip_input[:, :, reused:])
            (strip,) = self.trunk.run(["latent"], {"features": strip_input})
            features, covered = strip_input, (start, stop)
            if latent is None:
                latent = np.empty((1, strip.shape[1], height // self.trunk_factor, strip.shape[3]), np.float32)
            skip = (top - start) // self.trunk_factor
            latent[:, :, top // self.trunk_factor : bottom // self.trunk_factor] = strip[:, :, skip : skip + (bottom - top) // self.trunk_factor]
            del strip
        if latent is None:
            raise ValueError("an image of no rows has no latent")
        return latent

    def trunk_rows(self, width: int, height: int) -> int:
        """Feature rows a trunk strip keeps on features ``width`` x ``height``: at least one latent row."""
        return max(self._trunk_rows(width, height), self.trunk_factor)

    def _trunk_rows(self, width: int, height: int) -> int:
        """All ``height`` rows when they fit in ``trunk_cells`` (one strip, no halos), else ``trunk_cells`` less the halos."""
        if width * height <= self.trunk_cells:
            return height
        return (self.trunk_cells // max(width, 1) - 2 * self.trunk_halo) // self.trunk_factor * self.trunk_factor

    def bands(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """``(left, right, start, stop)`` feature columns per band the trunk runs on in turn, kept and read.

        A trunk strip of the whole width keeps only ``trunk_cells / width`` rows less its halos (80 rows above and
        below with the shipped model): on a wide picture it keeps few rows, or none, and its halos are most of the
        work. Bands of columns, each with the halo at its sides, keep more rows per strip but run the stem again
        on the overlaps. The count taken is the one of least estimated CPU (:data:`STEM_CELL_COST`) among
        those whose strips keep at least one latent row within ``trunk_cells``.
        """
        best: tuple[float, list[tuple[int, int, int, int]]] | None = None
        fitting = False
        for count in range(1, max(width // self.trunk_factor, 1) + 1):
            size = -(-width // count // self.trunk_factor) * self.trunk_factor if width >= self.trunk_factor else width
            if count > 1 and size * (count - 1) >= width:
                continue  # fewer bands than asked for: a count already tried
            columns = strips(width, size, self.trunk_halo)
            fits = all(self._trunk_rows(stop - start, height) >= min(height, self.trunk_factor) for _, _, start, stop in columns)
            if fitting and not fits:
                continue
            cost = sum(self._band_cost(height, width, start, stop) for _, _, start, stop in columns)
            if best is None or (fits and not fitting) or cost < best[0]:
                best, fitting = (cost, columns), fitting or fits
        return best[1] if best is not None else []

    def _band_cost(self, height: int, width: int, start: int, stop: int) -> float:
        """Estimated CPU of one band, in trunk cells: those its trunk strips read, and the stem's output it computes."""
        rows = self.trunk_rows(stop - start, height)
        trunk = sum(bottom - top for _, _, top, bottom in strips(height, rows, self.trunk_halo))
        halo = self.halo // self.factor
        stem = min(stop + halo, width) - max(start - halo, 0)
        return trunk * (stop - start) + STEM_CELL_COST * stem * height

    def strips(self, height: int) -> list[tuple[int, int, int, int]]:
        """The stem's strips of an image ``height`` rows tall (see :func:`strips`)."""
        return strips(height, self.strip_rows, self.halo)

    def stem_columns(self) -> int:
        """Image columns a stem tile keeps: ``stem_cells`` over a strip's rows less the halos, a multiple of the factor."""
        columns = (self.stem_cells // (self.strip_rows + 2 * self.halo) - 2 * self.halo) // self.factor * self.factor
        return max(columns, self.factor)

    def features(self, rgb: np.ndarray) -> np.ndarray:
        """The stem's output for the whole image (the trunk's input): for calibrating the trunk on whole pictures."""
        picture = CodedPicture(rgb)
        rows = _FeatureRows(self, picture, 0, picture.width // self.factor)
        features = np.empty((1, rows.channels, rgb.shape[0] // self.factor, rgb.shape[1] // self.factor), np.float32)
        rows.take(features)
        return features

    def stem_rows(self, picture: CodedPicture, first: int, last: int) -> Iterator[np.ndarray]:
        """The stem's output at feature columns ``first`` to ``last``, one strip's interior (1, C, rows, last - first)
        after another, each strip run in tiles of :meth:`stem_columns` (a strip of 4000 columns whole held 226 MB)."""
        factor = self.factor
        tiles = -(-(last - first) * factor // self.stem_columns())  # as many as it takes, of even widths
        size = -(-(last - first) // tiles) * factor if tiles else factor
        columns = spans(first * factor, last * factor, size, self.halo, picture.width)
        for top, bottom, start, stop in self.strips(picture.height):
            image = picture.rows(start, stop)
            out: np.ndarray | None = None
            for left, right, begin, end in columns:
                (tile,) = self.stem.run(["features"], {"image": to_float(image[:, begin:end])})
                if out is None:
                    out = np.empty((1, tile.shape[1], (bottom - top) // factor, last - first), np.float32)
                row, column = (top - start) // factor, (left - begin) // factor
                out[:, :, :, left // factor - first : right // factor - first] = tile[
                    :, :, row : row + (bottom - top) // factor, column : column + (right - left) // factor]
                del tile  # before the next tile's activations
            del image
            assert out is not None
            yield out


class _FeatureRows:
    """The stem's feature rows in order, each computed once, as the trunk strips ask for them."""

    def __init__(self, analysis: TiledAnalysis, picture: CodedPicture, first: int, last: int) -> None:
        if picture.height == 0:
            raise ValueError("an image of no rows has no features")
        self._strips = analysis.stem_rows(picture, first, last)
        self._pending: np.ndarray | None = next(self._strips)  # rows computed, not yet taken
        self.channels = self._pending.shape[1]

    def take(self, out: np.ndarray) -> None:
        """Fill ``out`` (1, C, n, W) with the next n rows."""
        filled = 0
        while filled < out.shape[2]:
            if self._pending is None:
                self._pending = next(self._strips)
            count = min(out.shape[2] - filled, self._pending.shape[2])
            out[:, :, filled : filled + count] = self._pending[:, :, :count]
            filled += count
            self._pending = self._pending[:, :, count:] if count < self._pending.shape[2] else None


def to_float(rgb: np.ndarray) -> np.ndarray:
    """(h, W, 3) uint8 -> (1, 3, h, W) float32 in [0, 1], one strip at a time."""
    image = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)
    image /= 255.0
    return image


def limit_heap_retention() -> None:
    """Serve allocations above 1 MiB from their own mappings, returned to the system when freed.

    glibc raises its mmap threshold up to 32 MB after large frees and then serves tensors of a
    few megabytes from the heap, which it keeps: strip after strip the process would grow by
    what earlier phases freed (measured: about 400 MB at 1080p instead of about 260 MB). Setting
    the threshold fixes it (and stops the adjustment). Process-wide, once; a no-op without glibc.
    """
    _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def favour_heap_speed() -> None:
    """The opposite trade, for batch tools on a workstation (``aeic eval``): keep freed memory for reuse
    instead of mapping every buffer afresh. With the 1 MiB threshold each band and strip buffer page-faults
    anew: an eval of a 12 MP photo at one budget took 116-118 s, 62 s of it in the kernel; with these
    thresholds 71-75 s (14-18 s kernel), peak 2.6-3.2 GB instead of 2.2, the same scores (docs/evaluation.md).
    Process-wide; a no-op without glibc."""
    _mallopt(_M_MMAP_THRESHOLD, FAST_MMAP_THRESHOLD)
    _mallopt(_M_TRIM_THRESHOLD, FAST_TRIM_THRESHOLD)


def _mallopt(parameter: int, value: int) -> None:
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return
    if mallopt is not None:
        mallopt(parameter, value)
