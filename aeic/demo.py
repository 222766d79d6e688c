"""`make demo` / `python -m aeic.demo`: the whole system on one machine.

Starts the receiver on loopback with the embedded default (SQLite + files + in-process worker), sends a
handful of real photos through the sender codec at one rate, waits for the reconstructions, prints a
table (image, bytes, bpp, PSNR, encode ms, decode ms), writes a side-by-side picture and the gallery URL.
In a terminal it keeps serving the gallery until Ctrl-C; without a TTY (or with CI=true) it exits by
itself and leaves no process behind.

`--scale-out [--workers N]` (`make demo SCALE_OUT=1`) runs the same flow on the scale-out topology
instead, all on loopback without Docker: PostgreSQL, Redis and an S3-compatible server (moto), started by
`aeic.local_servers`; the API with no decoder of its own; N `aeic-receiver worker` processes consuming
the Redis Stream. The table then says which worker decoded each image.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

from aeic import local_servers
from aeic.evaluation.metrics import psnr as psnr_db
from aeic.local_servers import LocalServerError, free_port, stop_process

__all__ = ["main", "stop_process"]

# Photographs bundled inside scikit-image's wheel (no download).
_SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
_ROW_HEIGHT = 256


@dataclass
class Result:
    """One photo's trip through the system."""

    name: str
    original: np.ndarray
    bitstream: bytes
    encode_ms: float
    image_id: str = ""
    status: str = "pending"
    decode_ms: float | None = None
    error: str | None = None
    decoded_by: str | None = None  # scale-out: the worker process (consumer) that decoded it
    reconstruction: np.ndarray | None = None

    @property
    def bpp(self) -> float:
        return len(self.bitstream) * 8 / (self.original.shape[0] * self.original.shape[1])

    @property
    def psnr(self) -> float | None:
        if self.reconstruction is None:
            return None
        return psnr_db(self.original, self.reconstruction)  # numpy only: the receiver extra has no scikit-image


# -- inputs --------------------------------------------------------------------------------------


