"""The README's benchmark table, generated from ``benchmarks/results/*.json``.

Each section names the machine its figures were measured on (CPU, cores, RAM, date, load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
HEADING = "## Benchmarks"


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _machine(doc: dict[str, Any]) -> str:
    m = doc.get("machine")
    if not m:
        return "_Measured on: not recorded._"
    load = m.get("load_average_1_5_15")
    load_text = f", load average {load[0]:.1f} (shared machine)" if load else ""
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v and k in ("onnxruntime", "torch"))
    return (f"_Measured on {m['cpu_model']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM, {m['date_utc'][:16]} UTC"
            f"{load_text}; {versions}._")


def _rows(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _snr(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "identical" if value == float("inf") else f"{value:.1f}"


def entropy_section(doc: dict[str, Any]) -> list[str]:
    r = doc["results"]
    shape = "x".join(str(v) for v in r["latent_shape"])
    rows = [(op, _num(r[op]["symbols_per_s"] / 1e6, 2), _num(r[op]["latent_mb_per_s"], 1), _num(r[op]["ms"], 1))
            for op in ("encode", "decode")]
    return [(f"**rANS entropy coding** (latent {shape}, {r['payload_bytes']:,} bytes, "
            f"size / ideal = {r['size_over_ideal']:.4f})"), "", _machine(doc), "",
            *_rows(("", "Msymbols/s", "latent MB/s (int32)", "ms"), rows)]


def model_section(doc: dict[str, Any]) -> list[str]:
    rows: list[tuple[Any, ...]] = []
    for preset_name, parts in doc["parts"].items():
        for part, entry in parts.items():
            if preset_name == "nano-se" or part == "analysis":
                rows.append((f"{preset_name} {part}", _num(entry["parameters"] / 1e6, 2),
                             _num(entry["macs_per_pixel"] / 1e3, 1)))
    heavy = doc["heavy_encoder"]["sd_vae"]
    rows.append((f"SD-VAE encoder (AutoencoderKL, SD config; MACs at {heavy['count_size']})",
                 _num(heavy["parameters"] / 1e6, 2), _num(heavy["macs_per_pixel"] / 1e3, 1)))
    lines = ["**Model cost** (MACs per input pixel; Conv/Linear/attention products, see benchmarks/macs.py)", "",
             _machine(doc), "", *_rows(("Part", "Params (M)", "kMACs/pixel"), rows)]
    encode = heavy.get("encode")
    if encode:
        lines += ["", heavy_encode_line(encode)]
    latency = doc.get("sender_latency")
    if latency:
        rows = [(size, _num(v["analysis_ms"], 0), _num(v["hyper_ms"], 0), _num(v["entropy_rans_ms"], 0),
                 _num(v["total_ms"], 0)) for size, v in latency["sizes"].items()]
        lines += ["", f"Sender path in onnxruntime ({latency['package']}, rate level {latency['rate_level']}):", "",
                  *_rows(("Size", "analysis ms", "hyper ms", "entropy model + rANS ms", "total ms"), rows)]
    return lines


def heavy_encode_line(encode: dict[str, Any]) -> str:
    if "seconds" not in encode:
        return f"SD-VAE encoder at {encode['size']}: {encode.get('error', 'not measured')}."
    cpu = f" ({encode['cpu_seconds']:.0f} s CPU)" if "cpu_seconds" in encode else ""
    return (f"SD-VAE encoder (random weights), one {encode['size']} encode on this CPU: {encode['seconds']:.1f} s wall"
            f"{cpu}, peak RSS {encode['peak_rss_mb']:,.0f} MB.")


def heavy_1080p_section(doc: dict[str, Any]) -> list[str]:
    heavy = doc["sd_vae"]
    return [f"**SD-VAE encoder at 1080p**: {heavy['parameters'] / 1e6:.1f} M parameters, "
            f"{heavy['macs_per_pixel'] / 1e3:,.0f} kMACs/pixel at {heavy['count_size']}. "
            + heavy_encode_line(heavy["encode"]) + (f" {heavy['encode']['how']}" if "how" in heavy["encode"] else ""),
            "", _machine(doc)]


def downscale_lines(rd: dict[str, Any] | None) -> list[str]:
    """The coding downscale variants at equal bytes against coding the 1080p photos whole."""
    if not rd:
        return []
    parts = [f"{variant} {row['psnr_change_db']:+.2f} dB PSNR at {row['bytes_change_pct']:+.1f} % bytes"
             for variant, row in rd.items()
             if variant != "whole" and isinstance(row, dict) and row.get("psnr_change_db") is not None]
    whole = rd["whole"]
    return ["", (f"Coding downscale at {rd['size']} and equal bytes (RD photos coded whole at level {rd['whole_level']}: "
                 f"{_num(sum(whole['bytes']) / len(whole['bytes']), 0)} B, {_num(sum(whole['psnr_db']) / len(whole['psnr_db']), 2)} dB "
                 f"mean; each variant at its best level within the same bytes): " + "; ".join(parts) + ".")]


def sender_section(doc: dict[str, Any]) -> list[str]:
    rows = []
    for variant, s in doc["summary"].items():
        rd = doc.get("rd_cost", {}).get(variant) or {}
        run = doc["runs"][variant]
        cpu_ratio = (doc["runs"]["reference"]["cpu_ms_per_frame"] / run["cpu_ms_per_frame"]
                     if "cpu_ms_per_frame" in doc["runs"].get("reference", {}) and run.get("cpu_ms_per_frame") else None)
        rows.append((variant, _num(s["fps"], 3), _num(1e3 / run["cpu_ms_per_frame"], 3) if run.get("cpu_ms_per_frame") else "n/a",
                     _num(s["peak_rss_mb"], 0), _num(s["speedup_vs_reference"], 2), _num(cpu_ratio, 2),
                     _num(rd.get("bytes_change_pct"), 1) if rd else "-", _num(rd.get("psnr_change_db"), 2) if rd else "-",
                     _snr(rd.get("latent_snr_vs_default_db")) if rd else "-"))
    failed = [f"{v}: {r['error']}" for v, r in doc["runs"].items() if "error" in r]
    if "error" in doc.get("rd_cost", {}):
        failed.append(f"RD cost: {doc['rd_cost']['error']}")
    ours = {v: r for v, r in doc["summary"].items() if v != "reference"}
    verdict = []
    default = doc["runs"].get("default", {})
    if "peak_after_analysis_only_mb" in default:
        verdict += ["", (f"Memory of the default variant: {default['rss_after_load_mb']:,.0f} MB after loading, "
                        f"{default['peak_after_analysis_only_mb']:,.0f} MB peak after the analysis graph alone, "
                        f"{default['peak_rss_mb']:,.0f} MB peak for the whole path.")]
    if ours:
        fastest = max(ours, key=lambda v: ours[v]["fps"])
        leanest = min(ours, key=lambda v: ours[v]["peak_rss_mb"])
        speedup = ours[fastest]["speedup_vs_reference"]
        verdict += ["", (f"Fastest: {fastest} ({_num(speedup, 2)}x the reference, target "
                       f"{doc['targets']['speedup_vs_reference']:.0f}x: {'met' if speedup and speedup >= 4 else 'not met'}); "
                       f"lowest peak RSS: {leanest} ({ours[leanest]['peak_rss_mb']:,.0f} MB, target "
                       f"{doc['targets']['peak_rss_mb']:.0f} MB: {'met' if ours[leanest]['meets_300mb'] else 'not met'}).")]
    verdict += downscale_lines(doc.get("rd_cost", {}).get("downscale_at_equal_bytes"))
    t = doc["targets"]
    return [(f"**Sender path at {doc['size']}** (read file, encode, rANS, container; one process per variant; "
            f"targets: >= {t['speedup_vs_reference']:.0f}x the reference fps, <= {t['peak_rss_mb']:.0f} MB peak RSS). "
            f"Package: {doc['package']}."), "", _machine(doc), "",
            *_rows(("Variant", "fps (wall)", "frames per CPU-second", "peak RSS MB", "x reference (wall)",
                    "x reference (CPU time)",
                    "RD: bytes %", "RD: PSNR dB", "latent SNR vs default dB"), rows),
            *verdict, *([""] + [f"Failed: {f}" for f in failed] if failed else [])]


def _receiver_model(doc: dict[str, Any]) -> str:
    folder = Path(str(doc.get("model_path", ""))).parent  # aeic/models/<name> in whichever checkout ran it
    shipped = folder.name == "models" and folder.parent.name == "aeic"
    weights = "shipped package" if shipped else "random weights: timings are of the same graphs, bytes are not representative"
    return f"model {doc.get('model_name', '?')} {doc.get('model_id', '')}, {weights}"


def receiver_section(doc: dict[str, Any]) -> list[str]:
    lines = [f"**Receiver** ({_receiver_model(doc)})", "", _machine(doc), ""]
    decode = doc.get("decode")
    if decode:
        rows: list[tuple[Any, ...]] = [(size, _num(v["ms"]["p50"], 0), v["repeats"]) for size, v in decode["latency"].items()]
        lines += [f"Decode on {decode['device']}:", "", *_rows(("Size", "p50 ms", "repeats"), rows), ""]
        rows = [(batch, _num(v["images_per_s"], 3)) for batch, v in decode["throughput_768x512_by_batch_size"].items()]
        lines += [*_rows(("Batch size (768x512)", "images/s"), rows), ""]
    load = doc.get("load")
    if load:
        lines += [(f"Load test: {load['uploads']} uploads from {load['clients']} concurrent clients on loopback: "
                  f"{load['accepted']} accepted (202), {load['errors']} errors, {load['lost']} lost, "
                  f"{load['duplicates']} duplicates, {load['acceptance_rate_per_s']:.0f} uploads/s accepted, "
                  f"p95 latency {load['latency_ms'].get('p95', 0):.0f} ms.")]
    return lines


SECTIONS = (("entropy_coding", entropy_section), ("model", model_section),
            ("heavy_encoder_1080p", heavy_1080p_section), ("sender", sender_section),
            ("receiver", receiver_section))


def render(results: Path) -> str:
    """Markdown for every result file present (missing ones are listed as not run)."""
    blocks, missing = [], []
    for name, section in SECTIONS:
        doc = _load(results, name)
        if doc is None:
            missing.append(name)
            continue
        try:
            blocks.append("\n".join(section(doc)))
        except (KeyError, TypeError, ZeroDivisionError) as exc:
            blocks.append(f"**{name}**: result file has an unexpected shape ({type(exc).__name__}: {exc}).")
    if missing:
        blocks.append(f"Not run yet: {', '.join(missing)} (`make bench`).")
    return "Generated by `make bench` (`python -m benchmarks.run_all`) from `benchmarks/results/*.json`.\n\n" + \
        "\n\n".join(blocks)


def update_readme(readme: Path, table: str) -> bool:
    """Replace the text between the markers; append a section with them when they are missing.

    A missing README is left alone (it is the project's front page, not ours to create): False.
    """
    if not readme.is_file():
        return False
    text = readme.read_text()
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text and text.index(START) < text.index(END):
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + f"{HEADING}\n\n{block}\n"
    readme.write_text(text)
    return True
