"""``aeic eval``: argument parsing and the run, as :func:`main_eval` (wired into the ``aeic`` CLI)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from aeic.evaluation import baselines, images, learned, metrics, plots, resume, runner
from aeic.sender.coding_scale import parse_downscale
from aeic.sender.images import IMAGE_SUFFIXES
from aeic.sender.rate_distortion_rounding import parse_rounding

BASELINE_CHOICES = ("jpeg", "webp", "avif", "jxl", "best", "none")
LARGE_PHOTO_MPX = 8.0  # above it, the classic search's time is worth a warning (a 12 MP photo: tens of minutes)
METRIC_NAMES = (*metrics.CORE_METRICS, *metrics.PERCEPTUAL_METRICS, *learned.REQUIREMENTS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aeic eval",
        description="Compress every image to a real AEIC bitstream, decode it, and measure it against "
        "classic codecs at the same bytes. Writes OUT/results.csv, OUT/summary.json, RD plots and side-by-side "
        "crops (OUT/rd_<metric>.png, OUT/side_by_side_<image>_<point>.png).",
        epilog="Exit status: 0 done; 1 some image failed (its error rows are in the results); 2 bad arguments; "
        "130 interrupted (the rows written stay, the same command resumes).",
    )
    p.add_argument("--images", type=Path, required=True, help=f"folder of images ({', '.join(sorted(IMAGE_SUFFIXES))}: what the sender reads)")
    p.add_argument(
        "--model", default=None, help="model package folder or shipped model name (default: shipped)"
    )
    points = p.add_argument_group("rate points (at least one)")
    points.add_argument("--rates", default=None, help="model rate indices, e.g. 0,1,2")
    points.add_argument("--budgets-bpp", default=None, help="whole-file byte budgets in bpp, e.g. 0.01,0.02")
    p.add_argument("--baseline", choices=BASELINE_CHOICES, default="best",
                   help="classic codec at equal bytes; best = JPEG, WebP, AVIF, JPEG XL and the best of them")  # fmt: skip
    p.add_argument("--baseline-max-mpx", type=float, default=None, metavar="MPX",
                   help="the classic search tries only downscale factors whose picture has at most MPX megapixels "
                        "(and always the smallest): hours fewer on 20+ MP photos, where the largest sizes cost most")  # fmt: skip
    p.add_argument("--criterion", choices=sorted(baselines.CRITERIA), default="psnr",
                   help="how the baseline search picks the downscale factor (default psnr)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder (re-run to resume)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--metrics", default=None,
                   help=f"comma list of {', '.join(METRIC_NAMES)} (default: every one that runs here)")  # fmt: skip
    p.add_argument("--save-recon", type=int, default=1, metavar="N",
                   help="save reconstructions of the first N readable images (default 1; the side-by-side needs one)")  # fmt: skip
    p.add_argument("--baselines-only", action="store_true",
                   help="no model: classic codecs at the --budgets-bpp only (reference numbers)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true", help="skip RD curves and side-by-side pictures")
    p.add_argument("--compare", action="append", default=[], metavar="LABEL=RUN",
                   help="add another aeic eval run (e.g. an MSE-only model, or a --baselines-only run) to the RD "
                        "plots and side-by-side pictures; its AEIC rows are named LABEL")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--provider", default=None, help="onnxruntime provider for the sender (default: best)")
    p.add_argument("--device", default="auto", help="receiver torch device (default auto)")
    p.add_argument("--downscale", default="auto", type=parse_downscale, metavar="{auto,1,2,4}",
                   help="the sender's coding downscale (default auto: by image and budget size)")
    p.add_argument("--rounding", default="package", type=parse_rounding, metavar="{package,nearest,W}",
                   help="the sender's symbol rounding (default: the package's rate-distortion weight)")
    return p


def baseline_codecs(choice: str) -> tuple[list[str], dict[str, str]]:
    """Codec names for ``--baseline`` and the reasons for any that cannot run here."""
    if choice == "none":
        return [], {}
    available = baselines.available_codecs()
    wanted = list(baselines.CODECS) if choice == "best" else [choice]
    missing = {name: reason for name in wanted if (reason := available[name]) is not None}
    return [name for name in wanted if name not in missing], missing


def _warn_slow_classic_search(paths: Sequence[Path]) -> None:
    """Say before the run, with the way out, when the classic search will take hours: it codes a photo at up
    to 13 sizes and about 8 qualities per codec, and the largest sizes of a 20+ MP photo dominate."""
    large = {p.name: mpx for p in paths if (mpx := images.megapixels(p)) > LARGE_PHOTO_MPX}
    if not large:
        return
    name = max(large, key=lambda n: large[n])
    print(
        f"aeic eval: {len(large)} image(s) over {LARGE_PHOTO_MPX:g} MP (largest {name}, {large[name]:.1f} MP): the "
        "classic search codes each at up to 13 sizes, and AVIF alone can take over 20 minutes per image and budget "
        "at 24 MP. For a quicker run: --baseline-max-mpx 4 (factors whose picture is at most 4 MP; recorded in "
        "summary.json), --baseline webp (one codec), or --baseline none now and a --baselines-only run into "
        "another --out later, joined with --compare classic=THAT_OUT.",
        file=sys.stderr,
    )


def _print_means(summary: dict[str, Any]) -> None:
    """The means table; ``ok`` is how many images each mean is over, ``unr``/``err`` those left out."""
    cols = [m for m in metrics.CORE_METRICS if m in summary["metrics"]]
    head = f"{'point':<10} {'method':<6} {'ok':>3} {'unr':>3} {'err':>3} {'bpp':>8} "
    print(head + " ".join(f"{c:>8}" for c in cols))
    for m in summary["means"]:
        values = " ".join(f"{m[c]:8.4f}" if m[c] is not None else f"{'-':>8}" for c in cols)
        bpp = f"{m['bpp']:8.5f}" if m["bpp"] is not None else f"{'-':>8}"
        counts = f"{m['n_ok']:>3} {m['n_unreachable']:>3} {m['n_error']:>3}"
        print(f"{m['point']:<10} {m['method']:<6} {counts} {bpp} {values}")
    skipped = summary["config"].get("skipped_baselines") or {}
    if skipped:  # the note at the start has long scrolled away; the table must not pass for best-of-four
        ran = summary["config"]["baselines"]
        which = f"best: of {', '.join(ran)} only" if len(ran) > 1 else "no best row"
        print(f"{which}; not run here: " + ", ".join(f"{name} ({why})" for name, why in skipped.items()))
    cap = summary["config"].get("baseline_max_mpx")
    if cap is not None and summary["config"]["baselines"]:
        print(f"classic codecs: downscale factors up to {cap:g} MP only (--baseline-max-mpx)")
        for method, rows in summary["baseline_rows_at_cap"].items():  # the cap may have made these weaker
            print(f"  {method}: {len(rows)} row(s) at the largest factor the cap allows, perhaps held back by it: "
                  + ", ".join(rows[:3]) + (", ..." if len(rows) > 3 else ""))  # fmt: skip
    undefined: dict[str, set[str]] = {}  # only texture is ever undefined: of a flat original
    for m in summary["means"]:
        for col, names in m["undefined_images"].items():
            undefined.setdefault(col, set()).update(names)
    for col, names in undefined.items():
        print(f"{col} undefined (flat original) for {len(names)} image(s), left out of its mean: "
              + ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else ""))  # fmt: skip
    failed = {r["image"]: r["detail"] for r in reversed(summary["rows"]) if r["status"] == "error"}
    for image, detail in sorted(failed.items()):
        print(f"error: {image}: {detail}")


def parse_compare(values: Sequence[str]) -> dict[str, Path]:
    """``LABEL=RUN`` pairs: a column label and the output folder of another ``aeic eval`` run."""
    pairs: dict[str, Path] = {}
    for value in values:
        label, sep, run = value.partition("=")
        if not sep or not label or not run:
            raise ValueError(f"--compare expects LABEL=RUN, got {value!r}")
        if not (Path(run) / "summary.json").is_file():  # checked now, not after every image was measured
            raise ValueError(f"--compare {label}: {run} holds no summary.json (not an aeic eval run)")
        pairs[label] = Path(run)
    return pairs


def _plots(summary: dict[str, Any], config: runner.EvalConfig, compare: dict[str, Path]) -> None:
    """RD curves, and per point a side-by-side of the first image with a saved reconstruction there: AEIC and
    the best classic codec, or the one classic codec run."""
    plots.rd_curves(plots.with_compared_means(summary, compare), config.out)
    if config.save_recon < 1:
        return
    methods = ("aeic", "best") if len(config.baselines) > 1 else ("aeic", *config.baselines)
    for point in config.points:
        image = plots.first_saved_image(config.out, summary["rows"], point.label, methods)
        if image is None:
            print(f"no side-by-side at {point.label}: no reconstruction saved there (--save-recon {config.save_recon})")
            continue
        extra = plots.compared_reconstructions(compare, image, point.label)
        plots.side_by_side_from_run(config.out, config.images, image, point.label, methods, extra=extra)


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[runner.EvalConfig, dict[str, Path]]:
    """The run's settings and its --compare runs; a bad option ends here, through ``parser.error``."""
    try:
        points = runner.parse_points(args.rates, args.budgets_bpp)
        compare = parse_compare(args.compare)
    except ValueError as exc:
        parser.error(str(exc))
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.baseline_max_mpx is not None and not args.baseline_max_mpx > 0:
        parser.error("--baseline-max-mpx must be > 0")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is not a folder")
    codecs, missing = baseline_codecs(args.baseline)
    for name, reason in missing.items():
        print(f"baseline {name} skipped: {reason}", file=sys.stderr)
    if args.baseline not in ("best", "none") and not codecs:
        parser.error(f"baseline {args.baseline} is not available here")
    config = runner.EvalConfig(
        images=args.images, out=args.out, points=points, baselines=codecs, criterion=args.criterion,
        limit=args.limit, metrics=args.metrics.split(",") if args.metrics else None, save_recon=args.save_recon,
        skipped_baselines=missing, baseline_max_mpx=args.baseline_max_mpx,
    )  # fmt: skip
    return config, compare


