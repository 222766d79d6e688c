"""``aeic set-rounding``: name the sender's rate-distortion rounding weight in a package.

The weight is an encoder setting tuned for one model's decoder (see
:mod:`aeic.sender.rate_distortion_rounding`), so it travels in the package manifest
(``encoder.rounding_weight``), where every sender of the package picks it up. Only the manifest
changes: the weights, tables and receiver stay byte for byte, and any stream decodes as before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from aeic.sender.rate_distortion_rounding import RateDistortionRounding
from aeic.shared import model_package as pkg


def set_rounding_weight(package: Path, out: Path, weight: float | None) -> Path:
    """``package`` copied to ``out`` with ``weight`` as its rounding weight (None: nearest rounding)."""
    if weight is not None:
        RateDistortionRounding(weight)  # validates
    pkg.ModelPackage.load(package)  # verified before it is copied
    manifest = json.loads((package / pkg.MANIFEST).read_text())
    if Path(out).resolve() != Path(package).resolve():
        out.mkdir(parents=True, exist_ok=True)
        for name in manifest["files"]:
            shutil.copyfile(package / name, out / name)
    encoder = {k: v for k, v in manifest.get("encoder", {}).items() if k != "rounding_weight"}
    if weight is not None:
        encoder["rounding_weight"] = float(weight)
    manifest = {k: v for k, v in manifest.items() if k != "encoder"} | ({"encoder": encoder} if encoder else {})
    pkg.write_manifest(out, manifest)
    return out
