"""Sender path (onnxruntime + numpy) against receiver path (torch) at 1 and 2 threads, 100+ inputs.

Random images and crops of real photos go through the exported sender of a tiny random-weight
package with onnxruntime at 1 and at 2 intra-op threads; the receiver entropy-decodes each stream
with torch at 1 and at 2 threads. The streams, the symbols and scale indices they carry, and the
quantized latent must agree exactly in every combination, or the rANS stream would desynchronize.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from aeic.codec.testing import make_tiny_package
from aeic.receiver.decoder import ReceiverCodec
from aeic.sender.encoder import SenderCodec
from aeic.shared.entropy_model import FRACTION_BITS, NumpyBackend
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left", "brick", "gravel", "grass", "color")
NUM_RANDOM = 56
CROPS_PER_PHOTO = 6  # 8 photos x 6 crops + 56 random images = 104 inputs


def _real_photos() -> list[np.ndarray]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-image's bundled photos are not installed")
    folder = Path(spec.origin).parent / "data"
    return [np.asarray(Image.open(folder / f"{name}.png").convert("RGB")) for name in PHOTOS]


def _inputs() -> Iterator[np.ndarray]:
    rng = np.random.default_rng(2024)
    for _ in range(NUM_RANDOM):  # odd sizes (padding), uniform noise or noise on a gradient
        height, width = (int(v) for v in rng.integers(20, 200, size=2))
        noise = rng.integers(0, 256, size=(height, width, 3))
        if rng.random() < 0.5:
            ramp = np.linspace(0, 255, width)[None, :, None]
            noise = 0.7 * ramp + 0.3 * noise
        yield noise.astype(np.uint8)
    for photo in _real_photos():
        for _ in range(CROPS_PER_PHOTO):
            height = int(rng.integers(40, min(260, photo.shape[0])))
            width = int(rng.integers(40, min(260, photo.shape[1])))
            top = int(rng.integers(0, photo.shape[0] - height + 1))
            left = int(rng.integers(0, photo.shape[1] - width + 1))
            yield np.ascontiguousarray(photo[top : top + height, left : left + width])


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("tiny-se"))


def test_sender_and_receiver_agree_at_1_and_2_threads_on_104_inputs(package: Path) -> None:
    senders = {threads: SenderCodec.from_package(package, threads=threads) for threads in (1, 2)}
    receiver = ReceiverCodec.from_package(package, device="cpu")
    levels = senders[1].num_levels
    previous_threads = torch.get_num_threads()
    count = 0
    try:
        for case, rgb in enumerate(_inputs()):
            level = case % levels
            analysed = {t: sender.analyse(rgb) for t, sender in senders.items()}
            streams = {t: senders[t].encode_analysed(analysed[t], level) for t in senders}
            assert streams[1] == streams[2], f"input {case}: onnxruntime at 1 and 2 threads disagree"
            sender_latent = senders[1].quantized_latent(analysed[1], level)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                receiver_latent = receiver._latent(receiver.parse(streams[1])).numpy()
                np.testing.assert_array_equal(
                    receiver_latent, sender_latent, err_msg=f"input {case}, torch at {threads} threads"
                )
            # the sender's own numpy decoder reads the same symbols back (nothing left over)
            parsed = receiver.parse(streams[1])
            fixed = senders[1].package.entropy_model.decode(parsed.payload, sender_latent.shape, NumpyBackend())
            gain = senders[1].package.level_gains[level][:, None, None]
            np.testing.assert_array_equal((fixed / (1 << FRACTION_BITS) / gain).astype(np.float32), sender_latent)
            count += 1
    finally:
        torch.set_num_threads(previous_threads)
    assert count == NUM_RANDOM + CROPS_PER_PHOTO * len(PHOTOS) >= 100


def test_reconstructions_are_identical_across_torch_threads(package: Path) -> None:
    sender = SenderCodec.from_package(package, threads=1)
    receiver = ReceiverCodec.from_package(package, device="cpu")
    previous_threads = torch.get_num_threads()
    photos = _real_photos()
    try:
        for case, photo in enumerate(photos):
            stream = sender.encode(np.ascontiguousarray(photo[:200, :300]), case % sender.num_levels)
            decoded = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                decoded[threads] = receiver.decode(stream)
            np.testing.assert_array_equal(decoded[1], decoded[2], err_msg=PHOTOS[case])
    finally:
        torch.set_num_threads(previous_threads)
