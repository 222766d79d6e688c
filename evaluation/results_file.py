"""``OUT/results.csv``: the rows of an evaluation, appended as they are made, so a run resumes where it stopped.

A row is keyed by (image, point, method); a folder holds one row per key. A row a killed run left half
written is dropped on opening (and so measured again), never averaged.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STATUSES = ("ok", "unreachable", "error")


def _csv_open(path: Path, mode: str) -> Any:
    """UTF-8, with non-UTF-8 file names kept byte for byte (surrogateescape) instead of crashing."""
    return path.open(mode, newline="", encoding="utf-8", errors="surrogateescape")


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    """What a row is of: (image, point, method); a folder holds one row per key."""
    return row["image"], row["point"], row["method"]


def _complete(row: dict[str, Any]) -> bool:
    """False for a row a killed run left half written: fields missing or extra, or no known status."""
    return None not in row and None not in row.values() and row["status"] in STATUSES


def _cell(value: Any) -> str:
    """A value as the CSV stores it: ``repr`` for floats, so they read back to the same number."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class ResultsFile:
    """Append-only CSV of rows with a fixed header; knows which (image, point, method) rows exist."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        self.rows: list[dict[str, str]] = []
        if path.exists() and path.stat().st_size > 0:
            with _csv_open(path, "r") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames != columns:
                    raise ValueError(
                        f"{path} was written with other columns {reader.fieldnames}; use a new --out folder"
                    )
                rows = list(reader)
            # a row cut short by a killed run is dropped, so it is measured again; a row written twice (two
            # runs at once, before eval.lock) is kept once, the later one
            self.rows = list({_key(r): r for r in rows if _complete(r)}.values())
            if len(self.rows) < len(rows) or not path.read_bytes().endswith(b"\n"):
                self._rewrite()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite()
        self.done = {_key(r): r for r in self.rows}

    def _rewrite(self) -> None:
        """Header and the rows kept, written whole and then moved into place."""
        tmp = self.path.with_suffix(".csv.tmp")
        with _csv_open(tmp, "w") as fh:
            writer = csv.DictWriter(fh, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write ``rows`` through at once (a run stopped later keeps them); missing columns are empty."""
        rows = [{c: _cell(row.get(c)) for c in self.columns} for row in rows]
        with _csv_open(self.path, "a") as fh:
            csv.DictWriter(fh, self.columns).writerows(rows)
        for row in rows:
            self.rows.append(row)
            self.done[_key(row)] = row
