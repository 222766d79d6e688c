"""End to end: real photos -> the real SenderCodec (tiny random-weight package) in a process where
torch cannot be imported -> spool -> HTTP upload to a receiver on loopback.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from aeic.sender.spool import Spool
from aeic.shared.bitstream import unpack
from PIL import Image
from sender_support import ReceiverDouble

testing = pytest.importorskip("aeic.codec.testing")
pytest.importorskip("aeic.sender.encoder")

TOKEN = "e2e-device-token"

# Runs aeic-send's main() with every import of torch failing, then checks none slipped in.
SENDER = textwrap.dedent(
    """
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked for the sender (import of {name})")
            return None

    sys.meta_path.insert(0, BlockTorch())
    from aeic.sender.cli import main

    code = main(sys.argv[1:])
    leaked = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
    if leaked:
        print("torch leaked into the sender:", leaked, file=sys.stderr)
        sys.exit(99)
    sys.exit(code)
    """
)


def run_sender(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AEIC_TOKEN": TOKEN, "XDG_STATE_HOME": str(tmp_path / "state")}
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
    chelsea = Image.open(source / "chelsea.png").convert("RGB")  # 451x300
    coffee = Image.open(source / "coffee.png").convert("RGB")  # 600x400
    astronaut = Image.open(source / "astronaut.png").convert("RGB").resize((200, 200))
    chelsea.save(folder / "chelsea.jpg", quality=92)
    exif = coffee.getexif()
    exif[0x0112] = 6  # displayed rotated: upright size is 400x600
    coffee.save(folder / "coffee.jpg", quality=92, exif=exif)
    astronaut.save(folder / "astronaut.webp", lossless=True)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return [folder / "chelsea.jpg", folder / "broken.png", folder / "coffee.jpg", folder / "astronaut.webp"]


EXPECTED_SIZES = {"chelsea.jpg": (451, 300), "coffee.jpg": (400, 600), "astronaut.webp": (200, 200)}


def test_encode_with_the_real_codec_and_torch_blocked(
    package: Path, photos: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_sender(
        ["encode", *map(str, photos), "-o", str(out), "--model", str(package), "--rate", "0"], tmp_path
    )
    assert result.returncode == 1, result.stderr  # the corrupt file; the others still encoded
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        line for line in result.stderr.splitlines() if "broken.png" in line and line.startswith("error:")
    ]
    assert len(result.stdout.splitlines()) == 3 and "bpp" in result.stdout
    for name, (width, height) in EXPECTED_SIZES.items():
        header = unpack((out / f"{Path(name).stem}.aeic").read_bytes()).header
        assert (header.width, header.height, header.rate_index) == (width, height, 0)


def test_send_to_receiver_after_an_outage_exactly_once(
    package: Path, photos: list[Path], tmp_path: Path
) -> None:
    good = [str(p) for p in photos if p.name != "broken.png"]
    spool_dir = tmp_path / "spool"
    receiver = ReceiverDouble(TOKEN)  # down at first
    base = ["--model", str(package), "--to", receiver.url, "--spool", str(spool_dir), "--retry-for", "0"]
    down = run_sender(["send", *good, *base, "--rate", "1"], tmp_path)
    assert down.returncode == 3, down.stderr  # queued, not delivered
    assert len(Spool(spool_dir)) == 3
    with receiver:
        up = run_sender(["flush", *base], tmp_path)
        again = run_sender(["send", *good, *base, "--rate", "1"], tmp_path)  # same photos: same keys
    assert up.returncode == 0, up.stderr
    assert again.returncode == 0, again.stderr
    assert len(receiver.stored) == 3 and len(Spool(spool_dir)) == 0
    statuses = sorted(r["status"] for r in receiver.requests)
    assert statuses == [200, 200, 200, 202, 202, 202]  # the repeat is recognised, not stored twice
    sizes = sorted((unpack(b).header.width, unpack(b).header.height) for b in receiver.stored.values())
    assert sizes == sorted(EXPECTED_SIZES.values())
