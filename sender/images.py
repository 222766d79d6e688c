"""Read an image file of any common format as the 8-bit RGB picture the encoder takes.

Why one reader: the encoder only understands 8-bit RGB, while edge devices see PNG, JPEG,
WebP, BMP, TIFF, 16-bit PNG, greyscale, palette and alpha images, often with an EXIF
orientation tag (phones, some cameras). Every such detail is settled here, once:

* EXIF orientation is applied, so the array is upright as a viewer would show it.
* 16-bit samples are scaled to 8 bits (x * 255 / 65535, rounded), not clipped.
* 32-bit float greyscale (Pillow mode ``F``, float TIFFs) is scaled by its range: samples all within
  0..1 are multiplied by 255, else samples all within 0..255 are taken as they are (both rounded);
  NaN, infinity or any other range is an error naming it, never a silently clipped (black) picture.
* Greyscale and palette images are expanded to three equal or looked-up channels.
* Alpha (RGBA, LA, palette transparency) is composited over white: transparent areas
  become white, as most viewers show them, instead of the arbitrary colour hidden under
  alpha 0. The bitstream carries no alpha.
* An embedded RGB colour profile (ICC) other than sRGB is converted to sRGB, as viewers show it: the
  bitstream and the receiver's PNG are sRGB, and a phone's Display P3 or a camera's Adobe RGB
  photo read as sRGB numbers comes out dull and shifted in hue. A profile that does not parse, or
  one for another colour space (CMYK, grey), leaves the samples as they are.
* Animated or multi-page files: the first frame.

:func:`open_image` gives the decoded file as a :class:`UprightImage`, which applies all of that a strip of
rows at a time as the encoder reads it (:mod:`aeic.sender.rows`): a 48 MP photo is then Pillow's decoded
picture only (192 MB), never besides it an HxWx3 array (144 MB), a rotated copy (192 MB) or an RGBA one.
:func:`read_image` gives the array, for callers that want one.

AVIF is read where Pillow was built with it (Pillow 11.2 and later, as shipped); HEIC/HEIF and JPEG XL
are not read, nor EPS or WMF/EMF drawings where Pillow lacks Ghostscript or a Windows handler. Any failure
(missing file, not an image, one of those formats, truncated or corrupt data, unsupported mode, too large)
raises :class:`ImageReadError` with one line saying which file and why.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from aeic.shared import decode_limits
from PIL import Image, ImageCms, UnidentifiedImageError, features

# The bitstream stores each dimension in 1..16384 (see docs/bitstream.md).
MAX_SIDE = 16384

# File suffixes the folder watcher treats as images (lower case).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif"})
# Photo formats Pillow reads only through a plugin the sender does not install (a phone's HEIC/HEIF, JPEG XL): the
# folder watcher and training list them too, so each is named as unreadable instead of passed over unseen.
PLUGIN_ONLY_SUFFIXES = frozenset({".heic", ".heif", ".hif", ".jxl"})

# ISO base media file brands (the ``ftyp`` box) of the formats Pillow needs a plugin for: AVIF's own (Pillow has it
# built in since 11.2), then HEIC's and HEIF's (no plugin here). ``mif1``/``msf1`` are HEIF's: an AVIF file
# lists ``avif`` too, so AVIF is told first.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})
# a JPEG XL codestream, and the JPEG XL container's signature box
_JXL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")
_SNIFF_BYTES = 64
# drawings Pillow identifies but renders only with outside help: EPS with Ghostscript, WMF/EMF with a Windows handler
_DRAWING_FORMATS = frozenset({"EPS", "WMF"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Modes whose samples an RGB colour profile describes (a palette's entries are RGB).
_RGB_PROFILE_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA"})
# Rows converted to RGB and copied out of Pillow at a time. Whole, a conversion holds the photo three
# times over (Pillow's 4-byte pixels, a bytes copy, the array): 850 MB peak for a 48 MP JPEG, over the
# service's MemoryMax; in strips the photo is held in Pillow and in the array only (about 370 MB).
_STRIP_ROWS = 256
# EXIF orientation -> the transpose that turns the stored picture upright (as ImageOps.exif_transpose)
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
_T = TypeVar("_T")


class ImageReadError(Exception):
    """The file could not be read as an image; the message names the file and the reason."""


def _detail(exc: BaseException | str) -> str:
    """An exception's or warning's text on one line: a decoder plugin's message may span several (pillow-jxl's does)."""
    return " ".join(str(exc).split())


def read_image(path: str | Path) -> np.ndarray:
    """Return the upright image at ``path`` as a C-contiguous HxWx3 uint8 RGB array."""
    return _reading(Path(path), lambda image: UprightImage(image, path).array())


def open_image(path: str | Path, on_warning: Callable[[str], None] | None = None) -> UprightImage:
    """The image at ``path`` decoded, to be read upright in 8-bit RGB a strip of rows at a time (by the encoder):
    what :func:`read_image` returns without the array beside the decoded picture. A file that cannot be read
    fails here, as there; its pixels' conversion is checked on its first row. A photo with more pixels than a
    receiver decodes fails from its header, before it is decoded: a 108-megapixel one was decoded whole (550 MB,
    3 s on one core) for the encoder to refuse it.

    Each warning the reading raised (Pillow's on odd metadata: "tag 274 had too many entries") is given to
    ``on_warning`` as one line naming the file, once, or else warned again so naming it: in an agent's log
    Python's own form was two lines naming a file of Pillow's, not the photo."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return _reading(Path(path), lambda image: UprightImage(_codable(image, path), path))
    finally:
        for line in dict.fromkeys(f"{path}: {_detail(caught_one.message)}" for caught_one in caught):
            if on_warning is None:
                warnings.warn(line, UserWarning, stacklevel=2)
            else:
                on_warning(line)


def _codable(image: Image.Image, path: str | Path) -> Image.Image:
    """``image`` if a receiver decodes as many pixels (:data:`aeic.shared.decode_limits.MAX_PIXELS`), else
    :class:`ImageReadError` saying so."""
    width, height = image.size
    if width * height > decode_limits.MAX_PIXELS:
        raise ImageReadError(f"{path}: {width}x{height} ({width * height / 1e6:.0f} megapixels) is over the "
                             f"{decode_limits.MAX_PIXELS:,} pixels a receiver decodes (8192x8192): scale it down "
                             "first")  # fmt: skip
    return image


def _reading(path: Path, make: Callable[[Image.Image], _T]) -> _T:
    """``make`` of the opened image at ``path``, every failure told as :class:`ImageReadError`."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between 1x and 2x its pixel limit; we decide ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_regular(path) as file:
                image = identified(path, file)
                _check_size(path, image.size)
                try:
                    return make(image)
                except OSError as exc:  # not "corrupt or truncated image data": the file is whole
                    if image.format in _DRAWING_FORMATS:
                        raise ImageReadError(f"{path}: {image.format} drawing, which this Pillow cannot render ({_detail(exc)}): "
                                             "export it to PNG or JPEG") from None
                    raise
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: image too large to decode safely ({_detail(exc)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError/EOFError.
        raise ImageReadError(f"{path}: corrupt or truncated image data ({_detail(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - untrusted files can trip any decoder plugin bug
        raise ImageReadError(f"{path}: cannot decode image ({type(exc).__name__}: {_detail(exc)})") from None


def upright_rgb8(image: Image.Image, path: str | Path) -> np.ndarray:
    """An opened image as the sender codes it (the module docstring's policy), ``path`` naming it in errors.

    Training reads its photos through this too (opened reduced, a large JPEG), so it learns the pixels the sender sends.
    """
    return UprightImage(image, path).array()


class UprightImage:
    """An opened image as the sender codes it (the module docstring's policy), read a strip of rows at a time.

    Only the decoded picture is held; each strip is cut from it, turned upright and converted on its own.
    Every step is either per pixel (mode, alpha, colour profile, 16-bit and float scaling) or moves whole
    rows and columns (the EXIF transposes), so the strips are exactly the rows of the whole picture
    converted at once. A :class:`aeic.sender.rows.RowSource`, for one encode: the encoder reads what it needs
    and then calls :meth:`release`, which lets the decoded picture go (192 MB for a 48 MP photo).
    """

    def __init__(self, image: Image.Image, path: str | Path) -> None:
        image.load()
        self.path = Path(path)
        self._image: Image.Image | None = image
        self._transpose = _ORIENTATIONS.get(image.getexif().get(_EXIF_ORIENTATION, 1))
        width, height = image.size
        if self._transpose in _SIDEWAYS:
            width, height = height, width
        self._shape = (height, width, 3)
        self._mode = image.mode
        self._float_scale = 1.0
        if image.mode == "F":
            try:
                self._float_scale = _float_scale(image)
            except ValueError as exc:  # a float image out of range: its own message, not "corrupt data"
                raise ImageReadError(f"{self.path}: {exc}") from None
        self._to_srgb = _srgb_transform(image)
        self.rows(0, min(1, height))  # an unsupported mode fails here, when the file is read, not mid-encode

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, 3) of the upright picture."""
        return self._shape

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` of the upright picture, (stop - start, width, 3) uint8 RGB."""
        if self._image is None:
            raise ValueError(f"{self.path}: its pixels were released after they were read for an encode; open it again")
        strip = self._image.crop(self._stored_box(start, stop))
        if self._transpose is not None:
            strip = strip.transpose(self._transpose)
        return self._rgb8(strip)

    def array(self) -> np.ndarray:
        """The whole upright picture as a C-contiguous HxWx3 uint8 array, filled a strip at a time."""
        height = self._shape[0]
        array = np.empty(self._shape, dtype=np.uint8)
        for top in range(0, height, _STRIP_ROWS):
            array[top : top + _STRIP_ROWS] = self.rows(top, min(top + _STRIP_ROWS, height))
        return array

    def release(self) -> None:
        """Let the decoded picture go: the encoder has read what it needs (its shape stays)."""
        self._image = None

    def _stored_box(self, start: int, stop: int) -> tuple[int, int, int, int]:
        """The box of the stored picture whose transpose is upright rows ``start`` to ``stop``: rows for the
        flips and the half turn, columns for the quarter turns and the diagonal flips."""
        stored_height, stored_width, _ = self._shape
        width, height = (stored_height, stored_width) if self._transpose in _SIDEWAYS else (stored_width, stored_height)
        method = self._transpose
        if method in (Image.Transpose.ROTATE_180, Image.Transpose.FLIP_TOP_BOTTOM):
            return 0, height - stop, width, height - start
        if method in (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270):
            return start, 0, stop, height
        if method in (Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90):
            return width - stop, 0, width - start, height
        return 0, start, width, stop  # upright, or flipped left to right

    def _rgb8(self, strip: Image.Image) -> np.ndarray:
        """A strip in the file's mode as 8-bit RGB (the module docstring's policy)."""
        mode = self._mode
        if mode in _SIXTEEN_BIT_MODES or mode == "F":
            if mode == "F":
                grey = np.round(np.asarray(strip, dtype=np.float32) * self._float_scale).astype(np.uint8)
            else:
                grey = _sixteen_to_eight(np.asarray(strip))
            return np.repeat(grey[:, :, None], 3, axis=2)
        try:
            if mode == "P" and "transparency" in strip.info:
                strip = strip.convert("RGBA")
            if strip.mode in _ALPHA_MODES:
                rgba = strip.convert("RGBA")
                strip = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            rgb = strip if strip.mode == "RGB" else strip.convert("RGB")
            if self._to_srgb is not None:
                rgb = self._to_srgb.apply(rgb)
        except ValueError as exc:
            raise ImageReadError(f"{self.path}: unsupported pixel mode {mode!r} ({exc})") from None
        rows = np.asarray(rgb, dtype=np.uint8)
        if rows.ndim != 3 or rows.shape[2] != 3:
            raise ImageReadError(f"{self.path}: unsupported pixel layout {rows.shape} from mode {mode!r}")
        return rows


_SIDEWAYS = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                       Image.Transpose.ROTATE_90})


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file. Opened without blocking and checked on the
    open descriptor: a FIFO (even one swapped in after a watcher saw a file) would block a plain open
    until some writer came, and a device would be read forever. Any failure to open is the file
    system's (a missing file, a link loop), told as such rather than as damaged image data. Training opens
    its photos through this too."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ImageReadError(f"{path}: {_OPEN_ERRORS.get(exc.errno or 0, f'cannot open ({exc.strerror})')}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
            raise ImageReadError(f"{path}: is {kind}, not an image file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_OPEN_ERRORS = {
    errno.ENOENT: "no such file",
    errno.EISDIR: "is a directory, not an image file",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ELOOP: "symbolic link loop, not an image file",
}


def identified(path: Path, file: BinaryIO) -> Image.Image:
    """``Image.open`` of the file, or one line saying what the file is when Pillow identifies no format.

    Pillow warns of an AVIF file in a build without AVIF before it gives up; its warning is dropped, the
    error says the same on its one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return Image.open(file)
    except UnidentifiedImageError:
        file.seek(0)
        raise ImageReadError(f"{path}: {unidentified_reason(file.read(_SNIFF_BYTES))}") from None


def unidentified_reason(head: bytes) -> str:
    """Why Pillow identified no format in a file that starts with ``head``: empty, a format it reads only
    with a plugin or a build option (HEIC from a phone, JPEG XL, AVIF from an older or slimmer Pillow), or
    none it knows. A phone's HEIC photo was only "not a recognised image format"."""
    if not head:
        return "empty file (0 bytes)"
    if head[4:8] == b"ftyp":
        end = min(int.from_bytes(head[:4], "big"), len(head))
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}  # 12..16: the minor version
        if brands & _AVIF_BRANDS:
            if pillow_reads_avif():
                return "corrupt or unsupported AVIF image"
            return "AVIF image, and this Pillow has no AVIF support: install Pillow 11.2 or later, or convert it to JPEG or PNG"
        if brands & _HEIF_BRANDS:
            return "HEIC/HEIF image, which Pillow does not read: convert it to JPEG or PNG"
    if head.startswith(_JXL_SIGNATURES):
        return "JPEG XL image, which Pillow does not read: convert it to JPEG or PNG"
    return "not a recognised image format"


def pillow_reads_avif() -> bool:
    """Whether this Pillow decodes AVIF (built in since 11.2, where its build found libavif)."""
    try:
        return bool(features.check_module("avif"))
    except ValueError:  # a Pillow before 11.2 knows no such module
        return False


def _check_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ImageReadError(f"{path}: size {width}x{height} is outside the supported 1..{MAX_SIDE} per side")


def _srgb_transform(image: Image.Image) -> ImageCms.ImageCmsTransform | None:
    """The 8-bit RGB to sRGB transform of the image's embedded profile, or None where the samples stay as
    they are: no profile, one that does not parse (viewers ignore it too), or one for a colour space other
    than RGB or an image mode it does not describe. An sRGB profile is transformed too (measured: Pillow's
    own sRGB profile maps every sample to itself): a profile's name does not tell what it holds."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in _RGB_PROFILE_MODES:
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "RGB":
            return None
        return ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), "RGB", "RGB")
    except (OSError, ValueError, ImageCms.PyCMSError):
        return None


def _float_strips(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """A mode ``F`` image's rows as float32, :data:`_STRIP_ROWS` at a time: no float copy of a whole large
    picture besides Pillow's own."""
    for top in range(0, image.height, _STRIP_ROWS):
        box = (0, top, image.width, min(top + _STRIP_ROWS, image.height))
        yield top, np.asarray(image.crop(box), dtype=np.float32)


def _float_scale(image: Image.Image) -> float:
    """What a mode ``F`` image's samples are multiplied by to make 8 bits: 255 if every sample is within 0..1,
    else 1 if within 0..255; ``ValueError`` otherwise (one pass over the image in strips)."""
    low, high = np.inf, -np.inf
    for _, samples in _float_strips(image):
        if not np.isfinite(samples).all():
            raise ValueError("float samples include NaN or infinity")
        low, high = min(low, float(samples.min())), max(high, float(samples.max()))
    if low >= 0 and high <= 1:
        return 255.0
    if low >= 0 and high <= 255:
        return 1.0
    raise ValueError(f"float samples span {low:g}..{high:g}, neither 0..1 nor 0..255")


def _sixteen_to_eight(samples: np.ndarray) -> np.ndarray:
    """Map 0..65535 samples to 0..255 with rounding (x * 255 / 65535)."""
    wide = np.clip(samples, 0, 65535).astype(np.uint32)  # 65535 * 255 + 32767 fits in 32 bits
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)
