"""aeic.sender.config: defaults < config file (TOML/JSON) < AEIC_* env vars < flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from aeic.sender.config import ConfigError, load_config, misspelt_variables

TOML = """
receiver_url = "https://receiver.example:8000"
token = "from-file"
spool_dir = "/var/lib/aeic-sender/spool"
spool_max_items = 500
rate = 2
watch_poll = 5.0
camera_source = "rtsp://cam.local/stream"
"""


def test_defaults(tmp_path: Path) -> None:
    config = load_config({}, None, {"XDG_STATE_HOME": str(tmp_path)})
    assert config.receiver_url is None and config.token is None and config.rate is None
    assert config.spool_dir == tmp_path / "aeic" / "spool"
    assert config.spool_max_items == 100_000 and config.timeout == 30.0


def test_toml_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "sender.toml"
    path.write_text(TOML)
    config = load_config({}, path, {})
    assert config.receiver_url == "https://receiver.example:8000" and config.token_value() == "from-file"
    assert config.spool_dir == Path("/var/lib/aeic-sender/spool") and config.spool_max_items == 500
    assert config.rate == 2 and config.camera_source == "rtsp://cam.local/stream"

    env = {"AEIC_TOKEN": "from-env", "AEIC_SPOOL_MAX_ITEMS": "700", "AEIC_SENDER_CONFIG": str(path)}
    config = load_config({}, None, env)  # the file comes from AEIC_SENDER_CONFIG
    assert config.token_value() == "from-env" and config.spool_max_items == 700 and config.rate == 2

    config = load_config({"token": "from-flag", "target_bytes": 1500}, None, env)
    assert config.token_value() == "from-flag"
    assert config.target_bytes == 1500 and config.rate is None  # the flag's rate control wins


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "sender.json"
    path.write_text('{"receiver_url": "http://10.0.0.2:8000", "target_bytes": 1500, "threads": 2}')
    config = load_config({}, path, {})
    assert config.target_bytes == 1500 and config.threads == 2


def test_token_is_not_printed(tmp_path: Path) -> None:
    config = load_config({"token": "s3cret"}, None, {})
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('receiver_urll = "x"', "receiver_urll"),  # a typo is an error, not silently ignored
        ("rate = 1\ntarget_bytes = 10", "either rate or target_bytes"),
        ("threads = 0", "threads"),
        ("spool_max_bytes = -1", "spool_max_bytes"),
        ("rate = [", "not valid"),
    ],
)
def test_invalid_files_give_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config({}, path, {})


def test_invalid_env_value_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        load_config({}, None, {"AEIC_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config({}, tmp_path / "absent.toml", {})


DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "sender"


def test_shipped_example_config_is_valid() -> None:
    config = load_config({}, DEPLOY / "sender.toml", {})
    assert config.receiver_url and config.spool_dir == Path("/var/lib/aeic-sender/spool")


def test_readme_documents_every_key() -> None:
    from aeic.sender.config import SenderConfig

    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    missing = [key for key in SenderConfig.model_fields if f"| `{key}` |" not in readme]
    assert missing == []


def test_an_invalid_value_is_named_with_where_it_was_set(tmp_path: Path) -> None:
    """'timeout: Input should be a valid number' sent an operator to a config file that did not set it
    (AEIC_TIMEOUT in the unit's environment file did)."""
    path = tmp_path / "sender.toml"
    path.write_text('recieverurl = "http://x"\nthreads = "four"\n')
    with pytest.raises(ConfigError) as raised:
        load_config({"watch_poll": -1.0}, path, {"AEIC_TIMEOUT": "soon", "AEIC_TOKEN": "s3cret-t0ken"})
    message = str(raised.value)
    assert f"recieverurl (in {path}): unknown key" in message
    assert f"threads (in {path}):" in message
    assert "timeout (from AEIC_TIMEOUT):" in message
    assert "watch_poll (from the command line):" in message
    assert "\n" not in message and "s3cret" not in message


def test_a_misspelt_environment_variable_is_named() -> None:
    """AEIC_RECIEVER_URL in the unit's environment file was ignored without a word."""
    environ = {
        "AEIC_RECIEVER_URL": "https://x",  # transposed letters
        "AEIC_TOKN": "t",  # a letter short
        "AEIC_SPOOL_DIR": "/var/lib/aeic-sender/spool",  # a sender setting
        "AEIC_ADMIN_TOKEN": "a", "AEIC_MAX_ATTEMPTS": "3", "AEIC_CONFIG": "r.toml", "AEIC_DEVICE": "cpu",  # receiver's
    }
    assert misspelt_variables(environ) == [
        "environment variable AEIC_RECIEVER_URL is not a sender setting (ignored): AEIC_RECEIVER_URL?",
        "environment variable AEIC_TOKN is not a sender setting (ignored): AEIC_TOKEN?",
    ]


@pytest.mark.parametrize(
    "key", ["timeout", "backoff_base", "backoff_max", "item_backoff_max", "watch_poll", "camera_interval"]
)
@pytest.mark.parametrize("value", ["inf", "1e12"])
def test_a_wait_too_long_to_sleep_is_refused(key: str, value: str) -> None:
    """``AEIC_TIMEOUT=inf`` passed the check and the first upload died with a traceback (OverflowError from the
    socket's timeout; Python's waits end at about 9.2e9 s), a watch agent in a restart loop."""
    with pytest.raises(ConfigError, match=f"{key} \\(from AEIC_{key.upper()}\\): Input should be less than or equal"):
        load_config({}, None, {f"AEIC_{key.upper()}": value})


def test_limits_only_compared_may_be_infinite() -> None:
    """``retry_for`` and ``item_max_age`` are never waited on whole: infinity means keep trying, never reject."""
    config = load_config({}, None, {"AEIC_RETRY_FOR": "inf", "AEIC_ITEM_MAX_AGE": "inf"})
    assert config.retry_for == float("inf") and config.item_max_age == float("inf")
    with pytest.raises(ConfigError, match="retry_for"):
        load_config({}, None, {"AEIC_RETRY_FOR": "nan"})


@pytest.mark.parametrize(("name", "content"), [("sender.toml", b"rate = 3\r\n"), ("sender.json", b'{"rate": 3}')])
def test_a_config_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path, name: str, content: bytes) -> None:
    """Windows editors (Notepad before 2019, PowerShell's Out-File) start UTF-8 with a BOM: the file was refused
    as "Invalid statement (at line 1, column 1)", which names nothing to fix."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content)
    assert load_config({}, path, {}).rate == 3
