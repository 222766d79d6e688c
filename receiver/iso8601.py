"""ISO 8601 date-times as `datetime.fromisoformat` reads them from Python 3.11 on, on Python 3.10 too.

Why: 3.10's `fromisoformat` takes only what `isoformat()` writes, so on 3.10 the API refused `since` and
`until` values that 3.11 accepts (`+0100` offsets, one-digit fractions, `20261206T0900`, week dates) with
422. On 3.11 and later the standard library parses; `parse_iso8601_310` is the 3.10 reading of the same
forms: a calendar (`YYYY-MM-DD`, `YYYYMMDD`) or week date (`YYYY-Www[-D]`, `YYYYWww[D]`), optionally any
one separator character and `HH[:MM[:SS[.f]]]` (or `HHMMSS`, fraction after `.` or `,`, truncated to
microseconds), then `Z` or `+`/`-` and `HH[:MM[:SS[.f]]]` (or `HHMMSS`). Unlike the standard library
it refuses a fraction after hours or minutes (which that reads as a fraction of a second: `T09.5` is
09:00:00.5 there), an empty fraction (`T09:30:15.Z`) and a digit as the date-time separator.
"""

from __future__ import annotations

import re
import sys
from datetime import date, datetime, timedelta, timezone

__all__ = ["parse_iso8601", "parse_iso8601_310"]


def _clock(name: str) -> str:
    """HH[:MM[:SS[.f]]] or HH[MM[SS[.f]]] (colons all or none), groups prefixed with `name`."""
    return (rf"(?P<{name}h>\d{{2}})(?:(?P<{name}c>:?)(?P<{name}m>\d{{2}})"
            rf"(?:(?P={name}c)(?P<{name}s>\d{{2}})(?:[.,](?P<{name}f>\d+))?)?)?")


_ISO_8601 = re.compile(
    # `YYYY-Www-` and a digit after the next one: the hyphen is the separator, the digits the time
    r"(?P<year>\d{4})(?:(?P<wd>-)?W(?P<week>\d{2})(?:(?(wd)-)(?P<weekday>\d)(?(wd)(?!\d)))?"
    r"|(?P<cd>-?)(?P<month>\d{2})(?P=cd)(?P<day>\d{2}))"
    r"(?:." + _clock("t") + r"(?:(?P<utc>Z)|(?P<sign>[+-])" + _clock("z") + r")?)?",
    re.ASCII | re.DOTALL,
)


def _micro(fraction: str | None) -> int:
    return int((fraction or "0")[:6].ljust(6, "0"))


def parse_iso8601_310(value: str) -> datetime:
    """The datetime `value` names (naive when it has no offset); ValueError when it is not one."""
    match = _ISO_8601.fullmatch(value)
    if match is None:
        raise ValueError(f"Invalid isoformat string: {value!r}")
    g = match.groupdict()
    if g["week"] is not None:
        day = date.fromisocalendar(int(g["year"]), int(g["week"]), int(g["weekday"] or 1))
    else:
        day = date(int(g["year"]), int(g["month"]), int(g["day"]))
    zone = None
    if g["utc"]:
        zone = timezone.utc
    elif g["sign"]:
        offset = timedelta(hours=int(g["zh"]), minutes=int(g["zm"] or 0), seconds=int(g["zs"] or 0),
                           microseconds=_micro(g["zf"]))
        zone = timezone(-offset if g["sign"] == "-" else offset) if offset else timezone.utc
    return datetime(day.year, day.month, day.day, int(g["th"] or 0), int(g["tm"] or 0), int(g["ts"] or 0),
                    _micro(g["tf"]), tzinfo=zone)


def parse_iso8601(value: str) -> datetime:
    """`datetime.fromisoformat` with Python 3.11's reading of ISO 8601 on every supported Python."""
    if sys.version_info >= (3, 11):
        return datetime.fromisoformat(value)
    return parse_iso8601_310(value)
