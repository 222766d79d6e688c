"""End to end: real photos -> the real SenderCodec (tiny random-weight package) in a process where
torch cannot be imported -> spool -> HTTP upload to the real receiver on loopback -> decoded there
by the real ReceiverCodec.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from aeic.sender.spool import Spool
from aeic.shared.bitstream import unpack
from import_blocking import blocking_prelude
from PIL import Image
from sender_support import RealReceiver

testing = pytest.importorskip("aeic.codec.testing")
pytest.importorskip("aeic.sender.encoder")

# Runs aeic-send's main() with every import of torch failing, then checks none slipped in.
SENDER = blocking_prelude("torch") + textwrap.dedent(
    """
    from aeic.sender.cli import main

    code = main(sys.argv[1:])
    leaked = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
    if leaked:
        print("torch leaked into the sender:", leaked, file=sys.stderr)
        sys.exit(99)
    sys.exit(code)
    """
)


def run_sender(
    args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), **(extra_env or {})}
    env.pop("AEIC_SENDER_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-c", SENDER, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def _photo_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-image's bundled photos are not installed")
    return Path(spec.origin).parent / "data"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(testing.make_tiny_package(tmp_path_factory.mktemp("tiny-package")))


@pytest.fixture()
def photos(tmp_path: Path) -> list[Path]:
    """Real photos in several formats and sizes, one EXIF-rotated, plus a corrupt file."""
    source = _photo_dir()
    folder = tmp_path / "photos"
    folder.mkdir()
    chelsea = Image.open(source / "chelsea.png").convert("RGB").crop((0, 0, 301, 197))  # odd sizes
    coffee = Image.open(source / "coffee.png").convert("RGB").resize((300, 200))
    astronaut = Image.open(source / "astronaut.png").convert("RGB").resize((200, 200))
    chelsea.save(folder / "chelsea.jpg", quality=92)
    exif = coffee.getexif()
    exif[0x0112] = 6  # displayed rotated: upright size is 200x300
    coffee.save(folder / "coffee.jpg", quality=92, exif=exif)
    astronaut.save(folder / "astronaut.webp", lossless=True)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return [folder / "chelsea.jpg", folder / "broken.png", folder / "coffee.jpg", folder / "astronaut.webp"]


EXPECTED_SIZES = {"chelsea.jpg": (301, 197), "coffee.jpg": (200, 300), "astronaut.webp": (200, 200)}


def test_encode_with_the_real_codec_and_torch_blocked(
    package: Path, photos: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_sender(
        ["encode", *map(str, photos), "-o", str(out), "--model", str(package), "--rate", "0"], tmp_path
    )
    assert result.returncode == 1, result.stderr  # the corrupt file; the others still encoded
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0]
    assert len(result.stdout.splitlines()) == 3 and "bpp" in result.stdout
    for name, (width, height) in EXPECTED_SIZES.items():
        header = unpack((out / f"{Path(name).stem}.aeic").read_bytes()).header
        assert (header.width, header.height, header.rate_index) == (width, height, 0)


def test_byte_budget_and_provider_fallback(package: Path, photos: list[Path], tmp_path: Path) -> None:
    good = [str(p) for p in photos if p.name != "broken.png"]
    common = ["--model", str(package), "--provider", "NoSuchExecutionProvider", "--json"]
    fits = run_sender(
        ["encode", *good, "-o", str(tmp_path / "a"), "--target-bytes", "1500", *common], tmp_path
    )
    assert fits.returncode == 0, fits.stderr
    assert "NoSuchExecutionProvider is not available here; using CPUExecutionProvider" in fits.stderr
    events = [json.loads(line) for line in fits.stdout.splitlines()]
    encoded = [e for e in events if e["event"] == "encoded"]
    levels = pytest.importorskip("aeic.sender.encoder").SenderCodec.from_package(package).num_levels
    # The tiny model's streams are far below the budget, so the best (highest) rate is chosen.
    assert [(e["bytes"] <= 1500, e["rate_index"]) for e in encoded] == [(True, levels - 1)] * 3
    too_small = run_sender(
        ["encode", *good, "-o", str(tmp_path / "b"), "--target-bytes", "20", *common], tmp_path
    )
    assert too_small.returncode == 1
    assert too_small.stderr.count("even the lowest rate needs") == 3


def test_send_to_the_real_receiver_after_an_outage_exactly_once(
    package: Path, photos: list[Path], tmp_path: Path
) -> None:
    ReceiverCodec = pytest.importorskip("aeic.receiver.decoder").ReceiverCodec
    pytest.importorskip("aeic.receiver.api")

    good = [str(p) for p in photos if p.name != "broken.png"]
    spool_dir = tmp_path / "spool"
    receiver = RealReceiver(tmp_path / "receiver", [ReceiverCodec.from_package(package, device="cpu")])
    base = ["--to", receiver.url, "--spool", str(spool_dir), "--retry-for", "0"]
    env = {"AEIC_TOKEN": receiver.token}
    encode = ["--model", str(package), "--rate", "1"]
    down = run_sender(["send", *good, *base, *encode], tmp_path, env)  # the receiver is down
    assert down.returncode == 3, down.stderr  # queued, not delivered
    assert len(Spool(spool_dir)) == 3
    with receiver:
        up = run_sender(["flush", *base], tmp_path, env)
        again = run_sender(["send", *good, *base, *encode], tmp_path, env)  # same photos: same keys
        images = _wait_until_decoded(receiver, 3)
        reconstruction = httpx.get(
            f"{receiver.url}/v1/images/{images[0]['id']}/reconstruction",
            headers={"Authorization": f"Bearer {receiver.token}"},
            timeout=30,
        )
    assert up.returncode == 0, up.stderr
    assert again.returncode == 0, again.stderr
    assert len(Spool(spool_dir)) == 0
    assert len(images) == 3  # the repeat was recognised by its Idempotency-Key, not stored twice
    assert all(image["status"] == "done" for image in images), images
    assert sorted((i["width"], i["height"]) for i in images) == sorted(EXPECTED_SIZES.values())
    decoded = Image.open(io.BytesIO(reconstruction.content))
    assert reconstruction.status_code == 200 and decoded.size == (images[0]["width"], images[0]["height"])


def _wait_until_decoded(receiver: RealReceiver, count: int, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        images = receiver.images()
        if len(images) >= count and all(i["status"] in ("done", "failed") for i in images):
            return images
        assert time.monotonic() < deadline, images
        time.sleep(0.2)


def _start_sender(args: list[str], tmp_path: Path, extra_env: dict[str, str]) -> subprocess.Popen[str]:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), **extra_env}
    env.pop("AEIC_SENDER_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-c", SENDER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _stop(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def test_watch_folder_sends_completed_files_once_across_restarts(
    package: Path, photos: list[Path], tmp_path: Path
) -> None:
    ReceiverCodec = pytest.importorskip("aeic.receiver.decoder").ReceiverCodec
    pytest.importorskip("aeic.receiver.api")
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    receiver = RealReceiver(tmp_path / "receiver", [ReceiverCodec.from_package(package, device="cpu")])
    args = ["watch", str(outbox), "--to", receiver.url, "--spool", str(tmp_path / "spool"), "--poll", "0.2"]
    args += ["--model", str(package), "--rate", "0"]
    env = {"AEIC_TOKEN": receiver.token}
    with receiver:
        first = _start_sender(args, tmp_path, env)
        try:
            data = photos[0].read_bytes()
            with (outbox / photos[0].name).open("wb") as slow_copy:  # a copy in progress
                slow_copy.write(data[: len(data) // 2])
                slow_copy.flush()
                time.sleep(0.05)
                slow_copy.write(data[len(data) // 2 :])
            for photo in photos[1:]:
                (outbox / photo.name).write_bytes(photo.read_bytes())
            deadline = time.monotonic() + 180
            while len(receiver.images()) < 3 and time.monotonic() < deadline and first.poll() is None:
                time.sleep(0.2)
            time.sleep(1.0)  # a few more scans: nothing is sent twice, the broken file is reported once
        finally:
            code, out, err = _stop(first)
        assert code == 0 and len(receiver.images()) == 3, (out, err)
        assert out.count("[watch]") == 3 and err.count("error:") == 1 and "broken.png" in err
        # A restart remembers what was sent: a new photo goes, the old ones do not.
        second = _start_sender(args, tmp_path, env)
        try:
            Image.open(_photo_dir() / "rocket.jpg").convert("RGB").resize((160, 240)).save(outbox / "new.png")
            deadline = time.monotonic() + 120
            while len(receiver.images()) < 4 and time.monotonic() < deadline and second.poll() is None:
                time.sleep(0.2)
            time.sleep(1.0)
        finally:
            code, out, err = _stop(second)
        images = receiver.images()
    assert code == 0 and len(images) == 4, (out, err)
    sent = [line for line in out.splitlines() if line.startswith("[watch]")]
    assert len(sent) == 1 and "new.png" in sent[0]
