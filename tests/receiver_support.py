"""Shared fixtures and helpers for the receiver tests: a real PostgreSQL server, stores on both
engines, decoder doubles that satisfy the ReceiverCodec contract, and a receiver process of its own
with such a double (`python receiver_support.py ...`, see `serve_with_double`)."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from aeic.receiver.auth import create_device_token
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import ImageRecord, MetadataStore, NewImage, SqlMetadataStore
from aeic.shared.bitstream import Bitstream, Header, pack, peek_header

from aeic import local_servers
from aeic.local_servers import ServerNotInstalled, free_port

if TYPE_CHECKING:
    from fastapi import FastAPI
    from selenium.webdriver import Chrome


def new_image(n: int, device: str = "cam1", key: str | None = None, size: tuple[int, int] = (64, 48),
              model: str = "54535431", sha: str = "a" * 64) -> NewImage:
    """The metadata of upload number ``n`` (ids and sizes follow ``n``), for stores tested without the API."""
    return NewImage(id=f"{n:032x}", device=device, idempotency_key=key, model_id=model, width=size[0],
                    height=size[1], rate_index=0, bytes=100 + n, sha256=sha)


def store_left_at(url: str, version: int, *downgrade: str, image: NewImage) -> ImageRecord:
    """A database an older receiver left: migrated, ``image`` stored, then taken back to schema ``version``
    by the ``downgrade`` statements; the migration tests open it again."""
    old = SqlMetadataStore.from_url(url)
    old.migrate()
    record, _ = old.insert_image(image)
    with old.engine.begin() as conn:
        for statement in downgrade:
            conn.execute(sa.text(statement))
        conn.execute(sa.text(f"DELETE FROM aeic_schema_version WHERE version > {version}"))
    old.close()
    return record


TEST_MODEL_ID = b"TST1"
# Set by .ci/run: a server or tool the tests start is missing -> the test fails instead of skipping, so CI
# cannot pass with the checks it promises (PostgreSQL, Redis, hadolint, compose, schemas) silently skipped.
REQUIRE_ENV = "AEIC_REQUIRE_TEST_TOOLS"


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose server or tool is not installed here; fail instead when REQUIRE_ENV is set."""
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason} [{REQUIRE_ENV} is set]", pytrace=False)
    pytest.skip(reason)


def started(server: AbstractContextManager[str]) -> Iterator[str]:
    """Yield the URL of a local server (`aeic.local_servers`) for a fixture and stop it afterwards; a server
    that is not installed skips the test (fails under REQUIRE_ENV)."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(server)
        except ServerNotInstalled as exc:
            unavailable(str(exc))
        yield url


def make_bitstream(width: int = 48, height: int = 32, payload: bytes = b"\x01\x02\x03",
                   model_id: bytes = TEST_MODEL_ID, rate_index: int = 0, downscale: int = 1) -> bytes:
    """A valid container (the payload is opaque to everything but the real decoder)."""
    header = Header(model_id, width, height, rate_index, (120, 110, 100, 40, 40, 40), downscale=downscale)
    return pack(Bitstream(header, payload))


def upload_stream(base: str, token: str, payload: bytes = b"\x01\x02\x03", size: tuple[int, int] = (48, 32)) -> str:
    """POST a :func:`make_bitstream` to a running receiver as the device of ``token``; its image id (202)."""
    reply = httpx.post(f"{base}/v1/images", content=make_bitstream(*size, payload=payload), timeout=10,
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
    assert reply.status_code == 202, reply.text
    return str(reply.json()["id"])

class FakeCodec:
    """Test double for the ReceiverCodec contract: deterministic images of the header's size.

    A payload starting with b"FAIL" raises, like a corrupt payload would in the real entropy decoder.
    """

    def __init__(self, model_id: bytes = TEST_MODEL_ID) -> None:
        self.model_id = model_id
        self.batches: list[int] = []

    def decode(self, data: bytes) -> np.ndarray:
        return self.decode_batch([data])[0]

    def decode_batch(self, items: list[bytes]) -> list[np.ndarray]:
        self.batches.append(len(items))
        out = []
        for data in items:
            header = peek_header(data)
            payload = data[header.size:-4]
            if payload.startswith(b"FAIL"):
                raise ValueError("corrupt payload: rANS stream ended early")
            value = sum(payload) % 256
            image = np.full((header.height, header.width, 3), value, dtype=np.uint8)
            image[:, : header.width // 2, 0] = 255
            out.append(image)
        return out


class BlockingCodec(FakeCodec):
    """Holds every batch until `release` is set (at most `hold_s`): a receiver in the middle of a long
    decode. `invert` gives other pixels than FakeCodec's, as a decode on another device may."""

    def __init__(self, hold_s: float = 30.0, invert: bool = False) -> None:
        super().__init__()
        self.hold_s, self.invert = hold_s, invert
        self.entered, self.release = threading.Event(), threading.Event()

    def decode_batch(self, items: list[bytes]) -> list[np.ndarray]:
        self.entered.set()
        if not self.release.wait(self.hold_s):
            raise TimeoutError("the test never released the batch")
        images = super().decode_batch(items)
        return [255 - image for image in images] if self.invert else images


