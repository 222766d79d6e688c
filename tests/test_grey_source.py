"""A grey source picture is flagged by the sender and decoded grey by the receiver (flags bit 4).

Before the flag, the model decoded colour: a grey photo came back with pink and green patches.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from aeic.codec.testing import make_tiny_package
from aeic.evaluation.codec_adapter import PackageCodec
from aeic.receiver.decoder import ReceiverCodec, to_grey
from aeic.sender.encoder import SenderCodec, is_grey
from aeic.sender.images import read_image
from aeic.sender.pipeline import RateControl, encode_image
from aeic.shared import bitstream
from PIL import Image


@pytest.fixture(scope="module")
def codecs(tmp_path_factory: pytest.TempPathFactory) -> tuple[SenderCodec, ReceiverCodec]:
    folder = make_tiny_package(tmp_path_factory.mktemp("tiny-se"))
    return SenderCodec.from_package(folder, downscale=1), ReceiverCodec.from_package(folder, device="cpu")


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour photo-like picture (gradients and noise)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows / height, cols / width, ((rows + cols) % 64) / 64], -1) * 200
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _grey_photo(height: int, width: int) -> np.ndarray:
    """The luma of ``_photo`` as a greyscale file reads: three equal channels."""
    luma = np.asarray(Image.fromarray(_photo(height, width)).convert("L"))
    return np.repeat(luma[:, :, None], 3, axis=2)


def _is_grey(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def test_is_grey_checks_every_row() -> None:
    grey = np.full((600, 5, 3), 90, np.uint8)  # taller than one comparison band
    assert is_grey(grey)
    grey[599, 4, 2] = 91
    assert not is_grey(grey)


def test_the_grey_flag_is_set_for_a_grey_picture_only(codecs: tuple[SenderCodec, ReceiverCodec]) -> None:
    """Only flags bit 4 differs: the payload, and so the size a budget counts, is the same."""
    sender, _ = codecs
    grey = _grey_photo(40, 56)
    tinted = grey.copy()
    tinted[0, 0, 0] ^= 1
    flagged, plain = sender.encode(grey, 2), sender.encode(tinted, 2)
    assert bitstream.unpack(flagged).header.grey and not bitstream.unpack(plain).header.grey
    assert flagged[3] == plain[3] | 0x10


def test_to_grey_is_the_bt601_luma_in_three_channels() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30], [255, 255, 255]]], np.uint8)
    rgb = np.repeat(rgb, 300, axis=0)  # over one band of rows
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    out = to_grey(rgb.copy())
    assert _is_grey(out)
    assert out[0, :, 0].tolist() == [76, 150, 29, 18, 255]
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1  # Pillow rounds its fixed point its own way


def test_a_grey_photo_decodes_exactly_grey(codecs: tuple[SenderCodec, ReceiverCodec]) -> None:
    sender, receiver = codecs
    grey = _grey_photo(100, 140)
    encoded = encode_image(sender, grey, RateControl(rate=1))
    assert bitstream.unpack(encoded.data).header.grey
    decoded = receiver.decode(encoded.data)
    assert decoded.shape == grey.shape and _is_grey(decoded)
    # the same payload without the flag: the model alone decodes colour (the defect)
    stream = bitstream.unpack(encoded.data)
    unflagged = bitstream.pack(bitstream.Bitstream(replace(stream.header, grey=False), stream.payload))
    assert not _is_grey(receiver.decode(unflagged))


def test_a_grey_file_through_the_budget_path_decodes_grey(
    codecs: tuple[SenderCodec, ReceiverCodec], tmp_path: Path
) -> None:
    sender, receiver = codecs
    path = tmp_path / "grey.png"
    Image.fromarray(_grey_photo(70, 90)[..., 0], "L").save(path)
    rgb = read_image(path)
    encoded = encode_image(sender, rgb, RateControl(target_bytes=400))
    assert len(encoded.data) <= 400
    assert _is_grey(receiver.decode(encoded.data))


def test_the_evaluation_codec_flags_grey_as_the_sender_does(codecs: tuple[SenderCodec, ReceiverCodec]) -> None:
    sender, receiver = codecs
    codec = PackageCodec(sender, receiver)
    grey, colour = _grey_photo(64, 64), _photo(64, 64)
    assert codec.encode(grey, 2) == encode_image(sender, grey, RateControl(rate=2)).data
    assert _is_grey(codec.decode(codec.encode(grey, 2)))
    data, level = codec.encode_to_budget(grey, 300)
    assert bitstream.unpack(data).header.grey and (data, level) == sender.encode_to_budget(grey, 300)
    assert codec.encode(colour, 2) == sender.encode(colour, 2)


def test_aeic_encode_and_aeic_send_encode_flag_a_grey_file_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aeic.codec import cli as codec_cli
    from aeic.sender import cli as sender_cli

    photo = tmp_path / "photo.png"
    Image.fromarray(_grey_photo(48, 64)[..., 0], "L").save(photo)
    assert codec_cli.main(["encode", str(photo), "-o", str(tmp_path / "a")]) == 0
    assert sender_cli.main(["encode", str(photo), "-o", str(tmp_path / "b")]) == 0
    first, second = (tmp_path / "a" / "photo.aeic").read_bytes(), (tmp_path / "b" / "photo.aeic").read_bytes()
    assert first == second and bitstream.unpack(first).header.grey
    capsys.readouterr()
    assert codec_cli.main(["info", str(tmp_path / "a" / "photo.aeic")]) == 0
    assert json.loads(capsys.readouterr().out)["grey"] is True
