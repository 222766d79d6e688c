"""Sender settings: one validated model filled from defaults, a config file, env vars and flags.

Precedence, lowest to highest: built-in defaults < config file (``--config`` or
``AEIC_SENDER_CONFIG``; TOML by default, JSON when the name ends in ``.json``) < environment
variables (``AEIC_`` + the key in upper case, e.g. ``AEIC_TOKEN``, ``AEIC_RECEIVER_URL``)
< command-line flags. Unknown keys in a file are an error, so a typo is reported instead
of silently ignored. The format is documented in deploy/sender/README.md.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from aeic.sender.forward import ItemPolicy
from aeic.sender.spool import DEFAULT_MAX_BYTES, DEFAULT_MAX_ITEM_BYTES, DEFAULT_MAX_ITEMS

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the sender extra installs tomli there
    import tomli as tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "AEIC_"
CONFIG_ENV = "AEIC_SENDER_CONFIG"
# The longest a setting the sender sleeps or waits on may be, seconds (a year). Python's waits and socket
# timeouts end at about 9.2e9 s: ``timeout = inf`` passed the check and the first upload died with a traceback.
LONGEST_WAIT = 365 * 86400.0


class ConfigError(ValueError):
    """The settings are invalid; the message says which key and why."""


def default_spool_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/aeic/spool`` (``~/.local/state/aeic/spool``) for an interactive user."""
    environ = os.environ if environ is None else environ
    state = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "aeic" / "spool"


class SenderConfig(BaseModel):
    """Every setting of ``aeic-send``; field names are the config-file keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Receiver and transport.
    receiver_url: str | None = Field(None, description="receiver base URL, e.g. https://host:8000")
    token: SecretStr | None = Field(None, description="per-device bearer token")
    ca_bundle: Path | None = Field(None, description="PEM CA bundle replacing the system store")
    timeout: float = Field(
        30.0, gt=0, le=LONGEST_WAIT, description="seconds a whole upload request may take, answer included"
    )
    retry_for: float = Field(60.0, ge=0, description="one-shot commands: seconds to keep retrying")
    backoff_base: float = Field(1.0, gt=0, le=LONGEST_WAIT, description="first retry delay, seconds")
    backoff_max: float = Field(300.0, gt=0, le=LONGEST_WAIT, description="longest retry delay, seconds")
    item_max_attempts: int = Field(
        ItemPolicy.max_attempts, ge=1, description="an item failing while the receiver accepts others is "
        "rejected after this many such failures, once they span item_max_age")  # fmt: skip
    item_max_age: float = Field(ItemPolicy.max_age, ge=0, description="seconds, see item_max_attempts")
    item_backoff_max: float = Field(
        ItemPolicy.backoff_max, gt=0, le=LONGEST_WAIT,
        description="longest delay between tries of an item set aside, seconds",
    )

    # Spool.
    spool_dir: Path = Field(default_factory=default_spool_dir)
    spool_max_items: int = Field(DEFAULT_MAX_ITEMS, ge=1)
    spool_max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1)
    spool_max_item_bytes: int = Field(
        DEFAULT_MAX_ITEM_BYTES, ge=1, description="a pending file larger than this is rejected unread"
    )

    # Encoder.
    model: Path | None = Field(None, description="model package directory (default: the shipped one)")
    provider: str | None = Field(
        None, description="onnxruntime execution provider, e.g. CUDAExecutionProvider"
    )
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads")
    downscale: Literal["auto", 1, 2, 4] = Field("auto", description="coding downscale; auto: by image size")
    rate: int | None = Field(None, ge=0, le=255, description="rate index")
    target_bytes: int | None = Field(None, ge=1, description="byte budget per image")

    @field_validator("downscale", mode="before")
    @classmethod
    def _downscale_from_text(cls, value: Any) -> Any:
        """An environment variable or a JSON string says "2"; the model wants the number."""
        return int(value) if isinstance(value, str) and value.isdigit() else value

    # Folder watcher.
    watch_poll: float = Field(2.0, gt=0, le=LONGEST_WAIT, description="seconds between folder scans")
    watch_recursive: bool = False

    # Camera.
    camera_source: str | None = Field(None, description="0, /dev/videoN or rtsp://...")
    camera_interval: float = Field(10.0, gt=0, le=LONGEST_WAIT, description="seconds between frames")

    @model_validator(mode="after")
    def _one_rate_control(self) -> SenderConfig:
        if self.rate is not None and self.target_bytes is not None:
            raise ValueError("give either rate or target_bytes, not both")
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must be at least backoff_base")
        return self

    def token_value(self) -> str | None:
        return self.token.get_secret_value() if self.token is not None else None


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML (default) or JSON (``.json``) config file into a flat dict."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    is_json = path.suffix.lower() == ".json"
    try:
        text = raw.decode("utf-8-sig")  # a BOM (Windows editors write one) is dropped, not "Invalid statement"
        data = json.loads(text) if is_json else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object of settings")
    return data


def env_values(environ: Mapping[str, str]) -> dict[str, str]:
    """``AEIC_<KEY>`` variables for every known key (strings; the model converts them)."""
    values = {}
    for key in SenderConfig.model_fields:
        value = environ.get(ENV_PREFIX + key.upper())
        if value is not None and value != "":
            values[key] = value
    return values


def misspelt_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per ``AEIC_*`` variable a letter or two away from a sender setting's name.

    Why: a typo in the unit's environment file (``AEIC_RECIEVER_URL``) was ignored without a word. Only
    near misses are named: the receiver's and other tools' ``AEIC_*`` variables are no concern here.
    """
    environ = os.environ if environ is None else environ
    known = sorted({ENV_PREFIX + key.upper() for key in SenderConfig.model_fields} | {CONFIG_ENV})
    lines = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = [candidate for candidate in known if _edit_distance(name, candidate) <= 2]
            if close:
                lines.append(f"environment variable {name} is not a sender setting (ignored): {close[0]}?")
    return lines


