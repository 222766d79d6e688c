"""The sender against a hostile file system: odd names, links, FIFOs, a spool damaged while it runs.

Each test guards a defect found by trying these edges on the real CLI: a symlink loop that stopped
every scan, a FIFO that hung the reader, a non-UTF-8 name that ended the agent under a strict UTF-8
locale, output names too long or equal but for case, an unreadable sidecar that stopped the drain, a
spool folder deleted while running.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from aeic.sender import cli
from aeic.sender.forward import Forwarder
from aeic.sender.images import ImageReadError, read_image
from aeic.sender.report import Reporter
from aeic.sender.spool import Spool
from aeic.sender.uploader import Uploader
from aeic.sender.watch import Candidate, FolderWatcher, Handled, run_watch
from PIL import Image
from sender_support import ContainerCodec, ReceiverDouble, make_bitstream

pytest.importorskip("aeic.sender.encoder")  # the command layer catches the encoder's BudgetError

TOKEN = "device-token"
NON_UTF8 = os.fsdecode(b"bad-\xff\xfe.png")


def _png(path: Path, seed: int = 0) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="PNG")
    return path


def _hostile_folder(folder: Path) -> None:
    """Good images beside a symlink loop, a dangling link, a FIFO, a folder named x.jpg, an empty file."""
    folder.mkdir()
    _png(folder / "good.png", 1)
    (folder / "link.png").symlink_to(_png(folder.parent / "elsewhere.png", 2))
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "dangling.png").symlink_to(folder.parent / "missing.png")
    os.mkfifo(folder / "fifo.png")
    (folder / "x.jpg").mkdir()
    (folder / "zero.png").write_bytes(b"")


def test_links_fifos_and_folders_do_not_stop_the_scan(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _hostile_folder(folder)
    watcher = FolderWatcher(folder, tmp_path / "state.json")
    watcher.scan()
    assert [c.name for c in watcher.scan()] == ["good.png", "link.png"]
    assert sorted(watcher.unlisted) == ["dangling.png", "loop.png"]


def test_run_watch_reports_an_unlistable_entry_once(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _hostile_folder(folder)
    stop = threading.Event()
    lines: list[str] = []
    handled: list[str] = []

    def handle(candidate: Candidate) -> tuple[Handled, str]:
        handled.append(candidate.name)
        return Handled.SENT, ""

    watcher = FolderWatcher(folder, tmp_path / "state.json")
    scan, scans = watcher.scan, []

    def counted_scan() -> list[Candidate]:  # five scans, however loaded the machine (a 0.3 s timer was not)
        scans.append(1)
        if len(scans) == 5:
            stop.set()
        return scan()

    watcher.scan = counted_scan  # type: ignore[method-assign]
    run_watch(watcher, handle, stop, 0.01, on_error=lines.append)
    assert handled == ["good.png", "link.png"]
    assert len(lines) == 2 and "loop.png: skipped: Too many levels" in lines[1]  # sorted: dangling first


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO swapped in after the watcher saw a file (or named by hand) must not hang the reader."""
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    errors: list[str] = []

    def read() -> None:
        try:
            read_image(fifo)
        except ImageReadError as exc:
            errors.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "read_image blocked on a FIFO"
    assert errors and "FIFO" in errors[0]


def test_undecodable_names_are_printed_escaped_under_a_strict_locale() -> None:
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    reporter = Reporter(out=out, err=out)
    reporter.error(NON_UTF8, f"{NON_UTF8}: cannot encode")
    reporter.info(f"uploaded {NON_UTF8}")
    out.flush()
    assert out.buffer.getvalue().count(b"bad-\\udcff\\udcfe.png") == 2


def _encode(argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> int:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    return cli.main(argv, codec_factory=lambda config, reporter: ContainerCodec())


def test_encode_names_long_case_colliding_and_not_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdout", strict)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    images = [
        _png(tmp_path / "one" / "A.png", 1),
        _png(tmp_path / "two" / "a.png", 2),
        _png(tmp_path / "one" / ("é" * 125 + ".png"), 3),  # 254 bytes
        _png(tmp_path / "one" / NON_UTF8, 4),
    ]
    out = tmp_path / "out"
    assert _encode(["encode", *map(str, images), "-o", str(out)], monkeypatch, tmp_path) == cli.EXIT_OK
    names = [entry.name for entry in out.iterdir()]
    assert len(names) == 4 and len({name.casefold() for name in names}) == 4
    assert all(len(os.fsencode(name)) <= 255 for name in names)


