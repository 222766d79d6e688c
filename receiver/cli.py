"""`aeic-receiver`: run the service (`serve`), decode queued jobs (`worker`), manage device tokens (`token create|revoke|list`)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from aeic.receiver.settings import ConfigError, ReceiverSettings, closest_setting, load_settings
from aeic.shared.url_redaction import without_password
from pydantic import ValidationError
from pydantic_settings import SettingsError

if TYPE_CHECKING:  # imported in _open_store, where it is used, as each subcommand imports its own modules
    from aeic.receiver.storage import SqlMetadataStore

__all__ = ["main"]

log = logging.getLogger(__name__)

# Settings whose value is not repeated in an error line: a token, or a URL that may carry a password.
_SECRET_SETTINGS = {"admin_token", "database_url", "queue", "blob_url", "s3_endpoint_url"}
_LOG_LEVELS = ["debug", "info", "warning", "error"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="data directory (env AEIC_DATA_DIR)")
    parser.add_argument("--config", type=Path, help="TOML config file (env AEIC_CONFIG)")
    parser.add_argument("--database-url", help="SQLAlchemy database URL (env AEIC_DATABASE_URL)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aeic-receiver", description="AEIC receiver service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API, decode worker and gallery")
    _common(serve)
    serve.add_argument("--host", help="bind address (env AEIC_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (env AEIC_PORT, default 8000)")
    serve.add_argument("--model", dest="model_packages", type=Path, action="append",
                       help="model package directory (repeatable; default: the shipped model)")
    serve.add_argument("--device", help="torch device for the decoder: auto, cpu, cuda ...")
    serve.add_argument("--batch-size", type=int, help="most images decoded together")
    serve.add_argument("--no-worker", dest="worker", action="store_const", const=False,
                       help="accept uploads but do not decode in this process")
    serve.add_argument("--log-level", default="info", choices=_LOG_LEVELS, help="default: info")
    _worker_parser(sub)
    token = sub.add_parser("token", help="device tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a token for a device and print it once")
    _common(create)
    create.add_argument("--device", required=True, help="device name (letters, digits, . _ -)")
    revoke = token_sub.add_parser("revoke", help="revoke every token of a device")
    _common(revoke)
    revoke.add_argument("--device", required=True, help="device name whose tokens stop working at once")
    listing = token_sub.add_parser("list", help="the devices given tokens, with their active and revoked counts")
    _common(listing)
    return parser


def _worker_parser(sub: argparse._SubParsersAction) -> None:
    """`aeic-receiver worker`: a decode worker process fed by the Redis Stream (scale-out)."""
    worker = sub.add_parser("worker", help="decode jobs from the Redis Stream (scale-out mode)")
    _common(worker)
    worker.add_argument("--queue", help="redis://host:6379/0 (env AEIC_QUEUE)")
    worker.add_argument("--blob-url", help="s3://bucket/prefix (env AEIC_BLOB_URL; default: files under --data)")
    worker.add_argument("--model", dest="model_packages", type=Path, action="append",
                        help="model package directory (repeatable; default: the shipped model)")
    worker.add_argument("--device", help="torch device for the decoder: auto, cpu, cuda ...")
    worker.add_argument("--batch-size", type=int, help="most images decoded together")
    worker.add_argument("--consumer", help="consumer name in the group (default: host-pid)")
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus metrics and /healthz (liveness) on this port")
    worker.add_argument("--log-level", default="info", choices=_LOG_LEVELS, help="default: info")


def _worker(args: argparse.Namespace) -> int:
    from aeic.receiver.stream_worker import run_worker

    settings = _settings(args, queue=args.queue, blob_url=args.blob_url, model_packages=args.model_packages,
                         device=args.device, batch_size=args.batch_size)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _check_device(settings.device)
    _check_sd_turbo_folder(settings)
    try:
        return run_worker(settings, consumer=args.consumer, metrics_port=args.metrics_port)
    except ValueError as exc:
        print(f"aeic-receiver: {exc}", file=sys.stderr)
        return 2


def _settings(args: argparse.Namespace, **extra: object) -> ReceiverSettings:
    return load_settings(args.config, data_dir=args.data, database_url=args.database_url, **extra)


def _hold_worker_locks(settings: ReceiverSettings) -> list[int]:
    """Take the data directory's worker lock, then a SQLite database's, for the start-up checks and the model
    load; raises `DataDirInUseError` or `DatabaseInUseError` (one line, before any model loads) when another
    receiver's worker holds one. Why held so long: released at once, a second `serve` started meanwhile passed
    this check and failed later, when the app takes the locks for good, with a 43-line traceback (status 3).
    They are given back just before the app takes them, which leaves a window of milliseconds, not seconds."""
    from aeic.receiver.data_dir import lock_data_dir, lock_sqlite_database, prepare_data_dir, unlock_data_dir

    prepare_data_dir(settings.data_dir)
    held = [lock_data_dir(settings.data_dir)]
    try:
        database_lock = lock_sqlite_database(settings.resolved_database_url())
    except OSError:  # a database folder not made yet: the database check reports what it cannot open
        database_lock = None
    except BaseException:
        unlock_data_dir(held.pop())
        raise
    return held if database_lock is None else [*held, database_lock]


def _listen(host: str, port: int) -> list[socket.socket]:
    """Bind the API's sockets (one per address `host` names, as asyncio's server would), not yet listening.

    Why before the model loads: uvicorn binds only after the app's start-up, so a port in use was found
    after the model had loaded and the worker had started (and claimed a batch), and was reported among
    six lines of start-up and shutdown with status 3. A bound socket that does not listen yet refuses
    connections, as a closed port does, until uvicorn takes it over."""
    sockets: list[socket.socket] = []
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _name, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            port = sock.getsockname()[1]  # a port 0 is the first address's, for every other one
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {reason}") from None
    return sockets


def _check_database(settings: ReceiverSettings) -> None:
    """Open and migrate the database before the model loads, so that a corrupt file, a newer schema or an
    unreachable server is one line and status 2, not a traceback from uvicorn's start-up with status 3."""
    _open_store(settings).close()


