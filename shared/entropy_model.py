"""The deterministic entropy model: integer hyper-synthesis and 4-step spatial-channel context.

Both sides must derive *identical* means and scale indices from the decoded symbols, or the rANS
stream desynchronises. Everything here is therefore integer arithmetic on a fixed-point grid:

* every activation is an integer in units of ``2**-FRACTION_BITS`` (the hyper-latent ``z`` in
  units of 1), clamped to a 16-bit range;
* a layer is a convolution with int8 weights and integer bias, evaluated in float64 (products and
  partial sums stay below 2**53, so any summation order on any device gives the exact integer),
  then rescaled per output channel by a power of two with round-half-up, then clamped (the numpy
  backend stores the clamped integers as float32 where the clamp range allows it exactly);
* the last context layer emits, per latent channel, the mean (fixed point) and the index of the
  Gaussian scale table (an integer in ``[0, NUM_SCALES)``).

The latent is coded in four steps. With channel group ``g`` (four equal groups) and spatial phase
``p`` of the 2x2 grid, step ``t`` codes the elements whose phase is ``(g + t) % 4``; its context
network sees the hyper features and every element decoded in earlier steps.

Convolutions run on a :class:`ConvBackend`: numpy here (sender), torch on the receiver.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .entropy_coding import CdfTables, SymbolDecoder, SymbolEncoder

FRACTION_BITS = 6
ACTIVATION_LIMIT = (1 << 15) - 1
NUM_STEPS = 4
NUM_SCALES = 64
SCALE_MIN = 0.11
SCALE_MAX = 64.0
LATENT_LIMIT = 1 << 20  # |y| beyond this is an encoder failure, reported, never clipped
EXACT_LIMIT = 1 << 53  # float64 represents every integer below this exactly
Z_LIMIT = 1 << 31  # the largest |z| a payload can carry (an escape holds a 32-bit zigzag code)
BAND_BYTES = 4 << 20  # the float64 tap products NumpyBackend holds at once
FLOAT32_EXACT = 1 << 24  # float32 represents every integer up to this exactly
ROUNDING_CHUNK = 1 << 16  # latent elements rounded at once by EntropyModel.encode


def scale_table() -> np.ndarray:
    """The Gaussian scales indexed by the context model (float64, log-spaced)."""
    return np.exp(np.linspace(np.log(SCALE_MIN), np.log(SCALE_MAX), NUM_SCALES))


@dataclass(frozen=True, eq=False)
class IntConv:
    """One integer convolution: ``clamp(round(conv(x, weight) + bias) * 2**-shift), lo, hi)``."""

    weight: np.ndarray  # (Cout, Cin, k, k) int8 range
    bias: np.ndarray  # (Cout,) integers
    shift: np.ndarray  # (Cout,) power-of-two rescale, may be negative
    lo: np.ndarray  # (Cout,)
    hi: np.ndarray  # (Cout,)

    @property
    def kernel_size(self) -> int:
        return int(self.weight.shape[-1])


@dataclass(frozen=True)
class PixelShuffle:
    """Depth-to-space by ``factor`` (an exact reordering)."""

    factor: int


Layer = IntConv | PixelShuffle


class Rounding(Protocol):
    def __call__(self, residual: np.ndarray, indices: np.ndarray, tables: CdfTables) -> np.ndarray:
        """Integer symbols for ``residual`` (latent minus mean, in bins), coded with tables ``indices``.

        Element by element: the encoder hands it only the elements one step codes, flattened.
        """


def nearest_rounding(residual: np.ndarray, indices: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Round half up: the least squared error, whatever the bits."""
    return np.floor(residual + 0.5).astype(np.int64)


class ConvBackend(Protocol):
    def conv(self, x: np.ndarray, layer: IntConv) -> np.ndarray:
        """``x`` is (C, H, W) of integers; returns (Cout, H, W) integers after rescale and clamp."""


def requantize(acc: np.ndarray, layer: IntConv) -> np.ndarray:
    """Power-of-two rescale with round-half-up, then clamp, in place on ``acc`` (Cout, ...); exact in float64."""
    per_channel = (-1,) + (1,) * (acc.ndim - 1)
    acc *= np.ldexp(1.0, -layer.shift.astype(np.int64)).reshape(per_channel)
    acc += 0.5
    np.floor(acc, out=acc)
    return np.clip(acc, layer.lo.reshape(per_channel), layer.hi.reshape(per_channel), out=acc)


def storage_dtype(layer: IntConv) -> type[np.floating]:
    """float32 where every output of ``layer`` (an integer within its clamp range) is exact in it, else float64.

    Half the memory for the same integers: the context's 512 output channels of a 12 MP picture are 50 MB
    in float64.
    """
    bound = max(abs(int(v)) for v in (*layer.lo.tolist(), *layer.hi.tolist()))
    return np.float32 if bound <= FLOAT32_EXACT else np.float64


