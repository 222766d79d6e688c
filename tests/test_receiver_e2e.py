"""End to end with the real codec of a tiny random-weight model package: real bitstreams from
SenderCodec, decoded by the real ReceiverCodec inside the receiver, over real HTTP; a receiver killed
with SIGKILL after accepting uploads loses nothing; `python -m aeic.demo` runs and cleans up."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import receiver_support
from PIL import Image
from receiver_support import free_port

pytest.importorskip("aeic.codec.testing", reason="aeic.codec.testing (tiny model package) not available")

from aeic.receiver.decoder import ReceiverCodec
from aeic.sender.encoder import SenderCodec

from aeic.demo import stop_process

# Fixtures shared with the other receiver tests.
tiny_package = receiver_support.tiny_package
photo = receiver_support.natural_photo


def _serve(package: Path, data: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "aeic.receiver.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data", str(data), "--model", str(package), "--device", "cpu", "--log-level", "warning", *extra]
    env = {**os.environ, "AEIC_ADMIN_TOKEN": "e2e-admin", "AEIC_POLL_INTERVAL_S": "0.1"}
    return subprocess.Popen(command, env=env, start_new_session=True)


def _wait_ready(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"receiver exited with {process.returncode}"
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("receiver did not start")


_stop = stop_process


def _wait_done(base: str, headers: dict[str, str], ids: list[str]) -> list[dict]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        bodies = [httpx.get(f"{base}/v1/images/{i}", headers=headers).json() for i in ids]
        if all(b["status"] in ("done", "failed") for b in bodies):
            return bodies
        time.sleep(0.1)
    raise AssertionError("images were not decoded in time")


def test_real_bitstreams_survive_a_killed_receiver_and_decode_exactly(tiny_package: Path, tmp_path: Path) -> None:
    package = tiny_package
    sender = SenderCodec.from_package(package)
    receiver = ReceiverCodec.from_package(package, device="cpu")
    pictures = [photo(96, 64, 1), photo(96, 64, 2), photo(64, 80, 3)]
    streams = [sender.encode(p, 0) for p in pictures]
    data = tmp_path / "data"
    token = subprocess.run(
        [sys.executable, "-m", "aeic.receiver.cli", "token", "create", "--device", "edge-1", "--data", str(data)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    # 1. Accept uploads without decoding, then die hard: the 202s are promises.
    first = _serve(package, data, port, "--no-worker")
    try:
        _wait_ready(base, first)
        ids = []
        for n, stream in enumerate(streams):
            reply = httpx.post(f"{base}/v1/images", content=stream, timeout=30,
                               headers={**headers, "Content-Type": "application/octet-stream",
                                        "Idempotency-Key": f"shot-{n}"})
            assert reply.status_code == 202, reply.text
            ids.append(reply.json()["id"])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # 2. A new process with the worker decodes everything that was accepted.
    second = _serve(package, data, port, "--batch-size", "4")
    try:
        _wait_ready(base, second)
        replay = httpx.post(f"{base}/v1/images", content=streams[0], timeout=30,
                            headers={**headers, "Content-Type": "application/octet-stream",
                                     "Idempotency-Key": "shot-0"})
        assert replay.json()["id"] == ids[0]
        bodies = _wait_done(base, headers, ids)
        assert [b["status"] for b in bodies] == ["done"] * 3, [b["error"] for b in bodies]
        assert [b["timings"]["batch_size"] for b in bodies] == [2, 2, 1]
        for body, stream, picture in zip(bodies, streams, pictures):
            assert (body["height"], body["width"]) == picture.shape[:2]
            assert body["bytes"] == len(stream)
            png = httpx.get(f"{base}/v1/images/{body['id']}/reconstruction", headers=headers).content
            received = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            expected = receiver.decode(stream)
            assert received.shape == expected.shape == picture.shape
            # Batched and single decoding may differ by float rounding only.
            assert np.abs(received.astype(int) - expected.astype(int)).mean() < 1.0
    finally:
        _stop(second)


def test_demo_runs_non_interactively_and_leaves_no_process(tiny_package: Path, tmp_path: Path) -> None:
    package = tiny_package
    images = tmp_path / "photos"
    images.mkdir()
    for n in range(2):
        Image.fromarray(photo(96, 64, 10 + n)).save(images / f"photo{n}.png")
    out = tmp_path / "out"
    env = {**os.environ, "CI": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "aeic.demo", "--model", str(package), "--images", str(images), "--rate", "0",
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("image"))
    assert all(col in header for col in ("bytes", "bpp", "PSNR dB", "encode ms", "decode ms"))
    rows = [line for line in lines if line.startswith("photo")]
    assert len(rows) == 2 and all(row.rstrip().endswith("done") for row in rows)
    assert any(line.startswith("gallery: http://127.0.0.1:") for line in lines)
    assert lines[-1].startswith("receiver stopped") and "--serve" in lines[-1]  # the printed link is dead now
    with Image.open(out / "side_by_side.png") as sheet:
        assert sheet.height >= 2 * 256
    leftovers = [p for p in Path("/proc").glob("[0-9]*")
                 if b"aeic-demo-" in _cmdline(p) and b"receiver.cli" in _cmdline(p)]
    assert leftovers == []



def test_demo_in_serve_mode_keeps_the_gallery_up_until_ctrl_c(tiny_package: Path, tmp_path: Path) -> None:
    """`--serve` (what a terminal gets by default): the gallery stays reachable after the table, and Ctrl-C
    (SIGINT) stops the demo and its receiver."""
    import queue
    import threading

    images = tmp_path / "photos"
    images.mkdir()
    Image.fromarray(photo(96, 64, 20)).save(images / "photo0.png")
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    # A test run started in the background (`cmd &`) ignores SIGINT, and a child inherits an ignored
    # signal; with a handler installed here the demo starts with the default, as from a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "aeic.demo", "--model", str(tiny_package), "--images", str(images), "--rate", "0",
             "--out", str(tmp_path / "out"), "--serve"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    lines: queue.Queue[str] = queue.Queue()
    stdout = process.stdout
    assert stdout is not None  # stdout=PIPE

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("serving the gallery") for line in seen):
            assert process.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        url = next(line.split(" ", 1)[1].strip() for line in seen if line.startswith("gallery: "))
        time.sleep(1.0)
        assert process.poll() is None  # still serving after the results
        page = httpx.get(url, follow_redirects=True, timeout=30)
        assert page.status_code == 200 and page.text.count('class="card status-done"') == 1
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, "".join(seen)
    finally:
        stop_process(process)  # type: ignore[arg-type]
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=5)
    leftovers = [p for p in Path("/proc").glob("[0-9]*")
                 if b"aeic-demo-" in _cmdline(p) and b"receiver.cli" in _cmdline(p)]
    assert leftovers == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
