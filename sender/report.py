"""What ``aeic-send`` prints: one summary line per image, upload events, errors.

Human mode: summary lines on stdout, errors and status on stderr. ``--json`` mode: one JSON
object per line on stdout (``event`` says which kind), and errors additionally as one plain
line on stderr so a person watching a service log still sees them.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from typing import Any, TextIO

from aeic.sender.pipeline import Encoded
from aeic.sender.spool import SpoolItem
from aeic.sender.uploader import Outcome, UploadResult


class Reporter:
    """Thread-safe printer (the forwarder thread reports uploads while images are encoded)."""

    def __init__(self, as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._lock = threading.Lock()
        # What the receiver answered during this command (every forwarder reports here, the
        # background one of watch/camera included), for the summary and the exit status.
        self.uploaded = 0
        self.rejected = 0

    def _emit(self, stream: TextIO, line: str) -> None:
        with self._lock:
            print(_encodable(line, stream), file=stream, flush=True)

    def event(self, kind: str, **fields: Any) -> None:
        if self.as_json:
            self._emit(self.out, json.dumps({"event": kind, **fields}, sort_keys=True))

    def info(self, message: str) -> None:
        """Status for people (stderr); JSON consumers get the structured events instead."""
        self._emit(self.err, message)

    def error(self, source: str, message: str) -> None:
        """One line on stderr per failed input; the message already names the file."""
        self._emit(self.err, f"error: {message}")
        self.event("error", source=source, error=message)

    def encoded(self, position: str, source: str, enc: Encoded, *, key: str | None = None, **extra: Any) -> None:
        """One line per encoded image; ``key`` is its spool item's when queued (a camera frame's names its capture)."""
        if self.as_json:
            self.event(
                "encoded",
                source=source,
                width=enc.width,
                height=enc.height,
                bytes=len(enc.data),
                bpp=round(enc.bpp, 6),
                rate_index=enc.rate_index,
                encode_ms=round(enc.encode_ms, 1),
                key=key or enc.key,
                **extra,
            )
            return
        where = "".join(f", {name} {value}" for name, value in extra.items())
        self._emit(
            self.out,
            f"{position} {source}: {enc.width}x{enc.height}, {len(enc.data)} bytes, {enc.bpp:.4f} bpp, "
            f"rate {enc.rate_index}, encode {enc.encode_ms:.0f} ms{where}",
        )

    def upload(self, item: SpoolItem, result: UploadResult) -> None:
        """Listener for :class:`aeic.sender.forward.Forwarder`."""
        name = item.source or item.key[:12]
        with self._lock:
            self.uploaded += result.outcome is Outcome.ACCEPTED
            self.rejected += result.outcome is Outcome.REJECTED
        self.event(
            "upload",
            source=item.source,
            key=item.key,
            outcome=result.outcome.value,
            status=result.status,
            detail=result.detail,
            receiver_id=result.receiver_id,
        )
        if result.outcome is Outcome.ACCEPTED:
            suffix = f" as {result.receiver_id}" if result.receiver_id else ""
            self.info(f"uploaded {name} ({item.key[:12]}){suffix}")
        elif result.outcome is Outcome.REJECTED:
            # No status: the spool itself found the bitstream damaged; the receiver never saw it.
            who = "by the receiver" if result.status is not None else "as damaged in the spool"
            self.info(f"rejected {who}: {name}: {result.detail} (kept in the spool's rejected/)")
        # A failed try has no line of its own: the forwarder's OutageLog tells an outage (first failure,
        # sparse reminders, recovery) and the forwarder an item set aside (aeic.sender.outage).


# C0 and C1 control characters, DEL and the Unicode line and paragraph separators: none belongs in a
# one-line log record.
_CONTROL = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]")


def _encodable(line: str, stream: TextIO) -> str:
    """``line`` as one plain line ``stream`` can encode.

    Control characters are written escaped (``\\n``, ``\\x1b``): a receiver's answer (its reason or
    image id), a camera's or a proxy's, or the name of a file dropped into the watched folder could
    otherwise forge log lines with a line break, or send escape sequences to the operator's terminal
    (retitle it, clear it, recolour or hide what follows). What the stream's encoding cannot hold is
    escaped too: a file name that is not valid UTF-8 (its bytes come back as lone surrogates) must not
    end the agent under a strict UTF-8 locale."""
    line = _CONTROL.sub(lambda match: repr(match.group())[1:-1], line)
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return line.encode(encoding, "backslashreplace").decode(encoding)
