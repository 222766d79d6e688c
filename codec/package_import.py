"""A model package back to a trainable :class:`AEICModel`, so training can start from what shipped.

A package holds every weight in the form its users run: the analysis and hyper-analysis as ONNX
initializers, the entropy model as integer layers, the receiver as fp16 safetensors. Reading them
back is exact for the float graphs and for the integer layers (an int8 weight with its shift is
the float the fake-quantized layer rounds to), fp16-exact for the receiver; the hyper-latent's
scales, stored only as quantized frequency tables, are fitted back from each table's mass at 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist
from typing import cast

import numpy as np
import onnx
import torch
from aeic.shared import model_package as pkg
from aeic.shared.entropy_coding import PRECISION
from onnx import numpy_helper
from safetensors.torch import load_file
from torch import nn

from .entropy_model import Z_SCALE_MIN, HyperpriorContextModel
from .export import STEM_STAGES
from .model import AEICModel, ModelConfig
from .quantization import QConv2d


class PackageImportError(ValueError):
    """A sealed package this version cannot turn back into its trainable model (another version's export)."""


def model_from_package(package: Path) -> AEICModel:
    """The trainable model whose export is ``package`` (a nano one's pixel decoder attaches on use; a full
    one's SD-Turbo base weights load from ``AEIC_SD_TURBO_DIR``, refused unless they are those it was trained on).

    A package from another version of the code (another configuration, other graph or tensor names) is a
    :class:`PackageImportError` naming it, not the KeyError, TypeError or torch listing of wherever it broke."""
    manifest = pkg.ModelPackage.load(package).manifest
    try:
        config = ModelConfig.from_dict(manifest["config"])
    except (KeyError, TypeError) as exc:
        raise PackageImportError(f"{package}: its model configuration is not this version's ({exc}); "
                                 "was it exported by another version of aeic?") from exc
    model = AEICModel(config)  # a full profile's base weights: the SD-Turbo folder (AEIC_SD_TURBO_DIR)
    try:
        _load_package_weights(model, package, manifest)
    except _OtherBase as exc:
        raise PackageImportError(f"{package}: {exc}") from exc.__cause__
    except (KeyError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise PackageImportError(f"{package}: its weights do not fit the {config.name} model ({detail}); "
                                 "was it exported by another version of aeic?") from exc
    return model


@torch.no_grad()
def _load_package_weights(model: AEICModel, package: Path, manifest: dict) -> None:
    """Every weight of ``model`` from the package's graphs, arrays and receiver tensors."""
    config = model.config
    model.analysis.stages.load_state_dict(_analysis_state(package, config))
    model.hyper_analysis.load_state_dict(_initializers(onnx.load(str(package / "hyper.onnx")).graph, "hyper_analysis."))
    arrays = dict(np.load(package / "entropy.npz"))
    _load_entropy(model.entropy, arrays)
    positions = np.array([level["position"] for level in manifest["rate_levels"]])
    trained = arrays["levels.gains"][np.isclose(positions, np.round(positions))]  # the rate points, not the levels between
    model.log_gains.copy_(torch.from_numpy(np.log(trained.astype(np.float64))).float())
    receiver = {k: v.float() for k, v in load_file(str(package / "receiver.safetensors")).items()}
    model.synthesis.load_state_dict(_prefixed(receiver, "synthesis."))
    decoder = _prefixed(receiver, "decoder.")
    if config.profile == "nano":
        model.decoder.load_state_dict(decoder)
        return
    from .full_profile import BaseWeightsError, FullDecoder  # diffusers: only where SD-Turbo is there to load

    assert isinstance(model.decoder, FullDecoder)
    # only what training changed, over the folder's base weights, which the package's fingerprint checks
    try:
        missing, unexpected = model.decoder.load_state_dict(decoder, strict=False)
    except BaseWeightsError as exc:  # another SD-Turbo folder than it was trained on: its own line, not "another version"
        raise _OtherBase(str(exc)) from exc
    lacking = set(model.decoder.trainable_state_dict()) & set(missing)
    if unexpected or lacking:
        raise KeyError(f"decoder tensors missing {sorted(lacking)[:3]}, unexpected {unexpected[:3]}")


class _OtherBase(Exception):
    """A full package's decoder on SD-Turbo weights it was not trained on, passed through as its own line."""


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _initializers(graph: onnx.GraphProto, prefix: str = "") -> dict[str, torch.Tensor]:
    """The graph's weights by name, also under the names of the Identity nodes that share them: the
    exporter keeps one initializer for equal tensors (an untrained norm's ones and zeros)."""
    tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in tensors:
            tensors[node.output[0]] = tensors[node.input[0]]
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


def _analysis_state(package: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """``analysis.stages`` weights from the stem and trunk graphs (lean blocks' gate and value re-joined)."""
    stem_layers = STEM_STAGES * (2 + config.analysis.blocks_per_stage)
    state: dict[str, torch.Tensor] = {}
    for name, offset in (("analysis_stem.onnx", 0), ("analysis_trunk.onnx", stem_layers)):
        graph = onnx.load(str(package / name)).graph
        tensors = _initializers(graph)
        graph_state = {k: v for k, v in tensors.items() if k.split(".", 1)[0].isdigit()}  # layer weights only
        blocks = sorted({int(key.split(".")[0]) for key in graph_state if ".project." in key})
        norms = [node.input[1:3] for node in graph.node if node.op_type == "LayerNormalization"]
        for block, (weight, bias) in zip(blocks, norms, strict=True):  # graph order is block order
            graph_state[f"{block}.norm.weight"], graph_state[f"{block}.norm.bias"] = tensors[weight], tensors[bias]
        for key, value in graph_state.items():
            index, rest = key.split(".", 1)
            state[f"{int(index) + offset}.{rest}"] = value
    for key in [k for k in state if ".gate." in k]:
        part = key.rsplit(".", 1)[1]
        layer = key.split(".gate.")[0]
        state[f"{layer}.expand.{part}"] = torch.cat([state.pop(key), state.pop(f"{layer}.value.{part}")])
    return state


def _load_entropy(entropy: HyperpriorContextModel, arrays: dict[str, np.ndarray]) -> None:
    networks: list[tuple[str, nn.Sequential]] = [("hyper_synthesis", entropy.hyper_synthesis)]
    networks += [(f"context.{step}", cast(nn.Sequential, network)) for step, network in enumerate(entropy.context)]
    for prefix, network in networks:
        for index, module in enumerate(network):
            if isinstance(module, QConv2d):
                _load_qconv(module, arrays, f"{prefix}.{index}")
    entropy.z_log_scale.copy_(torch.tensor([math.log(s) for s in _z_scales(arrays)]))


def _load_qconv(module: QConv2d, arrays: dict[str, np.ndarray], prefix: str) -> None:
    """Float weights that round to exactly the stored integer layer: w / 2^bits, b / 2^(bits + in_bits)."""
    weight_bits = arrays[f"{prefix}.shift"].astype(np.float64) + module.out_bits.double().numpy() - module.in_bits
    scale = torch.from_numpy(np.exp2(weight_bits))
    module.weight.copy_(torch.from_numpy(arrays[f"{prefix}.weight"].astype(np.float64)) / scale[:, None, None, None])
    module.bias.copy_(torch.from_numpy(arrays[f"{prefix}.bias"].astype(np.float64)) / (scale * 2.0**module.in_bits))


def _z_scales(arrays: dict[str, np.ndarray]) -> list[float]:
    """Each hyper-latent channel's Gaussian scale, from its table's probability of 0."""
    scales = []
    for counts, offset in zip(arrays["z_tables.counts"], arrays["z_tables.offsets"], strict=True):
        p_zero = min(counts[offset] / (1 << PRECISION), 1 - 1e-12)
        scales.append(max(Z_SCALE_MIN, 0.5 / NormalDist().inv_cdf((1 + p_zero) / 2)))
    return scales