def _evaluator(args: argparse.Namespace, config: runner.EvalConfig, codec_factory: Callable[..., Any] | None,
               held: ExitStack) -> runner.Evaluator:
    """The model loaded (none for --baselines-only) and checked against the rate points asked for; then the
    --out folder's lock, kept in ``held``, and only then the folder is written to; then the warning of a slow
    classic search, for the photos whose classic rows are not in the folder yet."""
    paths = images.list_images(config.images, config.limit)  # fail before loading a model
    if args.baselines_only:
        codec = None
    elif codec_factory is None:
        from aeic.evaluation.codec_adapter import PackageCodec, resolve_model

        codec = PackageCodec.from_package(
            resolve_model(args.model), provider=args.provider, device=args.device,
            downscale=args.downscale, rounding=args.rounding,
        )
    else:
        codec = codec_factory(args.model)
    levels = getattr(codec, "num_levels", None)
    if levels is not None:
        bad = [p.label for p in config.points if p.kind == "rate" and p.value >= levels]
        if bad:
            raise ValueError(f"rate points {bad} not in this model (rate indices 0..{levels - 1})")
    info = (
        codec.info() if codec is not None and hasattr(codec, "info")
        else {"codec": type(codec).__name__ if codec else None}
    )
    held.enter_context(resume.out_folder_lock(config.out))
    evaluator = runner.Evaluator(codec, config, info)
    if config.baselines and config.baseline_max_mpx is None:  # only the photos whose search is still to come
        _warn_slow_classic_search([p for p in paths if evaluator.classic_rows_missing(p.name)])
    return evaluator


def main_eval(argv: Sequence[str] | None = None, codec_factory: Callable[..., Any] | None = None) -> int:
    """Run ``aeic eval``; returns 0, or 1 when some images failed. ``codec_factory`` is for tests."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config, compare = _config(parser, args)
    with ExitStack() as held:
        try:
            evaluator = _evaluator(args, config, codec_factory, held)
        except (FileNotFoundError, ValueError, TypeError) as exc:
            print(f"aeic eval: {exc}", file=sys.stderr)
            return 2
        try:
            summary = evaluator.run(progress=not args.no_progress)
        except KeyboardInterrupt:
            kept = len(evaluator.results.rows)
            print(f"aeic eval: interrupted; {kept} rows kept in {config.out / 'results.csv'}, the same command "
                  "resumes", file=sys.stderr)  # fmt: skip
            return 130
        _print_means(summary)
        for name, reason in summary["skipped_metrics"].items():
            print(f"{name}: {reason}")
        if not args.no_plots:
            _plots(summary, config, compare)
    print(f"results: {config.out / 'results.csv'}, {config.out / 'summary.json'}")
    errors = sum(m["n_error"] for m in summary["means"])
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main_eval())