def _check_device(name: str) -> None:
    """Refuse a decoder device torch does not know or this machine lacks, before the model loads. Why: the
    decoders load in the worker's thread after start-up, so `--device cuda` on a machine without CUDA (or
    `--device cdua`) started a receiver that accepted every upload and decoded none, with a traceback in
    its log. `auto` and `cpu` always work and are not checked: importing torch took 7 s of a start on this
    loaded 2-core machine, which the worker otherwise spends in its own thread while the API answers."""
    if name in ("auto", "cpu"):
        return
    import torch
    from aeic.receiver.decoder import resolve_device

    try:
        device = resolve_device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device ({exc.__class__.__name__}); use auto, cpu, "
                          "cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: no CUDA device is available to torch here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available to torch here; use --device cpu")


def _check_sd_turbo_folder(settings: ReceiverSettings) -> None:
    """Refuse a full-profile package's SD-Turbo folder that is unset or not one (`AEIC_SD_TURBO_DIR`), before
    the model loads: as with a missing device, the receiver started, accepted uploads and left them waiting
    for a decoder that could not load (its reason in the log). Reads no weights and imports no torch."""
    from aeic.shared.model_package import ModelPackage, default_model_dir

    for path in settings.model_packages or [default_model_dir()]:
        config = ModelPackage.load(path).manifest.get("config")
        if isinstance(config, dict) and config.get("profile") == "full":
            from aeic.codec.sd_turbo_folder import check_folder, configured_folder

            check_folder(configured_folder())
            _check_decoder_dtype(settings)
            return  # one folder serves every full-profile package


