"""aeic-send commands in-process, with a container-writing codec double and a loopback receiver.

The real encoder runs in tests/test_sender_e2e.py; here the subject is the command layer:
arguments, per-image summaries, error lines and exit codes, spooling and delivery.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aeic.sender import cli
from aeic.sender.spool import Spool
from aeic.shared.bitstream import unpack
from PIL import Image
from sender_support import ContainerCodec, ReceiverDouble, ScanCounter, make_bitstream

# The command layer catches the encoder's BudgetError, so it needs the lead's encoder module.
pytest.importorskip("aeic.sender.encoder")

TOKEN = "device-token"


def _factory(config: object, reporter: object) -> ContainerCodec:
    return ContainerCodec()


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("a.png", (40, 30)), ("b.jpg", (64, 48))):
        path = folder / name
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    corrupt = folder / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return [paths[0], corrupt, paths[1]]


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> int:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    return cli.main(argv, codec_factory=_factory)


def test_encode_writes_bitstreams_and_reports_each_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path / "in")
    code = _run(
        ["encode", *map(str, images), "-o", str(tmp_path / "out"), "--rate", "2"], monkeypatch, tmp_path
    )
    out, err = capsys.readouterr()
    assert code == cli.EXIT_INPUT  # one input failed, the others still went
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.aeic", "b.aeic"]
    header = unpack((tmp_path / "out" / "b.aeic").read_bytes()).header
    assert (header.width, header.height, header.rate_index) == (64, 48, 2)
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/3]") and lines[1].startswith("[3/3]")
    assert "40x30" in lines[0] and "bytes" in lines[0] and "bpp" in lines[0] and " ms" in lines[0]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.jpg" in errors[0]


def test_json_output_and_byte_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path / "in")
    argv = ["encode", str(images[0]), str(images[2]), "-o", str(tmp_path / "out"), "--target-bytes", "70"]
    assert _run([*argv, "--json"], monkeypatch, tmp_path) == cli.EXIT_OK
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    encoded = [e for e in events if e["event"] == "encoded"]
    assert len(encoded) == 2 and all(e["bytes"] <= 70 and e["rate_index"] == 1 for e in encoded)
    assert {"bpp", "encode_ms", "key", "width", "height", "output"} <= set(encoded[0])
    assert events[-1] == {"event": "summary", "encoded": 2, "failed": 0}


def test_budget_too_small_is_reported_per_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path / "in")
    code = _run(
        ["encode", str(images[0]), "-o", str(tmp_path / "out"), "--target-bytes", "10"], monkeypatch, tmp_path
    )
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT and "even the lowest rate" in err and not list((tmp_path / "out").iterdir())


def test_send_delivers_each_image_once_and_empties_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path / "in")
    spool_dir = tmp_path / "spool"
    monkeypatch.setenv("AEIC_TOKEN", TOKEN)
    with ReceiverDouble(TOKEN) as receiver:
        # Plain invocation with images means `send`.
        code = _run(
            [*map(str, images), "--to", receiver.url, "--spool", str(spool_dir)], monkeypatch, tmp_path
        )
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT  # the corrupt file; both good images delivered
    assert len(receiver.stored) == 2 and [r["status"] for r in receiver.requests] == [202, 202]
    assert len(Spool(spool_dir)) == 0 and err.count("uploaded ") == 2


def test_send_reports_an_image_the_receiver_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Uploads made while encoding count: a rejected image makes the exit status 1, not 0."""
    images = _images(tmp_path / "in")
    spool_dir = tmp_path / "spool"
    monkeypatch.setenv("AEIC_TOKEN", TOKEN)
    with ReceiverDouble(TOKEN) as receiver:
        receiver.inject = [413]
        argv = ["send", str(images[0]), str(images[2]), "--to", receiver.url, "--spool", str(spool_dir)]
        code = _run([*argv, "--json"], monkeypatch, tmp_path)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == cli.EXIT_INPUT
    assert events[-1] == {"event": "summary", "failed": 0, "uploaded": 1, "rejected": 1, "queued": 0}
    assert len(receiver.stored) == 1 and len(Spool(spool_dir).rejected()) == 1