def exposed_files(
    config: SenderConfig, config_path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> list[str]:
    """One warning per file or folder of the settings that lets every user of the device read or redirect
    the token, or upload as the device.

    Why: a config file holding ``token`` that anyone may read gives the device's token to every local
    user; a config file anyone may write lets any of them point ``receiver_url`` at their own server,
    which the agent then sends the token (and the images) to; a CA bundle anyone may write lets them add
    a certificate for the receiver's name; a spool anyone may write lets them queue their own pictures.
    A warning, not a refusal: the agent keeps delivering while the operator fixes the mode (``chmod o-rw``).
    """
    environ = os.environ if environ is None else environ
    lines = []
    path = config_path or environ.get(CONFIG_ENV)
    mode = _mode(Path(path)) if path else None
    if mode is not None and mode & 0o002:
        lines.append(f"config file {path} can be changed by any user of this device (mode {mode:04o}): whoever "
                     f"changes receiver_url gets the device token; chmod o-w {path}")  # fmt: skip
    if mode is not None and mode & 0o004 and path and "token" in read_config_file(Path(path)):
        lines.append(f"config file {path} holds the device token and any user of this device can read it (mode "
                     f"{mode:04o}): chmod o-r {path}, or move the token to AEIC_TOKEN in a file only root reads "
                     "(the unit's EnvironmentFile)")  # fmt: skip
    bundle_mode = _mode(config.ca_bundle) if config.ca_bundle is not None else None
    if bundle_mode is not None and bundle_mode & 0o002:
        lines.append(f"CA bundle {config.ca_bundle} can be changed by any user of this device (mode "
                     f"{bundle_mode:04o}): a certificate added to it can pose as the receiver; chmod o-w it")  # fmt: skip
    spool_mode = _mode(config.spool_dir)
    if spool_mode is not None and spool_mode & 0o002:
        lines.append(f"spool {config.spool_dir} can be written by any user of this device (mode {spool_mode:04o}): "
                     "what they put in it is uploaded as this device's images; chmod o-w it")  # fmt: skip
    return lines


def _mode(path: Path) -> int | None:
    """The permission bits of ``path`` (of its target for a link), or None when it cannot be examined."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return None


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, char in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1]


def load_config(
    cli_values: Mapping[str, Any] | None = None,
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> SenderConfig:
    """Merge defaults, file, environment and flags (``None`` flags are 'not given')."""
    environ = os.environ if environ is None else environ
    path = config_path or environ.get(CONFIG_ENV)
    layers = [
        (read_config_file(Path(path)) if path else {}, f"in {path}"),
        (env_values(environ), "from " + ENV_PREFIX + "{KEY}"),
        ({k: v for k, v in (cli_values or {}).items() if v is not None}, "from the command line"),
    ]
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}  # where each value came from, for the error line
    for layer, origin in layers:
        # rate and target_bytes exclude each other: a higher layer's choice replaces a lower one's.
        for key, other in (("rate", "target_bytes"), ("target_bytes", "rate")):
            if key in layer:
                merged.pop(other, None)
        merged.update(layer)
        origins.update({key: origin.replace("{KEY}", str(key).upper()) for key in layer})
    merged.setdefault("spool_dir", default_spool_dir(environ))
    try:
        return SenderConfig(**merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins)) from None


def _describe(exc: ValidationError, origins: Mapping[str, str]) -> str:
    """One line naming each bad key and where it was set: a value from ``AEIC_TIMEOUT`` is not looked
    for in the config file. The values themselves are not shown (one may be the token)."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        origin = origins.get(str(error["loc"][0])) if error["loc"] else None
        message = "unknown key (a typo?)" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{where} ({origin}): {message}" if origin else f"{where}: {message}")
    return "invalid settings: " + "; ".join(problems)
