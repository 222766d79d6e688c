"""Classic codecs (JPEG, WebP, AVIF, JPEG XL) at equal bytes: the comparison AEIC must beat.

For an image and a byte budget, every downscale factor in :data:`DOWNSCALE_FACTORS` is tried: the image is
shrunk (Lanczos), the highest quality whose whole file fits is found by binary search, the file is decoded
and upsampled back to full size (Lanczos), and the factor with the best *criterion* (PSNR by default, or
MS-SSIM) wins. At these rates (0.005-0.05 bpp) a classic codec cannot even write a full-size file, so
without the downscale search it would be unreachable, not merely bad.

Size accounting: the codec's whole file (headers and container included) counts. A downscaled file does
not say the original size, so :data:`SIZE_SIDE_INFO_BYTES` (two uint16) are charged on top of it whenever
the factor is not 1; AEIC's bitstream carries its size in its own header. JPEG files are first rewritten
losslessly without what libjpeg adds beyond a decodable file (:func:`compact_jpeg_headers`), as AEIC's
container holds nothing optional either.

A codec that cannot fit the budget at any factor and quality returns an *unreachable*
:class:`BaselineResult` (``reachable`` is False); callers count and report those instead of dropping them.
"""

from __future__ import annotations

import importlib
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from aeic.evaluation import metrics
from aeic.sender.encoder import is_grey
from PIL import Image, features

# Measured on Kodak at 0.01 bpp: factors below 1/8 win for JPEG and JPEG XL (often 1/12-1/16) and sometimes
# for WebP, so the grid goes down to 1/16; the in-between steps gain a few hundredths of a dB at 0.05 bpp.
DOWNSCALE_FACTORS: tuple[float, ...] = (
    1.0, 1 / 1.25, 1 / 1.5, 1 / 2, 1 / 2.5, 1 / 3, 1 / 4, 1 / 5, 1 / 6, 1 / 8, 1 / 10, 1 / 12, 1 / 16,
)  # fmt: skip
SIZE_SIDE_INFO_BYTES = 4
CRITERIA: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "psnr": metrics.psnr,
    "ms_ssim": metrics.ms_ssim,
}


@dataclass(frozen=True)
class ClassicCodec:
    """One Pillow format with its quality range and fixed encoder options."""

    name: str
    pil_format: str
    q_min: float
    q_max: float
    options: dict[str, Any] = field(default_factory=dict)
    plugin: str | None = None  # module that registers the format with Pillow
    max_side: int | None = None  # the format's largest width or height (None: no limit met here)
    q_step: float = 1  # the quality grid searched: q_min, q_min + q_step, ..., q_max
    compact: Callable[[bytes], bytes] | None = None  # a lossless rewrite of the encoder's file, smaller
    grey_mode: bool = False  # the format codes one channel: a grey original (R = G = B) is given as mode L

    @property
    def qualities(self) -> Sequence[float]:
        """The quality grid, ascending: integers for a step of 1 (what JPEG, WebP and AVIF take)."""
        if self.q_step == 1:
            return range(int(self.q_min), int(self.q_max) + 1)
        count = round((self.q_max - self.q_min) / self.q_step) + 1
        return [self.q_min + i * self.q_step for i in range(count)]

    def _register(self) -> None:
        if self.plugin is not None:
            importlib.import_module(self.plugin)

    def encode(self, img: Image.Image, quality: float) -> bytes:
        """The whole file for ``img`` at ``quality``."""
        self._register()
        buf = io.BytesIO()
        img.save(buf, self.pil_format, quality=quality, **self.options)
        return buf.getvalue() if self.compact is None else self.compact(buf.getvalue())

    def decode(self, data: bytes) -> Image.Image:
        """Decode the file to RGB."""
        self._register()
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")


