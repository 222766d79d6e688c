"""A model package: the folder both sides load, and the model id that bitstreams carry.

Layout (``docs/architecture.md``)::

    manifest.json          profile, configuration, rate levels, analysis tiling, file digests, model id
    analysis_stem.onnx     sender: image -> features at 1/4 (run in strips with a halo)
    analysis_trunk.onnx    sender: features -> latent (the analysis runs once per image)
    hyper.onnx             sender: (latent, gain) -> (scaled latent, hyper-latent)
    entropy.npz            both: integer entropy-model layers, CDF tables, per-level gains
    receiver.safetensors   receiver: synthesis transform and one-step decoder

The model id is the first 4 bytes of the SHA-256 of the manifest's canonical JSON, which lists
the SHA-256 of every file, so a receiver refuses streams made with weights it does not have.
A sender needs only ``SENDER_FILES``: an edge device may carry the package without the receiver's
weights, and the manifest still proves the model id.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .entropy_coding import CdfTables
from .entropy_model import EntropyModel, IntConv, Layer, PixelShuffle

MANIFEST = "manifest.json"
FORMAT = "aeic-model/1"
DEFAULT_MODEL = "nano-se"
SENDER_FILES = ("analysis_stem.onnx", "analysis_trunk.onnx", "hyper.onnx", "entropy.npz")
PACKAGE_FILES = (*SENDER_FILES, "receiver.safetensors")


class ModelPackageError(ValueError):
    """The folder is not a complete, consistent model package."""


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def canonical_json(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def compute_model_id(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "model_id"}
    return hashlib.sha256(canonical_json(body)).digest()[:4]


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Seal ``manifest`` for the files now in ``folder`` (their digests, then the model id) and write it."""
    manifest = {**manifest, "files": {name: file_digest(folder / name) for name in PACKAGE_FILES}}
    manifest["model_id"] = compute_model_id(manifest).hex()
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def models_root() -> Path:
    """Where shipped packages live: ``models/`` beside the root package's ``__init__``, in a source checkout
    (``aeic/models``) and in an installed wheel (``site-packages/aeic/models``) alike."""
    import aeic

    return Path(aeic.__file__).resolve().parent / "models"


def default_model_dir() -> Path:
    """``AEIC_MODEL`` (a folder), else the shipped default package."""
    configured = os.environ.get("AEIC_MODEL")
    return Path(configured) if configured else models_root() / DEFAULT_MODEL


# -- integer layers <-> arrays ---------------------------------------------------------------------
def layers_to_arrays(layers: list[Layer], prefix: str) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {f"{prefix}.count": np.array([len(layers)], dtype=np.int32)}
    for i, layer in enumerate(layers):
        key = f"{prefix}.{i}"
        if isinstance(layer, PixelShuffle):
            arrays[f"{key}.pixel_shuffle"] = np.array([layer.factor], dtype=np.int32)
        else:
            arrays[f"{key}.weight"] = layer.weight.astype(np.int8)
            for name in ("bias", "shift", "lo", "hi"):
                arrays[f"{key}.{name}"] = getattr(layer, name).astype(np.int64)
    return arrays


def layers_from_arrays(arrays: dict[str, np.ndarray], prefix: str) -> list[Layer]:
    layers: list[Layer] = []
    for i in range(int(arrays[f"{prefix}.count"][0])):
        key = f"{prefix}.{i}"
        if f"{key}.pixel_shuffle" in arrays:
            layers.append(PixelShuffle(int(arrays[f"{key}.pixel_shuffle"][0])))
        else:
            layers.append(IntConv(*(np.asarray(arrays[f"{key}.{n}"]) for n in ("weight", "bias", "shift", "lo", "hi"))))
    return layers


def entropy_model_to_arrays(model: EntropyModel) -> dict[str, np.ndarray]:
    arrays = layers_to_arrays(model.hyper_synthesis, "hyper_synthesis")
    for step, layers in enumerate(model.context):
        arrays.update(layers_to_arrays(layers, f"context.{step}"))
    arrays.update(model.z_tables.to_arrays("z_tables"))
    arrays.update(model.y_tables.to_arrays("y_tables"))
    arrays["latent_channels"] = np.array([model.latent_channels], dtype=np.int32)
    arrays["context.count"] = np.array([len(model.context)], dtype=np.int32)
    return arrays