def _fit(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the longest side is at most `max_side` (CPU decoding of huge photos is slow)."""
    height, width = rgb.shape[:2]
    if max(height, width) <= max_side:
        return rgb
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def load_photos(folder: Path | None, limit: int, max_side: int) -> list[tuple[str, np.ndarray]]:
    """Photos from `folder` (png/jpg/webp/...), else scikit-image's bundled sample photographs."""
    photos: list[tuple[str, np.ndarray]] = []
    if folder is not None:
        from aeic.sender.images import IMAGE_SUFFIXES, ImageReadError, read_image

        if not folder.is_dir():
            raise SystemExit(f"demo: --images {folder}: not a folder")
        candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for path in candidates:
            if len(photos) == limit:
                break
            try:  # one unreadable file is one line, not the end of the demo
                photos.append((path.name, _fit(read_image(path), max_side)))
            except ImageReadError as exc:
                print(f"demo: skipped {exc}", file=sys.stderr)
        if not photos:
            raise SystemExit(f"demo: no readable images in {folder} ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if len(candidates) > limit:  # say so: a folder's other photos are not silently left out
            print(f"demo: the first {limit} of {len(candidates)} images in {folder} "
                  f"(--limit N, or make demo LIMIT=N, for more)", file=sys.stderr)
        return photos
    try:
        from skimage import data
    except ImportError:  # the receiver extra alone: only the dev extra (`make demo`) has scikit-image
        raise SystemExit("demo: the sample photographs come with scikit-image (pip install scikit-image, or "
                         "`make demo`); or pass --images DIR") from None

    for name in _SAMPLE_PHOTOS[:limit]:
        photos.append((name, _fit(np.ascontiguousarray(getattr(data, name)()[..., :3]), max_side)))
    return photos


# -- the receiver process ------------------------------------------------------------------------


@contextmanager
def receiver_process(data_dir: Path, model: Path | None, port: int, admin: str, extra: Sequence[str] = (),
                     env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`aeic-receiver serve` on loopback; always stopped (SIGTERM, then SIGKILL) on exit."""
    command = [sys.executable, "-m", "aeic.receiver.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data", str(data_dir), "--log-level", "warning", *extra]
    if model is not None:
        command += ["--model", str(model)]
    process = subprocess.Popen(command, env={**os.environ, **(env or {}), "AEIC_ADMIN_TOKEN": admin},
                               start_new_session=True)
    try:
        yield process
    finally:
        stop_process(process)


# -- the scale-out topology ----------------------------------------------------------------------

_DEMO_BUCKET = "s3://aeic-demo/blobs"
# What `aeic-receiver worker` logs for each image it decoded (stream_worker.StreamWorker._settle).
_DECODED_LOG = re.compile(r"decoded image=(\S+) consumer=(\S+)")


@dataclass
class Worker:
    """One `aeic-receiver worker` process and the file its log goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@contextmanager
def scale_out_services() -> Iterator[dict[str, str]]:
    """PostgreSQL, Redis and moto's S3 server on loopback; yields the `AEIC_*` environment (and S3
    credentials) that the API and every worker share, as in deploy/README.md's "Without Docker"."""
    missing = [name for name in ("redis", "boto3") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"demo: --scale-out needs {' and '.join(missing)}: pip install -e '.[scale]'")
    with ExitStack() as stack:
        print("starting PostgreSQL, Redis and an S3 server (moto) on loopback ...", flush=True)
        postgres = stack.enter_context(local_servers.postgres_server())
        redis = stack.enter_context(local_servers.redis_server())
        s3 = stack.enter_context(local_servers.s3_server())
        yield {"AEIC_DATABASE_URL": local_servers.create_database(postgres, "aeic"), "AEIC_QUEUE": f"{redis}/0",
               "AEIC_BLOB_URL": _DEMO_BUCKET, "AEIC_S3_ENDPOINT_URL": s3, **local_servers.S3_CREDENTIALS}


@contextmanager
def worker_processes(count: int, data_dir: Path, model: Path | None,
                     env: Mapping[str, str]) -> Iterator[list[Worker]]:
    """`count` decode workers consuming the stream (consumers demo-w0, demo-w1, ...); always stopped."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // count))
    workers: list[Worker] = []
    try:
        for n in range(count):
            name, log = f"demo-w{n}", data_dir / f"demo-w{n}.log"
            command = [sys.executable, "-m", "aeic.receiver.cli", "worker", "--consumer", name,
                       "--data", str(data_dir / name), "--log-level", "info"]
            if model is not None:
                command += ["--model", str(model)]
            with open(log, "wb") as out:
                process = subprocess.Popen(command, env={**os.environ, **env, "OMP_NUM_THREADS": threads},
                                           stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            workers.append(Worker(name, process, log))
        yield workers
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.terminate()  # all at once: each finishes its batch in parallel
        for worker in workers:
            stop_process(worker.process)


def check_workers(workers: Sequence[Worker]) -> None:
    """Stop the demo with the log of a worker that exited (nothing would decode its share)."""
    for worker in workers:
        if worker.process.poll() is not None:
            raise SystemExit(f"demo: worker {worker.name} exited with code {worker.process.returncode}:\n"
                             f"{worker.log_tail()}")


def attribute(results: Sequence[Result], workers: Sequence[Worker]) -> None:
    """Fill `decoded_by` from the workers' logs."""
    decoded: dict[str, str] = {}
    for worker in workers:
        if worker.log.exists():
            decoded.update(_DECODED_LOG.findall(worker.log.read_text(errors="replace")))
    for result in results:
        result.decoded_by = decoded.get(result.image_id)


def wait_ready(client: httpx.Client, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: the receiver exited with code {process.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("demo: the receiver did not become ready in time")


def _device_token(database_url: str) -> str:
    """Migrate the database (before any other process does) and create the demo camera's token."""
    from aeic.receiver.auth import create_device_token
    from aeic.receiver.storage import SqlMetadataStore

    store = SqlMetadataStore.from_url(database_url)
    try:
        store.migrate()
        return create_device_token(store, "demo-camera")
    finally:
        store.close()


# -- sending and collecting ----------------------------------------------------------------------


def encode_all(photos: list[tuple[str, np.ndarray]], model: Path | None, rate: int | None) -> tuple[list[Result], int]:
    """Encode every photo with the sender codec; returns the results and the rate index used."""
    from aeic.sender.encoder import SenderCodec

    codec = SenderCodec.from_package(model)
    if rate is None:
        from aeic.shared.model_package import ModelPackage, default_model_dir

        rates = ModelPackage.load(model or default_model_dir()).rates
        rate = len(rates) // 2
    if not 0 <= rate < codec.num_levels:  # before any photo: one line, not the encoder's traceback
        raise SystemExit(f"demo: --rate {rate}: this package's rate levels are 0 to {codec.num_levels - 1}")
    results = []
    for name, rgb in photos:
        start = time.perf_counter()
        data = codec.encode(rgb, rate)
        results.append(Result(name, rgb, data, (time.perf_counter() - start) * 1000.0))
    return results, rate


def upload_all(client: httpx.Client, token: str, results: list[Result]) -> None:
    """POST each bitstream like an edge device would, keyed by the stream's SHA-256 as the sender keys it
    (not by the file name, which may hold spaces or accents an Idempotency-Key may not)."""
    from aeic.sender.spool import idempotency_key

    for result in results:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream",
                   "Idempotency-Key": idempotency_key(result.bitstream)}
        reply = client.post("/v1/images", content=result.bitstream, headers=headers)
        if reply.status_code != 202:
            raise SystemExit(f"demo: upload of {result.name} failed: {reply.status_code} {reply.text}")
        result.image_id = reply.json()["id"]


def collect(client: httpx.Client, token: str, results: list[Result], timeout: float,
            check: Callable[[], None] = lambda: None) -> None:
    """Wait until every image is decoded (or failed) and fetch the reconstructions; `check` runs on each
    poll and may stop the wait by raising."""
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + timeout
    waiting = list(results)
    while waiting and time.monotonic() < deadline:
        check()
        for result in list(waiting):
            body = client.get(f"/v1/images/{result.image_id}", headers=headers).json()
            result.status, result.error = body["status"], body["error"]
            result.decode_ms = body["timings"]["decode_ms"]
            if result.status in ("done", "failed"):
                waiting.remove(result)
        if waiting:
            time.sleep(0.25)
    for result in results:
        if result.status == "done":
            png = client.get(f"/v1/images/{result.image_id}/reconstruction.png", headers=headers).content
            with Image.open(io.BytesIO(png)) as image:
                result.reconstruction = np.asarray(image.convert("RGB"))


# -- output --------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    """The results as an aligned text table."""
    by_worker = any(r.decoded_by for r in results)
    header = (f"{'image':<22} {'size':>10} {'bytes':>7} {'bpp':>8} {'PSNR dB':>8} {'encode ms':>10} "
              f"{'decode ms':>10}  " + (f"{'worker':<12}  " if by_worker else "") + "status")
    lines = [header]
    for r in results:
        psnr = f"{r.psnr:8.2f}" if r.psnr is not None else f"{'-':>8}"
        decode = f"{r.decode_ms:10.0f}" if r.decode_ms is not None else f"{'-':>10}"
        size = f"{r.original.shape[1]}x{r.original.shape[0]}"
        worker = f"{r.decoded_by or '-':<12}  " if by_worker else ""
        lines.append(f"{r.name[:22]:<22} {size:>10} {len(r.bitstream):>7} {r.bpp:8.4f} {psnr} "
                     f"{r.encode_ms:10.0f} {decode}  {worker}{r.status}{': ' + r.error if r.error else ''}")
    return "\n".join(lines)


def _row(result: Result) -> Image.Image:
    def scaled(rgb: np.ndarray) -> Image.Image:
        image = Image.fromarray(rgb)
        return image.resize((max(1, round(image.width * _ROW_HEIGHT / image.height)), _ROW_HEIGHT))

    left = scaled(result.original)
    right = scaled(result.reconstruction) if result.reconstruction is not None else Image.new("RGB", left.size)
    row = Image.new("RGB", (left.width * 2 + 8, _ROW_HEIGHT + 22), (20, 20, 20))
    row.paste(left, (0, 22))
    row.paste(right, (left.width + 8, 22))
    psnr = f"{result.psnr:.2f} dB" if result.psnr is not None else result.status
    ImageDraw.Draw(row).text((4, 4), f"{result.name}: original | received ({len(result.bitstream)} B, "
                                     f"{result.bpp:.4f} bpp, {psnr})", fill=(235, 235, 235))
    return row


def side_by_side(results: list[Result], path: Path) -> Path:
    """Originals next to their reconstructions, one photo per row."""
    rows = [_row(r) for r in results]
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (20, 20, 20))
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _interactive(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stdin.isatty() and sys.stdout.isatty()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aeic.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="folder of photos (default: scikit-image's samples)")
    parser.add_argument("--limit", type=_positive, default=4, help="at most this many photos")
    parser.add_argument("--max-side", type=_positive, default=768, help="downscale photos to this longest side")
    parser.add_argument("--model", type=Path, help="model package (default: the shipped one)")
    parser.add_argument("--rate", type=int, help="rate index (default: the package's middle rate)")
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="where the picture is written")
    parser.add_argument("--port", type=int, default=0, help="receiver port (default: a free one)")
    parser.add_argument("--timeout", type=_positive_seconds, default=900.0, help="seconds to wait for decoding")
    parser.add_argument("--scale-out", action="store_true",
                        help="PostgreSQL, Redis, an S3 server (moto) and worker processes instead of the embedded "
                             "default (SQLite, files, in-process worker)")
    parser.add_argument("--workers", type=_positive, default=2, help="decode worker processes with --scale-out")
    serve = parser.add_mutually_exclusive_group()
    serve.add_argument("--serve", dest="serve", action="store_const", const=True,
                       help="keep serving the gallery until Ctrl-C (default in a terminal)")
    serve.add_argument("--no-serve", dest="serve", action="store_const", const=False,
                       help="exit after printing the results (default without a TTY or with CI=true)")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def run(args: argparse.Namespace) -> int:
    """The demo; returns the exit code (1 if any image failed to decode)."""
    photos = load_photos(args.images, args.limit, args.max_side)
    data_dir = Path(tempfile.mkdtemp(prefix="aeic-demo-"))
    admin, port = secrets.token_urlsafe(24), args.port or free_port()
    try:
        with ExitStack() as stack:  # unwinds in reverse: client, workers, API, then the servers
            env: dict[str, str] = {}
            workers: list[Worker] = []
            if args.scale_out:  # first: a missing server program stops the demo before any work
                env = stack.enter_context(scale_out_services())
            print(f"encoding {len(photos)} photo(s) with the sender codec ...", flush=True)
            results, rate = encode_all(photos, args.model, args.rate)
            token = _device_token(env.get("AEIC_DATABASE_URL") or f"sqlite:///{(data_dir / 'receiver.db').resolve()}")
            process = stack.enter_context(receiver_process(
                data_dir, args.model, port, admin, ["--no-worker"] if args.scale_out else [], env))
            if args.scale_out:
                workers = stack.enter_context(worker_processes(args.workers, data_dir, args.model, env))
                print(f"scale-out: API without a decoder, {len(workers)} worker process(es) on the Redis "
                      "Stream, metadata in PostgreSQL, blobs in S3 (moto)", flush=True)
            client = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60))
            wait_ready(client, process, timeout=120)
            upload_all(client, token, results)
            print(f"uploaded at rate index {rate}; waiting for the receiver to decode ...", flush=True)
            collect(client, token, results, args.timeout, check=lambda: check_workers(workers))
            attribute(results, workers)
            print(table(results))
            picture = side_by_side(results, args.out / "side_by_side.png")
            print(f"side-by-side picture: {picture}")
            print(f"gallery: http://127.0.0.1:{port}/login?token={admin}", flush=True)
            if _interactive(args.serve):
                print("serving the gallery; press Ctrl-C to stop", flush=True)
                try:
                    process.wait()
                except KeyboardInterrupt:
                    print()
            else:  # the link above dies with the receiver now: say so, and how to keep it
                print("receiver stopped (no terminal, or CI=true): run in a terminal, or with --serve, "
                      "to keep the gallery up", flush=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0 if all(r.status == "done" for r in results) else 1


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; SIGTERM is turned into a clean shutdown of the receiver too, while it runs (the caller's
    handler is put back: a test that called it left every later test's SIGTERM raising KeyboardInterrupt)."""
    from aeic.shared.model_package import ModelPackageError

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(_parser().parse_args(argv))
    except ModelPackageError as exc:
        print(f"demo: no usable model package ({exc}); pass --model DIR or set AEIC_MODEL", file=sys.stderr)
        return 2
    except LocalServerError as exc:  # e.g. redis-server not installed: one line, no traceback
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
