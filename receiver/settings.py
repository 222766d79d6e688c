"""Receiver configuration from (highest priority first) CLI flags, `AEIC_*` environment variables,
a TOML config file, then defaults.

Why one object: the API, the worker, the storage and the CLI all read the same validated values, so a
wrong value fails at start-up instead of in the middle of a decode. A misspelt name fails too: the TOML
file takes only the names below, and an `AEIC_*` variable one edit or so away from a setting's name
(`AEIC_MAX_UPLOAD_BYTE`) is refused with the name it was probably meant to be; other `AEIC_*` names are
left alone, as the sender (`AEIC_ITEM_MAX_ATTEMPTS`) and the tests have variables of their own.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any, Literal

from aeic.shared.decode_limits import TILE_PIXELS
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

__all__ = ["CONFIG_ENV", "DEFAULT_BATCH_SIZE", "MAX_SECONDS", "ConfigError", "ReceiverSettings", "closest_setting", "load_settings"]

# Environment variable naming the TOML config file (the `--config` flag wins over it).
CONFIG_ENV = "AEIC_CONFIG"
# 1: on a CPU a batch is at most 5 % faster per image (slower at 768x512), peaks higher and makes its first
# image wait for the last (docs/benchmarks.md, receiver_cpu_batching*.json); GPU deployments set 8. The worker
# configs default to it too, so that one built in code without settings decodes as the receiver does.
DEFAULT_BATCH_SIZE = 1
# The longest duration a setting takes (a year): the worker waits with these, and a wait past the platform's
# time_t (poll_interval_s=1e10) killed its thread with an OverflowError, leaving the receiver not ready for good.
MAX_SECONDS = 365 * 24 * 3600.0


class ReceiverSettings(BaseSettings):
    """Every knob of the receiver service; each one is also `AEIC_<NAME>` in the environment."""

    # No inf or nan in a float setting: session_ttl_s=inf failed every sign-in (500), login_attempts_per_minute
    # =inf the start-up (an OverflowError traceback), and no setting means "unlimited" by it.
    model_config = SettingsConfigDict(env_prefix="AEIC_", extra="forbid", toml_file=None, allow_inf_nan=False)

    data_dir: Path = Field(Path("aeic-data"), description="Holds the SQLite database and the blob files.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/receiver.db. postgresql+psycopg:// works."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_upload_bytes: int = Field(1_000_000, ge=32, description="Largest accepted bitstream (HTTP 413 above).")
    upload_timeout_s: float = Field(60.0, gt=0, le=MAX_SECONDS, description="Most seconds an upload's or a sign-in form's body may take to arrive (408).")
    header_timeout_s: float = Field(
        20.0, gt=0, le=MAX_SECONDS, description="Most seconds a request's line and headers may take to arrive, from the "
        "connection opening (or a kept-alive connection's next request starting): the connection is then closed."
    )
    max_dimension: int = Field(16384, ge=1, le=16384, description="Largest accepted width or height.")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, le=256, description="Most compatible jobs decoded in one call.")
    max_attempts: int = Field(3, ge=1, le=100, description="Decode tries before an image is marked failed.")
    retry_delay_s: float = Field(2.0, ge=0, le=MAX_SECONDS, description="Delay before the first retry; doubles each attempt.")
    rate_limit_per_minute: float = Field(
        600.0, gt=0, description="Sustained decode cost per device per minute (a 1080p photo coded whole costs 1)."
    )
    rate_limit_burst: int = Field(60, ge=1, description="Decode cost a device may send back to back.")
    admin_token: SecretStr | None = Field(None, description="Bearer token that sees every device's images.")
    session_ttl_s: float = Field(43200.0, gt=0, le=MAX_SECONDS, description="Lifetime of a gallery sign-in (cookie and session).")
    cookie_secure: bool | None = Field(
        None, description="Secure flag of the gallery cookie; unset: only when the request came over HTTPS."
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="Proxies whose X-Forwarded-Proto/-For are trusted (comma list, '*' for any)."
    )
    root_path: str | None = Field(
        None, description="The path prefix a reverse proxy serves the receiver under (/aeic for https://host/aeic/), "
        "which the proxy strips: the gallery's links, redirects, /docs and the OpenAPI document's server name it."
    )
    login_attempts_per_minute: float = Field(
        10.0, gt=0, description="Failed gallery sign-ins and wrong API tokens per client address per minute."
    )
    allowed_hosts: str = Field(
        "*", description="Host names requests may name (comma list, '*' for any): other Hosts get 400, which "
        "stops DNS rebinding from reaching a receiver on a private address through a visitor's browser."
    )
    model_packages: list[Path] = Field(
        default_factory=list, description="Model package directories; empty means the shipped default."
    )
    device: str = Field("auto", description="Torch device for the decoder: auto, cpu, cuda, cuda:1 ...")
    decoder_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="What a full-profile package's SD-Turbo UNet and VAE compute in: float16 or bfloat16 "
        "halve their memory on a GPU (float16 needs one); the codec's own layers stay float32."
    )
    decode_tile_pixels: int = Field(
        TILE_PIXELS, ge=64 * 64, description="Padded coded pixels the pixel decoder renders in one pass: a larger "
        "picture is rendered in tiles, which bounds a decode's memory (default 1536x1536: a 1080p photo coded "
        "whole is one pass, its output unchanged)."
    )
    worker: bool = Field(True, description="Run the decode worker inside the API process.")
    poll_interval_s: float = Field(1.0, gt=0, le=MAX_SECONDS, description="Worker sleep when idle and not woken by an upload.")
    thumbnail_px: int = Field(320, ge=16, le=2048, description="Longest side of gallery thumbnails.")
    # Scale-out (issue 8): shared blob store, decode queue, worker processes.
    blob_url: str | None = Field(None, description="s3://bucket/prefix for blobs; default files under data_dir.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO), e.g. http://minio:9000.")
    queue: str | None = Field(None, description="redis://host:port/db: enqueue decodes for `aeic-receiver worker`; "
                              "the API replicas' rate limits are kept there too, one budget for them all.")
    reclaim_after_s: float = Field(
        60.0, gt=0, le=MAX_SECONDS, description="Lease of a decode claim: one not renewed for this long is a dead worker's, taken over."
    )
    decode_deadline_s: float = Field(
        120.0, gt=0, le=MAX_SECONDS, description="Seconds a claimed batch may take per unit of decode cost (a 1080p photo coded "
        "whole; every image at least one) before it counts as hung: its images get a failed attempt and go to "
        "another worker (or the next start), its lease is no longer renewed, a late result is dropped, and "
        "/healthz answers 503 so the process is restarted."
    )
    hung_exit_grace_s: float = Field(
        10.0, ge=0, le=MAX_SECONDS, description="`aeic-receiver worker` only: seconds after a hung batch was given up before the "
        "process exits with status 75 if its decode still has not returned, so that a supervisor that restarts "
        "exited containers (Docker Compose, Kubernetes) recovers it. The embedded worker of `serve` never exits."
    )

    @field_validator("data_dir", "model_packages", mode="after")
    @classmethod
    def _expand_home(cls, value: Path | list[Path]) -> Path | list[Path]:
        """`~` in a path from the config file or the environment means the home folder, as in a shell: no shell
        expands it there, and `data_dir = "~/aeic"` made a folder named `~` in the working directory."""
        if isinstance(value, list):
            return [path.expanduser() for path in value]
        return value.expanduser()

    @field_validator("allowed_hosts", mode="after")
    @classmethod
    def _some_host(cls, value: str) -> str:
        """A list that names no host would answer 400 to every request, the probes' included, while the
        process looked healthy to itself: refused at start instead."""
        if not any(host.strip() for host in value.split(",")):
            raise ValueError("names no host: give host names (comma list), or '*' for any")
        return value

    @field_validator("root_path", mode="after")
    @classmethod
    def _path_prefix(cls, value: str | None) -> str | None:
        """A prefix as pages join it to their paths: `/aeic/` and `/aeic` alike are `/aeic`, `/` is none. Not a
        URL, a relative path or one with a space, `?` or `#`: each would make every link of the gallery wrong."""
        value = (value or "").rstrip("/")
        if not value:
            return None
        if (not value.startswith("/") or value.startswith("//")
                or not all("!" <= ch <= "~" and ch not in "?#\\" for ch in value)):
            raise ValueError("must be a path such as /aeic (the prefix the proxy serves the receiver under)")
        return value

    @field_validator("queue", "blob_url", mode="after")
    @classmethod
    def _url_scheme(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A queue or blob URL of another scheme fails here, where its value (which may carry a password) is
        not repeated; the backends' own checks quoted it whole, on a traceback from `serve`'s start-up."""
        if value is None:
            return None
        if info.field_name == "queue" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be redis://[:password@]host:port/db (or rediss://, unix://)")
        if info.field_name == "blob_url" and not (value.startswith("s3://") and len(value) > len("s3://")):
            raise ValueError("must be s3://bucket or s3://bucket/prefix")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """CLI (init kwargs) > environment > TOML file > defaults."""
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    def resolved_database_url(self) -> str:
        """The configured URL, or the embedded SQLite file inside the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'receiver.db').resolve()}"


class ConfigError(ValueError):
    """A setting the command line refuses in one line: a config file that cannot be read as TOML, an
    environment variable that misspells a setting, a device or a backend that is not there."""


def closest_setting(name: str) -> str | None:
    """The setting `name` was probably meant to be (a typo's: a character or two added, dropped or changed),
    or None. A longer name that contains a setting's, as the sender's `item_max_attempts` does
    `max_attempts`, is another tool's, not a typo."""
    matches = difflib.get_close_matches(name.lower(), ReceiverSettings.model_fields, n=3, cutoff=0.8)
    return next((match for match in matches if abs(len(match) - len(name)) <= 2), None)


def _check_environment() -> None:
    """Refuse an `AEIC_*` variable that is a near miss of a setting's name: it would be ignored silently."""
    prefix = ReceiverSettings.model_config.get("env_prefix", "")
    for variable in sorted(os.environ):
        upper = variable.upper()
        if not upper.startswith(prefix) or upper == CONFIG_ENV:
            continue
        name = upper[len(prefix):].lower()
        if name in ReceiverSettings.model_fields:
            continue
        meant = closest_setting(name)
        if meant is not None:
            raise ConfigError(f"environment variable {variable} is not a receiver setting: did you mean "
                              f"{prefix}{meant.upper()}?")


def _check_toml(config: Path) -> None:
    """Parse `config` once here, so a syntax error is one line naming the file and the place."""
    try:
        with config.open("rb") as file:
            tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config} is not valid TOML: {exc}") from None


def load_settings(config_file: Path | None = None, **overrides: Any) -> ReceiverSettings:
    """Build settings from all sources; `overrides` are CLI values (None means "not given")."""
    _check_environment()
    config = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    given = {key: value for key, value in overrides.items() if value is not None}
    if config is None:
        return ReceiverSettings(**given)
    if not config.is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    _check_toml(config)
    with_file = type(
        "ReceiverSettingsFromFile",
        (ReceiverSettings,),
        {"model_config": SettingsConfigDict(**{**ReceiverSettings.model_config, "toml_file": config})},
    )
    return with_file(**given)
