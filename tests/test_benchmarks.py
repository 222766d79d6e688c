"""Smoke tests of the benchmark suite in reduced mode: tiny sizes, seconds, real code paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import entropy_coding_bench, model_bench
from benchmarks.table import END, START, render, update_readme

MACHINE_KEYS = {"cpu_model", "cpu_cores", "ram_gib", "versions", "date_utc"}


def test_entropy_coding_bench_reduced(tmp_path: Path) -> None:
    out = tmp_path / "entropy_coding.json"
    assert entropy_coding_bench.main(["--channels", "16", "--height", "4", "--width", "8", "--repeats", "1",
                                      "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert MACHINE_KEYS <= doc["machine"].keys()
    result = doc["results"]
    assert result["latent_shape"] == [16, 4, 8]
    assert {"symbols_per_s", "compressed_mb_per_s", "ms"} <= result["encode"].keys() <= result["decode"].keys() | {"ms"}
    assert result["encode"]["symbols_per_s"] > 0 and result["decode"]["symbols_per_s"] > 0
    assert 1.0 <= result["size_over_ideal"] < 1.2  # rANS: a few bytes over the information content


def test_model_bench_reduced(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    assert model_bench.main(["--count-size", "128x128", "--heavy-size", "none", "--sender-sizes", "none",
                             "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert MACHINE_KEYS <= doc["machine"].keys()
    parts = doc["parts"]["nano-se"]
    assert set(parts) == {"analysis", "hyper_analysis", "hyper_synthesis", "context_model", "synthesis", "unet",
                          "pixel_decoder_taef2", "pixel_decoder_internal"}
    assert parts["pixel_decoder_internal"]["macs_per_pixel"] < parts["pixel_decoder_taef2"]["macs_per_pixel"] / 4
    assert 0.9e6 < parts["analysis"]["parameters"] < 1.0e6  # AEIC-SE: about 0.94 M parameters
    assert 9e3 < parts["analysis"]["macs_per_pixel"] < 10.5e3  # and about 9.7 K MACs per pixel
    assert doc["parts"]["nano-me"]["analysis"]["macs_per_pixel"] > parts["analysis"]["macs_per_pixel"]
    heavy = doc["heavy_encoder"]["sd_vae"]
    assert heavy["macs"]["attention_products"] > 0 and heavy["macs_per_pixel"] > 100 * parts["analysis"]["macs_per_pixel"]


def test_readme_table_is_regenerated_in_place(tmp_path: Path) -> None:
    results = tmp_path / "results"
    entropy_coding_bench.main(["--channels", "8", "--height", "4", "--width", "4", "--repeats", "1",
                               "--out", str(results / "entropy_coding.json")])
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nIntro.\n")
    update_readme(readme, render(results))
    update_readme(readme, render(results))
    text = readme.read_text()
    assert text.startswith("# Project\n\nIntro.\n")
    assert text.count(START) == 1 and text.count(END) == 1 and text.count("## Benchmarks") == 1
    assert "rANS entropy coding" in text and "Measured on" in text and "Not run yet: model" in text


def test_missing_readme_is_not_created(tmp_path: Path) -> None:
    assert update_readme(tmp_path / "README.md", "table") is False
    assert not (tmp_path / "README.md").exists()


def test_reference_sender_exports_and_encodes(tmp_path: Path) -> None:
    from aeic.shared import bitstream

    from benchmarks import reference_sender
    from benchmarks.images import photo

    model = reference_sender.build(photo(128, 128, index=3))
    codec = reference_sender.ReferenceCodec(reference_sender.export(model, tmp_path / "reference.onnx"))
    rgb = photo(200, 136, index=4)  # padded to 256x256 inside, true size in the header
    stream = bitstream.unpack(codec.encode(rgb))
    assert (stream.header.width, stream.header.height) == (200, 136)
    assert stream.header.model_id == reference_sender.MODEL_ID and len(stream.payload) > 0
    assert reference_sender.parameters()["analysis"] == 940296  # the same AEIC-SE analysis as ours


def test_static_int8_keeps_the_first_convolution_in_float(tmp_path: Path) -> None:
    """The analysis stem quantized as the sender bench does: QDQ, first conv in float, output close to float."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from aeic.codec.export import export_package
    from aeic.codec.testing import make_tiny_model

    from benchmarks import quantize

    torch.manual_seed(0)
    stem = export_package(make_tiny_model(), tmp_path / "package") / "analysis_stem.onnx"
    rng = np.random.default_rng(0)
    feeds = [{"image": rng.random((1, 3, 64, 64), dtype=np.float32)} for _ in range(3)]
    target = quantize.static_int8(stem, tmp_path / "stem.int8.onnx", feeds)
    nodes = onnx.load(str(target)).graph.node
    dequantized = {name for node in nodes if node.op_type == "DequantizeLinear" for name in node.output}
    convs = {node.name: node for node in nodes if node.op_type == "Conv"}
    (first,) = quantize.first_conv(stem)
    assert not dequantized & set(convs[first].input)
    assert all(dequantized & set(node.input[1:]) for name, node in convs.items() if name != first)
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    reference, quantized = run(stem), run(target)
    snr = 10 * np.log10(np.mean(reference**2) / np.mean((reference - quantized) ** 2))
    assert snr > 15, f"int8 stem at {snr:.1f} dB SNR against float"


def test_receiver_memory_bench_reduced(tmp_path: Path) -> None:
    """Stage by stage peak RSS in child processes, and tiled against whole, on a tiny package and picture."""
    from aeic.codec.testing import make_tiny_package
    from PIL import Image

    from benchmarks import receiver_memory_bench

    package = make_tiny_package(tmp_path / "tiny")
    photo = tmp_path / "photo.png"
    rows, cols = np.mgrid[0:300, 0:400]
    Image.fromarray((np.stack([rows, cols, rows + cols], -1) % 256).astype(np.uint8)).save(photo)
    out = tmp_path / "memory.json"
    assert receiver_memory_bench.main(["--model", str(package), "--photo", str(photo), "--sizes", "384x256",
                                       "--tiles", "16384", "--rate", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    whole, default, tiled = doc["runs"]
    assert [whole["run"], tiled["tile_pixels"]] == ["whole", 16384]
    assert set(whole["stages"]) == {"entropy", "synthesis", "unet", "pixel_decoder", "finish"}
    assert whole["peak_rss_mb"] >= whole["rss_loaded_mb"] > 0
    assert default["against_whole"]["max_abs"] == 0  # under the default tile: the same decode
    assert tiled["against_whole"]["max_abs"] <= 1 and tiled["against_whole"]["psnr_db"] > 50


def test_perceptual_memory_bench_reduced(tmp_path: Path) -> None:
    """A child process per metric and way on a small photo: both ways give piq's number, with a peak measured."""
    from benchmarks import perceptual_memory_bench

    out = tmp_path / "perceptual.json"
    assert perceptual_memory_bench.main(["--sizes", "120x90", "--metrics", "vif,gmsd", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert MACHINE_KEYS <= doc["machine"].keys()
    runs = {(run["metric"], run["way"]): run for run in doc["runs"]}
    assert set(runs) == {(metric, way) for metric in ("vif", "gmsd") for way in ("piq", "aeic")}
    for metric in ("vif", "gmsd"):
        assert runs[metric, "aeic"]["value"] == pytest.approx(runs[metric, "piq"]["value"], abs=1e-6)
    assert all(run["peak_above_mb"] >= 0 and run["seconds"] > 0 and run["size"] == "120x90" for run in runs.values())
