"""/readyz for a SQLite database on another disk than the blobs: its disk filling is not ready either."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from fastapi.testclient import TestClient
from receiver_support import FakeCodec


def test_not_ready_while_the_sqlite_databases_disk_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: only the blob folder's free space was checked, so a database on its own disk filled (every upload
    answered 503 storage_unavailable) while /readyz said ready and the load balancer kept sending."""
    database = tmp_path / "db-disk" / "receiver.db"
    database.parent.mkdir()
    settings = ReceiverSettings(data_dir=tmp_path / "data", database_url=f"sqlite:///{database}", worker=False)
    real_usage = shutil.disk_usage

    def usage(path: str | Path) -> object:
        if Path(path).resolve().is_relative_to(database.parent):
            return SimpleNamespace(total=10 << 30, used=10 << 30, free=1 << 20)
        return real_usage(path)

    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        assert client.get("/readyz").status_code == 200
        monkeypatch.setattr(shutil, "disk_usage", usage)
        ready = client.get("/readyz")
    checks = ready.json()["checks"]
    assert ready.status_code == 503 and checks["database"] == "error: OSError: No space left on device"
    assert checks["blobs"] == "ok" and str(database.parent) not in ready.text  # anonymous callers: no path


def test_the_full_database_disk_is_logged_once_with_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """/readyz gives anonymous callers the reason only; the operator needs the folder, in the log, once a
    failure (as for the blob store), not once a probe."""
    import logging

    settings = ReceiverSettings(data_dir=tmp_path / "data", worker=False)
    full = [True]
    real_usage = shutil.disk_usage

    def usage(path: str | Path) -> object:
        return SimpleNamespace(total=10 << 30, used=10 << 30, free=1 << 20) if full else real_usage(path)

    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        monkeypatch.setattr(shutil, "disk_usage", usage)
        with caplog.at_level(logging.WARNING, logger="aeic.receiver.api"):
            codes = [client.get("/readyz").status_code for _ in range(3)]
            full.clear()
            codes += [client.get("/readyz").status_code for _ in range(2)]
    assert codes == [503] * 3 + [200] * 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("readiness: database", "readiness: the database"))]
    assert len(lines) == 2 and f"database folder {settings.data_dir.resolve()} has 1048576 bytes free" in lines[0]
    assert lines[1] == "readiness: the database is usable again"
