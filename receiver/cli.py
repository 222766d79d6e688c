"""`aeic-receiver`: run the service (`serve`), decode queued jobs (`worker`), manage device tokens (`token create|revoke`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aeic.receiver.settings import ReceiverSettings, load_settings
from pydantic import ValidationError

if TYPE_CHECKING:  # imported in _open_store, where it is used, as each subcommand imports its own modules
    from aeic.receiver.storage import SqlMetadataStore

__all__ = ["main"]


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
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _worker_parser(sub)
    token = sub.add_parser("token", help="device tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a token for a device and print it once")
    _common(create)
    create.add_argument("--device", required=True, help="device name (letters, digits, . _ -)")
    revoke = token_sub.add_parser("revoke", help="revoke every token of a device")
    _common(revoke)
    revoke.add_argument("--device", required=True)
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
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _worker(args: argparse.Namespace) -> int:
    from aeic.receiver.stream_worker import run_worker

    settings = _settings(args, queue=args.queue, blob_url=args.blob_url, model_packages=args.model_packages,
                         device=args.device, batch_size=args.batch_size)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_worker(settings, consumer=args.consumer, metrics_port=args.metrics_port)
    except ValueError as exc:
        print(f"aeic-receiver: {exc}", file=sys.stderr)
        return 2


def _settings(args: argparse.Namespace, **extra: object) -> ReceiverSettings:
    return load_settings(args.config, data_dir=args.data, database_url=args.database_url, **extra)


def _worker_locks_held(settings: ReceiverSettings) -> str | None:
    """Why another receiver's worker already holds this data dir or SQLite database, else None: said in
    one line before any model loads (the app takes both locks for good when it starts)."""
    from aeic.receiver.data_dir import (
        DatabaseInUseError,
        DataDirInUseError,
        lock_data_dir,
        lock_sqlite_database,
        unlock_data_dir,
    )

    try:
        if settings.data_dir.is_dir():
            unlock_data_dir(lock_data_dir(settings.data_dir))
        database_lock = lock_sqlite_database(settings.resolved_database_url())
    except (DataDirInUseError, DatabaseInUseError) as exc:
        return str(exc)
    except OSError:  # a database folder not made yet: the app makes it, and reports what it cannot
        return None
    if database_lock is not None:
        unlock_data_dir(database_lock)
    return None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from aeic.receiver.api import create_app

    settings = _settings(args, host=args.host, port=args.port, model_packages=args.model_packages,
                         device=args.device, batch_size=args.batch_size, worker=args.worker)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.worker and settings.queue is None:
        busy = _worker_locks_held(settings)
        if busy is not None:
            print(f"aeic-receiver: {busy}", file=sys.stderr)
            return 2
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=30, forwarded_allow_ips=settings.forwarded_allow_ips)
    return 0


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
        else:
            count = store.revoke_device_tokens(args.device)
            print(f"revoked {count} token(s) of device {args.device!r}", file=sys.stderr)
    finally:
        store.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = _parser().parse_args(argv)
    from aeic.shared.model_package import ModelPackageError

    try:
        if args.command == "worker":
            return _worker(args)
        return _serve(args) if args.command == "serve" else _token(args)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"aeic-receiver: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except ModelPackageError as exc:
        print(f"aeic-receiver: cannot load a model package: {exc} (use --model DIR or AEIC_MODEL)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
