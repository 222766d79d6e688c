"""What lets a run resume into an ``--out`` folder: one ``aeic eval`` at a time (``eval.lock``), and rows made
only one way (``run.json``: the criterion, encoders and codec the rows depend on, and a hash of each picture).

Rows made another way would be averaged together with these without a word: another model's, another
criterion's, another picture's under the same name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aeic.evaluation import baselines
from aeic.sender.images import ImageReadError, open_regular
from aeic.shared.durable import exclusive_lock

LOCK_FILE = "eval.lock"
RUN_IDENTITY_FILE = "run.json"
# What decides the rows, beyond the columns: a re-run into the same --out may only add rows made the same
# way. Provider, device and the package's path may change between resumes; the model id may not.
ROW_DEFINING_CODEC_KEYS = ("codec", "model_id", "sender_downscale", "sender_rounding")


@contextmanager
def out_folder_lock(out: Path) -> Iterator[None]:
    """One ``aeic eval`` at a time in an ``--out`` folder (made here if missing): two (the same command started
    twice, a requeued job) would each measure and append every row, so the means counted each image twice."""
    out.mkdir(parents=True, exist_ok=True)
    busy = ValueError(f"another aeic eval is writing to {out} (it holds {out / LOCK_FILE}): wait for it, or stop it first")
    with exclusive_lock(out / LOCK_FILE, busy):
        yield


def run_identity(
    criterion: str, codecs: list[str], codec_info: dict[str, Any] | None, baseline_max_mpx: float | None = None
) -> dict[str, Any]:
    """The settings rows depend on: the baseline criterion and encoder settings (with the search's
    ``--baseline-max-mpx`` when one is given, so a folder from before that option still resumes), the codecs
    a ``best`` row chooses among (a codec missing on one machine would otherwise mix best-of-three rows with
    best-of-four ones), and the codec (None for --baselines-only)."""
    codec = None if codec_info is None else {k: codec_info.get(k) for k in ROW_DEFINING_CODEC_KEYS}
    settings = baselines.encoder_settings()
    cap = {} if baseline_max_mpx is None else {"max_mpx": baseline_max_mpx}
    encoders = {name: {**settings[name], **cap} for name in codecs} or None
    best_of = sorted(codecs) if len(codecs) > 1 else None
    return {"criterion": criterion if codecs else None, "codec": codec, "encoders": encoders, "best_of": best_of}


def image_digests(paths: Iterable[Path]) -> dict[str, str]:
    """A content hash per image name, so a resumed run notices another picture under a name it measured."""
    digests = {}
    for path in paths:
        try:  # opened as the sender opens it: a FIFO is refused, not waited on
            with open_regular(path) as file:
                digests[path.name] = hashlib.sha256(file.read()).hexdigest()[:16]
        except (OSError, ImageReadError):  # unreadable: it gets error rows, not a digest
            continue
    return digests


def check_run_identity(
    out: Path, identity: dict[str, Any], resuming: bool = True, measured: Collection[str] = frozenset()
) -> None:
    """Refuse to resume a folder whose rows were made with another criterion, codec or pictures; record this run's.

    A baseline-only folder may be completed with a codec's rows (and the reverse), since neither kind of row
    depends on the other's settings. ``resuming`` False (no rows yet) starts afresh. ``identity["images"]``
    holds :func:`image_digests`, checked for the ``measured`` image names (those with rows);
    ``identity["encoders"]`` each classic codec's encoder settings, checked for the codecs in both.
    """
    stored = _stored_identity(out) if resuming else {"criterion": None, "codec": None}
    merged = dict(stored)
    for key, value in identity.items():
        if key == "images":
            merged[key] = _merged_digests(out, stored.get(key) or {}, value, measured)
        elif key == "encoders" and value is not None:  # per classic codec: others may join a folder
            merged[key] = _merged_encoders(out, stored.get(key) or {}, value)
        elif value is not None:
            if stored.get(key) is not None and stored[key] != value:
                raise ValueError(
                    f"{out} holds rows made with {key} {stored[key]!r}, not {value!r}; use a new --out folder"
                )
            merged[key] = value
    (out / RUN_IDENTITY_FILE).write_text(json.dumps(merged, indent=2) + "\n")


def _stored_identity(out: Path) -> dict[str, Any]:
    """The identity the folder's rows were made with: its ``run.json``, or for a folder written before
    ``run.json`` existed, what its ``summary.json`` says."""
    stored: dict[str, Any] = {"criterion": None, "codec": None}
    if (out / RUN_IDENTITY_FILE).exists():
        stored.update(json.loads((out / RUN_IDENTITY_FILE).read_text()))
    elif (out / "summary.json").exists():
        old = json.loads((out / "summary.json").read_text())
        config, codec = old.get("config", {}), old.get("codec") or {}
        stored["criterion"] = config.get("criterion") if config.get("baselines") else None
        if any(codec.get(k) is not None for k in ROW_DEFINING_CODEC_KEYS):
            stored["codec"] = {k: codec.get(k) for k in ROW_DEFINING_CODEC_KEYS}
    return stored


def _merged_digests(
    out: Path, stored: dict[str, str], current: dict[str, str], measured: Collection[str]
) -> dict:
    """``stored`` updated with ``current``; refuses when an image that has rows is now another picture."""
    changed = sorted(n for n in measured if n in stored and n in current and stored[n] != current[n])
    if changed:
        raise ValueError(
            f"{out} holds rows of other pictures named {changed[:3]} (another --images folder, or the files "
            "changed); use a new --out folder"
        )
    return {**stored, **current}


def _merged_encoders(out: Path, stored: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``stored`` updated with ``current``; refuses when a classic codec with rows now has other settings."""
    changed = sorted(name for name in current if name in stored and stored[name] != current[name])
    if changed:
        raise ValueError(
            f"{out} holds {', '.join(changed)} rows made with other encoder settings "
            f"({stored[changed[0]]!r}); use a new --out folder"
        )
    return {**stored, **current}
