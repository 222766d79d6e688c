"""``aeic-send``: compress images on the edge device and deliver them to the receiver.

Subcommands (``aeic-send IMAGE... --to URL`` without one means ``send``): ``encode`` writes
``.aeic`` files; ``send`` encodes, spools and uploads; ``watch`` sends new images appearing
in a folder; ``camera`` sends a frame every N seconds; ``flush`` drains the spool; ``spool``
shows what is queued or rejected. Exit status: 0 all done; 1 some input failed (the others
still went); 2 bad usage, settings or model, or the receiver refused the token or URL (items stay
queued); 3 images are safely queued but not delivered yet; 130 interrupted (Ctrl-C) before the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aeic.sender.backoff import Backoff
from aeic.sender.coding_scale import AUTO_SHORT_SIDE, MIN_CODED_BPP, parse_downscale
from aeic.sender.config import ConfigError, SenderConfig, exposed_files, load_config, misspelt_variables
from aeic.sender.forward import DrainReport, Forwarder, ItemPolicy
from aeic.sender.images import ImageReadError, open_image
from aeic.sender.pipeline import Codec, Encoded, RateControl, encode_image
from aeic.sender.report import Reporter
from aeic.sender.rows import Picture
from aeic.sender.spool import Spool, SpoolFullError, StreamTooLargeError
from aeic.sender.uploader import Outcome, UploadConfigError, Uploader, UploadResult
from aeic.sender.watch import Candidate, FolderWatcher, Handled, run_watch
from aeic.shared.durable import atomic_write
from aeic.shared.url_redaction import without_password

from aeic import __version__

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_QUEUED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
COMMANDS = ("encode", "send", "watch", "camera", "flush", "spool")
DEFAULT_RATE = 0
# An output name's stem; with "-N.aeic" and atomic_write's ".tmp-" prefix and ".pid.random" suffix the
# temporary name stays under the 255 bytes that Linux filesystems allow.
MAX_OUTPUT_STEM_BYTES = 200
CodecFactory = Callable[[SenderConfig, Reporter], Codec]

SPOOL_POLICY = (
    "The spool keeps every bitstream on disk until the receiver acknowledges it. It is bounded by "
    "--spool-max-items and --spool-max-bytes; when full, new images are refused (reported as "
    "errors, never dropped silently) and nothing already queued is ever deleted."
)
EPILOG = (
    "Settings come from flags, then AEIC_* environment variables (AEIC_TOKEN, AEIC_RECEIVER_URL, ...), "
    "then the --config file (TOML or JSON; see deploy/sender/README.md). "
    + SPOOL_POLICY
    + " Exit status: 0 done; 1 some input failed; 2 bad usage/settings/model or token/URL refused"
    " (items stay queued); 3 queued, not yet delivered; 130 interrupted."
)


class UsageError(Exception):
    """Settings that make the command impossible (printed, exit status 2)."""


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="settings file (TOML, or JSON if it ends in .json)")
    common.add_argument(
        "--json", action="store_true", default=None, help="one JSON object per line on stdout"
    )

    encoder = argparse.ArgumentParser(add_help=False)
    encoder.add_argument("--model", type=Path, help="model package directory (default: the shipped model)")
    encoder.add_argument("--provider", help="onnxruntime execution provider (falls back to the CPU)")
    encoder.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    encoder.add_argument(
        "--downscale", type=parse_downscale, metavar="{auto,1,2,4}",
        help="code the image reduced by this factor, the receiver scales back (default auto: at a rate level, "
             f"the largest that keeps a {AUTO_SHORT_SIDE}-pixel short side; with --target-bytes, the largest coded "
             f"picture the budget gives at least {MIN_CODED_BPP} bits a pixel)",
    )
    rate = encoder.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=int, help=f"rate index (default {DEFAULT_RATE})")
    rate.add_argument("--target-bytes", type=int, help="byte budget: the best rate whose bitstream fits")

    upload = argparse.ArgumentParser(add_help=False)
    upload.add_argument("--to", dest="receiver_url", metavar="URL", help="receiver base URL")
    upload.add_argument("--token", help="device bearer token (prefer AEIC_TOKEN: flags show in ps)")
    upload.add_argument(
        "--ca-bundle", type=Path, help="PEM CA bundle for a private CA (TLS is always verified)"
    )
    upload.add_argument("--timeout", type=float, help="seconds a whole upload request may take, answer included (default 30)")
    upload.add_argument(
        "--retry-for", type=float, help="seconds to keep retrying before exiting (default 60)"
    )
    upload.add_argument(
        "--spool", dest="spool_dir", type=Path, help="spool directory (default ~/.local/state/aeic/spool)"
    )
    upload.add_argument("--spool-max-items", type=int, help="most pending items (default 100000)")
    upload.add_argument("--spool-max-bytes", type=int, help="most pending bytes (default 256 MiB)")

    parser = argparse.ArgumentParser(
        prog="aeic-send",
        description="Compress images at ultra-low bitrate and send them to an AEIC receiver.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"aeic-send {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("encode", parents=[common, encoder], help="write .aeic bitstreams to a folder")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")

    p = sub.add_parser(
        "send", parents=[common, encoder, upload], help="encode, spool and upload images", epilog=EPILOG
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")

    p = sub.add_parser(
        "watch", parents=[common, encoder, upload], help="send new images from a folder", epilog=EPILOG
    )
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("--poll", dest="watch_poll", type=float, help="seconds between scans (default 2)")
    p.add_argument("--recursive", dest="watch_recursive", action="store_true", default=None)

    p = sub.add_parser(
        "camera", parents=[common, encoder, upload], help="send a camera frame every N seconds", epilog=EPILOG
    )
    p.add_argument("--source", dest="camera_source", help="0, /dev/videoN, rtsp://... or a video file")
    p.add_argument(
        "--interval", dest="camera_interval", type=float, help="seconds between frames (default 10)"
    )
    p.add_argument("--count", type=int, help="stop after this many frames (default: run until stopped)")

    p = sub.add_parser(
        "flush", parents=[common, upload], help="upload everything in the spool", epilog=EPILOG
    )
    p.add_argument(
        "--requeue-rejected", action="store_true", help="move rejected items back to the queue first"
    )

    p = sub.add_parser("spool", parents=[common], help="list queued and rejected items")
    p.add_argument("--spool", dest="spool_dir", type=Path, help="spool directory")
    return parser


def _plain_http(receiver_url: str) -> str | None:
    """A warning when uploads would cross a network unencrypted: an ``http://`` receiver on another host.

    Why: the device token goes with every upload; on plain HTTP anyone on the path (the Wi-Fi, a hotel or
    mobile network) can read it and upload as this device, or change the images. A loopback receiver (a
    test, a tunnel's local end) is not warned about."""
    try:
        parts = urlsplit(receiver_url)
        host = parts.hostname or ""
    except ValueError:  # the uploader says what is wrong with it
        return None
    if parts.scheme != "http" or host == "localhost" or _is_loopback(host):
        return None
    return (f"the receiver URL {without_password(receiver_url)} is plain http://: the device token and every image "
            "cross the network unencrypted (readable and alterable on the way); use https://")  # fmt: skip


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return False


def _with_default_command(argv: list[str]) -> list[str]:
    """``aeic-send IMAGE... --to URL`` is ``aeic-send send IMAGE... --to URL``."""
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        return ["send", *argv]
    return argv


_CONFIG_KEYS = frozenset(SenderConfig.model_fields)


def _cli_values(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in _CONFIG_KEYS and v is not None}


# --------------------------------------------------------------------------- building blocks
def load_sender_codec(config: SenderConfig, reporter: Reporter) -> Codec:
    """Create the ONNX session once per process and say which provider runs it."""
    from aeic.sender.encoder import SenderCodec  # the lead's module; numpy/onnxruntime only

    try:
        codec = SenderCodec.from_package(
            config.model, provider=config.provider, threads=config.threads, downscale=config.downscale
        )
    except Exception as exc:
        raise UsageError(f"cannot load the model package {config.model or '(default)'}: {exc}") from exc
    used = getattr(codec, "provider", "?")
    if config.provider and config.provider != used:
        reporter.info(f"provider {config.provider} is not available here; using {used}")
    reporter.info(f"encoder: model {codec.model_id.hex()}, provider {used}, downscale {config.downscale}")
    return codec


def _budget_error() -> type[Exception]:
    from aeic.sender.encoder import BudgetError

    return BudgetError


def _rate_control(config: SenderConfig) -> RateControl:
    if config.target_bytes is not None:
        return RateControl(target_bytes=config.target_bytes)
    return RateControl(rate=DEFAULT_RATE if config.rate is None else config.rate)


def _open_spool(config: SenderConfig) -> Spool:
    """The spool, its folder made private (0700) when this is the first use.

    Why: it holds every image until delivery, and a bitstream decodes with the public model; made with the
    default umask it was readable by every user of the device (``~/.local/state`` is not private on every
    system). A folder that exists keeps the mode its operator gave it. A spool that is a link to nowhere
    (a card or disk not mounted) says so, where the folder's creation said only ``File exists``."""
    root = config.spool_dir
    if root.is_symlink() and not root.exists():
        raise UsageError(f"spool {root} is a symbolic link to {os.readlink(root)}, which does not exist "
                         "(storage not mounted?)")  # fmt: skip
    if root.exists() and not root.is_dir():  # said only "File exists"
        raise UsageError(f"spool {root} is not a folder")
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it first
            root.mkdir(mode=0o700)
    return Spool(
        config.spool_dir,
        max_items=config.spool_max_items,
        max_bytes=config.spool_max_bytes,
        max_item_bytes=config.spool_max_item_bytes,
    )


def _forwarder(
    config: SenderConfig, spool: Spool, reporter: Reporter, sleep: Callable[[float], object] = time.sleep
) -> Forwarder:
    if not config.receiver_url:
        raise UsageError(
            "no receiver URL: pass --to URL, set AEIC_RECEIVER_URL or receiver_url in the config"
        )
    uploader = Uploader(
        config.receiver_url, config.token_value() or "", ca_bundle=config.ca_bundle, timeout=config.timeout
    )
    if uploader.proxy is not None:
        reporter.info(f"uploading to {without_password(uploader.url)} through the proxy {without_password(uploader.proxy)} "
                      "(environment)")
    backoff = Backoff(base=config.backoff_base, max_delay=config.backoff_max)
    policy = ItemPolicy(config.item_max_attempts, config.item_max_age, config.item_backoff_max)
    return Forwarder(
        spool,
        uploader,
        backoff=backoff,
        item_policy=policy,
        sleep=sleep,
        listener=reporter.upload,
        on_error=reporter.info,
    )


class ImageEncoder:
    """Read/encode one input with uniform error reporting (shared by every command)."""

    def __init__(self, codec: Codec, control: RateControl, reporter: Reporter) -> None:
        levels = getattr(codec, "num_levels", None)
        if control.rate is not None and isinstance(levels, int) and not 0 <= control.rate < levels:
            raise UsageError(f"rate {control.rate} is not offered by this model: choose 0..{levels - 1}")
        self.codec, self.control, self.reporter = codec, control, reporter
        self.budget_error = _budget_error()

    def from_file(self, path: Path) -> Encoded | None:
        try:
            picture = open_image(path, self._warned)  # read strip by strip as it is coded: never whole as an array
        except ImageReadError as exc:
            self.reporter.error(str(path), str(exc))
            return None
        return self.from_array(picture, str(path))

    def _warned(self, line: str) -> None:
        self.reporter.info(f"warning: {line}")

    def from_array(self, rgb: Picture, source: str) -> Encoded | None:
        try:
            return encode_image(self.codec, rgb, self.control)
        except self.budget_error as exc:
            self.reporter.error(source, f"{source}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others or the agent
            self.reporter.error(source, f"{source}: cannot encode: {type(exc).__name__}: {exc}")
        return None


def _unique_output(directory: Path, source: Path, used: set[str]) -> Path:
    """``DIR/<stem>.aeic``, numbered when an earlier input of this run had the stem; compared without
    case, as the FAT and exFAT cards and sticks of edge devices compare names (``A.jpg``, ``a.png``)."""
    stem, n = _short_stem(source.stem or "image"), 1
    name = f"{stem}.aeic"
    while name.casefold() in used:
        n += 1
        name = f"{stem}-{n}.aeic"
    used.add(name.casefold())
    return directory / name


def _short_stem(stem: str) -> str:
    """``stem`` cut to :data:`MAX_OUTPUT_STEM_BYTES`: an input name near the 255-byte limit would
    otherwise give an output name (and its temporary name while written) too long to create."""
    while len(os.fsencode(stem)) > MAX_OUTPUT_STEM_BYTES:
        stem = stem[:-1]
    return stem


def _install_stop_handlers(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM (systemd stop) and SIGINT end a long-running command cleanly; returns the old handlers."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    return previous


# --------------------------------------------------------------------------- commands
def cmd_encode(
    args: argparse.Namespace, config: SenderConfig, reporter: Reporter, codec_factory: CodecFactory
) -> int:
    if args.output.exists() and not args.output.is_dir():  # said only "File exists"
        raise UsageError(f"output {args.output} is not a folder")
    args.output.mkdir(parents=True, exist_ok=True)
    encoder = ImageEncoder(codec_factory(config, reporter), _rate_control(config), reporter)
    failures, used = 0, set[str]()
    for index, path in enumerate(args.images, 1):
        encoded = encoder.from_file(path)
        if encoded is None:
            failures += 1
            continue
        target = _unique_output(args.output, path, used)
        atomic_write(target, encoded.data)
        reporter.encoded(f"[{index}/{len(args.images)}]", str(path), encoded, output=str(target))
    reporter.event("summary", encoded=len(args.images) - failures, failed=failures)
    return EXIT_INPUT if failures else EXIT_OK


def _spool_encoded(
    spool: Spool, encoded: Encoded, source: str, reporter: Reporter, position: str, gate: _FullSpoolGate | None = None,
    capture: str | None = None,
) -> tuple[Handled, str]:
    """Queue ``encoded``: SENT with its key; LATER when the spool cannot take it now (full, unwritable: the
    watcher tries the file again); FAILED with why when it never could (a stream over
    ``spool_max_item_bytes``, which had been queued and then rejected as damaged)."""
    try:
        item = spool.put(
            encoded.data,
            source=source,
            capture=capture,
            rate_index=encoded.rate_index,
            width=encoded.width,
            height=encoded.height,
        )
    except StreamTooLargeError as exc:
        reporter.error(source, f"{source}: not queued: {exc}")
        return Handled.FAILED, f"not queued: {exc}"
    except SpoolFullError as exc:
        if gate is None or gate.refused():
            reporter.error(source, f"{source}: not queued: {exc}")
        return Handled.LATER, ""
    except OSError as exc:  # disk full, read-only or failing storage
        reporter.error(source, f"{source}: not queued: cannot write the spool: {exc}")
        return Handled.LATER, ""
    if gate is not None:
        gate.queued()
    reporter.encoded(position, source, encoded, key=item.key, queued=item.key[:12])
    return Handled.SENT, item.key


class _FullSpoolGate:
    """Whether a long-running command should encode its next image while the spool is full.

    An image the full spool refuses was encoded for nothing: during an outage the watcher encoded the
    same photo again every scan (seconds of a Pi's CPU each time) and the camera every frame, each with
    an error line. After a refusal no image is encoded until the forwarder has removed an item (delivered
    or rejected) or ``recheck`` seconds have passed (another process may have drained the spool); the
    refusal is one line, and the room coming back another.
    """

    def __init__(self, spool: Spool, reporter: Reporter, recheck: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.spool, self.reporter, self.recheck, self._clock = spool, reporter, recheck, clock
        self._refused_at: float | None = None  # when the spool last refused an image; None: it has room
        self._removed_then = 0  # the forwarder's removals at that time

    def _removed(self) -> int:
        return self.reporter.uploaded + self.reporter.rejected

    def open(self) -> bool:
        """Whether encoding an image is worth it now."""
        if self._refused_at is None or self._removed() > self._removed_then:
            return True
        return self._clock() - self._refused_at >= self.recheck

    def refused(self) -> bool:
        """Note a refusal; True when it is the first of a run of them (the one to report)."""
        first = self._refused_at is None
        self._refused_at, self._removed_then = self._clock(), self._removed()
        if first:
            # not "is full": a card gone read-only refuses images too; the error line beside this says why
            self.reporter.info(f"spool {self.spool.root} takes no new image: none is encoded until an upload makes "
                               "room or a minute has passed (said once; the next line says when it takes images "
                               "again)")  # fmt: skip
        return first

    def queued(self) -> None:
        """An image was queued: if the spool had been full, say that it has room again."""
        if self._refused_at is not None:
            self.reporter.info(f"spool {self.spool.root} takes images again")
        self._refused_at = None


def _finish(
    forwarder: Forwarder,
    config: SenderConfig,
    reporter: Reporter,
    failures: int,
    blocked: UploadResult | None = None,
) -> int:
    """Deliver what is queued (unless the receiver already refused our token or URL) and pick the exit status."""
    report = (
        DrainReport(stopped=blocked) if blocked is not None
        else forwarder.flush(max_wait=config.retry_for, wait_for_set_aside=True)
    )
    remaining = forwarder.undelivered()
    # The reporter counts every answer of this command: also those of the passes made while
    # encoding (send) or by the background forwarder (camera), not only this last flush.
    reporter.event(
        "summary", failed=failures, uploaded=reporter.uploaded, rejected=reporter.rejected, queued=remaining
    )
    if remaining:
        reason = report.stopped.detail if report.stopped else "not delivered yet"
        if report.stopped is None and report.set_aside:
            reason = "set aside after failing while the receiver accepted others; `aeic-send spool` lists them"
        reporter.info(
            f"{remaining} item(s) remain queued in {forwarder.spool.root} ({reason}); "
            "they are safe on disk: run `aeic-send flush` or keep the agent running"
        )
    if report.stopped is not None and report.stopped.outcome is Outcome.BLOCKED:
        return EXIT_USAGE  # a token or URL the receiver refuses is a settings problem
    if failures or reporter.rejected:
        return EXIT_INPUT
    return EXIT_QUEUED if remaining else EXIT_OK


def cmd_send(
    args: argparse.Namespace, config: SenderConfig, reporter: Reporter, codec_factory: CodecFactory
) -> int:
    spool = _open_spool(config)
    forwarder = _forwarder(config, spool, reporter)
    encoder = ImageEncoder(codec_factory(config, reporter), _rate_control(config), reporter)
    failures, stopped = 0, None
    try:
        for index, path in enumerate(args.images, 1):
            encoded = encoder.from_file(path)
            if encoded is None or _spool_encoded(
                spool, encoded, str(path), reporter, f"[{index}/{len(args.images)}]"
            )[0] is not Handled.SENT:
                failures += 1
                continue
            if stopped is None:  # deliver while encoding; after a failure wait until the end
                stopped = forwarder.drain_pass().stopped
        blocked = stopped if stopped is not None and stopped.outcome is Outcome.BLOCKED else None
        return _finish(forwarder, config, reporter, failures, blocked)
    finally:
        forwarder.uploader.close()


def cmd_flush(
    args: argparse.Namespace, config: SenderConfig, reporter: Reporter, codec_factory: CodecFactory
) -> int:
    spool = _open_spool(config)
    if args.requeue_rejected:
        reporter.info(f"requeued {spool.requeue_rejected()} rejected item(s)")
    forwarder = _forwarder(config, spool, reporter)
    try:
        reporter.info(f"{len(spool)} item(s) queued in {spool.root}")
        return _finish(forwarder, config, reporter, 0)
    finally:
        forwarder.uploader.close()


def cmd_spool(
    args: argparse.Namespace, config: SenderConfig, reporter: Reporter, codec_factory: CodecFactory
) -> int:
    spool = _open_spool(config)
    set_aside = 0
    for state, items in (("pending", spool.pending()), ("rejected", spool.rejected())):
        for item in items:
            why = item.extra.get("reason") if state == "rejected" else item.last_error
            aside = state == "pending" and item.failed_alone > 0
            set_aside += aside
            reporter.event(
                "item",
                state=state,
                key=item.key,
                source=item.source,
                size=item.size,
                attempts=item.attempts,
                detail=why,
                **({"failed_alone": item.failed_alone, "next_attempt": item.next_attempt} if aside else {}),
            )
            if not reporter.as_json:
                if aside:
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item.next_attempt))
                    why = f"{why}; set aside: failed {item.failed_alone}x while others were accepted, next try {when}"
                reporter._emit(
                    reporter.out,
                    f"{state:8} {item.key[:12]} {item.size:>7} B "
                    f"attempts {item.attempts:<3} {item.source or '?'}" + (f"  ({why})" if why else ""),
                )
    reporter.info(
        f"{len(spool)} pending ({spool.pending_bytes()} bytes; {set_aside} set aside), "
        f"{len(spool.rejected())} rejected in {spool.root}"
    )
    return EXIT_OK


class _Daemon:
    """Spool + background forwarder shared by ``watch`` and ``camera``."""

    def __init__(self, config: SenderConfig, reporter: Reporter) -> None:
        self.stop, self.wake = threading.Event(), threading.Event()
        self.spool = _open_spool(config)
        self.forwarder = _forwarder(config, self.spool, reporter, sleep=self.stop.wait)
        self.thread = threading.Thread(
            target=self.forwarder.run, args=(self.stop, self.wake), name="aeic-forwarder", daemon=True
        )
        self._previous_handlers: dict[int, Any] = {}

    def __enter__(self) -> _Daemon:  # noqa: PYI034 (typing.Self needs Python 3.11; Jetsons run 3.10)
        self._previous_handlers = _install_stop_handlers(self.stop)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.wake.set()
        self.thread.join(timeout=60)
        self.forwarder.uploader.close()
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)


def cmd_watch(
    args: argparse.Namespace, config: SenderConfig, reporter: Reporter, codec_factory: CodecFactory
) -> int:
    directory = args.directory.resolve()
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    state = config.spool_dir / "watch" / f"{digest}.db"

    def opened() -> FolderWatcher:
        try:
            return FolderWatcher(directory, state, recursive=config.watch_recursive)
        except (NotADirectoryError, ValueError) as exc:
            raise UsageError(str(exc)) from None

    watcher: FolderWatcher | None = None
    try:
        watcher = opened()
    except OSError as exc:  # a full or failing disk: the queue can still go, and its uploads make room
        problem = exc
    # The receiver settings are checked (``_Daemon``) before the model loads: a missing token or URL is
    # one line at once, not after seconds of loading on a Pi that systemd restarts every few seconds.
    with _Daemon(config, reporter) as daemon:
        if watcher is None:
            watcher = _state_once_it_opens(opened, state, problem, daemon.stop, config.watch_poll, reporter)
        if watcher is not None:
            with watcher:
                _watch(watcher, directory, config, reporter, codec_factory, daemon)
    return EXIT_OK


def _state_once_it_opens(opened: Callable[[], FolderWatcher], state: Path, problem: OSError,
                         stop: threading.Event, poll: float, reporter: Reporter) -> FolderWatcher | None:  # fmt: skip
    """The watcher once its state opens, tried every ``poll`` seconds while the forwarder delivers the queue;
    None when stopped first.

    Why: a full disk (a long outage's backlog) or a card gone read-only failed the state's opening at start, and
    the agent exited, for systemd to start it again every few seconds, while the queued images, whose delivery
    makes room, stayed queued."""
    reporter.info(f"watch: cannot open its state {state} ({problem}); delivering what is queued meanwhile and "
                  f"trying again every {poll:g} s")  # fmt: skip
    while not stop.wait(poll):
        try:
            watcher = opened()
        except OSError:
            continue
        reporter.info(f"watch state opened: {watcher.directory} is scanned")
        return watcher
    return None


def _watch(watcher: FolderWatcher, directory: Path, config: SenderConfig, reporter: Reporter,
           codec_factory: CodecFactory, daemon: _Daemon) -> None:
    """Encode and spool each file ``watcher`` finds ready, uploading in the background, until stopped."""
    encoder = ImageEncoder(codec_factory(config, reporter), _rate_control(config), reporter)
    gate = _FullSpoolGate(daemon.spool, reporter)

    def handle(candidate: Candidate) -> tuple[Handled, str]:
        encoded = encoder.from_file(candidate.path)
        if encoded is None:
            return Handled.FAILED, "unreadable or not encodable"
        outcome, detail = _spool_encoded(daemon.spool, encoded, candidate.name, reporter, "[watch]", gate)
        if outcome is Handled.SENT:
            daemon.wake.set()
        return outcome, detail

    reporter.info(f"watching {directory} every {config.watch_poll:g} s; spool {daemon.spool.root}; "
                  f"receiver {without_password(daemon.forwarder.uploader.url)}")  # fmt: skip
    run_watch(watcher, handle, daemon.stop, config.watch_poll, on_error=reporter.info, ready=gate.open)


def cmd_camera(
    args: argparse.Namespace, config: SenderConfig, reporter: Reporter, codec_factory: CodecFactory
) -> int:
    try:
        from aeic.sender.camera import Camera, parse_source  # OpenCV loads only for this command
    except ImportError as exc:
        if exc.name != "cv2":
            raise
        raise UsageError("`aeic-send camera` needs OpenCV, which the sender extra leaves out: "
                         "pip install 'aeic[camera]' (or opencv-python-headless)") from exc  # fmt: skip

    if not config.camera_source:
        raise UsageError("no camera source: pass --source 0|/dev/videoN|rtsp://... or set camera_source")
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    camera = Camera(parse_source(config.camera_source), log=reporter.info)
    failures = 0
    with _Daemon(config, reporter) as daemon:  # the receiver settings first, as in watch
        encoder = ImageEncoder(codec_factory(config, reporter), _rate_control(config), reporter)
        gate = _FullSpoolGate(daemon.spool, reporter)
        reporter.info(f"camera {camera.name} every {config.camera_interval:g} s; spool {daemon.spool.root}; "
                      f"receiver {without_password(daemon.forwarder.uploader.url)}")  # fmt: skip
        for number, rgb in enumerate(camera.frames(config.camera_interval, daemon.stop, args.count), 1):
            if not gate.open():  # the spool is full: this frame is skipped unencoded
                failures += 1
                continue
            source = f"camera-{time.strftime('%Y%m%dT%H%M%S')}-{number}"
            encoded = encoder.from_array(rgb, source)
            if encoded is None or _spool_encoded(
                daemon.spool, encoded, source, reporter, f"[frame {number}]", gate, capture=source
            )[0] is not Handled.SENT:
                failures += 1
                continue
            daemon.wake.set()
        if args.count is None:
            return EXIT_OK
    # A bounded run delivers what it captured before exiting, like `send`.
    forwarder = _forwarder(config, daemon.spool, reporter)
    try:
        return _finish(forwarder, config, reporter, failures)
    finally:
        forwarder.uploader.close()


HANDLERS = {
    "encode": cmd_encode,
    "send": cmd_send,
    "watch": cmd_watch,
    "camera": cmd_camera,
    "flush": cmd_flush,
    "spool": cmd_spool,
}


def main(argv: Sequence[str] | None = None, codec_factory: CodecFactory = load_sender_codec) -> int:
    """Entry point of the ``aeic-send`` console script."""
    args = build_parser().parse_args(_with_default_command(list(sys.argv[1:] if argv is None else argv)))
    reporter = Reporter(as_json=bool(args.json))
    try:
        config = load_config(_cli_values(args), args.config)
        uploads = args.command in ("send", "watch", "camera", "flush")
        plain = _plain_http(config.receiver_url) if uploads and config.receiver_url else None
        for line in [*misspelt_variables(), *exposed_files(config, args.config), *([plain] if plain else [])]:
            reporter.info(f"aeic-send: warning: {line}")
        return HANDLERS[args.command](args, config, reporter, codec_factory)
    except (ConfigError, UsageError, UploadConfigError) as exc:
        reporter.info(f"aeic-send: {exc}")
        return EXIT_USAGE
    except OSError as exc:
        # Spool or output folder not writable, disk full, ...: say what and where, no traceback.
        reporter.info(f"aeic-send: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Ctrl-C in a one-shot command (watch and camera stop cleanly on it): every write is atomic,
        # so what was queued is whole and stays; a traceback would only hide that.
        reporter.info("aeic-send: interrupted; images already queued stay in the spool (`aeic-send flush` sends them)")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