def test_send_while_receiver_down_queues_then_flush_delivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path / "in")
    good = [str(images[0]), str(images[2])]
    spool_dir = tmp_path / "spool"
    monkeypatch.setenv("AEIC_TOKEN", TOKEN)
    receiver = ReceiverDouble(TOKEN)  # down
    base = ["--to", receiver.url, "--spool", str(spool_dir), "--retry-for", "0"]
    assert _run(["send", *good, *base], monkeypatch, tmp_path) == cli.EXIT_QUEUED
    assert "remain queued" in capsys.readouterr().err and len(Spool(spool_dir)) == 2
    # Sending the same images again while down does not duplicate them in the spool.
    assert _run(["send", *good, *base], monkeypatch, tmp_path) == cli.EXIT_QUEUED
    assert len(Spool(spool_dir)) == 2
    with receiver:
        assert _run(["flush", *base], monkeypatch, tmp_path) == cli.EXIT_OK
    assert len(receiver.stored) == 2 and len(receiver.requests) == 2 and len(Spool(spool_dir)) == 0


def test_usage_errors_exit_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path / "in")
    monkeypatch.delenv("AEIC_TOKEN", raising=False)
    monkeypatch.delenv("AEIC_RECEIVER_URL", raising=False)
    assert (
        _run(["send", str(images[0]), "--to", "http://127.0.0.1:9"], monkeypatch, tmp_path) == cli.EXIT_USAGE
    )
    assert "AEIC_TOKEN" in capsys.readouterr().err
    assert _run(["flush", "--token", "t"], monkeypatch, tmp_path) == cli.EXIT_USAGE
    assert "no receiver URL" in capsys.readouterr().err
    config = tmp_path / "bad.toml"
    config.write_text("rate = 'high'")
    assert (
        _run(["encode", str(images[0]), "-o", str(tmp_path), "--config", str(config)], monkeypatch, tmp_path)
        == cli.EXIT_USAGE
    )
    assert "rate" in capsys.readouterr().err
    assert _run(["encode", str(images[0]), "-o", str(tmp_path), "--rate", "7"], monkeypatch, tmp_path) == 2
    assert "choose 0..3" in capsys.readouterr().err


def test_a_spool_or_output_that_is_a_file_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--spool`` or ``-o`` naming a file said only "File exists: PATH"."""
    images = _images(tmp_path / "in")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    assert _run(["spool", "--spool", str(a_file)], monkeypatch, tmp_path) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"aeic-send: spool {a_file} is not a folder"
    assert _run(["encode", str(images[0]), "-o", str(a_file)], monkeypatch, tmp_path) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"aeic-send: output {a_file} is not a folder"
    assert a_file.read_text() == "not a folder"


def test_spool_command_lists_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.put(b"queued bytes", source="x.jpg")
    rejected = spool.put(b"bad bytes", source="y.jpg")
    spool.reject(rejected, "HTTP 422: invalid_header: nope", 422)
    assert _run(["spool", "--spool", str(tmp_path / "spool")], monkeypatch, tmp_path) == cli.EXIT_OK
    out, err = capsys.readouterr()
    assert "pending" in out and "x.jpg" in out and "rejected" in out and "invalid_header" in out
    assert "1 pending" in err and "1 rejected" in err


def test_watch_sends_new_files_until_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "outbox"
    folder.mkdir()
    monkeypatch.setenv("AEIC_TOKEN", TOKEN)
    receiver = ReceiverDouble(TOKEN).start()
    scans = ScanCounter(monkeypatch)

    def producer() -> None:
        images = _images(tmp_path / "made")
        for path in (images[0], images[1], images[2]):
            (folder / path.name).write_bytes(path.read_bytes())
        # One scan may have listed the folder before these writes, the next sees the files, the one after
        # finds them stable and its turn handles them (the broken one reported); a fourth ends after that.
        scans.wait_for(scans.count + 4)
        deadline = time.monotonic() + 20
        while len(receiver.stored) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        argv = [
            "watch",
            str(folder),
            "--to",
            receiver.url,
            "--spool",
            str(tmp_path / "spool"),
            "--poll",
            "0.05",
        ]
        code = _run(argv, monkeypatch, tmp_path)
    finally:
        thread.join()
        receiver.stop()
    err = capsys.readouterr().err
    assert code == cli.EXIT_OK and len(receiver.stored) == 2
    assert err.count("error:") == 1 and "broken.jpg" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_watch_delivers_the_queue_while_its_state_cannot_be_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk (or a card gone read-only) failed the opening of the watch state at start ("watch state:
    database or disk is full", exit status 2): systemd restarted the agent every 5 s, and the queued images,
    whose delivery makes room, stayed queued. The agent now delivers the queue meanwhile and opens the state
    once it can."""
    spool_dir, folder = tmp_path / "spool", tmp_path / "outbox"
    folder.mkdir()
    Spool(spool_dir).put(make_bitstream(1), source="queued-during-the-outage.jpg")
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    blocker = spool_dir / "watch" / f"{digest}.db"
    blocker.mkdir(parents=True)  # no database can be opened there, as on a full disk
    monkeypatch.setenv("AEIC_TOKEN", TOKEN)
    receiver = ReceiverDouble(TOKEN).start()

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)

    def operator() -> None:
        until(lambda: len(receiver.stored) == 1 or finished.is_set())  # the queue goes meanwhile
        blocker.rmdir()
        image = _images(tmp_path / "made")[0]
        (folder / image.name).write_bytes(image.read_bytes())
        until(lambda: len(receiver.stored) == 2 or finished.is_set())
        if not finished.is_set():  # a SIGTERM after the command returned would end the test run
            os.kill(os.getpid(), signal.SIGTERM)

    finished = threading.Event()
    thread = threading.Thread(target=operator)
    thread.start()
    try:
        argv = ["watch", str(folder), "--to", receiver.url, "--spool", str(spool_dir), "--poll", "0.05"]
        code = _run(argv, monkeypatch, tmp_path)
    finally:
        finished.set()
        thread.join()
        receiver.stop()
    err = capsys.readouterr().err
    assert code == cli.EXIT_OK and len(receiver.stored) == 2 and len(Spool(spool_dir)) == 0
    assert err.count("cannot open its state") == 1 and "watch state opened" in err


