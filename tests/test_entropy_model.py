"""The integer entropy model is exact: sender (numpy) and receiver (torch) derive identical symbols."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
import torch
from aeic.codec.model import AEICModel
from aeic.codec.testing import make_tiny_model
from aeic.codec.torch_backend import TorchBackend
from aeic.sender.rate_distortion_rounding import RateDistortionRounding
from aeic.shared.entropy_coding import SymbolEncoder
from aeic.shared.entropy_model import (
    ACTIVATION_LIMIT,
    BAND_BYTES,
    FRACTION_BITS,
    NUM_STEPS,
    EntropyModel,
    IntConv,
    NumpyBackend,
    Rounding,
    nearest_rounding,
    run_network,
    step_mask,
    step_masks,
    storage_dtype,
)


@pytest.fixture(scope="module")
def tiny() -> tuple[AEICModel, EntropyModel]:
    model = make_tiny_model()
    return model, model.entropy.export()


def _latents(model: AEICModel, seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 128 * shape[0], 128 * shape[1], generator=generator)
    with torch.no_grad():
        y = model.analysis(image)
        scaled, z = model.scale_latent(y, torch.tensor([seed % model.config.num_rates]))
    return scaled[0].numpy(), z[0].numpy()


def _random_latents(rng: np.random.Generator, channels: int, z_channels: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = 4 * int(rng.integers(1, 3)), 4 * int(rng.integers(1, 3))
    y = rng.normal(size=(channels, h, w)) * rng.choice([0.3, 3.0, 30.0])
    z = rng.normal(size=(z_channels, h // 4, w // 4)) * 2
    return y.astype(np.float32), z.astype(np.float32)


def test_step_masks_partition_the_latent() -> None:
    masks = step_masks(8, 6, 10)
    assert masks.shape == (NUM_STEPS, 8, 6, 10)
    np.testing.assert_array_equal(masks.sum(0), 1)
    for step in range(NUM_STEPS):  # each step codes a quarter of every channel group
        assert masks[step].sum() == 8 * 6 * 10 // NUM_STEPS


def test_step_mask_is_the_specified_phase_and_group() -> None:
    """docs/bitstream.md: element (c, y, x) is coded in step (p - g) mod 4, p = [[0, 1], [3, 2]][y mod 2][x mod 2]."""
    channels, height, width = 12, 5, 7
    for step in range(NUM_STEPS):
        mask = step_mask(step, channels, height, width)
        for c, y, x in np.ndindex(channels, height, width):
            phase, group = ((0, 1), (3, 2))[y % 2][x % 2], (4 * c) // channels
            assert mask[c, y, x] == ((phase - group) % NUM_STEPS == step)


@pytest.mark.parametrize("threads", [1, 2])
def test_numpy_encoder_and_torch_decoder_agree_on_100_inputs(
    tiny: tuple[AEICModel, EntropyModel], threads: int
) -> None:
    model, integer = tiny
    rng = np.random.default_rng(threads)
    torch.set_num_threads(threads)
    backend = TorchBackend("cpu")
    for case in range(60):
        if case % 3 == 0:
            y, z = _latents(model, case, (1, 1 + case % 2))
        else:
            y, z = _random_latents(rng, integer.latent_channels, integer.z_channels)
        payload, sender_y = integer.encode(y, z)
        receiver_y = integer.decode(payload, y.shape, backend)
        np.testing.assert_array_equal(receiver_y, sender_y)
        np.testing.assert_array_equal(integer.decode(payload, y.shape, NumpyBackend()), sender_y)


def test_backends_compute_identical_integer_layers(tiny: tuple[AEICModel, EntropyModel]) -> None:
    _, integer = tiny
    rng = np.random.default_rng(5)
    z = rng.integers(-4, 5, size=(integer.z_channels, 3, 2)).astype(np.float64)
    np.testing.assert_array_equal(
        run_network(integer.hyper_synthesis, z, NumpyBackend()), run_network(integer.hyper_synthesis, z, TorchBackend())
    )


def test_float_noise_in_the_analysis_output_still_decodes(tiny: tuple[AEICModel, EntropyModel]) -> None:
    model, integer = tiny
    y, z = _latents(model, 3, (1, 2))
    rng = np.random.default_rng(0)
    for _ in range(10):
        noisy = y * (1 + 1e-5 * rng.standard_normal(y.shape)).astype(np.float32)
        payload, sender_y = integer.encode(noisy, z)
        np.testing.assert_array_equal(integer.decode(payload, y.shape, TorchBackend()), sender_y)


def test_fake_quantized_training_model_matches_the_integer_model(
    tiny: tuple[AEICModel, EntropyModel]
) -> None:
    model, integer = tiny
    y, z = _latents(model, 4, (1, 1))
    with torch.no_grad():
        y_hat, _, _ = model.entropy.eval()(torch.from_numpy(y)[None], torch.from_numpy(z)[None])
    # training rounds where the integer model skips (index 0, symbol taken as 0), so compare with
    # the integer model coding that table like any other: means, indices and rounding must agree
    trained = y_hat[0].numpy()
    skip_free = _without_skips(integer)
    _, exact_no_skip = skip_free.encode(y, z)
    agreement = np.mean(np.abs(trained - exact_no_skip / (1 << FRACTION_BITS)) < 1e-6)
    assert agreement > 0.99, f"only {agreement:.3f} of the latent matches the exported integer model"


def _without_skips(integer: EntropyModel) -> EntropyModel:
    """The same integer model with the skip table coded like any other (what training computes)."""
    import dataclasses

    tables = dataclasses.replace(integer.y_tables, skip_index=None, _models={})
    return dataclasses.replace(integer, y_tables=tables)


def test_every_partial_sum_provably_stays_below_2_53(tiny: tuple[AEICModel, EntropyModel]) -> None:
    """Exactness of float64 accumulation, for any payload: z up to 2**31, activations clamped."""
    from aeic.shared.entropy_model import EXACT_LIMIT
    from aeic.shared.model_package import ModelPackage, default_model_dir

    _, integer = tiny
    assert 0 < integer.accumulator_bound() < EXACT_LIMIT
    shipped = default_model_dir()
    if (shipped / "manifest.json").is_file():
        assert ModelPackage.load(shipped).entropy_model.accumulator_bound() < EXACT_LIMIT


def test_a_model_whose_sums_could_leave_the_exact_range_is_refused(
    tiny: tuple[AEICModel, EntropyModel]
) -> None:
    import dataclasses

    from aeic.shared.entropy_model import EntropyModel, IntConv

    _, integer = tiny
    first = integer.hyper_synthesis[0]
    assert isinstance(first, IntConv)
    huge = dataclasses.replace(first, bias=np.full_like(first.bias, 1 << 53))
    with pytest.raises(ValueError, match="not exact"):
        EntropyModel(
            hyper_synthesis=[huge, *integer.hyper_synthesis[1:]],
            context=integer.context,
            z_tables=integer.z_tables,
            y_tables=integer.y_tables,
            latent_channels=integer.latent_channels,
        )


def _definition_conv(x: np.ndarray, layer: IntConv) -> np.ndarray:
    """The integer layer by its definition, in int64: bias plus each tap's product over the zero-padded
    input, then round half up of ``acc / 2**shift`` and the clamp."""
    channels, h, w = x.shape
    k = layer.kernel_size
    padded = np.pad(x.astype(np.int64), ((0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    acc = np.repeat(layer.bias.astype(np.int64)[:, None], h * w, axis=1)
    for dy, dx in np.ndindex(k, k):
        acc += layer.weight[:, :, dy, dx].astype(np.int64) @ padded[:, dy : dy + h, dx : dx + w].reshape(channels, -1)
    shift = layer.shift.astype(np.int64)[:, None]
    rounded = (acc + (1 << np.maximum(shift - 1, 0)) * (shift > 0)) >> np.maximum(shift, 0) << np.maximum(-shift, 0)
    return np.clip(rounded, layer.lo[:, None], layer.hi[:, None]).reshape(-1, h, w)


class _DefinitionBackend:
    def conv(self, x: np.ndarray, layer: IntConv) -> np.ndarray:
        return _definition_conv(x, layer).astype(np.float64)


def _random_layer(rng: np.random.Generator, inputs: int, outputs: int, k: int) -> IntConv:
    relu = rng.random() < 0.5
    return IntConv(
        weight=rng.integers(-127, 128, size=(outputs, inputs, k, k)).astype(np.int8),
        bias=rng.integers(-(1 << 20), 1 << 20, size=outputs),
        shift=rng.integers(-2, 13, size=outputs),
        lo=np.full(outputs, 0 if relu else -ACTIVATION_LIMIT),
        hi=np.full(outputs, ACTIVATION_LIMIT),
    )


def _sparse_input(rng: np.random.Generator, channels: int, h: int, w: int) -> np.ndarray:
    """Integers with whole channels zero, or zero on some pixels of the 2x2 grid (a step's context)."""
    x = rng.integers(-ACTIVATION_LIMIT, ACTIVATION_LIMIT + 1, size=(channels, h, w)).astype(np.float64)
    pattern = rng.integers(4)
    for channel in range(channels):
        if pattern == 1 and rng.random() < 0.5:
            x[channel] = 0
        if pattern == 2:  # half the channels zero on each grid pixel: the second step's context
            for row, col in np.ndindex(2, 2):
                if (channel + 2 * row + col) % 4 < 2:
                    x[channel, row::2, col::2] = 0
    return x * (pattern != 3)


@pytest.mark.parametrize("band_bytes", [1, 5_000, BAND_BYTES])
def test_numpy_backend_computes_the_integer_definition_exactly(band_bytes: int) -> None:
    """Bands of any size (one row each, a few, the whole input), 2x2-grid zeros, odd sizes, 1x1 to 5x5 kernels,
    float32 or float64 input; outputs in float32 where the clamp range fits it exactly, else float64."""
    rng = np.random.default_rng(band_bytes)
    backend = NumpyBackend(band_bytes)
    for case in range(60):
        k = (1, 3, 5)[case % 3]
        layer = _random_layer(rng, int(rng.integers(1, 40)), int(rng.integers(1, 30)), k)
        wide = case % 4 == 3  # sums beyond float32's exact integers (2**24) are kept: the clamp allows them
        if wide:
            outputs = layer.weight.shape[0]
            layer = dataclasses.replace(layer, lo=np.full(outputs, -(1 << 40)), hi=np.full(outputs, 1 << 40))
        x = _sparse_input(rng, layer.weight.shape[1], int(rng.integers(1, 14)), int(rng.integers(1, 14)))
        got = backend.conv(x.astype(np.float32) if case % 2 else x, layer)
        assert got.dtype == storage_dtype(layer) == (np.float64 if wide else np.float32)
        np.testing.assert_array_equal(got, _definition_conv(x, layer), err_msg=f"case {case}")


def _definition_encode(
    integer: EntropyModel, y: np.ndarray, z: np.ndarray, rounding: Rounding
) -> tuple[bytes, np.ndarray]:
    """``EntropyModel.encode`` as specified, step by step over whole arrays with the definition's layers."""
    backend, encoder = _DefinitionBackend(), SymbolEncoder()
    z_symbols = np.floor(z.astype(np.float64) + 0.5).astype(np.int64)
    encoder.add(z_symbols, np.broadcast_to(np.arange(z.shape[0])[:, None, None], z.shape), integer.z_tables)
    features = run_network(integer.hyper_synthesis, z_symbols.astype(np.float64), backend)
    decoded = np.zeros(y.shape)
    for step, mask in enumerate(step_masks(*y.shape)):
        context = np.clip(decoded, -ACTIVATION_LIMIT, ACTIVATION_LIMIT)
        out = run_network(integer.context[step], np.concatenate([features, context]), backend)
        means, indices = out[: integer.latent_channels], out[integer.latent_channels :].astype(np.int64)
        symbols = rounding(y.astype(np.float64) - means / (1 << FRACTION_BITS), indices, integer.y_tables)
        symbols[indices == integer.y_tables.skip_index] = 0
        encoder.add(symbols[mask], indices[mask], integer.y_tables)
        decoded[mask] = (symbols * (1 << FRACTION_BITS) + means)[mask]
    return encoder.finish(), decoded


@pytest.mark.parametrize("rounding", [nearest_rounding, RateDistortionRounding(4.0)], ids=["nearest", "rd"])
def test_encode_gives_the_bytes_of_its_definition(
    tiny: tuple[AEICModel, EntropyModel], rounding: Rounding
) -> None:
    """The encoder's shortcuts (only the coded elements rounded, the context kept up to date in place,
    the backend's bands and skipped zeros) change no byte of the payload and nothing of ŷ."""
    model, integer = tiny
    rng = np.random.default_rng(11)
    for case in range(12):
        if case % 3 == 0:
            y, z = _latents(model, case, (1, 1 + case % 2))
        else:
            y, z = _random_latents(rng, integer.latent_channels, integer.z_channels)
        payload, decoded = integer.encode(y, z, NumpyBackend(band_bytes=(1, 50_000, BAND_BYTES)[case % 3]), rounding)
        expected_payload, expected = _definition_encode(integer, y, z, rounding)
        assert payload == expected_payload, f"case {case}"
        np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("rounding", [nearest_rounding, RateDistortionRounding(4.0)], ids=["nearest", "rd"])
def test_encode_holds_under_six_float64_latents(tiny: tuple[AEICModel, EntropyModel], rounding: Rounding) -> None:
    """A 12 MP picture coded whole: the encoder held 10 float64 copies of its latent's size at once (270 MB:
    the latent made float64, every step's 2C output channels alive twice, padded float64 sums, the four steps'
    masks, the rounding's temporaries over a whole step); now its outputs, the context and ŷ (about 4)."""
    _, integer = tiny
    rng = np.random.default_rng(5)
    y = (rng.normal(size=(integer.latent_channels, 96, 128)) * 3).astype(np.float32)
    z = (rng.normal(size=(integer.z_channels, 24, 32)) * 2).astype(np.float32)
    backend = NumpyBackend(band_bytes=1 << 16)  # its buffers small beside the latent
    tracemalloc.start()
    try:
        integer.encode(y, z, backend, rounding)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * y.size * 8


class _NoNetworks:
    """A backend that fails the test if a network runs."""

    def conv(self, x: np.ndarray, layer: IntConv) -> np.ndarray:
        raise AssertionError("a network ran")


def test_a_short_corrupt_stream_at_the_decode_limit_fails_before_any_network() -> None:
    """Found by fuzzing: an 18-byte stream claiming 4096x4096 with the payload 01 took 5 s and 1.5 GB of
    context networks (one thread) before finish() refused it; the z group already leaves a stuck state."""
    from aeic.shared import bitstream
    from aeic.shared.entropy_coding import EntropyDecodeError
    from aeic.shared.model_package import ModelPackage

    package = ModelPackage.load()
    header = bitstream.Header(model_id=package.model_id, width=4096, height=4096, rate_index=0)
    stream = bitstream.unpack(bitstream.pack(bitstream.Bitstream(header, b"\x01")))
    assert len(bitstream.pack(stream)) == 18
    with pytest.raises(EntropyDecodeError, match="the data ran out with state 1"):
        package.entropy_model.decode(stream.payload, (256, 128, 128), _NoNetworks())


@pytest.mark.parametrize("band_bytes", [1, 20_000, 10**9])
def test_torch_backend_in_row_bands_decodes_the_sender_symbols(
    tiny: tuple[AEICModel, EntropyModel], band_bytes: int
) -> None:
    """The receiver bounds its unfolded context by rows (one row per band at 1 byte): same integers."""
    model, integer = tiny
    rng = np.random.default_rng(band_bytes)
    backend = TorchBackend("cpu", band_bytes=band_bytes)
    for case in range(6):
        y, z = _latents(model, case, (2, 1)) if case % 2 else _random_latents(rng, integer.latent_channels,
                                                                               integer.z_channels)
        payload, sender_y = integer.encode(y, z)
        np.testing.assert_array_equal(integer.decode(payload, y.shape, backend), sender_y)
