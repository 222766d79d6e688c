"""`aeic-receiver` command line: token management and configuration sources."""

from __future__ import annotations

from pathlib import Path

import pytest
from aeic.receiver.auth import hash_token
from aeic.receiver.cli import main
from aeic.receiver.settings import load_settings
from aeic.receiver.storage import SqlMetadataStore


def test_token_create_prints_once_and_stores_only_the_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "create", "--device", "cam-7", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("aeic_") and len(token) > 40 and "shown only once" in out.err
    store = SqlMetadataStore.from_url(f"sqlite:///{tmp_path / 'receiver.db'}")
    try:
        assert store.device_for_token(hash_token(token)) == "cam-7"
        assert token.encode() not in (tmp_path / "receiver.db").read_bytes()
    finally:
        store.close()
    assert main(["token", "revoke", "--device", "cam-7", "--data", str(tmp_path)]) == 0
    assert main(["token", "create", "--device", "bad name!", "--data", str(tmp_path)]) == 2


def test_token_list_names_each_device_and_a_revoke_that_finds_none_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: no way to see which devices hold tokens but SQL, and `token revoke` of a mistyped name said
    'revoked 0 token(s)' with status 0, while the leaked token it was meant for still worked."""
    data = ["--data", str(tmp_path)]
    for device in ("cam-7", "cam-7", "garden-camera-long-name"):
        assert main(["token", "create", "--device", device, *data]) == 0
    assert main(["token", "revoke", "--device", "garden-camera-long-name", *data]) == 0
    capsys.readouterr()
    assert main(["token", "revoke", "--device", "cam7", *data]) == 1
    err = capsys.readouterr().err
    assert "'cam7' has no active token; nothing revoked" in err and err.count("\n") == 1
    assert main(["token", "list", *data]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [["device", "active", "revoked"], ["cam-7", "2", "0"],
                                                    ["garden-camera-long-name", "0", "1"]]
    assert len({len(line.rsplit("  ", 1)[0]) for line in lines}) == 1  # the columns aligned
    assert main(["token", "list", "--data", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.splitlines() == ["device  active  revoked  newest token (UTC)"]


def test_settings_priority_cli_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "receiver.toml"
    config.write_text('batch_size = 7\nmax_upload_bytes = 5000\nport = 9000\nmodel_packages = ["/m/a"]\n')
    monkeypatch.setenv("AEIC_MAX_UPLOAD_BYTES", "6000")
    monkeypatch.setenv("AEIC_CONFIG", str(config))
    settings = load_settings(port=9100, data_dir=tmp_path)
    assert (settings.batch_size, settings.max_upload_bytes, settings.port) == (7, 6000, 9100)
    assert settings.model_packages == [Path("/m/a")]
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path.resolve() / 'receiver.db'}"
    monkeypatch.setenv("AEIC_BATCH_SIZE", "0")
    assert main(["token", "create", "--device", "x", "--data", str(tmp_path)]) == 2


def test_missing_config_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "create", "--device", "x", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_a_new_data_directory_is_private(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Images and the database are readable by the service's user only; an existing open folder is
    kept as the operator made it, with a warning."""
    import stat

    data = tmp_path / "nested" / "data"
    assert main(["token", "create", "--device", "cam1", "--data", str(data)]) == 0
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert main(["token", "create", "--device", "cam1", "--data", str(shared)]) == 0
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755 and "mode 0755" in caplog.text