class NumpyBackend:
    """The sender's backend: per band of input rows, one float64 product gives every kernel tap at once.

    The weight laid out as (tap, out, in) times the band's pixels (in, pixels) is each tap's
    contribution at each input pixel; each tap's block is then added, shifted, into the output.
    One product per band instead of one per tap, and no shifted copies of the (wider) input: the
    same exact integers, since every partial sum is a sum of some of the products plus the bias,
    at most ``accumulator_bound`` < 2**53 in any order. Bands bound the working set to about
    ``band_bytes`` of products however large the image (a Pi's memory). Input channels that are
    zero over a band are left out of its product (they add exactly nothing), and where that
    differs enough between the pixels of a 2x2 grid (the context of a step is zero where the
    steps that decode it have not run yet), each of the four pixels is its own product.

    Only the output rows a band can still reach are accumulated (a window of the band's rows and
    the kernel's reach); rows the band completes are rescaled, clamped and stored in the layer's
    :func:`storage_dtype`, so a layer holds its output and a band's worth of float64, not a
    float64 copy of its output with padding.

    The weights, inputs, products and window of a band go in buffers kept between calls (one set per
    thread): with the sender's allocator settings (:func:`aeic.sender.tiled_analysis.limit_heap_retention`)
    every fresh array over 1 MiB is new pages, which cost more to fault in than the products
    take. Keep an instance for a run of encodes (the rate levels of one image); the buffers go
    with it.
    """

    def __init__(self, band_bytes: int = BAND_BYTES) -> None:
        self.band_bytes = band_bytes
        self._local = threading.local()

    def conv(self, x: np.ndarray, layer: IntConv) -> np.ndarray:
        x = np.asarray(x)
        channels, h, w = x.shape
        k, outputs, r = layer.kernel_size, layer.weight.shape[0], layer.kernel_size // 2
        taps = layer.weight.transpose(2, 3, 0, 1).reshape(k * k * outputs, channels)
        stride = _grid_stride(x)
        rows_per_band = stride * max(1, self.band_bytes // (8 * len(taps) * max(w, 1)))
        out = np.empty((outputs, h, w), dtype=storage_dtype(layer))
        # window row j: the sums of output row start - r + j (the padded accumulator's row start + j)
        window = self._buffer("window", (outputs, min(rows_per_band, h) + 2 * r, w + 2 * r))
        window[:] = layer.bias[:, None, None]
        for start in range(0, h, rows_per_band):
            stop = min(start + rows_per_band, h)
            for row, col in np.ndindex(stride, stride):
                tile = x[:, start + row : stop : stride, col::stride]
                self._add_taps(window, taps, tile, slice(row, stop - start, stride), slice(col, w, stride), k)
            top, bottom = max(0, start - r), h if stop == h else stop - r  # the output rows this band completes
            if bottom > top:
                out[:, top:bottom] = requantize(window[:, top - start + r : bottom - start + r, r : r + w], layer)
            window[:, : 2 * r] = window[:, stop - start : stop - start + 2 * r]  # partial sums of the next rows
            window[:, 2 * r :] = layer.bias[:, None, None]
        return out

    def _add_taps(self, acc: np.ndarray, taps: np.ndarray, tile: np.ndarray, rows: slice, cols: slice, k: int) -> None:
        """Add each tap's products over ``tile`` (the input at ``rows``, ``cols``) into ``acc`` (padded by 2 k div 2)."""
        used = np.flatnonzero(np.any(tile != 0, axis=(1, 2)))
        if used.size == 0:
            return
        weight = self._buffer("weight", (len(taps), used.size))
        weight[...] = taps if used.size == taps.shape[1] else taps[:, used]
        inputs = tile
        if used.size < len(tile) or not tile.flags.c_contiguous or tile.dtype != np.float64:
            inputs = self._buffer("inputs", (used.size, *tile.shape[1:]))
            inputs[...] = tile if used.size == len(tile) else tile[used]
        products = self._buffer("products", (len(taps), inputs[0].size))
        np.matmul(weight, inputs.reshape(used.size, -1), out=products)
        by_tap = products.reshape(k, k, -1, *tile.shape[1:])
        edge = 2 * (k // 2)
        for dy, dx in np.ndindex(k, k):
            target_rows = slice(rows.start + edge - dy, rows.stop + edge - dy, rows.step)
            target_cols = slice(cols.start + edge - dx, cols.stop + edge - dx, cols.step)
            acc[:, target_rows, target_cols] += by_tap[dy, dx]

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 array of ``shape`` in the buffer ``name``, grown when too small.

        Never under ``band_bytes``: a buffer that size is a mapping of its own, which goes back to the
        system with the backend, where a small one would be left in the heap between larger blocks.
        """
        buffers, size = vars(self._local), math.prod(shape)
        if name not in buffers or buffers[name].size < size:
            buffers[name] = np.empty(max(size, self.band_bytes // 8))
        return buffers[name][:size].reshape(shape)


def _grid_stride(x: np.ndarray) -> int:
    """2 (each pixel of the 2x2 grid its own products) where zero channels at least halve the work, else 1.

    Four products over a quarter of the pixels each cost more per operation than one: worth it
    for the context of the second step (half its channels are zero on each pixel of the grid).
    """
    grid = [x[:, row::2, col::2] for row, col in np.ndindex(2, 2)]
    nonzero = np.stack([np.any(pixels != 0, axis=(1, 2)) for pixels in grid])
    work = sum(int(used.sum()) * math.prod(pixels.shape[1:]) for used, pixels in zip(nonzero, grid, strict=True))
    return 2 if 2 * work <= int(np.any(nonzero, axis=0).sum()) * math.prod(x.shape[1:]) else 1


def pixel_shuffle(x: np.ndarray, factor: int) -> np.ndarray:
    c, h, w = x.shape
    out = x.reshape(c // factor**2, factor, factor, h, w).transpose(0, 3, 1, 4, 2)
    return out.reshape(c // factor**2, h * factor, w * factor)


def accumulator_bound(layers: list[Layer], input_limit: int) -> tuple[int, int]:
    """(the largest magnitude any partial sum of ``layers`` can reach, the bound of its output).

    With every input in ``[-input_limit, input_limit]``, a partial sum of output channel ``o`` is
    at most ``|bias[o]| + sum |weight[o]| * input_limit`` in magnitude, whatever the summation order;
    each later layer sees the clamp range of the one before.
    """
    worst, limit = 0, int(input_limit)
    for layer in layers:
        if isinstance(layer, PixelShuffle):
            continue
        weight_sums = np.abs(layer.weight.astype(np.int64)).reshape(layer.weight.shape[0], -1).sum(1)
        for weight_sum, bias in zip(weight_sums.tolist(), layer.bias.tolist(), strict=True):
            worst = max(worst, abs(int(bias)) + int(weight_sum) * limit)
        limit = max(abs(int(v)) for v in (*layer.lo.tolist(), *layer.hi.tolist()))
    return worst, limit


def run_network(layers: list[Layer], x: np.ndarray, backend: ConvBackend) -> np.ndarray:
    for layer in layers:
        x = pixel_shuffle(x, layer.factor) if isinstance(layer, PixelShuffle) else backend.conv(x, layer)
    return x


def step_mask(step: int, channels: int, height: int, width: int) -> np.ndarray:
    """(C, H, W) booleans: the latent elements step ``step`` codes (phase ``(group + step) % 4``)."""
    rows, cols = np.ogrid[:height, :width]
    phase = np.array([[0, 1], [3, 2]])[rows % 2, cols % 2]  # 2x2 phases in a cycle
    group = (np.arange(channels) * NUM_STEPS) // channels
    return phase[None, :, :] == ((group + step) % NUM_STEPS)[:, None, None]


def step_masks(channels: int, height: int, width: int) -> np.ndarray:
    """(NUM_STEPS, C, H, W) booleans: which latent elements each step codes."""
    return np.stack([step_mask(step, channels, height, width) for step in range(NUM_STEPS)])


@dataclass(frozen=True, eq=False)
class EntropyModel:
    """Integer hyperprior + context model with its frozen CDF tables."""

    hyper_synthesis: list[Layer]
    context: list[list[Layer]]  # one network per step
    z_tables: CdfTables
    y_tables: CdfTables
    latent_channels: int

    def __post_init__(self) -> None:
        bound = self.accumulator_bound()
        if bound >= EXACT_LIMIT:
            raise ValueError(
                f"integer entropy model is not exact: a partial sum may reach {bound} >= 2**53 "
                "(weights, biases or clamp ranges too large)"
            )

    def accumulator_bound(self) -> int:
        """The largest |partial sum| of any convolution, for any payload (decoded z up to Z_LIMIT)."""
        hyper, feature_limit = accumulator_bound(self.hyper_synthesis, Z_LIMIT)
        context_input = max(feature_limit, ACTIVATION_LIMIT)  # the decoded latent is clipped to this
        return max([hyper, *(accumulator_bound(step, context_input)[0] for step in self.context)])

    def _means_and_indices(
        self, step: int, features: np.ndarray, decoded: np.ndarray, backend: ConvBackend
    ) -> tuple[np.ndarray, np.ndarray]:
        context = np.clip(decoded, -ACTIVATION_LIMIT, ACTIVATION_LIMIT)
        out = run_network(self.context[step], np.concatenate([features, context]), backend)
        return out[: self.latent_channels], out[self.latent_channels :].astype(np.int64)

    def encode(self, y: np.ndarray, z: np.ndarray, backend: ConvBackend | None = None,
               rounding: Rounding = nearest_rounding) -> tuple[bytes, np.ndarray]:
        """Code the scaled latent ``y`` (C, h, w) and hyper-latent ``z``; returns payload and ŷ (fixed point).

        ``rounding`` picks each symbol from its residual; it is the encoder's choice alone (any
        symbols decode), so a sender may trade error for bits without changing the format.
        """
        backend = backend or NumpyBackend()
        if not np.all(np.isfinite(y)) or np.abs(y).max(initial=0) > LATENT_LIMIT:
            raise ValueError("latent out of the codable range (non-finite or too large)")
        encoder = SymbolEncoder()
        z_symbols = np.floor(np.asarray(z, dtype=np.float64) + 0.5).astype(np.int64)
        encoder.add(z_symbols, self._z_indices(z_symbols.shape), self.z_tables)
        features = run_network(self.hyper_synthesis, z_symbols.astype(np.float64), backend)
        latent = np.asarray(y)  # only each step's elements are made float64 (exact from any float)
        decoded = np.zeros(y.shape, dtype=np.float64)
        # what _means_and_indices builds each step, kept up to date; the features' dtype holds the
        # clipped ŷ exactly (a 16-bit range)
        inputs = np.zeros((len(features) + len(y), *y.shape[1:]), dtype=features.dtype)
        inputs[: len(features)] = features
        context = inputs[len(features) :]
        del features
        for step in range(NUM_STEPS):
            mask = step_mask(step, *y.shape)
            out = run_network(self.context[step], inputs, backend)
            means = out[: self.latent_channels][mask].astype(np.float64)
            indices = out[self.latent_channels :][mask].astype(np.int64)
            del out  # before the rounding's temporaries
            symbols = self._round(latent[mask], means, indices, rounding)
            encoder.add(symbols, indices, self.y_tables)
            decoded[mask] = self._dequantize(symbols, means)
            context[mask] = np.clip(decoded[mask], -ACTIVATION_LIMIT, ACTIVATION_LIMIT)
            del mask, means, indices, symbols  # before the next step's networks
        return encoder.finish(), decoded

    def _round(self, latent: np.ndarray, means: np.ndarray, indices: np.ndarray, rounding: Rounding) -> np.ndarray:
        """The symbols of one step's elements, rounded a chunk at a time (element by element, so the same
        symbols): a rounding's temporaries over a 12 MP picture's whole step were 60 MB."""
        symbols = np.empty(len(means), dtype=np.int64)
        for start in range(0, len(means), ROUNDING_CHUNK):
            chunk = slice(start, start + ROUNDING_CHUNK)
            residual = latent[chunk].astype(np.float64) - means[chunk] / (1 << FRACTION_BITS)
            symbols[chunk] = rounding(residual, indices[chunk], self.y_tables)
        symbols[indices == self.y_tables.skip_index] = 0
        return symbols

    def decode(self, payload: bytes, latent_shape: tuple[int, int, int], backend: ConvBackend | None = None) -> np.ndarray:
        """ŷ (fixed point, units of 2**-FRACTION_BITS) from a payload; raises EntropyDecodeError."""
        backend = backend or NumpyBackend()
        _, height, width = latent_shape
        decoder = SymbolDecoder(payload)
        z_shape = (self.z_channels, height // 4, width // 4)
        z_symbols = decoder.read(self._z_indices(z_shape), self.z_tables)
        features = run_network(self.hyper_synthesis, z_symbols.astype(np.float64), backend)
        decoded = np.zeros(latent_shape, dtype=np.float64)
        for step in range(NUM_STEPS):
            mask = step_mask(step, *latent_shape)
            means, indices = self._means_and_indices(step, features, decoded, backend)
            symbols = np.zeros(latent_shape, dtype=np.int64)
            symbols[mask] = decoder.read(indices[mask], self.y_tables)
            decoded[mask] = self._dequantize(symbols, means)[mask]
        decoder.finish()
        return decoded

    @staticmethod
    def _dequantize(symbols: np.ndarray, means: np.ndarray) -> np.ndarray:
        return symbols * (1 << FRACTION_BITS) + means

    @property
    def z_channels(self) -> int:
        return self.z_tables.num_tables

    @staticmethod
    def _z_indices(shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(np.arange(shape[0])[:, None, None], shape)
