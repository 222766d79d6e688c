"""The evaluation loop: real bitstreams in, per-image rows and means out.

For every image (sorted, so runs are deterministic) and every rate point, the codec writes a complete
bitstream and decodes it; bpp is ``len(bitstream) * 8 / (W * H)`` with the container included. Classic
baselines are then coded at the same bytes: AEIC's actual byte count for a rate-index point, the byte
budget itself for a bpp-budget point (each method's best under the same budget).

Rows go to ``OUT/results.csv`` as soon as they exist (:mod:`~aeic.evaluation.results_file`), so an
interrupted run resumes where it stopped: rows already in the CSV are skipped, once
:mod:`~aeic.evaluation.resume` has checked that they were made the same way. ``OUT/summary.json`` holds the
configuration, the machine, every row and the means per (point, method) (:mod:`~aeic.evaluation.summary`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
from aeic.evaluation import baselines, learned, metrics, resume
from aeic.evaluation.images import UNREADABLE, list_images, load_rgb, recon_name
from aeic.evaluation.results_file import ResultsFile
from aeic.evaluation.summary import machine_info, means, typed_row
from aeic.shared import bitstream
from PIL import Image
from tqdm import tqdm

BASE_COLUMNS = [
    "image", "width", "height", "point", "method", "status", "detail", "rate_index", "factor", "quality",
    "budget_bytes", "bytes", "bpp", "encode_ms", "decode_ms",
]  # fmt: skip


@runtime_checkable
class Codec(Protocol):
    """What the runner needs from a codec: a complete bitstream per rate index, and its decoder."""

    def encode(self, rgb: np.ndarray, rate_index: int) -> bytes: ...

    def decode(self, data: bytes) -> np.ndarray: ...


class BudgetCodec(Codec, Protocol):
    """A codec that also meets byte budgets, which bpp-budget points need."""

    def encode_to_budget(self, rgb: np.ndarray, target_bytes: int) -> tuple[bytes, int]: ...


class BudgetUnreachable(Exception):
    """Raised by ``encode_to_budget`` when even the lowest rate is over the byte budget."""


@dataclass(frozen=True)
class RatePoint:
    """A rate index of the model, or a byte budget given in bits per pixel."""

    kind: str  # "rate" or "budget"
    value: float

    @property
    def label(self) -> str:
        return f"rate{int(self.value)}" if self.kind == "rate" else f"bpp{self.value:g}"

    def budget_bytes(self, width: int, height: int) -> int | None:
        """The whole-file byte budget for an image of this size (None for a rate index)."""
        return None if self.kind == "rate" else math.floor(self.value * width * height / 8)


def parse_points(rates: str | None, budgets_bpp: str | None) -> list[RatePoint]:
    """``"0,1,2"`` rate indices and/or ``"0.01,0.02"`` bpp budgets -> rate points (at least one)."""
    points: list[RatePoint] = []
    for item in filter(None, (rates or "").split(",")):
        index = _number(int, item, "--rates")
        if index < 0:
            raise ValueError(f"rate index must be >= 0, got {index}")
        points.append(RatePoint("rate", index))
    for item in filter(None, (budgets_bpp or "").split(",")):
        bpp = _number(float, item, "--budgets-bpp")
        if not 0 < bpp < 24:
            raise ValueError(f"bpp budget must be in (0, 24), got {bpp}")
        points.append(RatePoint("budget", bpp))
    if not points:
        raise ValueError("give at least one rate index or bpp budget")
    unique = {p.label: p for p in reversed(points)}  # "0.01,0.010" is one point, not two mean rows
    return [p for p in points if unique[p.label] is p]


def _number(kind: Callable[[str], Any], text: str, option: str) -> Any:
    """``kind(text)``, with an error that names the option and the bad item."""
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{option}: {text.strip()!r} is not a {kind.__name__}") from None


@dataclass
class EvalConfig:
    """Everything that decides the rows; stored in summary.json."""

    images: Path
    out: Path
    points: list[RatePoint]
    baselines: list[str] = field(default_factory=list)  # codec names; "best" is added when > 1
    criterion: str = "psnr"  # how the baseline search ranks downscale factors
    limit: int | None = None
    metrics: list[str] | None = None  # None: every metric that can run here
    save_recon: int = 1  # reconstructions of the first N images go to OUT/recon/<point>/<method>/
    skipped_baselines: dict[str, str] = field(default_factory=dict)  # codec -> why it cannot run here
    baseline_max_mpx: float | None = None  # the classic search tries no factor whose picture is larger


UNREADABLE_DETAIL = "unreadable image"  # how an error row of a file that cannot be read starts


def metric_functions(names: list[str] | None) -> tuple[dict[str, Callable[..., float]], dict[str, str]]:
    """Metric name -> function, and name -> reason for each requested metric that cannot run here."""
    fns: dict[str, Callable[..., float]] = dict(metrics.CORE_METRICS)
    skipped: dict[str, str] = {}
    for name in metrics.PERCEPTUAL_METRICS:
        try:
            fns[name] = metrics.perceptual_metric_fn(name)
        except ImportError as exc:
            skipped[name] = f"skipped: piq not importable ({exc}); pip install --no-deps piq"
    if names is not None:
        unknown = set(names) - set(fns) - set(skipped) - set(learned.REQUIREMENTS)
        if unknown:
            raise ValueError(f"unknown metrics: {sorted(unknown)}")
        fns = {n: f for n, f in fns.items() if n in names}
        skipped = {n: r for n, r in skipped.items() if n in names}
    return fns, skipped


def _coding_factor(data: bytes) -> float | str:
    """1 / the coding downscale an AEIC stream was made at (the scale of the picture it codes)."""
    try:
        return 1.0 / bitstream.peek_header(data).downscale
    except bitstream.BitstreamError:  # a stand-in codec of the tests writes other bytes
        return ""


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - start) * 1000.0


def _check_runnable(codec: Codec | None, config: EvalConfig) -> None:
    """Refuse, before anything is measured or written, points the codec cannot code and unknown baselines."""
    if codec is None:
        if any(p.kind == "rate" for p in config.points) or not config.baselines:
            raise ValueError("without a codec only bpp budgets with at least one baseline can be evaluated")
    elif not isinstance(codec, Codec):
        raise TypeError("codec needs encode(rgb, rate_index) -> bytes and decode(bytes) -> rgb")
    elif any(p.kind == "budget" for p in config.points) and not hasattr(codec, "encode_to_budget"):
        raise TypeError("bpp budgets need a codec with encode_to_budget(rgb, target_bytes)")
    unknown = set(config.baselines) - set(baselines.CODECS)
    if unknown:
        raise ValueError(f"unknown baseline codecs: {sorted(unknown)}")


class Evaluator:
    """Runs one configuration against one codec; see the module docstring for what it measures."""

    def __init__(
        self, codec: Codec | None, config: EvalConfig, codec_info: dict[str, Any] | None = None
    ) -> None:
        """``codec=None`` evaluates only the classic baselines, which needs bpp-budget points."""
        _check_runnable(codec, config)
        self.codec, self.config, self.codec_info = codec, config, codec_info or {}
        self.metric_fns, self.skipped = metric_functions(config.metrics)
        wanted = config.metrics if config.metrics is not None else list(learned.REQUIREMENTS)
        self.learned = learned.LearnedMetrics()
        for name, status in self.learned.status.items():
            if name in wanted and not status.available:
                self.skipped[name] = status.message
        self.learned_names = [n for n in self.learned.per_image_names if n in wanted]
        self.methods = (["aeic"] if codec is not None else []) + list(config.baselines)
        self.methods += ["best"] if len(config.baselines) > 1 else []
        self.columns = BASE_COLUMNS + list(self.metric_fns) + self.learned_names
        self.results = ResultsFile(config.out / "results.csv", self.columns)
        identity = resume.run_identity(
            config.criterion, config.baselines, self.codec_info if codec is not None else None,
            config.baseline_max_mpx,
        )  # fmt: skip
        identity["images"] = resume.image_digests(list_images(config.images, config.limit))
        measured = {r["image"] for r in self.results.rows}
        resume.check_run_identity(config.out, identity, resuming=bool(self.results.rows), measured=measured)
        self._warm = False

    @property
    def _baseline_max_pixels(self) -> int | None:
        """``--baseline-max-mpx`` in pixels, the classic search's cap (None: uncapped)."""
        cap = self.config.baseline_max_mpx
        return None if cap is None else math.floor(cap * 1e6)

    def classic_rows_missing(self, name: str) -> bool:
        """Whether image ``name`` still has a classic row to search: a resume skips the rows already done."""
        classic = [m for m in self.methods if m != "aeic"]
        return any((name, p.label, m) not in self.results.done for p in self.config.points for m in classic)

    def _score(self, ref: np.ndarray, rec: np.ndarray) -> dict[str, float]:
        out = {name: fn(ref, rec) for name, fn in self.metric_fns.items()}
        if self.learned_names:
            out.update(self.learned.per_image(ref, rec))
        return out

    def _encode(
        self, codec: Codec, rgb: np.ndarray, point: RatePoint, budget: int | None
    ) -> tuple[bytes, int | None, float]:
        if point.kind == "rate":
            data, ms = _timed(lambda: codec.encode(rgb, int(point.value)))
            return data, int(point.value), ms
        assert budget is not None  # a budget point's
        budget_codec = cast(BudgetCodec, codec)  # __init__ checked that it has encode_to_budget
        (data, rate), ms = _timed(lambda: budget_codec.encode_to_budget(rgb, budget))
        return data, rate, ms

    def _aeic_row(
        self, codec: Codec, base: dict[str, Any], rgb: np.ndarray, point: RatePoint
    ) -> tuple[dict, np.ndarray | None]:
        budget = point.budget_bytes(rgb.shape[1], rgb.shape[0])
        row = dict(base, method="aeic", budget_bytes=budget)
        self._warm_up()
        try:
            data, rate, enc_ms = self._encode(codec, rgb, point, budget)
        except BudgetUnreachable as exc:
            return dict(row, status="unreachable", detail=str(exc)), None
        except ValueError as exc:  # the sender refuses e.g. a side over the container's 16384 px
            return dict(row, status="error", detail=f"AEIC cannot code this image: {exc}"), None
        rec, dec_ms = _timed(lambda: codec.decode(data))
        rec = np.asarray(rec)
        if rec.shape != rgb.shape or rec.dtype != np.uint8:
            raise ValueError(f"decoder returned {rec.dtype} {rec.shape}, expected uint8 {rgb.shape}")
        row.update(
            status="ok", detail="", rate_index=rate, factor=_coding_factor(data), bytes=len(data),
            encode_ms=enc_ms, decode_ms=dec_ms,
        )
        row["bpp"] = len(data) * 8 / (rgb.shape[0] * rgb.shape[1])
        row.update(self._score(rgb, rec))
        return row, rec

    def _baseline_rows(
        self, base: dict[str, Any], rgb: np.ndarray, budget: int, wanted: list[str]
    ) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
        """Rows for the ``wanted`` baseline methods; each reconstruction is scored once (best reuses it)."""
        results = baselines.compress_all(rgb, budget, self.config.baselines, self.config.criterion,
                                         self._baseline_max_pixels)
        scores: dict[str, dict[str, float]] = {}
        for method, res in results.items():
            if method not in wanted:
                continue
            row = dict(base, method=method, budget_bytes=budget)
            if not res.reachable:
                yield dict(row, status="unreachable", detail=f"{res.codec}: no factor/quality fits"), None
                continue
            assert res.num_bytes is not None and res.reconstruction is not None  # reachable: both are set
            row.update(status="ok", detail=res.codec, factor=res.factor, quality=res.quality)
            row.update(bytes=res.num_bytes, bpp=res.num_bytes * 8 / (rgb.shape[0] * rgb.shape[1]))
            if res.codec not in scores:
                scores[res.codec] = self._score(rgb, res.reconstruction)
            row.update(scores[res.codec])
            yield row, res.reconstruction

    def _save(self, index: int, point: RatePoint, method: str, name: str, rec: np.ndarray | None) -> None:
        if rec is not None and index < self.config.save_recon:
            folder = self.config.out / "recon" / point.label / method
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rec).save(folder / recon_name(name))

    def _one(self, index: int, path: Path, rgb: np.ndarray, point: RatePoint) -> None:
        """All missing rows of one (image, point): AEIC first, then the baselines at its bytes."""
        done = self.results.done
        base = {"image": path.name, "width": rgb.shape[1], "height": rgb.shape[0], "point": point.label}
        key = (path.name, point.label)
        aeic = done.get((*key, "aeic"))
        if aeic is None and self.codec is not None:
            row, rec = self._aeic_row(self.codec, base, rgb, point)
            self._save(index, point, "aeic", path.name, rec)  # before its row: a resume skips rows it holds
            self.results.append([row])
            if rec is not None:
                self.learned.add_to_set(f"{point.label}/aeic", rgb, rec)
            aeic = self.results.done[key + ("aeic",)]
        missing = [m for m in self.methods if m != "aeic" and (*key, m) not in done]
        if not missing:
            return
        budget = point.budget_bytes(rgb.shape[1], rgb.shape[0])
        if budget is None:  # a rate point's budget is AEIC's byte count
            if aeic is None or aeic["status"] != "ok":
                detail = "no AEIC bytes to match (AEIC failed on this image)"
                self.results.append(dict(base, method=m, status="error", detail=detail) for m in missing)
                return
            budget = int(aeic["bytes"])
        rows = []
        for row, rec in self._baseline_rows(base, rgb, budget, missing):
            rows.append(row)
            self._save(index, point, row["method"], path.name, rec)
            if rec is not None:
                self.learned.add_to_set(f"{point.label}/{row['method']}", rgb, rec)
        self.results.append(rows)

    def run(self, progress: bool = True) -> dict[str, Any]:
        """Evaluate everything not yet in results.csv, then write summary.json and return it.

        Reconstructions are saved for the first ``save_recon`` readable images: an unreadable file first
        in the folder left none to draw the side-by-side from."""
        paths = list_images(self.config.images, self.config.limit)
        readable = 0  # images before this one that could be read: the index --save-recon counts
        unreadable = self._unreadable_images()  # once: a scan of every row per image made a resume quadratic
        with tqdm(total=len(paths) * len(self.config.points), disable=not progress, unit="pt") as bar:
            for path in paths:
                todo = [
                    p for p in self.config.points
                    if any((path.name, p.label, m) not in self.results.done for m in self.methods)
                ]  # fmt: skip
                if todo:
                    bar.set_postfix_str(path.name)
                    readable += self._image(readable, path, todo)
                else:
                    readable += path.name not in unreadable
                bar.update(len(self.config.points))
        summary = self.summary([p.name for p in paths])
        (self.config.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _warm_up(self) -> None:
        """One untimed encode/decode first, so lazy imports and graph set-up stay out of encode_ms/decode_ms."""
        if self.codec is not None and not self._warm:
            self._warm = True
            yy, xx = np.mgrid[0:64, 0:64]
            picture = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)
            self.codec.decode(self.codec.encode(picture, 0))

    def _image(self, index: int, path: Path, points: list[RatePoint]) -> bool:
        """Evaluate one image at ``points``; an unreadable file gets an error row per method instead (False)."""
        try:
            rgb = load_rgb(path)
        except UNREADABLE as exc:
            for point in points:
                self.results.append(
                    {"image": path.name, "point": point.label, "method": m, "status": "error",
                     "detail": f"{UNREADABLE_DETAIL}: {exc}"}
                    for m in self.methods if (path.name, point.label, m) not in self.results.done
                )  # fmt: skip
            return False
        for point in points:
            self._one(index, path, rgb, point)
        return True

    def _unreadable_images(self) -> set[str]:
        """The images this folder holds an unreadable-file error row of."""
        return {image for (image, _, _), row in self.results.done.items() if row["detail"].startswith(UNREADABLE_DETAIL)}

    def summary(self, image_names: list[str]) -> dict[str, Any]:
        """Configuration, machine, per-image rows (this image set only) and per-(point, method) means."""
        names = set(image_names)
        order = {p.label: i for i, p in enumerate(self.config.points)}
        method_order = {m: i for i, m in enumerate(self.methods)}
        # Rows of other points or methods in the same --out were made by other runs: not this summary's.
        rows = [
            r for r in self.results.rows
            if r["image"] in names and r["point"] in order and r["method"] in method_order
        ]  # fmt: skip
        rows.sort(key=lambda r: (r["image"], order[r["point"]], method_order[r["method"]]))
        config = asdict(self.config)
        config.update(images=str(self.config.images), out=str(self.config.out))
        settings = baselines.encoder_settings()
        config["baseline_encoders"] = {name: settings[name] for name in self.config.baselines}
        return {
            "config": config,
            "machine": machine_info(),
            "codec": self.codec_info,
            "metrics": list(self.metric_fns) + self.learned_names,
            "skipped_metrics": self.skipped,
            "set_metrics": self.learned.set_results(),  # FID/KID over rows evaluated in this run only
            "means": means(rows, self.columns, self.config.points, self.methods),
            "rows": [typed_row(r) for r in rows],
            "baseline_rows_at_cap": self._rows_at_cap(rows),
        }

    def _rows_at_cap(self, rows: list[dict[str, str]]) -> dict[str, list[str]]:
        """Method -> ``image@point`` of the classic rows whose factor is the largest ``--baseline-max-mpx`` let
        the search try: a larger picture, had it been tried, might have scored higher."""
        out: dict[str, list[str]] = {}
        max_pixels = self._baseline_max_pixels
        if max_pixels is None:
            return out
        for r in rows:
            if r["method"] != "aeic" and r["status"] == "ok":
                limit = baselines.largest_factor_within(int(r["width"]), int(r["height"]), max_pixels)
                if limit < max(baselines.DOWNSCALE_FACTORS) and math.isclose(float(r["factor"]), limit):
                    out.setdefault(r["method"], []).append(f"{r['image']}@{r['point']}")
        return out
