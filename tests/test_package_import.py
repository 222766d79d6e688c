"""A model package reads back into the model that exported it, and training can start from one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from aeic.codec.export import export_package
from aeic.codec.package_import import PackageImportError, model_from_package
from aeic.codec.testing import make_tiny_model
from aeic.shared import model_package as pkg
from aeic.training.config import TrainConfig
from aeic.training.trainer import Trainer
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from training_support import write_training_photos


def test_import_gives_back_the_exported_model(tmp_path: Path) -> None:
    original = make_tiny_model(seed=3)
    package = export_package(original, tmp_path / "package")
    imported = model_from_package(package).eval()
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(imported.analysis(image), original.analysis(image), atol=1e-6)
        y = original.analysis(image)
        assert torch.allclose(imported.hyper_analysis(y), original.hyper_analysis(y), atol=1e-6)
    assert torch.allclose(imported.log_gains, original.log_gains, atol=1e-6)
    exported, reimported = (pkg.entropy_model_to_arrays(m.entropy.export()) for m in (original, imported))
    layers = [k for k in exported if k.startswith(("context.", "hyper_synthesis."))]
    assert layers and all(np.array_equal(exported[k], reimported[k]) for k in layers)
    original_scale, imported_scale = (m.entropy.z_log_scale.exp() for m in (original, imported))
    assert torch.allclose(original_scale, imported_scale, rtol=1e-3)  # fitted back from 16-bit frequency tables
    for name, tensor in original.synthesis.state_dict().items():
        assert torch.equal(imported.synthesis.state_dict()[name], tensor.half().float())


def test_training_starts_from_a_package(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    package = export_package(make_tiny_model(seed=4), tmp_path / "package")
    (tmp_path / "photos").mkdir()
    photos = write_training_photos(tmp_path / "photos", 2)
    config = TrainConfig(name="t", model="tiny-se", data=photos, cache=tmp_path / "cache", short_side=160, crop=128,
                         batch=2, steps=1, log_every=1, out=tmp_path / "run", device="cpu", init=package)
    trainer = Trainer(config)
    assert torch.equal(trainer.model.synthesis.state_dict()["layers.0.weight"],
                       model_from_package(package).synthesis.state_dict()["layers.0.weight"])
    assert trainer.run().exists()


def _resealed(package: Path, out: Path, edit: Callable[[Path], None]) -> Path:
    """``package`` copied, changed by ``edit`` and sealed again: as another version of aeic would export it."""
    shutil.copytree(package, out)
    edit(out)
    manifest = json.loads((out / pkg.MANIFEST).read_text())
    pkg.write_manifest(out, {k: v for k, v in manifest.items() if k not in ("files", "model_id")})
    return out


def _config_field(folder: Path) -> None:
    manifest = json.loads((folder / pkg.MANIFEST).read_text())
    manifest["config"]["attention"] = "global"
    (folder / pkg.MANIFEST).write_text(json.dumps(manifest))


def _renamed_stem_weights(folder: Path) -> None:
    graph = onnx.load(str(folder / "analysis_stem.onnx"))
    renames = {init.name: f"onnx::Conv_{i}" for i, init in enumerate(graph.graph.initializer)}
    for init in graph.graph.initializer:
        init.name = renames[init.name]
    for node in graph.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    onnx.save(graph, str(folder / "analysis_stem.onnx"))


def _receiver_tensor_dropped(folder: Path) -> None:
    tensors = load_file(str(folder / "receiver.safetensors"))
    tensors.pop(next(key for key in tensors if key.startswith("decoder.")))
    (folder / "receiver.safetensors").write_bytes(safetensors_bytes(tensors))


@pytest.mark.parametrize("edit", [_config_field, _renamed_stem_weights, _receiver_tensor_dropped])
def test_a_package_of_another_version_is_named_not_a_traceback(tmp_path: Path, edit: Callable[[Path], None]) -> None:
    """Starting training from a package another version exported was a TypeError, "zip() argument 2 is longer
    than argument 1", or torch's listing of missing keys: tracebacks from `aeic-train`."""
    package = _resealed(export_package(make_tiny_model(seed=5), tmp_path / "package"), tmp_path / "other", edit)
    with pytest.raises(PackageImportError, match=f"^{package}: .*was it exported by another version of aeic"):
        model_from_package(package)