def compact_jpeg_headers(data: bytes) -> bytes:
    """The same JPEG without its optional JFIF APP0 segment and with all quantization tables in one DQT
    segment and all Huffman tables in one DHT segment, where libjpeg writes one segment per table: 34 bytes
    less for a colour file, the same pixels, still a baseline JPEG every decoder reads."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG file")
    kept: list[bytes] = [data[:2]]
    merged: dict[int, bytearray] = {}  # marker -> the payloads of all its segments
    pos = 2
    while True:
        marker = data[pos + 1]
        if data[pos] != 0xFF or marker in (0xD8, 0xD9):
            raise ValueError(f"unexpected JPEG marker at byte {pos}")
        if marker == 0xDA:  # start of scan: the rest is the entropy-coded data and EOI
            kept.append(data[pos:])
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        payload = data[pos + 4 : end]
        if marker in (0xDB, 0xC4):
            if marker not in merged:
                merged[marker] = bytearray()
                kept.append(bytes([marker]))  # where the merged segment goes: the first table's place
            merged[marker] += payload
        elif not (marker == 0xE0 and payload.startswith(b"JFIF\0")):
            kept.append(data[pos:end])
        pos = end
    parts = []
    for part in kept:
        if len(part) == 1:
            payload = bytes(merged[part[0]])
            part = b"\xff" + part + (len(payload) + 2).to_bytes(2, "big") + payload
        parts.append(part)
    return b"".join(parts)


# Encoder settings: the strongest compression each offers at a bounded cost; single-threaded so results
# are deterministic and the shared CPU is not flooded. Audited on the six non-Kodak photos at 0.01-0.05 bpp
# (docs/evaluation.md): JPEG's 4:2:0 baseline with optimized Huffman tables beat progressive and 4:4:4;
# WebP method 6 equals cwebp -m 6 (sharp_yuv and -af changed it by under 0.05 dB either way). AVIF is
# libaom (named, so the tune below means what it says) at speed 4, tuned for SSIM: Pillow 13's libavif
# otherwise tunes libaom for "iq" (byte-identical files), which cost 0.15-0.43 dB PSNR and up to 0.03
# MS-SSIM here, and speed 4 gained another 0.07-0.19 dB over speed 6 for three to four times the time.
# JPEG XL's file size is not monotone in its quality, so a quarter-step grid lets the binary search land
# nearer the largest file that fits (+0.01-0.05 dB over whole steps).
# Grey originals: JPEG (one component), AVIF (4:0:0) and JPEG XL code mode L as grey; WebP has no grey mode.
# Measured on two grey training photos (768 px) at 0.02 bpp against three equal channels: JPEG +0.29 /
# +0.69 dB, AVIF +0.06 / +0.20, JPEG XL +0.00 / -0.00 (docs/evaluation.md, Odd inputs).
# Side limits, measured with Pillow 13: JPEG writes up to 65500 px, WebP 16383, and libavif writes wider
# AVIF files than it decodes (32768). A panorama is coded only at the factors that fit them.
AVIF_OPTIONS: dict[str, Any] = {"codec": "aom", "speed": 4, "max_threads": 1, "advanced": {"tune": "ssim"}}
CODECS: dict[str, ClassicCodec] = {
    "jpeg": ClassicCodec(
        "jpeg", "JPEG", 1, 95, {"optimize": True}, max_side=65500, compact=compact_jpeg_headers, grey_mode=True
    ),
    "webp": ClassicCodec("webp", "WEBP", 0, 100, {"method": 6}, max_side=16383),
    "avif": ClassicCodec("avif", "AVIF", 0, 100, AVIF_OPTIONS, max_side=32768, grey_mode=True),
    "jxl": ClassicCodec(
        "jxl", "JXL", 0, 99, {"effort": 7, "num_threads": 1}, "pillow_jxl", q_step=0.25, grey_mode=True
    ),
}


def encoder_settings() -> dict[str, dict[str, Any]]:
    """What every classic codec is run with (format, quality grid, options), as JSON-able values."""
    return {
        name: {
            "format": c.pil_format,
            "qualities": [c.q_min, c.q_max, c.q_step],
            "options": c.options,
            "compact": None if c.compact is None else c.compact.__name__,
            "grey_mode": c.grey_mode,
        }
        for name, c in CODECS.items()
    }


def available_codecs() -> dict[str, str | None]:
    """Codec name -> None when usable here, else the reason it is not."""
    out: dict[str, str | None] = {"jpeg": None if features.check("jpg") else "Pillow built without libjpeg"}
    out["webp"] = None if features.check("webp") else "Pillow built without WebP"
    out["avif"] = (
        None if features.check("avif") else "Pillow built without AVIF (needs Pillow >= 11.3 wheels)"
    )
    if out["avif"] is None:
        from PIL import _avif  # present when the AVIF feature is

        if not _avif.encoder_codec_available(AVIF_OPTIONS["codec"]):
            out["avif"] = f"Pillow's libavif has no {AVIF_OPTIONS['codec']} encoder"
    try:
        import pillow_jxl  # noqa: F401  (registers the JXL format with Pillow)

        out["jxl"] = None
    except ImportError:
        out["jxl"] = "pillow-jxl-plugin not installed (pip install 'aeic[train]')"
    return out


@dataclass(frozen=True)
class BaselineResult:
    """Outcome of one codec at one budget. ``data`` is None when the budget is unreachable."""

    codec: str
    budget_bytes: int
    criterion: str
    data: bytes | None = None
    reconstruction: np.ndarray | None = field(default=None, repr=False)
    factor: float | None = None
    quality: float | None = None
    score: float | None = None
    method: str = ""  # the row label: the codec name, or "best"

    @property
    def reachable(self) -> bool:
        return self.data is not None

    @property
    def num_bytes(self) -> int | None:
        """Bytes a receiver needs: the file plus the original size when downscaled."""
        if self.data is None:
            return None
        return len(self.data) + (0 if self.factor == 1.0 else SIZE_SIDE_INFO_BYTES)


def _scaled_size(width: int, height: int, factor: float) -> tuple[int, int]:
    return max(1, round(width * factor)), max(1, round(height * factor))


def _largest_fitting_quality(
    codec: ClassicCodec, img: Image.Image, file_budget: int
) -> tuple[float, bytes] | None:
    """Binary search of the quality grid for the highest quality whose file is <= ``file_budget``; None if
    even q_min is over.

    Every accepted file was measured to fit, so the result respects the budget even where file size is
    not perfectly monotone in quality.
    """
    grid = codec.qualities
    data = codec.encode(img, grid[0])
    if len(data) > file_budget:
        return None
    best_q, best_data = grid[0], data
    lo, hi = 1, len(grid) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        data = codec.encode(img, grid[mid])
        if len(data) <= file_budget:
            best_q, best_data, lo = grid[mid], data, mid + 1
        else:
            hi = mid - 1
    return best_q, best_data


def largest_factor_within(width: int, height: int, max_pixels: int) -> float:
    """The largest factor of :data:`DOWNSCALE_FACTORS` that a search capped at ``max_pixels`` may try (the
    smallest always): a row at it may have been held back by the cap."""
    allowed = [f for f in DOWNSCALE_FACTORS if math.prod(_scaled_size(width, height, f)) <= max_pixels]
    return max(allowed, default=min(DOWNSCALE_FACTORS))


def compress_to_budget(
    rgb: np.ndarray,
    budget_bytes: int,
    codec: str | ClassicCodec,
    criterion: str = "psnr",
    factors: Iterable[float] = DOWNSCALE_FACTORS,
    max_pixels: int | None = None,
) -> BaselineResult:
    """Best (by ``criterion``) factor/quality of one codec whose whole size fits ``budget_bytes``; with
    ``max_pixels``, only the smallest factor and those whose shrunk picture has at most that many pixels are
    tried (a 24 MP photo's largest ones take most of the search's time)."""
    spec = CODECS[codec] if isinstance(codec, str) else codec
    score_fn = CRITERIA[criterion]
    height, width = rgb.shape[:2]
    # A grey original is coded grey where the format can, as AEIC codes it with its grey flag; it is scored
    # as RGB against the same original either way.
    grey = spec.grey_mode and is_grey(rgb)
    original = Image.fromarray(rgb[..., 0].copy(), "L") if grey else Image.fromarray(rgb, "RGB")
    best = BaselineResult(spec.name, budget_bytes, criterion, method=spec.name)
    # Smallest first: the file at the lowest quality grows with the pixel count, so once it is over
    # budget every larger size is too and the search stops. (Bounding each size's quality search by the
    # previous size's result was tried and dropped: JPEG XL sizes are not monotone enough for it.)
    for tried, factor in enumerate(sorted(set(factors))):
        size = _scaled_size(width, height, factor)
        if spec.max_side is not None and max(size) > spec.max_side:
            break  # factors ascend: every larger one is over the format's limit too
        if tried and max_pixels is not None and size[0] * size[1] > max_pixels:
            break  # the smallest factor is always tried, so a cap below it is not an unreachable row
        side = 0 if size == (width, height) else SIZE_SIDE_INFO_BYTES
        small = original if side == 0 else original.resize(size, Image.Resampling.LANCZOS)
        found = _largest_fitting_quality(spec, small, budget_bytes - side)
        if found is None:
            break
        quality, data = found
        decoded = spec.decode(data)
        if decoded.size != (width, height):
            decoded = decoded.resize((width, height), Image.Resampling.LANCZOS)
        recon = np.asarray(decoded, dtype=np.uint8)
        score = score_fn(rgb, recon)
        if best.score is None or score > best.score:
            best = replace(
                best,
                data=data,
                reconstruction=recon,
                factor=1.0 if side == 0 else factor,
                quality=quality,
                score=score,
            )
    return best


def best_of(results: Iterable[BaselineResult]) -> BaselineResult:
    """The reachable result with the highest score, labelled ``best``; unreachable if none is reachable."""
    results = list(results)
    if not results:
        raise ValueError("best_of needs at least one result")
    reachable = [r for r in results if r.reachable]
    if not reachable:
        return replace(results[0], codec="none", method="best")
    return replace(max(reachable, key=lambda r: r.score if r.score is not None else -math.inf), method="best")


def compress_all(
    rgb: np.ndarray,
    budget_bytes: int,
    codecs: Iterable[str],
    criterion: str = "psnr",
    max_pixels: int | None = None,
) -> dict[str, BaselineResult]:
    """Each named codec at ``budget_bytes``, plus ``best`` over them when more than one is named."""
    out = {
        name: compress_to_budget(rgb, budget_bytes, name, criterion, max_pixels=max_pixels) for name in codecs
    }
    if len(out) > 1:
        out["best"] = best_of(out.values())
    return out