def test_an_unreadable_sidecar_does_not_stop_the_drain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sidecar root wrote with umask 077 (or on a bad sector) must not hold back every other item."""
    spool = Spool(tmp_path / "spool")
    bad = spool.put(make_bitstream(1), source="bad")
    spool.put(make_bitstream(2), source="good")
    read_text = Path.read_text

    def denied(self: Path, encoding: str | None = None, errors: str | None = None) -> str:
        if self == bad.path.with_suffix(".json"):
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, encoding, errors)

    monkeypatch.setattr(Path, "read_text", denied)
    assert sorted(item.source or "?" for item in spool.items()) == ["?", "good"]
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url, TOKEN) as uploader:
        report = Forwarder(spool, uploader).drain_pass()
    assert report.accepted == 2 and len(receiver.stored) == 2 and len(spool) == 0


def test_a_spool_deleted_while_running_takes_new_items(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    shutil.rmtree(spool.root)
    item = spool.put(make_bitstream(1), source="after")
    assert [i.source for i in spool.items()] == ["after"]
    spool.reject(item, "HTTP 422: bad")
    assert [i.extra["reason"] for i in spool.rejected()] == ["HTTP 422: bad"]


def test_a_disk_full_between_bitstream_and_sidecar_keeps_the_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bitstream is stored: reporting it as not queued would be wrong (and a camera frame dropped)."""
    spool = Spool(tmp_path / "spool")

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "_write_sidecar", disk_full)
    item = spool.put(make_bitstream(1), source="frame")
    monkeypatch.undo()
    assert [i.key for i in spool.items()] == [item.key] and spool.read(item) == make_bitstream(1)


def test_a_full_spool_costs_one_encode_per_scan_not_one_per_waiting_file(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (folder / name).write_bytes(b"image")
    stop, handled = threading.Event(), []

    def spool_full(candidate: Candidate) -> tuple[Handled, str]:
        handled.append(candidate.name)
        if len(handled) == 3:
            stop.set()
        return Handled.LATER, ""

    run_watch(FolderWatcher(folder, tmp_path / "state.json"), spool_full, stop, 0.01, on_error=print)
    assert handled == ["a.png"] * 3


def test_a_truncated_spool_entry_is_quarantined_and_not_blamed_on_the_receiver(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    broken = spool.put(make_bitstream(1), source="broken")
    spool.put(make_bitstream(2), source="fine")
    broken.path.write_bytes(broken.path.read_bytes()[:10])
    err = io.StringIO()
    reporter = Reporter(err=err)
    with ReceiverDouble(TOKEN) as receiver, Uploader(receiver.url, TOKEN) as uploader:
        report = Forwarder(spool, uploader, listener=reporter.upload).drain_pass()
    assert (report.accepted, report.rejected, len(receiver.requests)) == (1, 1, 1)
    assert [item.source for item in spool.rejected()] == ["broken"]
    assert "rejected as damaged in the spool: broken" in err.getvalue()


def test_a_read_only_spool_with_crash_leftovers_is_still_listed_and_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An SD card remounted read-only after errors, holding a crash's leftovers (a temporary file, a
    lost sidecar, an orphan sidecar): `spool` and `flush` must still work, not exit on the first repair."""
    root = tmp_path / "spool"
    spool = Spool(root)
    first, second = spool.put(make_bitstream(1), source="a"), spool.put(make_bitstream(2), source="b")
    second.path.with_suffix(".json").unlink()
    (root / "pending" / ("0" * 64 + ".json")).write_text("{}")
    (root / "pending" / f".tmp-{first.key}.aeic.999999999.abcd").write_bytes(b"half")
    open_ = os.open

    def read_only_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(30, "Read-only file system", str(path))
        return open_(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    def read_only_unlink(path: Path, *args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(Path, "unlink", read_only_unlink)  # Python 3.10's pathlib holds its own os.unlink
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert cli.main(["spool", "--spool", str(root)]) == cli.EXIT_OK
    assert "2 pending" in capsys.readouterr().err
    with ReceiverDouble(TOKEN) as receiver:
        argv = ["flush", "--to", receiver.url, "--token", TOKEN, "--spool", str(root), "--retry-for", "0"]
        code = cli.main(argv)
    err = capsys.readouterr().err
    assert sorted(receiver.stored) == sorted([first.key, second.key]) and len(receiver.requests) == 2
    assert code == cli.EXIT_OK and err.count("cannot be removed from the spool") == 2
