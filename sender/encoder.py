"""The sender's codec: ONNX analysis, the integer entropy model in numpy, rANS, the container.

No torch: onnxruntime runs the float transforms, numpy the exact integer model. The analysis
transform runs once per image; a byte budget is met by searching rate levels over the light
hyper-analysis and entropy coding only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
from aeic.shared import bitstream, decode_limits
from aeic.shared.entropy_model import FRACTION_BITS, NumpyBackend
from aeic.shared.model_package import SENDER_FILES, ModelPackage, ModelPackageError
from aeic.shared.padding import ALIGNMENT, channel_histograms, statistics_of_histograms
from threadpoolctl import threadpool_limits

from . import coding_scale
from .rate_distortion_rounding import PACKAGE, rounding_for
from .rows import Picture, RowSource, as_rows, row_strips
from .tiled_analysis import (
    DEFAULT_STRIP_ROWS,
    CodedPicture,
    TiledAnalysis,
    favour_heap_speed,
    limit_heap_retention,
    trunk_tiling,
)

# rows read, counted and compared at a time: no full-size copy (a photo read from its file is converted from
# Pillow's picture strip by strip) and no full-size boolean arrays for a large photo
_FACTS_ROWS = 256

CPU_PROVIDER = "CPUExecutionProvider"
SPINNING = "session.intra_op.allow_spinning"  # onnxruntime's session config key
AUTO = coding_scale.AUTO
# a budget under level 0's size is searched among the levels up to the second trained rate point (16 levels
# per step in the shipped package), where sizes are not monotone in the level
LOWEST_LEVELS_SCANNED = 17


class BudgetError(ValueError):
    """Even the lowest rate level does not fit the byte budget."""


def allowed_cpus() -> int | None:
    """How many CPUs this process may run on, where that is fewer than the machine has (else None).

    Left to choose, onnxruntime runs one intra-op thread per physical core of the machine and pins each
    to its own core, whatever the process' affinity mask (``taskset``, systemd's ``CPUAffinity=``,
    ``docker --cpuset-cpus``): a sender held to one core of two ran its workers on the other, and when
    that core was busy each encode waited for them (1080p: 1.5 times the wall time; docs/sender.md,
    Resources on the device). Given a count, it starts its threads within the mask.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call here (macOS, Windows)
        return None
    return allowed if allowed < (os.cpu_count() or allowed) else None


def limit_blas_threads(threads: int | None) -> None:
    """Hold numpy's BLAS (the entropy model's matrix products) to the sender's thread count, for the process.

    ``threads=1`` asks for one core, yet OpenBLAS ran one thread per core of the machine: 1080p coded to 0.02
    bpp with ``threads=1`` on two cores took 7.2-8.1 s of CPU for 4.6-5.1 s of wall time; held, 5.2-6.6 s of
    each. ``None`` leaves the BLAS as it starts (OpenBLAS counts the CPUs of the process' affinity mask).
    """
    if threads:
        threadpool_limits(limits=threads, user_api="blas")


def session_options(threads: int | None, memory_pattern: bool = True) -> ort.SessionOptions:
    """No memory arena: each session's arena would keep its own peak for the life of the process.

    ``memory_pattern`` (one planned block per run) suits graphs run many times at one shape, the
    stem's strips; for the trunk the planned block is about twice its live tensors. ``threads``
    None: onnxruntime's default, or the CPUs the process may use when it is held to fewer
    (:func:`allowed_cpus`).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = memory_pattern
    threads = threads or allowed_cpus()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning: the CPU they spun on is the entropy model's (numpy, between
    # runs) and the device's other work's. Two threads on the loaded 2-core machine: 17 % less CPU, no slower.
    options.add_session_config_entry(SPINNING, "0")
    return options


def choose_providers(requested: str | None) -> list[str]:
    """The requested provider if this onnxruntime build has it, always with the CPU as fallback."""
    available = ort.get_available_providers()
    if requested and requested in available and requested != CPU_PROVIDER:
        return [requested, CPU_PROVIDER]
    return [CPU_PROVIDER]


@dataclass
class SourceFacts:
    """What the header says of the original picture, whatever its coding downscale: the budget's fallback
    analyses one photo at up to three downscales, and these passes over the whole original are made once."""

    rgb: RowSource

    @property
    def colour_stats(self) -> tuple[int, int, int, int, int, int]:
        """The header's colour statistics (of the original, not of the downscaled picture coded)."""
        return self._counted[0]

    @property
    def grey(self) -> bool:
        """The header's grey flag: the model decodes colour, so a grey photo came back tinted at low rates
        unless the receiver is told to output grey (one header bit, so a byte budget still holds)."""
        return self._counted[1]

    @cached_property
    def _counted(self) -> tuple[tuple[int, int, int, int, int, int], bool]:
        """Both facts from one pass over the rows: a photo read from its file is converted strip by strip
        for each pass, and a grey one was read in full twice."""
        return header_facts(self.rgb)


