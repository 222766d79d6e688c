"""The deterministic entropy model: integer hyper-synthesis and 4-step spatial-channel context.

Both sides must derive *identical* means and scale indices from the decoded symbols, or the rANS
stream desynchronises. Everything here is therefore integer arithmetic on a fixed-point grid:

* every activation is an integer in units of ``2**-FRACTION_BITS`` (the hyper-latent ``z`` in
  units of 1), clamped to a 16-bit range;
* a layer is a convolution with int8 weights and integer bias, evaluated in float64 (products and
  partial sums stay below 2**53, so any summation order on any device gives the exact integer),
  then rescaled per output channel by a power of two with round-half-up, then clamped;
* the last context layer emits, per latent channel, the mean (fixed point) and the index of the
  Gaussian scale table (an integer in ``[0, NUM_SCALES)``).

The latent is coded in four steps. With channel group ``g`` (four equal groups) and spatial phase
``p`` of the 2x2 grid, step ``t`` codes the elements whose phase is ``(g + t) % 4``; its context
network sees the hyper features and every element decoded in earlier steps.

Convolutions run on a :class:`ConvBackend`: numpy here (sender), torch on the receiver.
"""

from __future__ import annotations

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
        """Integer symbols for ``residual`` (latent minus mean, in bins), coded with tables ``indices``."""


def nearest_rounding(residual: np.ndarray, indices: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Round half up: the least squared error, whatever the bits."""
    return np.floor(residual + 0.5).astype(np.int64)


class ConvBackend(Protocol):
    def conv(self, x: np.ndarray, layer: IntConv) -> np.ndarray:
        """``x`` is (C, H, W) of integers; returns (Cout, H, W) integers after rescale and clamp."""


def requantize(acc: np.ndarray, layer: IntConv) -> np.ndarray:
    """Power-of-two rescale with round-half-up, then clamp; exact in float64."""
    scale = np.ldexp(1.0, -layer.shift.astype(np.int64))[:, None]
    out = np.floor(acc * scale + 0.5)
    return np.clip(out, layer.lo[:, None], layer.hi[:, None])


class NumpyBackend:
    """The sender's backend: one float64 matrix product per kernel tap, summed.

    Per tap rather than one im2col product: the same exact integers (every partial sum is an
    integer below 2**53) with a working set of one shifted copy of the input instead of k*k.
    Input channels that are entirely zero (the not yet decoded context, at the first step) are
    left out of the products: they add exactly nothing.
    """

    def conv(self, x: np.ndarray, layer: IntConv) -> np.ndarray:
        _, h, w = x.shape
        k = layer.kernel_size
        used = np.flatnonzero(np.any(x != 0, axis=(1, 2)))
        weight = layer.weight[:, used].astype(np.float64)
        padded = np.pad(np.asarray(x, dtype=np.float64)[used], ((0, 0), (k // 2, k // 2), (k // 2, k // 2)))
        acc = np.repeat(layer.bias.astype(np.float64)[:, None], h * w, axis=1)
        for dy in range(k):
            for dx in range(k):
                acc += weight[:, :, dy, dx] @ padded[:, dy : dy + h, dx : dx + w].reshape(len(used), h * w)
        return requantize(acc, layer).reshape(-1, h, w)


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


def step_masks(channels: int, height: int, width: int) -> np.ndarray:
    """(NUM_STEPS, C, H, W) booleans: which latent elements each step codes."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    phase = np.array([[0, 1], [3, 2]])[rows % 2, cols % 2]  # 2x2 phases in a cycle
    group = (np.arange(channels) * NUM_STEPS) // channels
    steps = (phase[None, :, :] - group[:, None, None]) % NUM_STEPS
    return np.stack([steps == t for t in range(NUM_STEPS)])


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
        decoded = np.zeros(y.shape, dtype=np.float64)
        for step, mask in enumerate(step_masks(*y.shape)):
            means, indices = self._means_and_indices(step, features, decoded, backend)
            symbols = rounding(y.astype(np.float64) - means / (1 << FRACTION_BITS), indices, self.y_tables)
            symbols[indices == self.y_tables.skip_index] = 0
            encoder.add(symbols[mask], indices[mask], self.y_tables)
            decoded[mask] = self._dequantize(symbols, means)[mask]
        return encoder.finish(), decoded

    def decode(self, payload: bytes, latent_shape: tuple[int, int, int], backend: ConvBackend | None = None) -> np.ndarray:
        """ŷ (fixed point, units of 2**-FRACTION_BITS) from a payload; raises EntropyDecodeError."""
        backend = backend or NumpyBackend()
        _, height, width = latent_shape
        decoder = SymbolDecoder(payload)
        z_shape = (self.z_channels, height // 4, width // 4)
        z_symbols = decoder.read(self._z_indices(z_shape), self.z_tables)
        features = run_network(self.hyper_synthesis, z_symbols.astype(np.float64), backend)
        decoded = np.zeros(latent_shape, dtype=np.float64)
        for step, mask in enumerate(step_masks(*latent_shape)):
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
