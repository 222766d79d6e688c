"""The integer entropy model is exact: sender (numpy) and receiver (torch) derive identical symbols."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aeic.codec.entropy_model import TorchBackend
from aeic.codec.testing import make_tiny_model
from aeic.shared.entropy_model import FRACTION_BITS, NUM_STEPS, NumpyBackend, run_network, step_masks


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_model()
    return model, model.entropy.export()


def _latents(model, seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
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


@pytest.mark.parametrize("threads", [1, 2])
def test_numpy_encoder_and_torch_decoder_agree_on_100_inputs(tiny, threads: int) -> None:
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


def test_backends_compute_identical_integer_layers(tiny) -> None:
    _, integer = tiny
    rng = np.random.default_rng(5)
    z = rng.integers(-4, 5, size=(integer.z_channels, 3, 2)).astype(np.float64)
    np.testing.assert_array_equal(
        run_network(integer.hyper_synthesis, z, NumpyBackend()), run_network(integer.hyper_synthesis, z, TorchBackend())
    )


def test_float_noise_in_the_analysis_output_still_decodes(tiny) -> None:
    model, integer = tiny
    y, z = _latents(model, 3, (1, 2))
    rng = np.random.default_rng(0)
    for _ in range(10):
        noisy = y * (1 + 1e-5 * rng.standard_normal(y.shape)).astype(np.float32)
        payload, sender_y = integer.encode(noisy, z)
        np.testing.assert_array_equal(integer.decode(payload, y.shape, TorchBackend()), sender_y)


def test_fake_quantized_training_model_matches_the_integer_model(tiny) -> None:
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


def _without_skips(integer):
    """The same integer model with the skip table coded like any other (what training computes)."""
    import dataclasses

    tables = dataclasses.replace(integer.y_tables, skip_index=None, _models={})
    return dataclasses.replace(integer, y_tables=tables)


def test_every_partial_sum_provably_stays_below_2_53(tiny) -> None:
    """Exactness of float64 accumulation, for any payload: z up to 2**31, activations clamped."""
    from aeic.shared.entropy_model import EXACT_LIMIT
    from aeic.shared.model_package import ModelPackage, default_model_dir

    _, integer = tiny
    assert 0 < integer.accumulator_bound() < EXACT_LIMIT
    shipped = default_model_dir()
    if (shipped / "manifest.json").is_file():
        assert ModelPackage.load(shipped).entropy_model.accumulator_bound() < EXACT_LIMIT


def test_a_model_whose_sums_could_leave_the_exact_range_is_refused(tiny) -> None:
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
