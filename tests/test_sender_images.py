"""aeic.sender.images: every common input format becomes an upright HxWx3 uint8 RGB array."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from aeic.sender.images import ImageReadError, read_image
from PIL import Image, ImageCms


def _gradient(width: int = 40, height: int = 24) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 6 % 256, y * 10 % 256, (x + y) * 3 % 256], axis=2).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".webp", ".tiff"])
def test_lossless_rgb_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    rgb = _gradient()
    path = tmp_path / f"img{suffix}"
    if suffix == ".webp":
        Image.fromarray(rgb).save(path, lossless=True)
    else:
        Image.fromarray(rgb).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_is_read_close_to_source(tmp_path: Path) -> None:
    rgb = _gradient()
    path = tmp_path / "img.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    out = read_image(path)
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 6


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    samples = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(samples).save(path)
    assert Image.open(path).mode.startswith("I")
    out = read_image(path)
    assert out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_sixteen_bit_rgb_png(tmp_path: Path) -> None:
    import cv2

    rgb16 = _gradient().astype(np.uint16) * 257  # exact 8-bit values in 16 bits
    path = tmp_path / "rgb16.png"
    cv2.imwrite(str(path), rgb16[:, :, ::-1])  # OpenCV writes BGR, 16-bit
    out = read_image(path)
    np.testing.assert_array_equal(out, _gradient())


def test_greyscale_is_expanded_to_three_equal_channels(tmp_path: Path) -> None:
    grey = _gradient()[:, :, 0]
    path = tmp_path / "grey.png"
    Image.fromarray(grey, mode="L").save(path)
    out = read_image(path)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], grey)


def _float_tiff(path: Path, samples: np.ndarray) -> Path:
    Image.fromarray(samples.astype(np.float32), mode="F").save(path)
    return path


def test_float_tiff_in_0_to_1_is_scaled_by_255_not_clipped_to_black(tmp_path: Path) -> None:
    samples = np.tile(np.array([0.0, 0.25, 0.5, 1.0], np.float32), (300, 1))  # over one strip of rows
    out = read_image(_float_tiff(tmp_path / "unit.tif", samples))
    assert out.shape == (300, 4, 3) and (out == out[..., :1]).all()
    assert out[299, :, 0].tolist() == [0, 64, 128, 255]  # 63.75 and 127.5 rounded


def test_float_tiff_in_0_to_255_is_taken_as_it_is(tmp_path: Path) -> None:
    samples = np.array([[0.0, 1.5, 100.4, 255.0]], np.float32)
    assert read_image(_float_tiff(tmp_path / "levels.tif", samples))[0, :, 1].tolist() == [0, 2, 100, 255]


@pytest.mark.parametrize(
    "samples, message",
    [
        ([[0.0, -0.5, 1.0]], r"float samples span -0.5\.\.1, neither 0\.\.1 nor 0\.\.255"),
        ([[0.0, 4000.0]], r"float samples span 0\.\.4000"),
        ([[0.5, np.nan]], "float samples include NaN or infinity"),
        ([[0.5, np.inf]], "float samples include NaN or infinity"),
    ],
)
def test_float_tiff_out_of_range_is_one_clear_error(tmp_path: Path, samples: list, message: str) -> None:
    path = _float_tiff(tmp_path / "odd.tif", np.array(samples, np.float32))
    with pytest.raises(ImageReadError, match=f"^{re.escape(str(path))}: {message}"):
        read_image(path)


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red channel everywhere
    rgba[0, :, 3] = 255  # top row opaque
    rgba[1, :, 3] = 0  # bottom row fully transparent (colour underneath must not leak)
    rgba[1, 1, 3] = 128  # one half-transparent pixel
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = read_image(path)
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[1, 0], [255, 255, 255])
    assert abs(int(out[1, 1, 0]) - 227) <= 1 and abs(int(out[1, 1, 1]) - 127) <= 1


def test_grey_with_alpha(tmp_path: Path) -> None:
    la = np.zeros((1, 2, 2), dtype=np.uint8)
    la[0, 0] = (10, 255)
    la[0, 1] = (10, 0)
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    out = read_image(path)
    np.testing.assert_array_equal(out[0], [[10, 10, 10], [255, 255, 255]])


def test_palette_image_and_palette_transparency(tmp_path: Path) -> None:
    rgb = _gradient()
    palette = Image.fromarray(rgb).quantize(colors=16)
    path = tmp_path / "palette.png"
    palette.save(path)
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(read_image(path), expected)

    palette.info["transparency"] = 0  # palette entry 0 becomes transparent -> white
    transparent = tmp_path / "palette_t.png"
    palette.save(transparent, transparency=0)
    out = read_image(transparent)
    mask = np.asarray(palette) == 0
    assert mask.any()
    assert (out[mask] == 255).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # A 40x24 landscape stored with orientation 6 (rotate 90 clockwise to display): upright is 24x40.
    rgb = np.zeros((24, 40, 3), dtype=np.uint8)
    rgb[:, :20] = (255, 0, 0)  # left half red
    rgb[:, 20:] = (0, 0, 255)  # right half blue
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    out = read_image(path)
    assert out.shape == (40, 24, 3)
    # Rotating 90 degrees clockwise puts the stored left (red) half on top.
    assert out[5, 12, 0] > 200 and out[5, 12, 2] < 60
    assert out[35, 12, 2] > 200 and out[35, 12, 0] < 60


def _red_blue_swapped_profile() -> bytes:
    """An RGB profile (sRGB's, red and blue colorants swapped) under which stored blue is sRGB red: a
    colour space as unlike sRGB as Display P3 or Adobe RGB, whose effect a test can tell at a glance."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    tags = {bytes(data[132 + 12 * i : 136 + 12 * i]): 136 + 12 * i for i in range(struct.unpack(">I", data[128:132])[0])}
    for first, second in ((b"rXYZ", b"bXYZ"), (b"rTRC", b"bTRC")):  # swap where each tag's data lies
        a, b = tags[first], tags[second]
        data[a : a + 8], data[b : b + 8] = data[b : b + 8], data[a : a + 8]
    data[84:100] = bytes(16)  # the profile ID (an MD5 of the old bytes) no longer holds: 0 means none
    return bytes(data)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_an_embedded_colour_profile_is_converted_to_srgb(tmp_path: Path, mode: str) -> None:
    """A photo's ICC profile was ignored: its numbers were coded as if sRGB, so a Display P3 photo (every
    recent iPhone's) came out of the receiver dull and off in hue."""
    path = tmp_path / f"tagged_{mode}.png"
    Image.new("RGB", (20, 12), (0, 0, 255)).convert(mode).save(path, icc_profile=_red_blue_swapped_profile())
    out = read_image(path)
    assert out.shape == (12, 20, 3) and (out == (255, 0, 0)).all()


def test_an_srgb_or_broken_profile_keeps_the_samples(tmp_path: Path) -> None:
    rgb = _gradient()
    srgb = tmp_path / "srgb.png"
    Image.fromarray(rgb).save(srgb, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    np.testing.assert_array_equal(read_image(srgb), rgb)
    broken = tmp_path / "broken.png"
    Image.fromarray(rgb).save(broken, icc_profile=b"not a profile" * 20)  # viewers ignore it: so do we
    np.testing.assert_array_equal(read_image(broken), rgb)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(_gradient()).convert("CMYK").save(path, quality=95)
    out = read_image(path)
    assert out.shape == (24, 40, 3) and out.dtype == np.uint8


def test_corrupt_file_raises_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    Image.fromarray(_gradient()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated PNG
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"this is not an image at all", "not a recognised image format"), (None, "no such file")],
)
def test_not_an_image_and_missing_file(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "thing.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match=expected):
        read_image(path)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


@pytest.mark.parametrize("mode", ["RGB", "P", "CMYK", "L"])
def test_images_taller_than_a_conversion_strip_are_whole(tmp_path: Path, mode: str) -> None:
    """The RGB copy is made in row strips: rows on both sides of every seam are where they belong."""
    rgb = np.random.default_rng(3).integers(0, 256, (700, 9, 3), dtype=np.uint8)  # 3 strips, the last short
    image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / "tall.tiff"
    image.save(path)
    np.testing.assert_array_equal(read_image(path), np.asarray(image.convert("RGB")))


def test_rotated_image_taller_than_a_conversion_strip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(5).integers(0, 256, (9, 700, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored 700 wide, displayed 700 tall (rotate 90 degrees counter-clockwise)
    path = tmp_path / "rotated.png"
    Image.fromarray(rgb).save(path, exif=exif)
    np.testing.assert_array_equal(read_image(path), np.rot90(rgb))


def test_reading_holds_about_one_copy_of_the_pixels(tmp_path: Path) -> None:
    """A 48 MP photo must fit the service's MemoryMax: no whole-image bytes copy beside the array.

    tracemalloc sees the numpy array and the bytes Pillow hands out (not Pillow's own pixel
    buffer); reading the whole image through one bytes object peaked at twice the pixels.
    """
    import tracemalloc

    rgb = np.random.default_rng(4).integers(0, 256, (4096, 64, 3), dtype=np.uint8)
    path = tmp_path / "tall.png"
    Image.fromarray(rgb).save(path, compress_level=0)
    read_image(path)  # warm up lazy imports and plugin registration
    tracemalloc.start()
    try:
        out = read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, rgb)
    assert peak < 1.5 * rgb.nbytes


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (8-bit RGB) and holds no pixels: opening it reads the
    header only, decoding it fails."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_a_photo_over_what_a_receiver_decodes_is_refused_from_its_header(tmp_path: Path) -> None:
    """A 108-megapixel phone photo (12000x9000) was decoded whole (550 MB peak, 3 s on one core) and then
    refused by the encoder as "cannot encode: ValueError: ... over the receiver's limit of 67,108,864 output
    pixels", while the install guide promised photos up to about 179 megapixels."""
    from aeic.sender.images import open_image

    with pytest.raises(ImageReadError) as raised:
        open_image(_png_header_only(tmp_path / "phone.png", 12000, 9000))
    assert str(raised.value) == (f"{tmp_path / 'phone.png'}: 12000x9000 (108 megapixels) is over the 67,108,864 "
                                 "pixels a receiver decodes (8192x8192): scale it down first")
    with pytest.raises(ImageReadError, match="corrupt or truncated"):  # within the bound: decoded as before
        open_image(_png_header_only(tmp_path / "large.png", 8192, 8192))
