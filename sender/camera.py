"""Grab one frame every N seconds from an OpenCV source, reconnecting after failures.

Sources: a camera index (``0``), a device path (``/dev/video2``), a network stream
(``rtsp://...``, ``http://...``) or a video file. A failed open or read releases the
capture and reopens it after a backoff delay (1 s doubling to 60 s, with jitter), so an
unplugged USB camera or a dropped RTSP stream comes back by itself. The capture buffer is
set to one frame where the backend allows; for network streams, which buffer regardless,
frames queued since the last picture are skipped, so each picture is recent.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol
from urllib.parse import urlsplit

import cv2
import numpy as np
from aeic.sender.backoff import Backoff
from aeic.sender.images import MAX_SIDE
from aeic.shared.url_redaction import without_password

# A grab slower than this waited for the source: the stream's buffer is drained.
LIVE_GRAB_SECONDS = 0.005
# Never skip more than this many buffered frames for one picture (about 2 s at 30 fps).
MAX_BUFFERED_FRAMES = 60
# Query parameters that carry an IP camera's credentials (``snapshot.cgi?user=admin&pwd=...``,
# ``?password=``, ``?auth=``, ``?token=``): masked in log lines like a URL's password.
_SECRET_PARAMETER = re.compile(r"pass|pwd|token|secret|key|auth|sig", re.IGNORECASE)


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` we use (lets tests pass a double)."""

    def isOpened(self) -> bool: ...
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def grab(self) -> bool: ...
    def retrieve(self) -> tuple[bool, np.ndarray | None]: ...
    def release(self) -> None: ...
    def set(self, prop: int, value: float) -> bool: ...


def parse_source(text: str) -> int | str:
    """``"0"`` -> camera index 0; anything else (device path, URL, file) is passed as is."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("camera source is empty: give an index, /dev/videoN or a stream URL")
    return int(stripped) if stripped.isdigit() else stripped


def display_name(source: int | str) -> str:
    """``source`` as log lines show it: a URL without the password of its user part, and with the values of
    query parameters that carry credentials replaced by ``***``. Many IP cameras take theirs in the query
    (``videostream.cgi?user=admin&pwd=...``), and the start line went whole into the journal."""
    if not isinstance(source, str):
        return str(source)
    shown = without_password(source)
    parts = urlsplit(shown)
    pairs = parts.query.split("&") if parts.query else []
    masked = [
        f"{name}=***" if value and _SECRET_PARAMETER.search(name) else f"{name}{sep}{value}"
        for name, sep, value in (pair.partition("=") for pair in pairs)
    ]
    return parts._replace(query="&".join(masked)).geturl() if masked != pairs else shown


def open_capture(source: int | str) -> Capture:
    capture = cv2.VideoCapture(source)
    capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    return capture


def to_rgb(frame: np.ndarray) -> np.ndarray:
    """OpenCV frames are BGR (or grey, or BGRA) -> HxWx3 uint8 RGB."""
    if frame.dtype != np.uint8:
        scale = 255.0 / 65535.0 if frame.dtype == np.uint16 else 1.0
        frame = np.clip(frame.astype(np.float32) * scale + 0.5, 0, 255).astype(np.uint8)
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


class Camera:
    """Yields RGB frames on a fixed schedule; never raises for a lost source."""

    def __init__(
        self,
        source: int | str,
        *,
        opener: Callable[[int | str], Capture] = open_capture,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.source = source
        self.name = display_name(source)  # rtsp://user:***@cam/..., http://cam/video.cgi?user=admin&pwd=***
        self._opener = opener
        self._backoff = backoff or Backoff(base=1.0, max_delay=60.0)
        self._clock = clock
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._capture: Capture | None = None
        # Failures said since the last good frame: an unplugged camera is one line (and one when it is
        # back), not one per reconnection try for as long as it stays away (1,440 a day at the 60-s cap).
        self._said: set[str] = set()
        # Network streams queue frames between our reads; local cameras keep one (BUFFERSIZE=1).
        self._is_stream = isinstance(source, str) and "://" in source

    def _read(self) -> np.ndarray | None:
        """One frame, opening the source if needed; None after releasing a failed source."""
        if self._capture is None:
            capture = self._opener(self.source)
            if not capture.isOpened():
                capture.release()
                self._failed(f"camera {self.name}: cannot open")
                return None
            self._capture = capture
        ok, frame = self._read_live() if self._is_stream else self._capture.read()
        if not ok or frame is None or frame.size == 0:
            self._failed(f"camera {self.name}: read failed, reconnecting")
            self.close()
            return None
        height, width = frame.shape[:2]
        if width > MAX_SIDE or height > MAX_SIDE:  # a broken or hostile source: no bitstream holds it
            self._failed(f"camera {self.name}: a {width}x{height} frame is larger than the {MAX_SIDE} pixels a side "
                         "a bitstream holds; skipped, reconnecting")  # fmt: skip
            self.close()
            return None
        if self._said:
            self._log(f"camera {self.name}: frames again")
            self._said.clear()
        return frame

    def _failed(self, line: str) -> None:
        """Log a failure the first time it happens since the last good frame."""
        if line not in self._said:
            self._said.add(line)
            self._log(f"{line} (retried with backoff; said once until a frame comes)")

    def _read_live(self) -> tuple[bool, np.ndarray | None]:
        """Skip frames a network stream buffered while we waited, then decode the newest.

        A grab that returns at once came from the buffer; one that had to wait for the source
        is at the live edge. Only the last grabbed frame is converted (retrieve).
        """
        assert self._capture is not None
        for _ in range(MAX_BUFFERED_FRAMES):
            started = self._clock()
            if not self._capture.grab():
                return False, None
            if self._clock() - started >= LIVE_GRAB_SECONDS:
                break
        return self._capture.retrieve()

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def frames(
        self, interval: float, stop: threading.Event, count: int | None = None
    ) -> Iterator[np.ndarray]:
        """Up to ``count`` frames (forever when None), one per ``interval`` seconds, until ``stop``."""
        produced = 0
        next_due = self._clock()
        try:
            while not stop.is_set() and (count is None or produced < count):
                frame = self._read()
                if frame is None:
                    stop.wait(self._backoff.next_delay())
                    continue
                self._backoff.reset()
                yield to_rgb(frame)
                produced += 1
                next_due = max(next_due + interval, self._clock())
                stop.wait(max(0.0, next_due - self._clock()))
        finally:
            self.close()
