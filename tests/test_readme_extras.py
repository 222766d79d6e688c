"""The README's list of what `pip install .[sender]` brings against pyproject.toml: an edge operator sizes
the device's install from it, so a dependency the sender extra gained (threadpoolctl, for the BLAS thread
limit) must be named there too."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_names_every_package_of_the_sender_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {Requirement(r).name.lower() for r in [*project["dependencies"], *project["optional-dependencies"]["sender"]]}
    readme = " ".join((ROOT / "README.md").read_text().split())
    listed = re.search(r"`pip install \.\[sender\]` \(([^)]*)\)", readme)
    assert listed is not None, "README: the sentence on the sender extra moved"
    missing = sorted(name for name in names if not re.search(rf"\b{re.escape(name)}\b", listed.group(1).lower()))
    assert missing == [], f"README's `pip install .[sender]` list lacks {missing}"
