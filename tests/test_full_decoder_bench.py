"""benchmarks.full_decoder_bench in reduced mode: SD-Turbo's configs swapped for the tests' tiny ones, so its
counting, measuring and scaling run in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sd_turbo_support import tiny_unet, tiny_vae

from benchmarks import full_decoder_bench


def test_full_decoder_bench_reduced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection")
    monkeypatch.setattr(full_decoder_bench, "SD_TURBO_UNET", {name: tiny_unet().config[name] for name in names})
    monkeypatch.setattr(full_decoder_bench, "SD_TURBO_VAE", {name: tiny_vae().config[name] for name in (
        "down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "latent_channels",
        "norm_num_groups")})
    monkeypatch.setattr(full_decoder_bench, "SIZES", {"small": (128, 128), "wide": (256, 128)})
    monkeypatch.setattr(full_decoder_bench, "MEASURED", ((64, 64), (128, 128)))
    out = tmp_path / "full_decoder.json"
    assert full_decoder_bench.main(["--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [m["coded"] for m in doc["measured_float32_cpu"]] == ["64x64", "128x128"]
    small, wide = doc["sizes"]["small"], doc["sizes"]["wide"]
    assert 0 < small["unet_attention_gmacs"] < small["unet_gmacs"]
    # convolutions double with the pixels, attention more than doubles (its products grow with their square)
    assert wide["vae_gmacs"] == pytest.approx(2 * small["vae_gmacs"], rel=0.05)
    assert wide["unet_attention_gmacs"] > 2.5 * small["unet_attention_gmacs"]
    assert doc["parameters"]["unet"] > 0 and doc["parameters"]["vae"] > 0
    weights = doc["weights_bytes"]
    assert weights["float32"] == {part: 4 * count for part, count in doc["parameters"].items()}
    # the UNet halves but for its float32 rate table; the VAE stays float32 under float16 (force_upcast)
    assert weights["bfloat16"]["unet"] == weights["float16"]["unet"] == (weights["float32"]["unet"] + 6 * 128 * 4) // 2
    assert weights["float16"]["vae"] == weights["float32"]["vae"] == 2 * weights["bfloat16"]["vae"]
