"""deploy/docker/constraints.txt against pyproject.toml: the images install `aeic[receiver,scale]` and
`aeic[sender,camera]` under these pins, so a requirement raised in pyproject past its pin (or a new one
left unpinned) breaks `docker build` with a resolver conflict, which no test without a Docker engine
would see. Checked offline: every requirement of those extras has a pin, and the pin satisfies it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
IMAGE_EXTRAS = ("receiver", "scale", "sender", "camera")
PINNED_ELSEWHERE = {"torch"}  # receiver.Dockerfile installs torch==${TORCH_VERSION} itself (the CUDA build)
# The images' Pythons: Ubuntu 24.04's python3 (receiver) and python:3.11 (sender).
IMAGE_PYTHONS = ("3.11", "3.12")


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "deploy/docker/constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.split("#")[0].strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _image_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *(r for extra in IMAGE_EXTRAS for r in project["optional-dependencies"][extra])]
    return [Requirement(name) for name in names]


def test_every_image_requirement_is_pinned_to_a_version_it_admits() -> None:
    pins = _pins()
    assert len(pins) > 50, "constraints.txt: the pins were not read"
    wrong = []
    for requirement in _image_requirements():
        name = canonicalize_name(requirement.name)
        if name == "aeic" or name in PINNED_ELSEWHERE:
            continue
        if requirement.marker and not any(requirement.marker.evaluate({"python_version": v}) for v in IMAGE_PYTHONS):
            continue  # e.g. tomli, for Python 3.10 only
        if name not in pins:
            wrong.append(f"{requirement}: no pin")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            wrong.append(f"{requirement}: pinned to {pins[name]}")
    assert wrong == [], "deploy/docker/constraints.txt: " + "; ".join(wrong)