def test_camera_sends_frames_from_an_opencv_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cv2

    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter.fourcc(*"MJPG"), 5, (32, 24))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG/AVI")
    for value in (30, 200):
        writer.write(np.full((24, 32, 3), value, np.uint8))
    writer.release()
    monkeypatch.setenv("AEIC_TOKEN", TOKEN)
    with ReceiverDouble(TOKEN) as receiver:
        argv = ["camera", "--source", str(clip), "--interval", "0.01", "--count", "3", "--to", receiver.url]
        code = _run([*argv, "--spool", str(tmp_path / "spool")], monkeypatch, tmp_path)
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK and out.count("[frame ") == 3
    # The file ends after two frames and is reopened: frame 3 repeats frame 1 byte for byte, yet it is
    # another capture (was: one Idempotency-Key, so the receiver stored it once and showed two frames of three).
    assert len(receiver.stored) == 3 and len(Spool(tmp_path / "spool")) == 0


def test_refused_token_keeps_images_queued_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path / "in")
    spool_dir = tmp_path / "spool"
    monkeypatch.setenv("AEIC_TOKEN", "revoked-token")
    with ReceiverDouble(TOKEN) as receiver:
        code = _run(
            ["send", str(images[0]), str(images[2]), "--to", receiver.url, "--spool", str(spool_dir)],
            monkeypatch,
            tmp_path,
        )
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and "check the device token" in err and "remain queued" in err
    assert len(Spool(spool_dir)) == 2 and Spool(spool_dir).rejected() == []
    assert [r["status"] for r in receiver.requests] == [401]  # asked once, not hammered


def test_ctrl_c_mid_upload_is_one_line_and_exit_130_with_the_image_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path / "in")
    spool_dir = tmp_path / "spool"
    monkeypatch.setenv("AEIC_TOKEN", TOKEN)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Uploader, "upload", interrupted)
    code = _run(["send", str(images[0]), "--to", "http://127.0.0.1:9", "--spool", str(spool_dir)], monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert code == cli.EXIT_INTERRUPTED == 130
    assert "interrupted; images already queued stay in the spool" in err and "Traceback" not in err
    assert len(Spool(spool_dir)) == 1
