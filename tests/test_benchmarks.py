"""Smoke tests of the benchmark suite in reduced mode: tiny sizes, seconds, real code paths."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert set(parts) == {"analysis", "hyper_analysis", "entropy_model", "synthesis", "unet", "pixel_decoder_taef2"}
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