@dataclass
class AnalysedImage:
    """An image after the analysis transform: reusable across rate levels."""

    facts: SourceFacts  # the original picture, shared by every analysis of it
    latent: np.ndarray  # (1, C, h, w) float32
    downscale: int = 1  # the coding downscale the latent was computed at
    # the entropy model's buffers, kept for this image's rate levels and freed with it
    backend: NumpyBackend = field(default_factory=NumpyBackend, repr=False)

    @property
    def rgb(self) -> RowSource:
        return self.facts.rgb

    @property
    def colour_stats(self) -> tuple[int, int, int, int, int, int]:
        return self.facts.colour_stats

    @property
    def grey(self) -> bool:
        return self.facts.grey


def header_facts(rgb: Picture) -> tuple[tuple[int, int, int, int, int, int], bool]:
    """The picture's colour statistics and whether it is grey (R == G == B at every pixel, as greyscale files
    read as RGB have), in one pass of strips. The statistics are
    :func:`aeic.shared.padding.colour_statistics` from counts that add up strip by strip, so they equal the
    whole picture's, and a photo read from its file is never whole as an array."""
    counts = np.zeros((3, 256), np.int64)
    grey = True
    for rows in row_strips(as_rows(rgb), _FACTS_ROWS):
        counts += channel_histograms(rows)
        grey = grey and np.array_equal(rows[..., 0], rows[..., 1]) and np.array_equal(rows[..., 1], rows[..., 2])
    return statistics_of_histograms(counts), grey


def is_grey(rgb: Picture) -> bool:
    """Whether an HxWx3 picture has R == G == B at every pixel (:func:`header_facts`' flag)."""
    return header_facts(rgb)[1]