def serve_with_double(data: str, database_url: str, blobs: str, port: str, lease_s: str, codec: str) -> None:
    """Run the receiver (`create_app` under uvicorn, as `aeic-receiver serve` does) in this process, with
    FakeCodec (`codec` "fake") or one whose decode never returns ("stuck": a process to kill -9 in the
    middle of a batch); blobs in a folder its peers share, standing for an object store."""
    import uvicorn
    from aeic.receiver.api import create_app
    from aeic.receiver.registry import CodecRegistry
    from aeic.receiver.settings import ReceiverSettings
    from aeic.receiver.storage import FilesystemBlobStore

    settings = ReceiverSettings(data_dir=Path(data), database_url=database_url, reclaim_after_s=float(lease_s),
                                poll_interval_s=0.05, retry_delay_s=0.0, admin_token="double-admin-token-0123456789")
    double = BlockingCodec(hold_s=3600.0) if codec == "stuck" else FakeCodec()
    app = create_app(settings, registry=CodecRegistry.from_codecs([double]),
                     blobs=FilesystemBlobStore(Path(blobs)))
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL server on loopback; yields a base URL without database name."""
    yield from started(local_servers.postgres_server())


@pytest.fixture()
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL server."""
    name = f"t_{secrets.token_hex(6)}"
    url = local_servers.create_database(postgres_server, name)
    admin = sa.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on the embedded SQLite database and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'receiver.db'}"
    return str(request.getfixturevalue("postgres_url"))


@contextmanager
def migrated_store(url: str) -> Iterator[SqlMetadataStore]:
    """The metadata store at `url`, migrated, closed on exit."""
    meta = SqlMetadataStore.from_url(url)
    meta.migrate()
    try:
        yield meta
    finally:
        meta.close()


def stored(store: MetadataStore, image_id: str) -> ImageRecord:
    """The record of an image the test knows is stored (a missing one fails here, not in an attribute)."""
    record = store.get_image(image_id)
    assert record is not None, f"image {image_id} is not in the store"
    return record


@pytest.fixture()
def store(database_url: str) -> Iterator[SqlMetadataStore]:
    """A migrated metadata store on each engine."""
    with migrated_store(database_url) as meta:
        yield meta


class ServerThread:
    """A real uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread: object = None

    def __enter__(self) -> ServerThread:  # noqa: PYI034 (typing.Self needs Python 3.11)
        import threading
        import time

        thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        thread.start()
        self._thread = thread
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(20)  # type: ignore[attr-defined]


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Chrome]:
    """Headless Debian Chromium driven by selenium through Debian's chromedriver (no downloads)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("chromium/chromium-driver not installed (install with .ci/install-system-deps.sh)")
    webdriver = pytest.importorskip("selenium.webdriver")
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


_TINY: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_package() -> Iterator[Path]:
    """A real (random-weight) model package, exported once per test process."""
    testing = pytest.importorskip("aeic.codec.testing", reason="aeic.codec.testing is not available")
    if "path" not in _TINY:
        root = Path(tempfile.mkdtemp(prefix="aeic-tiny-"))
        atexit.register(shutil.rmtree, root, True)
        _TINY["path"] = Path(testing.make_tiny_package(root / "package"))
    yield _TINY["path"]


def natural_photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth, colourful, deterministic stand-in for a photo (gradients, a block, mild noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 9.0)], axis=-1) * 200
    base += rng.uniform(0, 40, size=3) + rng.normal(0, 4, size=base.shape)
    image = base.clip(0, 255).astype(np.uint8)
    image[height // 4: height // 2, width // 4: width // 2] = rng.integers(0, 255, size=3, dtype=np.uint8)
    return image


if __name__ == "__main__":
    serve_with_double(*sys.argv[1:])


def make_tokens(settings: ReceiverSettings, *devices: str) -> dict[str, str]:
    """Device tokens created in the settings' database (made and migrated if new), by device name."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with migrated_store(settings.resolved_database_url()) as meta:
        return {device: create_device_token(meta, device) for device in devices}


def gallery_app(tmp_path: Path, admin: str, devices: tuple[str, ...] = ("cam1",),
                **overrides: Any) -> tuple[FastAPI, dict[str, str]]:
    """A receiver for the browser tests: the instant test decoder, quick polls and retries, a burst no test
    reaches, and a token for each device."""
    from aeic.receiver.api import create_app
    from aeic.receiver.registry import CodecRegistry

    values: dict[str, Any] = {"data_dir": tmp_path / "data", "admin_token": admin, "poll_interval_s": 0.05,
                              "retry_delay_s": 0.0, "rate_limit_burst": 1000, **overrides}
    settings = ReceiverSettings(**values)
    tokens = make_tokens(settings, *devices)
    return create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()])), tokens
