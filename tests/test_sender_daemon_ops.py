"""The sender as a long-running agent, as an operator meets it: settings mistakes, a folder that goes
away, a folder of thousands of photos. The command layer runs in-process with a codec double."""

from __future__ import annotations

import io
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aeic.sender import cli
from aeic.sender.cli import _FullSpoolGate
from aeic.sender.config import SenderConfig
from aeic.sender.forward import Forwarder
from aeic.sender.report import Reporter
from aeic.sender.spool import Spool
from aeic.sender.uploader import Uploader
from aeic.sender.watch import SCAN_SHARE, Candidate, FolderWatcher, Handled, run_watch
from PIL import Image
from sender_support import ContainerCodec, ReceiverDouble, ScanCounter, make_bitstream

pytest.importorskip("aeic.sender.encoder")  # the command layer catches the encoder's BudgetError


@pytest.mark.parametrize("command", ["watch", "camera"])
@pytest.mark.parametrize(("setting", "told"), [("AEIC_TOKEN", "no device token"), ("AEIC_RECEIVER_URL", "no receiver URL")])
def test_a_daemon_missing_a_receiver_setting_stops_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    command: str, setting: str, told: str,
) -> None:
    """systemd restarts a failed agent every 5 s: each start loaded the model (seconds of a Pi's CPU)
    before saying that the token or URL was missing."""
    loaded: list[str] = []

    def factory(config: SenderConfig, reporter: Reporter) -> ContainerCodec:
        loaded.append("model")
        return ContainerCodec()

    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for name, value in (("AEIC_TOKEN", "device-token"), ("AEIC_RECEIVER_URL", "http://127.0.0.1:9")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(setting)
    (tmp_path / "outbox").mkdir()
    argv = ["watch", str(tmp_path / "outbox")] if command == "watch" else ["camera", "--source", "0"]
    assert cli.main(argv, codec_factory=factory) == cli.EXIT_USAGE
    assert loaded == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and told in err[0]


class _CountingWatcher(FolderWatcher):
    """A real watcher that runs ``on_scan`` before each scan (to change the folder, advance a clock)."""

    def __init__(self, directory: Path, state: Path, on_scan: Callable[[int], None]) -> None:
        super().__init__(directory, state)
        self.scans = 0
        self._on_scan = on_scan

    def scan(self) -> list[Candidate]:
        self.scans += 1
        self._on_scan(self.scans)
        return super().scan()


def test_a_folder_gone_for_many_scans_is_one_line_and_its_return_another(tmp_path: Path) -> None:
    """An unmounted card or a deleted outbox was one line every poll (1,800 an hour at the default 2 s)."""
    folder = tmp_path / "outbox"
    folder.mkdir()
    stop = threading.Event()
    lines: list[str] = []
    handled: list[str] = []

    def change(scan: int) -> None:
        if scan == 2:
            shutil.rmtree(folder)
        elif scan == 30:
            folder.mkdir()
            (folder / "back.jpg").write_bytes(b"jpeg")
        elif scan == 40:
            stop.set()

    def handle(candidate: Candidate) -> tuple[Handled, str]:
        handled.append(candidate.name)
        return Handled.SENT, ""

    with _CountingWatcher(folder, tmp_path / "state.db", change) as watcher:
        run_watch(watcher, handle, stop, 0.001, on_error=lines.append)
    assert len(lines) == 2, lines
    assert "is gone" in lines[0] and lines[1] == f"watch: {folder} is scanned again"
    assert handled == ["back.jpg"]


def test_a_slow_scan_is_repeated_less_often(tmp_path: Path) -> None:
    """A scan of a folder of many thousand files takes a good part of a second on a Pi; repeated every 2 s
    it kept a core busy while nothing arrived. Scans now take at most SCAN_SHARE of the time."""
    now = [0.0]
    waits: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(0.0 if timeout is None else timeout)
            if len(waits) == 3:
                self.set()
            return self.is_set()

    def slow(scan: int) -> None:
        now[0] += 0.1 if scan == 1 else 1.5  # the first scan is quick, the later ones slow

    (tmp_path / "outbox").mkdir()
    with _CountingWatcher(tmp_path / "outbox", tmp_path / "state.db", slow) as watcher:
        run_watch(watcher, lambda candidate: (Handled.SENT, ""), Stop(), 2.0, clock=lambda: now[0])
    assert waits[0] == 2.0  # quick scans keep the poll interval
    assert waits[1] == pytest.approx(1.5 * (1 / SCAN_SHARE - 1))
    assert 1.5 / (1.5 + waits[1]) == pytest.approx(SCAN_SHARE)


def test_a_folder_that_cannot_be_listed_is_not_taken_for_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Path.glob took a folder it was denied for an empty one: every remembered file was forgotten, and the
    whole folder sent again once it could be listed."""
    folder = tmp_path / "outbox"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"jpeg")
    with FolderWatcher(folder, tmp_path / "state.db") as watcher:
        watcher.scan()
        (ready,) = watcher.scan()
        watcher.record(ready, Handled.SENT)
        real_scandir = os.scandir

        def denied(path: str) -> Any:
            if Path(path) == folder:
                raise PermissionError(13, "Permission denied", path)
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", denied)
        with pytest.raises(PermissionError):
            watcher.scan()
        monkeypatch.setattr(os, "scandir", real_scandir)
        assert watcher.scan() == [] and watcher.scan() == []  # still remembered: not sent again


def test_a_full_spool_is_one_line_and_no_photo_is_encoded_again_until_it_drains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """During an outage that filled the spool, the watcher encoded the same photo again on every scan (seconds
    of a Pi's CPU each) and logged an error line each time, for as long as the outage lasted."""
    folder = tmp_path / "outbox"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.full((24, 32, 3), 40 * index, np.uint8)).save(folder / f"{index}.png")
    codec = ContainerCodec()
    monkeypatch.setenv("AEIC_TOKEN", "device-token")
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    ScanCounter(monkeypatch, stop_after=40)  # the 2nd scan queues one photo and is refused the next; 38 more
    code = cli.main(
        ["watch", str(folder), "--to", "http://127.0.0.1:9", "--spool", str(tmp_path / "spool"),
         "--spool-max-items", "1", "--poll", "0.02"],
        codec_factory=lambda config, reporter: codec,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == cli.EXIT_OK
    assert codec.calls == 2  # the first photo queued, the second refused; then nothing until room
    assert err.count("not queued") == 1 and err.count("takes no new image: none is encoded") == 1


def test_the_full_spool_gate_opens_when_the_forwarder_removes_an_item_or_a_while_passes(tmp_path: Path) -> None:
    now = [0.0]
    err = io.StringIO()
    reporter = Reporter(out=io.StringIO(), err=err)
    gate = _FullSpoolGate(Spool(tmp_path / "spool"), reporter, recheck=60.0, clock=lambda: now[0])
    assert gate.open()
    assert gate.refused() and not gate.open()
    assert not gate.refused()  # a second refusal in the same run is not reported again
    now[0] = 59.0
    assert not gate.open()
    reporter.uploaded += 1  # the forwarder delivered an item: there is room
    assert gate.open()
    gate.queued()
    assert gate.open() and "takes images again" in err.getvalue()
    gate.refused()
    now[0] = 200.0  # another process may have drained it: try one image
    assert gate.open()


def test_a_stop_asked_for_mid_encode_clears_the_files_start_mark(tmp_path: Path) -> None:
    """systemd stops the agent with SIGTERM and kills it TimeoutStopSec later. An encode that outlasted that
    (a large photo on a Pi) left the file's start mark, so the kill counted as the file killing the agent,
    and after two restarts during its encode the photo was failed for good, never sent."""
    folder = tmp_path / "outbox"
    folder.mkdir()
    (folder / "big.jpg").write_bytes(b"jpeg")
    state = tmp_path / "state.db"
    stop = threading.Event()
    encoding, finish = threading.Event(), threading.Event()
    marks_during_stop: list[list[tuple[str, int]]] = []

    def handle(candidate: Candidate) -> tuple[Handled, str]:
        encoding.set()
        finish.wait(10)  # a long encode
        return Handled.SENT, ""

    def operator() -> None:
        encoding.wait(10)
        os.kill(os.getpid(), signal.SIGTERM)  # systemctl stop
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with closing(sqlite3.connect(state)) as db:
                marks = db.execute("SELECT name, starts FROM started").fetchall()
            if not marks:
                break
            time.sleep(0.05)
        marks_during_stop.append(marks)  # what a SIGKILL now would leave for the next start
        finish.set()

    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    helper = threading.Thread(target=operator)
    helper.start()
    try:
        with FolderWatcher(folder, state) as watcher:
            run_watch(watcher, handle, stop, 0.01)
    finally:
        helper.join()
        signal.signal(signal.SIGTERM, previous)
    assert marks_during_stop == [[]]
    with FolderWatcher(folder, state) as watcher:  # the encode ended after all: the file is sent, not marked
        watcher.scan()
        assert watcher.scan() == []


def test_an_item_set_aside_before_the_clock_jumped_back_is_not_starved(tmp_path: Path) -> None:
    """A Pi without a real-time clock boots with a saved time and NTP may set it back: an item set aside
    until 'ten minutes from now' in the old time must not wait for the clock to catch up (a day here)."""
    spool = Spool(tmp_path / "spool")
    item = spool.put(make_bitstream(1), source="a.jpg")
    before = 1_800_000_000.0
    spool.set_aside(item, "HTTP 500", now=before, until=before + 600, own=True)
    wall = [before - 86_400]  # the clock went back a day
    with ReceiverDouble("device-token") as receiver, Uploader(receiver.url, "device-token") as uploader:
        forwarder = Forwarder(spool, uploader, wall_clock=lambda: wall[0])
        report = forwarder.drain_pass()
    assert report.accepted == 1 and list(receiver.stored) == [item.key]


def test_the_proxy_start_line_masks_the_receiver_urls_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The line naming the environment's proxy showed the receiver URL whole, its password too (every
    other line masks it: the journal keeps them all)."""
    for name in ("NO_PROXY", "no_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    config = SenderConfig(receiver_url="https://dev:s3cret@receiver.invalid", token="t0ken", spool_dir=tmp_path / "spool")
    err = io.StringIO()
    forwarder = cli._forwarder(config, Spool(config.spool_dir), Reporter(out=io.StringIO(), err=err))
    forwarder.uploader.close()
    assert "through the proxy http://proxy.invalid:3128" in err.getvalue()
    assert "s3cret" not in err.getvalue() and "dev:***@receiver.invalid" in err.getvalue()