class SenderCodec:
    """Encodes RGB images into AEIC bitstreams with one model package."""

    def __init__(self, package: ModelPackage, provider: str | None = None, threads: int | None = None,
                 strip_rows: int = DEFAULT_STRIP_ROWS, downscale: int | str = AUTO,
                 rounding: float | str = PACKAGE, frugal_heap: bool = True) -> None:
        """``rounding``: ``"package"`` (the package's tuned weight), ``"nearest"`` or a weight
        (:mod:`aeic.sender.rate_distortion_rounding`). ``frugal_heap``: hand freed memory back to the system
        (a device's peak, :func:`limit_heap_retention`) or keep it for speed (:func:`favour_heap_speed`)."""
        if downscale != AUTO and downscale not in bitstream.DOWNSCALES:
            raise ValueError(f"downscale must be {AUTO!r} or one of {bitstream.DOWNSCALES}, got {downscale!r}")
        self.package = package
        self.downscale = downscale
        self.rounding = rounding_for(package.rounding_weight, rounding)
        if frugal_heap:
            limit_heap_retention()
        else:
            favour_heap_speed()
        limit_blas_threads(threads or allowed_cpus())
        providers = choose_providers(provider)

        def session(name: str, memory_pattern: bool = True) -> ort.InferenceSession:
            return ort.InferenceSession(str(package.file(name)), session_options(threads, memory_pattern), providers=providers)

        stem = session("analysis_stem.onnx")
        trunk = session("analysis_trunk.onnx", memory_pattern=False)
        factor, halo = package.analysis_tiling
        try:
            trunk_factor, trunk_halo = trunk_tiling(package.manifest["config"]["analysis"], factor)
        except (KeyError, TypeError) as exc:  # a package another version exported: one line, not a KeyError
            raise ModelPackageError(f"{package.path}: its analysis configuration is not this version's ({exc!r}); "
                                    "was it exported by another version of aeic?") from None
        self.analysis = TiledAnalysis(stem, trunk, factor, halo, trunk_factor, trunk_halo, strip_rows)
        self.hyper = session("hyper.onnx")
        self.provider = stem.get_providers()[0]

    @classmethod
    def from_package(cls, path: Path | str | None = None, provider: str | None = None, threads: int | None = None,
                     strip_rows: int = DEFAULT_STRIP_ROWS, downscale: int | str = AUTO,
                     rounding: float | str = PACKAGE, frugal_heap: bool = True) -> SenderCodec:
        return cls(ModelPackage.load(path, needs=SENDER_FILES), provider, threads, strip_rows, downscale, rounding,
                   frugal_heap)

    @property
    def model_id(self) -> bytes:
        return self.package.model_id

    @property
    def num_levels(self) -> int:
        return self.package.num_levels

    def analyse(self, rgb: Picture, downscale: int | None = None, facts: SourceFacts | None = None) -> AnalysedImage:
        """Run the analysis transform once (the expensive part), on the image reduced by the coding downscale.

        ``downscale`` (1, 2 or 4) overrides the codec's setting; with neither, ``"auto"`` picks one by size
        (:func:`aeic.sender.coding_scale.downscale_for_rate`). ``facts``: those of ``rgb`` from another
        analysis of it, so its header fields are not computed again. ``rgb``: an HxWx3 uint8 array or a
        :class:`~aeic.sender.tiled_analysis.RowSource` (a photo read by :func:`aeic.sender.images.open_image`)."""
        source = as_rows(rgb)
        factor = self._coding_factor(source, downscale)
        if facts is not None and facts.rgb is not source:
            raise ValueError("facts of another picture")
        return AnalysedImage(facts or SourceFacts(source), self.analysis(source, factor, ALIGNMENT), factor)

    def _coding_factor(self, source: RowSource, downscale: int | None) -> int:
        """``downscale``, else the codec's, checked: a picture a receiver would refuse fails before any work."""
        height, width, _ = source.shape
        if not (1 <= height <= bitstream.MAX_DIMENSION and 1 <= width <= bitstream.MAX_DIMENSION):
            raise ValueError(f"image size {width}x{height} outside 1..{bitstream.MAX_DIMENSION}")
        factor = downscale or (coding_scale.downscale_for_rate(height, width) if self.downscale == AUTO else int(self.downscale))
        too_large = decode_limits.oversize_reason(height, width, factor)
        if too_large is not None:
            raise ValueError(too_large)
        return factor

    def _analyses(self, source: RowSource, factors: list[int]) -> Iterator[AnalysedImage]:
        """The source analysed at each of ``factors`` in turn, each made when asked for.

        A source that can let go of its pixels (``release``: a photo opened from its file, whose decoded
        picture is 4 bytes a pixel) is read once, up front: the header's facts, then each factor's coded
        picture (a 48 MP photo at 1/4: 9 MB), and then released, before the analysis' own few hundred MB.
        """
        facts = SourceFacts(source)  # the header's colour statistics and grey flag, whatever the factor
        release = getattr(source, "release", None)
        if release is None:
            for factor in factors:
                yield AnalysedImage(facts, self.analysis(source, factor, ALIGNMENT), factor)
            return
        facts.grey  # noqa: B018 - computed (and cached) while the pixels are there
        if factors[0] == 1:  # coded whole (factors ascend): the photo's array, once analysed, gives the others
            photo = CodedPicture(source, 1).reduced()
            release()
            latent = self.analysis(photo, 1, ALIGNMENT)
            reduced = {factor: CodedPicture(photo, factor).reduced() for factor in factors[1:]}
            del photo  # not held through the entropy coding, as the caller's array was
            yield AnalysedImage(facts, latent, 1)
            factors = factors[1:]
        else:
            reduced = {factor: CodedPicture(source, factor).reduced() for factor in factors}
            release()
        for factor in factors:
            yield AnalysedImage(facts, self.analysis(reduced.pop(factor), 1, ALIGNMENT), factor)

    def _entropy_code(self, analysed: AnalysedImage, level: int) -> tuple[bytes, np.ndarray]:
        """(payload, ŷ in fixed point) of this rate level."""
        if not 0 <= level < self.num_levels:
            raise ValueError(f"rate level {level} outside 0..{self.num_levels - 1}")
        scaled, z = self.hyper.run(["scaled", "z"], {"latent": analysed.latent, "gain": self.package.level_gains[level]})
        return self.package.entropy_model.encode(scaled[0], z[0], analysed.backend, self.rounding)

    def quantized_latent(self, analysed: AnalysedImage, level: int) -> np.ndarray:
        """ŷ (C, h, w) in real units: exactly what a receiver reconstructs from this level's bitstream.

        Decoder fine-tuning trains on it, so the receiver half learns from the sender's true output.
        """
        _, fixed = self._entropy_code(analysed, level)
        gain = self.package.level_gains[level][:, None, None]
        return (fixed / (1 << FRACTION_BITS) / gain).astype(np.float32)

    def encode_analysed(self, analysed: AnalysedImage, level: int) -> bytes:
        payload, _ = self._entropy_code(analysed, level)
        height, width, _ = analysed.rgb.shape
        header = bitstream.Header(
            model_id=self.model_id,
            width=width,
            height=height,
            rate_index=level,
            colour_stats=analysed.colour_stats,
            downscale=analysed.downscale,
            grey=analysed.grey,
        )
        return bitstream.pack(bitstream.Bitstream(header, payload))

    def encode(self, rgb: Picture, rate_index: int) -> bytes:
        """A complete bitstream of ``rgb`` at rate level ``rate_index``. A photo from
        :func:`aeic.sender.images.open_image` is released once read (:meth:`_analyses`)."""
        source = as_rows(rgb)
        (analysed,) = self._analyses(source, [self._coding_factor(source, None)])
        return self.encode_analysed(analysed, rate_index)

    def encode_to_budget(self, rgb: Picture, target_bytes: int) -> tuple[bytes, int]:
        """The highest rate level whose whole bitstream fits ``target_bytes`` (binary search; a budget
        that level 0 overflows is looked for among the lowest levels one by one).

        With ``downscale="auto"`` the coding downscale comes from the budget and the image size
        (:func:`aeic.sender.coding_scale.downscale_for_budget`); when even the lowest level
        overflows there, the next larger downscale is tried (:func:`aeic.sender.coding_scale.budget_downscales`).
        A photo from :func:`aeic.sender.images.open_image` is released once read (:meth:`_analyses`).
        """
        auto = self.downscale == AUTO
        source = as_rows(rgb)
        height, width, _ = source.shape
        factors = coding_scale.budget_downscales(height, width, target_bytes) if auto else [None]
        checked = [self._coding_factor(source, factor) for factor in factors]
        smallest: list[int] = []  # each factor's smallest stream: the error names the least of them
        for analysed in self._analyses(source, checked):
            search = LevelSearch(partial(self.encode_analysed, analysed), target_bytes, self.num_levels)
            best = search.highest_fitting_level()
            if best is None:
                best, least = search.fit_among_lowest_levels()
                smallest.append(least)
            if best is not None:
                return best
        raise BudgetError(f"even the lowest rate needs {min(smallest)} bytes, over the budget of {target_bytes}")


