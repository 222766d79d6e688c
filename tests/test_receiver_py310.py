"""The receiver on Python 3.10 (requires-python >= 3.10): what 3.10's standard library or an install there
lacks that 3.11 has, found by the type check at python_version 3.10 and the review around it."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from aeic.receiver.api.images import _parse_time
from dateutil.parser import isoparse
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# Forms 3.10's datetime.fromisoformat refused (the API answered `since`/`until` with 422 there) and what
# they name, as 3.11 reads them.
_UTC_0900 = datetime(2026, 12, 6, 9, tzinfo=timezone.utc).timestamp()
READ_ON_3_11 = {
    "2026-12-06T10:00:00+0100": _UTC_0900,  # `date +%FT%T%z`
    "2026-12-06T09:00:00.5Z": _UTC_0900 + 0.5,
    "2026-12-06T09:00:00,25+00:00": _UTC_0900 + 0.25,
    "2026-12-06T09:00:00.1234567+00:00": _UTC_0900 + 0.123456,  # truncated to microseconds
    "20261206T090000Z": _UTC_0900,
    "2026-12-06T0900Z": _UTC_0900,
    "2026-12-06T04-05": _UTC_0900,
    "2026-W49-7T09:00Z": _UTC_0900,  # 2026-12-06 is the Sunday of ISO week 49
    "2026W497T09Z": _UTC_0900,
}


@pytest.mark.parametrize("value", sorted(READ_ON_3_11))
def test_since_and_until_take_iso_8601_as_python_3_11_reads_it(value: str) -> None:
    """On 3.11+ the API reads with datetime.fromisoformat, on 3.10 with dateutil's isoparse: both the same."""
    assert _parse_time(value, "since") == pytest.approx(READ_ON_3_11[value], abs=1e-6)
    assert isoparse(value.replace("Z", "+00:00")).timestamp() == pytest.approx(READ_ON_3_11[value], abs=1e-6)


@pytest.mark.parametrize("value", ["2026-12-06T25:00", "2026-02-30", "2026-W54", "garbage", "2026-12-06T09:00+2500"])
def test_both_readers_refuse_what_names_no_instant(value: str) -> None:
    with pytest.raises(ValueError):
        isoparse(value)
    if sys.version_info >= (3, 11):
        with pytest.raises(ValueError):
            datetime.fromisoformat(value)


def _extra_requirements(extras: dict[str, list[str]], name: str) -> list[Requirement]:
    """An extra's requirements, with those of the aeic[...] extras it names."""
    out = []
    for line in extras[name]:
        requirement = Requirement(line)
        if requirement.name == "aeic":
            for inner in sorted(requirement.extras):
                out += _extra_requirements(extras, inner)
        else:
            out.append(requirement)
    return out


def test_the_receiver_install_reads_toml_config_on_python_3_10() -> None:
    """pydantic-settings reads `--config`/AEIC_CONFIG with tomli on 3.10 (ImportError without it)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    tomli = [r for r in _extra_requirements(extras, "receiver") if r.name == "tomli"]
    assert any(r.marker is None or r.marker.evaluate({"python_version": "3.10"}) for r in tomli)


def test_the_receiver_install_reads_iso_8601_on_python_3_10() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    dateutil = [r for r in _extra_requirements(extras, "receiver") if r.name == "python-dateutil"]
    assert any(r.marker is None or r.marker.evaluate({"python_version": "3.10"}) for r in dateutil)
