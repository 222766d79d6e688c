"""aeic.sender.camera: frames on a schedule, RGB conversion, reconnect after failures."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from aeic.sender.backoff import Backoff
from aeic.sender.camera import Camera, parse_source, to_rgb


def test_parse_source() -> None:
    assert parse_source("0") == 0 and parse_source(" 2 ") == 2
    assert parse_source("/dev/video2") == "/dev/video2"
    assert parse_source("rtsp://cam/stream") == "rtsp://cam/stream"
    with pytest.raises(ValueError):
        parse_source("  ")


def test_to_rgb_handles_bgr_grey_bgra_and_16_bit() -> None:
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV order
    assert to_rgb(bgr)[0, 0].tolist() == [0, 0, 255]
    assert to_rgb(np.full((2, 2), 7, np.uint8)).shape == (2, 2, 3)
    assert to_rgb(np.zeros((2, 2, 4), np.uint8)).shape == (2, 2, 3)
    assert to_rgb(np.full((1, 1, 3), 65535, np.uint16))[0, 0].tolist() == [255, 255, 255]


class FlakyCapture:
    """Opens according to a script; each capture yields ``frames`` frames, then fails."""

    def __init__(self, opened: bool, frames: int, log: list[str]) -> None:
        self.opened, self.left, self.log = opened, frames, log
        self.grabbed: np.ndarray | None = None

    def isOpened(self) -> bool:
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.left == 0:
            self.log.append("read-fail")
            return False, None
        self.left -= 1
        self.log.append("frame")
        return True, np.zeros((4, 6, 3), np.uint8)

    def grab(self) -> bool:  # the live-stream path (a URL source): Capture's protocol; these tests open index 0
        ok, self.grabbed = self.read()
        return ok

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        return self.grabbed is not None, self.grabbed

    def release(self) -> None:
        self.log.append("release")

    def set(self, prop: int, value: float) -> bool:
        return True


def test_camera_reconnects_after_open_and_read_failures() -> None:
    log: list[str] = []
    script = [(False, 0), (True, 2), (True, 3)]  # cannot open, then 2 frames and a drop, then 3 frames

    def opener(source: int | str) -> FlakyCapture:
        opened, frames = script.pop(0)
        log.append(f"open {source}")
        return FlakyCapture(opened, frames, log)

    messages: list[str] = []
    camera = Camera(0, opener=opener, backoff=Backoff(base=0.001, max_delay=0.002), log=messages.append)
    frames = list(camera.frames(interval=0.0, stop=threading.Event(), count=4))
    assert len(frames) == 4 and all(f.shape == (4, 6, 3) for f in frames)
    assert log.count("open 0") == 3 and "read-fail" in log
    assert [line.split(" (")[0] for line in messages] == [
        "camera 0: cannot open", "camera 0: frames again", "camera 0: read failed, reconnecting", "camera 0: frames again"
    ]
    assert log[-1] == "release"  # the capture is released when the generator finishes


def test_stop_event_ends_the_stream() -> None:
    stop = threading.Event()
    camera = Camera(0, opener=lambda s: FlakyCapture(True, 100, []), log=lambda m: None)
    frames = camera.frames(interval=0.0, stop=stop)
    next(frames)
    stop.set()
    assert list(frames) == []


def test_real_opencv_capture_from_a_video_file(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 5, (32, 24))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG/AVI")
    for value in (30, 200):
        writer.write(np.full((24, 32, 3), value, np.uint8))
    writer.release()
    messages: list[str] = []
    camera = Camera(str(path), backoff=Backoff(base=0.001, max_delay=0.002), log=messages.append)
    frames = list(camera.frames(interval=0.0, stop=threading.Event(), count=3))
    assert [f.shape for f in frames] == [(24, 32, 3)] * 3
    assert abs(int(frames[0].mean()) - 30) < 10 and abs(int(frames[1].mean()) - 200) < 10
    assert "read failed, reconnecting" in messages[0]  # end of file: reopened like a dropped stream


class BufferedStream:
    """An RTSP-like capture: frames queue up while nobody reads; grabbing past them waits for
    the next live frame (the fake clock advances one frame period)."""

    def __init__(self, now: list[float], buffered: int) -> None:
        self.now, self.queue, self.next_live, self.current = now, list(range(buffered)), 100, -1

    def isOpened(self) -> bool:
        return True

    def grab(self) -> bool:
        if self.queue:
            self.current = self.queue.pop(0)
        else:
            self.now[0] += 0.04  # waited for the camera
            self.current, self.next_live = self.next_live, self.next_live + 1
        return True

    def retrieve(self) -> tuple[bool, np.ndarray]:
        return True, np.full((2, 2, 3), self.current % 256, np.uint8)

    def read(self) -> tuple[bool, np.ndarray]:
        self.grab()
        return self.retrieve()

    def release(self) -> None:
        pass

    def set(self, prop: int, value: float) -> bool:
        return True


def test_network_stream_skips_buffered_frames() -> None:
    now = [0.0]
    stream = BufferedStream(now, buffered=25)
    camera = Camera("rtsp://cam/stream", opener=lambda s: stream, clock=lambda: now[0], log=lambda m: None)
    frames = list(camera.frames(interval=0.0, stop=threading.Event(), count=2))
    # The 25 stale frames are skipped: the pictures are the first two live ones.
    assert [int(f[0, 0, 0]) for f in frames] == [100, 101]


def test_local_camera_reads_without_skipping() -> None:
    now = [0.0]
    stream = BufferedStream(now, buffered=3)
    camera = Camera(0, opener=lambda s: stream, clock=lambda: now[0], log=lambda m: None)
    frames = list(camera.frames(interval=0.0, stop=threading.Event(), count=2))
    assert [int(f[0, 0, 0]) for f in frames] == [0, 1]


def test_a_camera_away_for_many_tries_is_one_line_and_its_return_another() -> None:
    """An unplugged camera was one line per reconnection try, 1,440 a day at the 60-s backoff cap."""
    tries = iter([(False, 0)] * 30 + [(True, 0)] * 5 + [(True, 2)])

    def opener(source: int | str) -> FlakyCapture:
        opened, frames = next(tries)
        return FlakyCapture(opened, frames, [])

    messages: list[str] = []
    camera = Camera(0, opener=opener, backoff=Backoff(base=0.0001, max_delay=0.0002), log=messages.append)
    assert len(list(camera.frames(interval=0.0, stop=threading.Event(), count=2))) == 2
    assert [line.split(" (")[0] for line in messages] == [
        "camera 0: cannot open", "camera 0: read failed, reconnecting", "camera 0: frames again"
    ]


def test_a_stream_password_is_not_logged() -> None:
    """The README's example source is rtsp://user:pass@cam/stream: every reconnection line put the password in
    the journal."""
    messages: list[str] = []
    stop = threading.Event()

    def log(line: str) -> None:  # the stop comes with the lines, not after a time a loaded machine may outlast
        messages.append(line)
        stop.set()  # said once until a frame comes: the first line is all there is to see

    camera = Camera("rtsp://viewer:s3cret@cam.local:554/stream", opener=lambda source: FlakyCapture(False, 0, []),
                    backoff=Backoff(base=0.0001, max_delay=0.0002), log=log)  # fmt: skip
    frames = camera.frames(interval=0.0, stop=stop)
    assert list(frames) == []
    assert messages and all("s3cret" not in line for line in messages)
    assert messages[0].startswith("camera rtsp://viewer:***@cam.local:554/stream: cannot open")