class LevelSearch:
    """The byte-budget rules over the rate levels of one analysed image, each level coded at most once.

    Only whole bitstream sizes decide, and every level the rules visit is coded: sizes are not
    monotone in the level even above the lowest levels (measured: dips of up to 6 % spanning up
    to 4 levels in 16 of 117 photos, docs/sender.md), so no level's outcome can be told from
    another's without changing the answer for some image and budget.
    """

    def __init__(self, encode: Callable[[int], bytes], target_bytes: int, num_levels: int) -> None:
        self.encode = encode
        self.target_bytes = target_bytes
        self.num_levels = num_levels
        self.streams: dict[int, bytes] = {}

    def stream(self, level: int) -> bytes:
        if level not in self.streams:
            self.streams[level] = self.encode(level)
        return self.streams[level]

    def fits(self, level: int) -> bool:
        return len(self.stream(level)) <= self.target_bytes

    def highest_fitting_level(self) -> tuple[bytes, int] | None:
        """The binary search's answer: the last level it visits that fits (None: none does)."""
        low, high, best = 0, self.num_levels - 1, None
        while low <= high:
            middle = (low + high) // 2
            if self.fits(middle):
                best, low = middle, middle + 1
            else:
                high = middle - 1
        return None if best is None else (self.stream(best), best)

    def fit_among_lowest_levels(self) -> tuple[tuple[bytes, int] | None, int]:
        """The highest of the lowest levels that fits, and the smallest size among them (the levels
        the binary search coded are not coded again).

        Below the lowest trained rate point's neighbour the size is not monotone in the level (with tiny
        gains every symbol rounds to zero and the bits climb back): level 0 may overflow a budget that a
        level above it fits, which the binary search, having seen level 0 overflow, never tries."""
        levels = range(min(LOWEST_LEVELS_SCANNED, self.num_levels))
        fitting = [level for level in levels if self.fits(level)]
        best = (self.stream(fitting[-1]), fitting[-1]) if fitting else None
        return best, min(len(self.stream(level)) for level in levels)
