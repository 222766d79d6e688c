"""The whole sender path at 1920x1080 on this CPU: frames per second and peak RSS, per variant.

Each variant runs in its own child process (so its peak RSS, VmHWM, is its own), one after the
other in one run: a frame is read from a JPEG file on disk, encoded (analysis, hyper-analysis,
integer entropy model, rANS) and packed into the container. Variants:

* ``reference``: the paper's AEIC-SE sender path in float (``benchmarks.reference_sender``),
  onnxruntime with default session settings;
* ``default``: ours as shipped (``SenderCodec`` defaults: analysis stem in strips, no memory arena);
* ``untiled``: the stem on the whole image in one strip (what tiling saves);
* ``arena``: onnxruntime's CPU memory arena on (its default), which keeps each session's peak;
* ``int8_dynamic`` / ``int8_static``: the analysis graphs (stem and trunk) quantized with
  onnxruntime's tools (static: QDQ, per-channel 7-bit weights, uint8 activations calibrated on
  1080p training photos, the first convolution in float; ``benchmarks.quantize``);
* ``threads1`` / ``threads2``: onnxruntime intra-op threads and numpy's BLAS threads pinned;
* ``combined``: int8 static analysis and one thread together;
* ``downscale1`` / ``downscale2`` / ``downscale4``: a fixed coding downscale (``--downscale``): the
  frame is box-reduced by 1 (coded whole), 2 or 4 before the analysis and the receiver scales the
  reconstruction back. ``default`` is ``auto``, which codes a 1080p frame at 2;
* ``budget``: ours as shipped, each frame coded to a byte budget (``encode_to_budget``; the bytes of
  ``--bpp`` at 1080p, 5,184 at 0.02) instead of at one level: the analysis at the budget's downscale
  (1080p whole at 0.02), then every rate level the search codes. It records how many levels a frame
  cost and the analysis alone, so the search's share is the rest; no RD comparison (same streams).

Every speed-up's rate-distortion cost is measured: each variant of ours also encodes a few real
photos (training set, not Kodak), the receiver decodes them, and bytes and PSNR are compared
with the default variant, as is the analysis latent itself (SNR against the default's). The
downscale variants change the rate as well as the picture, so they are compared at equal bytes
and at 1080p, where they are meant to run: each 1080p RD photo is coded whole (downscale 1) at the
benchmark's level, and by the default (auto) and each downscale variant at the best level whose
stream fits the same bytes (``downscale_rd``). With a
random-weight package (when no trained one exists) bytes and PSNR are recorded but mean nothing
(its untrained entropy model codes hardly any latent symbol); the latent SNR still shows how far
a variant moves the encoder's output. The JSON says which package was used.

Usage: python -m benchmarks.sender_bench [--frames 2] [--variants a,b] [--package DIR] [--rd-images 2] [--bpp 0.02]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .images import photo, source_name
from .machine import proc_status_mb, write_result

if TYPE_CHECKING:
    from aeic.sender.encoder import SenderCodec

    from .reference_sender import ReferenceCodec

VARIANTS = ("reference", "default", "untiled", "arena", "int8_dynamic", "int8_static", "threads1", "threads2", "combined",
            "downscale1", "downscale2", "downscale4", "budget")
DOWNSCALE_VARIANTS = {"downscale1": 1, "downscale2": 2, "downscale4": 4}
# combined: int8 static analysis, one thread
ANALYSIS_GRAPHS = ("analysis_stem", "analysis_trunk")
SIZE = (1920, 1080)
RD_SIZE = (768, 512)
TARGET_SPEEDUP = 4.0
TARGET_RSS_MB = 300.0
CALIBRATION_PHOTOS = 6  # int8 static: training photos after the frame (index 0) and the RD photos (1..)


def _peak_rss_mb() -> float:
    """VmHWM of this process (the peak resident set), from /proc; ru_maxrss elsewhere."""
    try:
        return proc_status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float | None:
    try:
        return proc_status_mb("VmRSS")
    except (OSError, KeyError):
        return None


# ---------------------------------------------------------------- child side (no torch for ours)

def _our_codec(work: Path, variant: str) -> SenderCodec:
    import onnxruntime as ort
    from aeic.sender import encoder

    threads = {"threads1": 1, "threads2": 2, "combined": 1}.get(variant)
    base_options = encoder.session_options

    def options(threads: int | None, memory_pattern: bool = True) -> ort.SessionOptions:
        opts = base_options(threads, memory_pattern)
        if variant == "arena":
            opts.enable_cpu_mem_arena = True
        return opts

    encoder.session_options = options  # this child process only
    strip_rows = 1 << 16 if variant == "untiled" else encoder.DEFAULT_STRIP_ROWS
    codec = encoder.SenderCodec.from_package(work / "package", threads=threads, strip_rows=strip_rows,
                                             downscale=DOWNSCALE_VARIANTS.get(variant, "auto"))
    if variant == "untiled":  # nor cut into tiles of columns (a strip this tall would get tiles of 4 columns)
        codec.analysis.stem_cells = 1 << 40
    quantized = "int8_static" if variant == "combined" else variant
    if quantized.startswith("int8"):
        stem, trunk = (ort.InferenceSession(str(work / f"{graph}.{quantized}.onnx"), options(threads, graph == "analysis_stem"),
                                            providers=[encoder.CPU_PROVIDER]) for graph in ANALYSIS_GRAPHS)
        codec.analysis.stem, codec.analysis.trunk = stem, trunk
    return codec


def _reference_codec(work: Path) -> ReferenceCodec:
    from .reference_sender import ReferenceCodec

    return ReferenceCodec(work / "reference.onnx")


def _budget_encoder(codec: SenderCodec, target_bytes: int) -> tuple[Callable[[np.ndarray], bytes], dict[str, Any]]:
    """``encode_to_budget`` as a frame encoder, and what it did: the frames, the rate levels it coded, the level it chose."""
    stats: dict[str, Any] = {"budget_bytes": target_bytes, "frames_coded": 0, "levels_coded": 0}
    encode_analysed = codec.encode_analysed

    def counted(analysed: Any, level: int) -> bytes:
        stats["levels_coded"] += 1
        return encode_analysed(analysed, level)

    def encode(rgb: np.ndarray) -> bytes:
        stream, stats["level"] = codec.encode_to_budget(rgb, target_bytes)
        stats["frames_coded"] += 1
        return stream

    codec.encode_analysed = counted  # type: ignore[method-assign]  # this child process only
    return encode, stats


def _budget_fields(codec: SenderCodec, rgb: np.ndarray, stats: dict[str, Any]) -> dict[str, Any]:
    """The budget variant's record: levels coded per frame, and the analysis alone at the budget's downscale."""
    from aeic.sender import coding_scale

    height, width = rgb.shape[:2]
    factor = coding_scale.budget_downscales(height, width, stats["budget_bytes"])[0]
    start = time.perf_counter()
    codec.analyse(rgb, factor)
    return {"budget_bytes": stats["budget_bytes"], "budget_level": stats["level"], "budget_downscale": factor,
            "levels_coded_per_frame": stats["levels_coded"] / stats["frames_coded"],
            "ms_analysis_only": 1e3 * (time.perf_counter() - start)}


def run_child(work: Path, variant: str, frames: int, level: int, budget: int) -> dict[str, Any]:
    from aeic.sender.images import read_image

    start = time.perf_counter()
    # what it can do (encode's arguments, analyse) depends on the variant
    codec: Any = _reference_codec(work) if variant == "reference" else _our_codec(work, variant)
    load_s = time.perf_counter() - start
    to_budget, budget_stats = _budget_encoder(codec, budget) if variant == "budget" else (None, {})

    def encode(rgb: np.ndarray, level: int) -> bytes:
        if to_budget:
            return to_budget(rgb)
        return codec.encode(rgb) if variant == "reference" else codec.encode(rgb, level)

    frame = work / "frame.jpg"
    memory = {"rss_after_load_mb": _rss_mb()}
    if variant != "reference":  # where the peak comes from: the analysis graph alone, then the whole path
        codec.analyse(read_image(frame))
        memory["peak_after_analysis_only_mb"] = _peak_rss_mb()
    stream = encode(read_image(frame), level)  # warm-up
    times = []
    cpu0 = time.process_time()
    for _ in range(frames):
        t0 = time.perf_counter()
        stream = encode(read_image(frame), level)
        times.append(time.perf_counter() - t0)
    cpu_s = time.process_time() - cpu0
    peak_after_frames = _peak_rss_mb()
    if to_budget:
        memory.update(_budget_fields(codec, read_image(frame), budget_stats))
    elif variant != "reference":
        out = work / "streams" / variant
        out.mkdir(parents=True, exist_ok=True)
        for image in sorted((work / "rd").glob("*.png")):
            analysed = codec.analyse(read_image(image))
            (out / f"{image.stem}.aeic").write_bytes(codec.encode_analysed(analysed, level))
            np.save(out / f"{image.stem}.latent.npy", analysed.latent)
    return {"variant": variant, "frames": frames, "fps": frames / sum(times), "ms_per_frame": 1e3 * sum(times) / frames,
            "ms_per_frame_each": [1e3 * t for t in times], "cpu_ms_per_frame": 1e3 * cpu_s / frames, "bytes_1080p": len(stream), "load_s": load_s,
            "peak_rss_mb": peak_after_frames, **memory}


# ---------------------------------------------------------------- parent side

def _package(work: Path, package: Path | None) -> tuple[Path, str]:
    from aeic.shared.model_package import default_model_dir

    source = package or default_model_dir()
    if source.is_dir() and (source / "manifest.json").is_file():
        shutil.copytree(source, work / "package")
        return work / "package", f"trained package {source}"
    import torch
    from aeic.codec.export import export_package
    from aeic.codec.model import AEICModel
    from aeic.codec.presets import preset

    torch.manual_seed(0)
    export_package(AEICModel(preset("nano-se")), work / "package")
    return work / "package", "random-weight nano-se (no trained package found): bytes and PSNR are not meaningful"


def prepare(work: Path, package: Path | None, variants: list[str], rd_images: int) -> dict[str, Any]:
    from PIL import Image

    from . import quantize, reference_sender

    _, package_note = _package(work, package)
    Image.fromarray(photo(*SIZE)).save(work / "frame.jpg", quality=95)
    (work / "rd").mkdir()
    for n in range(rd_images):
        Image.fromarray(photo(*RD_SIZE, index=1 + n)).save(work / "rd" / f"{n}.png")
    if set(DOWNSCALE_VARIANTS) & set(variants):
        (work / "rd1080").mkdir()
        for n in range(rd_images):
            Image.fromarray(photo(*SIZE, index=1 + n)).save(work / "rd1080" / f"{n}.png")
    if "int8_dynamic" in variants:
        for graph in ANALYSIS_GRAPHS:
            quantize.dynamic_int8(work / "package" / f"{graph}.onnx", work / f"{graph}.int8_dynamic.onnx")
    if "int8_static" in variants or "combined" in variants:
        _static_int8(work, rd_images)
    if "reference" in variants:
        reference_sender.export(reference_sender.build(photo(512, 512, index=10)), work / "reference.onnx")
    return {"package": package_note, "frame_source": source_name(0),
            "rd_sources": [source_name(1 + n) for n in range(rd_images)],
            "calibration_sources": [source_name(n) for n in _calibration_photos(rd_images)] if {"int8_static", "combined"} & set(variants) else None,
            "reference_parameters": reference_sender.parameters() if "reference" in variants else None}


def _calibration_photos(rd_images: int) -> range:
    return range(1 + rd_images, 1 + rd_images + CALIBRATION_PHOTOS)


def _static_int8(work: Path, rd_images: int) -> None:
    """Calibrated as the sender runs them: the stem on 1080p strips, the trunk on whole 1080p features.

    Training photos other than the timed frame and the RD photos; the trunk's inputs are the
    float stem's features of the same photos.
    """
    from aeic.sender.encoder import SenderCodec
    from aeic.sender.tiled_analysis import to_float
    from aeic.shared.padding import ALIGNMENT, pad_to_multiple

    from . import quantize

    analysis = SenderCodec.from_package(work / "package").analysis
    stem_feeds, trunk_feeds = [], []
    for index in _calibration_photos(rd_images):
        rgb = pad_to_multiple(photo(*SIZE, index=index), ALIGNMENT)
        strips = analysis.strips(rgb.shape[0])
        stem_feeds += [{"image": to_float(rgb[start:stop])} for _, _, start, stop in (strips[1], strips[-2])]
        trunk_feeds.append({"features": analysis.features(rgb)})
    for graph, feeds in zip(ANALYSIS_GRAPHS, (stem_feeds, trunk_feeds), strict=True):
        quantize.static_int8(work / "package" / f"{graph}.onnx", work / f"{graph}.int8_static.onnx", feeds)


def _child_env(variant: str) -> dict[str, str]:
    env = dict(os.environ)
    threads = {"threads1": "1", "threads2": "2", "combined": "1"}.get(variant)
    if threads:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = threads
    return env


def spawn(work: Path, variant: str, frames: int, level: int, budget: int, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.sender_bench", "--child", variant, "--work", str(work),
               "--frames", str(frames), "--level", str(level), "--budget", str(budget)]
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=_child_env(variant))
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"did not finish within {timeout:.0f} s"}
    if done.returncode != 0:
        return {"variant": variant, "error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = float(np.mean((reference.astype(np.float64) - other) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.mean(reference.astype(np.float64) ** 2)) / noise)


def rd_costs(work: Path, variants: list[str]) -> dict[str, Any]:
    """Bytes and PSNR per variant on the RD photos, and the change against ``default``."""
    from aeic.receiver.decoder import ReceiverCodec
    from aeic.sender.images import read_image

    receiver = ReceiverCodec.from_package(work / "package", device="cpu")
    originals = {p.stem: read_image(p) for p in sorted((work / "rd").glob("*.png"))}
    table: dict[str, Any] = {}
    decoded_default: dict[str, np.ndarray] = {}
    for variant in [v for v in variants if v != "reference"]:
        streams = {name: (work / "streams" / variant / f"{name}.aeic").read_bytes() for name in originals}
        decoded = {name: receiver.decode(data) for name, data in streams.items()}
        if variant == "default":
            decoded_default = decoded
        default_streams = {n: (work / "streams" / "default" / f"{n}.aeic") for n in originals}
        table[variant] = {
            "mean_bytes": float(np.mean([len(s) for s in streams.values()])),
            "mean_psnr_db": float(np.mean([_psnr(decoded[n], originals[n]) for n in originals])),
            "identical_to_default": all(p.is_file() and p.read_bytes() == streams[n] for n, p in default_streams.items()),
            "psnr_vs_default_decode_db": (float(np.mean([_psnr(decoded[n], decoded_default[n]) for n in originals]))
                                          if decoded_default else None),
            # how far the analysis output moves (meaningful even with random weights)
            "latent_snr_vs_default_db": float(np.mean([_snr_db(
                np.load(work / "streams" / "default" / f"{n}.latent.npy"),
                np.load(work / "streams" / variant / f"{n}.latent.npy")) for n in originals])),
        }
    base = table.get("default")
    for row in table.values():
        if base:
            row["bytes_change_pct"] = 100 * (row["mean_bytes"] / base["mean_bytes"] - 1)
            row["psnr_change_db"] = row["mean_psnr_db"] - base["mean_psnr_db"]
    return table


def downscale_rd(work: Path, variants: list[str], level: int) -> dict[str, Any]:
    """At 1080p and equal bytes: PSNR of the default (auto) and each fixed downscale against coding whole at ``level``."""
    from aeic.receiver.decoder import ReceiverCodec
    from aeic.sender.encoder import BudgetError, SenderCodec
    from aeic.sender.images import read_image

    receiver = ReceiverCodec.from_package(work / "package", device="cpu")
    whole = SenderCodec.from_package(work / "package", downscale=1)
    factors: dict[str, int | str] = {"default": "auto", **{v: DOWNSCALE_VARIANTS[v] for v in variants if v in DOWNSCALE_VARIANTS}}
    codecs = {variant: SenderCodec.from_package(work / "package", downscale=f) for variant, f in factors.items()}
    rows: dict[str, Any] = {"whole": {"bytes": [], "psnr_db": []}}
    rows.update({v: {"bytes": [], "psnr_db": [], "level": []} for v in factors})
    for path in sorted((work / "rd1080").glob("*.png")):
        rgb = read_image(path)
        stream = whole.encode(rgb, level)
        rows["whole"]["bytes"].append(len(stream))
        rows["whole"]["psnr_db"].append(_psnr(receiver.decode(stream), rgb))
        for variant, codec in codecs.items():
            try:
                data, chosen_level = codec.encode_to_budget(rgb, len(stream))
            except BudgetError:
                continue
            rows[variant]["bytes"].append(len(data))
            rows[variant]["level"].append(chosen_level)
            rows[variant]["psnr_db"].append(_psnr(receiver.decode(data), rgb))
    base = float(np.mean(rows["whole"]["psnr_db"])) if rows["whole"]["psnr_db"] else None
    for variant in factors:
        row = rows[variant]
        row["mean_psnr_db"] = float(np.mean(row["psnr_db"])) if row["psnr_db"] else None
        row["psnr_change_db"] = row["mean_psnr_db"] - base if row["psnr_db"] and base is not None else None
        row["bytes_change_pct"] = (100 * (sum(row["bytes"]) / sum(rows["whole"]["bytes"]) - 1)
                                   if len(row["bytes"]) == len(rows["whole"]["bytes"]) else None)
    return {"size": f"{SIZE[0]}x{SIZE[1]}", "whole_level": level, **rows}


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    reference = runs.get("reference", {}).get("fps")
    summary = {}
    for variant, run in runs.items():
        if "fps" not in run:
            continue
        # budget codes several levels per frame, the reference one: no ratio, no 4x target
        speedup = run["fps"] / reference if reference and variant != "budget" else None
        summary[variant] = {
            "fps": run["fps"], "peak_rss_mb": run["peak_rss_mb"], "speedup_vs_reference": speedup,
            "meets_4x": None if speedup is None or variant == "reference" else speedup >= TARGET_SPEEDUP,
            "meets_300mb": run["peak_rss_mb"] <= TARGET_RSS_MB,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    from aeic.shared.model_package import ModelPackage

    parser = argparse.ArgumentParser(description="sender path fps and peak RSS at 1080p, per variant")
    parser.add_argument("--frames", type=int, default=2, help="timed frames per variant (after one warm-up)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bpp", type=float, default=0.02, help="nominal bpp of our codec's rate level (and the budget variant's bpp)")
    parser.add_argument("--level", type=int, default=None, help=argparse.SUPPRESS)  # a child's resolved level
    parser.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)  # a child's byte budget
    parser.add_argument("--package", type=Path, default=None, help="model package (default: the shipped one)")
    parser.add_argument("--rd-images", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="per child process")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.work, args.child, args.frames, args.level, args.budget)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if "default" not in variants:
        variants.insert(0, "default")  # the RD baseline
    with tempfile.TemporaryDirectory(prefix="aeic-sender-bench-") as tmp:
        work = Path(tmp)
        setup = prepare(work, args.package, variants, args.rd_images)
        package = ModelPackage.load(work / "package")
        level = package.level_for_bpp(args.bpp)
        budget = int(args.bpp * SIZE[0] * SIZE[1] / 8)
        runs = {v: spawn(work, v, args.frames, level, budget, args.timeout) for v in variants}
        try:  # the timings stand on their own: an RD failure is recorded, not fatal
            rd = rd_costs(work, [v for v in variants if "error" not in runs[v] and v not in (*DOWNSCALE_VARIANTS, "budget")])
            if set(DOWNSCALE_VARIANTS) & set(variants):
                rd["downscale_at_equal_bytes"] = downscale_rd(work, variants, level)
        except Exception as exc:  # noqa: BLE001 - any decoder failure
            rd = {"error": f"{type(exc).__name__}: {exc}"}
    result = {"size": f"{SIZE[0]}x{SIZE[1]}", "rate_level": level, "nominal_bpp": package.rates[level], "budget_bytes": budget,
              "rd_size": f"{RD_SIZE[0]}x{RD_SIZE[1]}",
              **setup, "targets": {"speedup_vs_reference": TARGET_SPEEDUP, "peak_rss_mb": TARGET_RSS_MB},
              "summary": summarise(runs), "runs": runs, "rd_cost": rd}
    print(write_result("sender", result, args.out))
    for variant, row in result["summary"].items():
        print(f"{variant:13s} {row['fps']:.3f} fps  peak {row['peak_rss_mb']:.0f} MB  x{row['speedup_vs_reference'] or 0:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
