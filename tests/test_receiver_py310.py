"""The receiver on Python 3.10 (requires-python >= 3.10): what 3.10's standard library or an install there
lacks that 3.11 has, found by the type check at python_version 3.10 and the review around it."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from aeic.receiver.api import _parse_time
from aeic.receiver.iso8601 import parse_iso8601_310
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
    assert _parse_time(value, "since") == pytest.approx(READ_ON_3_11[value], abs=1e-6)
    assert parse_iso8601_310(value).timestamp() == pytest.approx(READ_ON_3_11[value], abs=1e-6)


DATES = ["2026-12-06", "20261206", "2026-W49", "2026W49", "2026-W49-7", "2026W497", "2020-W53-5", "2026-W53",
         "2026-02-30", "2026-13-01", "2026-W00", "2026-1206", "202612-06", "2026W49-7", "2026-12-6"]
SEPARATORS = ["T", " ", "x", "-", "", "TT"]
TIMES = ["", "09", "0930", "09:30", "09:30:15", "093015", "09:30:15.5", "093015,123", "09:30:15.1234567",
         "09:3015", "0930:15", "24:00", "9:30", "09:30:15.5.5", "09:3"]
ZONES = ["", "Z", "-00:00", "+01", "+0100", "-05:30", "-05:30:15", "+053015.25", "+24:00", "+1", "+010", "z",
         "+01:00Z"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="compares with 3.11's datetime.fromisoformat")
def test_the_python_3_10_reading_is_the_standard_librarys() -> None:
    def read(parse: Callable[[str], datetime], text: str) -> datetime | str:
        try:
            return parse(text)
        except ValueError:
            return "refused"

    differ = [text for text in ("".join(parts) for parts in itertools.product(DATES, SEPARATORS, TIMES, ZONES))
              if read(datetime.fromisoformat, text) != read(parse_iso8601_310, text)]
    assert differ == []


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