def _check_decoder_dtype(settings: ReceiverSettings) -> None:
    """Refuse float16 where the decoder runs on the CPU (`device = "auto"` without a GPU too) before the model
    loads, rather than a decoder that cannot load after start-up. Imports torch only for float16."""
    if settings.decoder_dtype != "float16":
        return
    from aeic.receiver.decoder import check_decoder_dtype, resolve_device

    try:
        check_decoder_dtype(settings.decoder_dtype, resolve_device(settings.device))
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def _check_backends(settings: ReceiverSettings) -> None:
    """Reach the object store and the queue (creating the bucket and the consumer group, as the app does)
    before the model loads: unreachable, either was a traceback from uvicorn's start-up with status 3."""
    from aeic.receiver.backends import open_blob_store, open_queue, prepare_backends
    from aeic.receiver.worker import error_line

    if settings.blob_url:
        try:
            prepare_backends(open_blob_store(settings), None)
        except Exception as exc:  # noqa: BLE001 - boto3's and the network's errors alike: said in one line
            raise ConfigError(f"cannot use the blob store {without_password(settings.blob_url)}: "
                              f"{error_line(exc)}") from None
    if settings.queue:
        queue = open_queue(settings)
        assert queue is not None
        try:
            queue.ensure_group()
        except Exception as exc:  # noqa: BLE001 - redis' errors alike: said in one line
            raise ConfigError(f"cannot use the queue {without_password(settings.queue)}: {error_line(exc)}") from None
        finally:
            queue.close()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from aeic.receiver.api import create_app
    from aeic.receiver.data_dir import unlock_data_dir
    from aeic.receiver.header_timeout import protocol_with_header_timeout

    settings = _settings(args, host=args.host, port=args.port, model_packages=args.model_packages,
                         device=args.device, batch_size=args.batch_size, worker=args.worker)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    held = _hold_worker_locks(settings) if settings.worker and settings.queue is None else []
    sockets: list[socket.socket] = []
    try:
        _check_database(settings)
        _check_backends(settings)
        if settings.worker and settings.queue is None:
            _check_device(settings.device)
            _check_sd_turbo_folder(settings)
        sockets = _listen(settings.host, settings.port)
        app = create_app(settings)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    finally:
        while held:  # the app's start-up takes them again
            unlock_data_dir(held.pop())
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host  # an IPv6 address, as in a URL
    log.info("bound http://%s:%d; the API answers once start-up is complete", shown, sockets[0].getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=30,
                                           forwarded_allow_ips=settings.forwarded_allow_ips,
                                           http=protocol_with_header_timeout(settings.header_timeout_s,
                                                                             settings.upload_timeout_s)))
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on, once it has
        pass
    finally:
        for sock in sockets:
            sock.close()
    worker = app.state.receiver.worker
    if worker is not None and worker.is_alive():
        _exit_now(0)
    return 0