def entropy_model_from_arrays(arrays: dict[str, np.ndarray]) -> EntropyModel:
    return EntropyModel(
        hyper_synthesis=layers_from_arrays(arrays, "hyper_synthesis"),
        context=[layers_from_arrays(arrays, f"context.{s}") for s in range(int(arrays["context.count"][0]))],
        z_tables=CdfTables.from_arrays(arrays, "z_tables"),
        y_tables=CdfTables.from_arrays(arrays, "y_tables"),
        latent_channels=int(arrays["latent_channels"][0]),
    )


@dataclass(frozen=True, eq=False)
class ModelPackage:
    """A loaded, verified package. Heavy parts (ONNX, torch weights) load on the side that needs them."""

    path: Path
    manifest: dict
    entropy_model: EntropyModel
    level_gains: np.ndarray  # (levels, C) float32: latent gain of each rate level

    @classmethod
    def load(cls, path: Path | str | None = None, verify: bool = True, needs: tuple[str, ...] = PACKAGE_FILES) -> ModelPackage:
        """``needs``: the files this side reads, each checked against its digest (``SENDER_FILES`` on a sender)."""
        path = Path(path) if path is not None else default_model_dir()
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise ModelPackageError(f"{path} is not a model package: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_file.read_text())
        except ValueError as exc:  # not JSON, or not UTF-8: a ModelPackageError, which callers report in a line
            raise ModelPackageError(f"{path}: {MANIFEST} is not valid JSON ({exc})") from None
        if not isinstance(manifest, dict):
            raise ModelPackageError(f"{path}: {MANIFEST} is not a JSON object")
        if manifest.get("format") != FORMAT:
            raise ModelPackageError(f"{path}: unsupported package format {manifest.get('format')!r}")
        missing = [name for name in PACKAGE_FILES if name not in manifest.get("files", {})]
        if missing or "analysis_tiling" not in manifest:
            raise ModelPackageError(f"{path}: an older package layout (lacks {', '.join(missing) or 'analysis_tiling'}); "
                                    "export it again with `aeic export`")  # fmt: skip
        if verify:
            cls._verify(path, manifest, needs)
        try:
            with np.load(path / "entropy.npz", allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            return cls(path, manifest, entropy_model_from_arrays(arrays), arrays["levels.gains"].astype(np.float32))
        except KeyError as exc:  # digests and id agree, so another version of aeic wrote it: one line, not a KeyError
            raise ModelPackageError(f"{path}: entropy.npz lacks the array {exc}: was the package exported by "
                                    "another version of aeic?") from None

    @staticmethod
    def _verify(path: Path, manifest: dict, needs: tuple[str, ...]) -> None:
        for name in needs:
            digest = manifest["files"][name]
            if not (path / name).is_file():
                raise ModelPackageError(f"{path}: {name} is missing")
            if file_digest(path / name) != digest:
                raise ModelPackageError(f"{path}: {name} does not match its digest in the manifest")
        if bytes.fromhex(manifest["model_id"]) != compute_model_id(manifest):
            raise ModelPackageError(f"{path}: the manifest's model id does not match its contents")

    @property
    def model_id(self) -> bytes:
        return bytes.fromhex(self.manifest["model_id"])

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def rates(self) -> list[float]:
        """Nominal bpp of each rate level (the bitstream's rate index)."""
        return [level["nominal_bpp"] for level in self.manifest["rate_levels"]]

    @property
    def num_levels(self) -> int:
        return len(self.manifest["rate_levels"])

    def level_for_bpp(self, bpp: float) -> int:
        """The rate level whose nominal bpp is nearest ``bpp`` (in log): level numbers depend on the spacing."""
        return int(np.argmin(np.abs(np.log(np.asarray(self.rates)) - np.log(bpp))))

    def level_position(self, level: int) -> float:
        """The level's position between the trained rate points (0 .. num_rates - 1)."""
        return float(self.manifest["rate_levels"][level]["position"])

    @property
    def analysis_tiling(self) -> tuple[int, int]:
        """(factor, halo): the stem's downsampling and the input rows a strip needs on each side."""
        tiling = self.manifest["analysis_tiling"]
        return int(tiling["factor"]), int(tiling["halo"])

    @property
    def rounding_weight(self) -> float | None:
        """The sender's rate-distortion rounding weight tuned for this model (None: nearest rounding)."""
        weight = self.manifest.get("encoder", {}).get("rounding_weight")
        if weight is None:
            return None
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
            raise ModelPackageError(f"{self.path}: encoder.rounding_weight must be a positive number, got {weight!r}")
        return float(weight)

    def file(self, name: str) -> Path:
        return self.path / name
