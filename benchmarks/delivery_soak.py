"""Delivery soak: a real ``aeic-receiver serve`` and a real ``aeic-send watch``, killed with SIGKILL at
random moments while photos arrive, then counted: images in the receiver's catalogue against photos
dropped in, duplicates, items left in the spool, and the files the watcher recorded as failed.

Why a script and not a test: it runs for minutes, on the machine's timing, and each run is another
random schedule of kills. The deterministic faults (a lost answer, an answer after the timeout, a body cut
short, a full disk, a restarted receiver) are ``tests/test_delivery_faults.py``.

Each round: ``--photos`` small PNGs (128x96, written whole by rename) arrive in bursts of 1-4 over
``--seconds``; after each burst the receiver (``--kill r``) is killed with probability 0.3 and started again
on the same data folder after 0-0.5 s, the sender (``--kill s``) with probability 0.2 and started again
after 0-0.3 s. Then nothing is killed until the spool is empty and the catalogue holds every photo, or two
minutes pass. The receiver runs with ``--no-worker`` (no decodes: only storage is under test) and the sender
with a 0.2-1 s backoff, a 5 s timeout and a 0.1 s scan, so a kill's effects show within the round.

Usage: python -m benchmarks.delivery_soak [--rounds 3] [--photos 40] [--seconds 40] [--kill rs] [--seed 1]
       [--dir DIR] [--out benchmarks/results/delivery_soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from aeic.local_servers import free_port

from .machine import RESULTS_DIR, machine_info

BIN = Path(sys.executable).parent
ADMIN_TOKEN = "soak-admin-token-0123456789abcdef"


def write_photos(folder: Path, first: int, count: int) -> None:
    """Photos ``first`` .. ``first + count - 1``: seeded noisy gradients, each written whole (by rename)."""
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    for i in range(first, first + count):
        rng = np.random.default_rng(i)
        picture = np.stack([x / 128, y / 96, 0.5 + 0.5 * np.sin((x + y + i) / 9)], -1) * 200
        picture += rng.uniform(0, 40, 3) + rng.normal(0, 20, picture.shape)
        partial = folder / f".p{i:05d}.png"
        Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(partial, format="PNG")
        os.replace(partial, folder / f"p{i:05d}.png")


def catalogue(data: Path) -> tuple[int, int]:
    """Rows of the receiver's image table and their distinct bitstream digests."""
    db = sqlite3.connect(f"file:{data / 'receiver.db'}?mode=ro", uri=True)
    try:
        rows, distinct = db.execute("SELECT count(*), count(DISTINCT sha256) FROM images").fetchone()
    finally:
        db.close()
    return int(rows), int(distinct)


def watch_failures(spool: Path) -> list[str]:
    """``name: detail`` of each file the watcher recorded as failed (never sent unless it changes)."""
    failed: list[str] = []
    for state in (spool / "watch").glob("*.db"):
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
        try:
            failed += [f"{name}: {detail}" for name, detail in
                       db.execute("SELECT name, detail FROM handled WHERE status = 'failed'")]  # fmt: skip
        finally:
            db.close()
    return failed


class Round:
    """One receiver and one sender on a fresh folder, started again after each kill."""

    def __init__(self, root: Path) -> None:
        self.root, self.photos, self.data, self.spool = root, root / "in", root / "receiver", root / "spool"
        self.photos.mkdir(parents=True)
        created = subprocess.run([str(BIN / "aeic-receiver"), "token", "create", "--device", "soak", "--data",
                                  str(self.data)], capture_output=True, text=True, check=True)  # fmt: skip
        self.token = created.stdout.split()[0]
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log: IO[bytes] = (root / "processes.log").open("ab")
        self.receiver = self._receiver()
        self.sender = self._sender()

    def _receiver(self) -> subprocess.Popen[bytes]:
        port = self.url.rsplit(":", 1)[1]
        return subprocess.Popen([str(BIN / "aeic-receiver"), "serve", "--data", str(self.data), "--port", port,
                                 "--no-worker", "--log-level", "warning"],
                                env={**os.environ, "AEIC_ADMIN_TOKEN": ADMIN_TOKEN}, stdout=self.log, stderr=self.log)

    def _sender(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "AEIC_TOKEN": self.token, "AEIC_BACKOFF_BASE": "0.2", "AEIC_BACKOFF_MAX": "1",
               "AEIC_TIMEOUT": "5"}
        return subprocess.Popen([str(BIN / "aeic-send"), "watch", str(self.photos), "--to", self.url, "--spool",
                                 str(self.spool), "--poll", "0.1"], env=env, stdout=self.log, stderr=self.log)

    def kill_receiver(self, rng: random.Random) -> None:
        self.receiver.kill()
        self.receiver.wait()
        time.sleep(rng.uniform(0.0, 0.5))
        self.receiver = self._receiver()

    def kill_sender(self, rng: random.Random) -> None:
        self.sender.kill()
        self.sender.wait()
        time.sleep(rng.uniform(0.0, 0.3))
        self.sender = self._sender()

    def pending(self) -> int:
        return sum(1 for _ in (self.spool / "pending").glob("*.aeic"))

    def stored(self) -> int:
        try:
            return catalogue(self.data)[0]
        except sqlite3.Error:  # not created yet
            return 0

    def stop(self) -> None:
        for process in (self.sender, self.receiver):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()


def soak_round(root: Path, photos: int, seconds: float, kill: str, rng: random.Random) -> dict[str, Any]:
    """Run one round (see the module docstring) and count its outcome."""
    run = Round(root)
    kills = {"receiver": 0, "sender": 0}
    made, started = 0, time.monotonic()
    try:
        while time.monotonic() - started < seconds or made < photos:
            if made < photos:
                burst = min(photos - made, rng.randint(1, 4))
                write_photos(run.photos, made, burst)
                made += burst
            time.sleep(rng.uniform(0.05, 0.6))
            if "r" in kill and rng.random() < 0.3:
                run.kill_receiver(rng)
                kills["receiver"] += 1
            if "s" in kill and rng.random() < 0.2:
                run.kill_sender(rng)
                kills["sender"] += 1
        settle = time.monotonic() + 120
        while time.monotonic() < settle and (run.pending() or run.stored() < photos - len(watch_failures(run.spool))):
            time.sleep(1.0)
        time.sleep(1.0)  # a last upload in flight
    finally:
        run.stop()
    rows, distinct = catalogue(run.data)
    return {"photos": photos, "stored": rows, "duplicates": rows - distinct, "missing": photos - distinct,
            "left_in_spool": run.pending(), "rejected": sum(1 for _ in (run.spool / "rejected").glob("*.aeic")),
            "watch_failed": watch_failures(run.spool), "kills": kills}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--kill", default="rs", help="r: kill the receiver, s: kill the sender (default rs)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="keep each round's folders here")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "delivery_soak.json")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    base = args.dir or Path(tempfile.mkdtemp(prefix="aeic-soak-"))
    rounds = []
    try:
        for number in range(args.rounds):
            result = soak_round(base / f"round-{number}", args.photos, args.seconds, args.kill, rng)
            print(json.dumps(result), flush=True)
            rounds.append(result)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                                    "rounds": rounds}, indent=2) + "\n")  # fmt: skip
    lost = sum(r["missing"] for r in rounds)
    return 1 if lost or any(r["duplicates"] or r["left_in_spool"] for r in rounds) else 0


if __name__ == "__main__":
    raise SystemExit(main())