def _exit_now(status: int) -> NoReturn:
    """End the process without the interpreter's shutdown, once the app has stopped (claims handed back,
    database closed, locks released). Why: a decode worker thread the stop gave up on is still in torch's
    native code (a decoder load or a decode), and finalizing Python under it aborted the process
    ('terminate called without an active exception', SIGABRT) instead of the status asked for."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _open_store(settings: ReceiverSettings) -> SqlMetadataStore:
    from aeic.receiver.data_dir import prepare_data_dir
    from aeic.receiver.storage import SqlMetadataStore

    prepare_data_dir(settings.data_dir)
    store = SqlMetadataStore.from_url(settings.resolved_database_url())
    store.migrate()
    return store


def _token(args: argparse.Namespace) -> int:
    from aeic.receiver.auth import InvalidDeviceNameError, create_device_token

    store = _open_store(_settings(args))
    try:
        if args.token_command == "create":
            try:
                token = create_device_token(store, args.device)
            except InvalidDeviceNameError as exc:
                print(f"aeic-receiver: {exc}", file=sys.stderr)
                return 2
            print(token)
            print(f"token for device {args.device!r} created; it is shown only once", file=sys.stderr)
        elif args.token_command == "list":
            _print_token_counts(store.device_token_counts())
        else:
            count = store.revoke_device_tokens(args.device)
            if count == 0:  # a mistyped name revoked nothing: a leaked token would still work
                print(f"aeic-receiver: device {args.device!r} has no active token; nothing revoked "
                      "(`aeic-receiver token list` names the devices)", file=sys.stderr)
                return 1
            print(f"revoked {count} token(s) of device {args.device!r}", file=sys.stderr)
    finally:
        store.close()
    return 0


def _print_token_counts(counts: list[tuple[str, int, int, float]]) -> None:
    """`token list`: one line a device, aligned (a device name has no spaces)."""
    width = max([len("device"), *(len(device) for device, *_ in counts)])
    print(f"{'device':<{width}}  active  revoked  newest token (UTC)")
    for device, active, revoked, newest in counts:
        made = datetime.fromtimestamp(newest, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{device:<{width}}  {active:>6}  {revoked:>7}  {made}")


def _validation_line(exc: ValidationError) -> str:
    """pydantic's report (a block of lines with a documentation link) as one line: each setting, what is
    wrong with it and, unless it may hold a secret, the value given."""
    parts = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        if error["type"] == "extra_forbidden":
            meant = closest_setting(name)
            parts.append(f"{name} is not a setting" + (f" (did you mean {meant}?)" if meant else ""))
            continue
        given = "" if name.split(".")[0] in _SECRET_SETTINGS else f" (got {error['input']!r})"
        parts.append(f"{name}: {error['msg'][0].lower()}{error['msg'][1:]}{given}")
    return "; ".join(parts)


def _database_line(exc: Exception, settings_url: str | None) -> str:
    """A database error's first line, with the URL it was opening minus its password."""
    import sqlalchemy as sa

    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    try:
        where = sa.engine.make_url(settings_url).render_as_string(hide_password=True) if settings_url else ""
    except sa.exc.ArgumentError:
        where = "(an unparseable URL)"
    return f"cannot use the database {where}: {reason}".replace("  ", " ")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: every failure an operator can cause (a setting, the config file, the data
    directory, the database, the port, the model) is one line on stderr and status 2."""
    args = _parser().parse_args(argv)
    import sqlalchemy as sa
    from aeic.receiver.data_dir import DatabaseInUseError, DataDirInUseError
    from aeic.receiver.storage.migrations import SchemaTooNewError
    from aeic.shared.model_package import ModelPackageError

    try:
        if args.command == "worker":
            return _worker(args)
        return _serve(args) if args.command == "serve" else _token(args)
    except ValidationError as exc:
        message = f"invalid configuration: {_validation_line(exc)}"
    except SettingsError as exc:
        message = (f"invalid configuration: {exc} (list settings in the environment are JSON, e.g. "
                   """AEIC_MODEL_PACKAGES='["/opt/aeic/models/a"]')""")
    except (ConfigError, SchemaTooNewError, DataDirInUseError, DatabaseInUseError) as exc:
        message = str(exc)
    except FileNotFoundError as exc:
        message = f"invalid configuration: {exc}" if exc.errno is None else _os_line(exc)
    except ModelPackageError as exc:
        message = f"cannot load a model package: {exc} (use --model DIR or AEIC_MODEL)"
    except sa.exc.SQLAlchemyError as exc:
        message = _database_line(exc, _configured_url(args))
    except OSError as exc:
        message = _os_line(exc)
    print(f"aeic-receiver: {message}", file=sys.stderr)
    return 2


def _os_line(exc: OSError) -> str:
    if exc.filename is None:
        return exc.strerror or str(exc)
    return f"{exc.strerror or exc}: {exc.filename}"


def _configured_url(args: argparse.Namespace) -> str | None:
    """The database URL the failed command was opening (the settings loaded, as they were for it)."""
    try:
        return _settings(args).resolved_database_url()
    except (ValidationError, ValueError, OSError):
        return None


if __name__ == "__main__":
    sys.exit(main())
