"""The receiver as an internet-facing service: browser-hardening headers, no internal detail or echoed
input in answers, secrets kept out of logs, and the gallery session's lifecycle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aeic.receiver.api import create_app
from aeic.receiver.auth import create_device_token
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import SqlMetadataStore
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, make_bitstream

ADMIN = "security-admin-token-0123456789"


class Env:
    """A running app (TestClient, in-process worker) and one token per device."""

    def __init__(self, client: TestClient, data: Path, tokens: dict[str, str]) -> None:
        self.client, self.data, self.tokens = client, data, tokens

    def bearer(self, who: str) -> dict[str, str]:
        token = ADMIN if who == "admin" else self.tokens[who]
        return {"Authorization": f"Bearer {token}"}

    def upload(self, who: str = "cam1") -> str:
        headers = {**self.bearer(who), "Content-Type": "application/octet-stream"}
        response = self.client.post("/v1/images", content=make_bitstream(), headers=headers)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])


def _settings(data: Path, **overrides: Any) -> ReceiverSettings:
    values: dict[str, Any] = {"data_dir": data, "admin_token": ADMIN, "poll_interval_s": 0.05,
                              "retry_delay_s": 0.0, "max_upload_bytes": 4096}
    return ReceiverSettings(**{**values, **overrides})


def _tokens(settings: ReceiverSettings, *devices: str) -> dict[str, str]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = SqlMetadataStore.from_url(settings.resolved_database_url())
    store.migrate()
    try:
        return {device: create_device_token(store, device) for device in devices}
    finally:
        store.close()


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Env]:
    settings = _settings(tmp_path / "data")
    tokens = _tokens(settings, "cam1", "cam2")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        yield Env(client, settings.data_dir, tokens)


# -- output --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/login", "/healthz", "/v1/images", "/images/" + "0" * 32])
def test_every_answer_carries_the_browser_hardening_headers(env: Env, path: str) -> None:
    response = env.client.get(path)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp


def test_api_docs_stay_usable_but_unframeable(env: Env) -> None:
    docs = env.client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-security-policy"] == "frame-ancestors 'none'"


def test_images_are_never_sniffed(env: Env) -> None:
    image_id = env.upload()
    for _ in range(200):
        thumb = env.client.get(f"/v1/images/{image_id}/thumbnail", headers=env.bearer("cam1"))
        if thumb.status_code == 200:
            break
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.headers["x-content-type-options"] == "nosniff"


def test_a_huge_cursor_is_not_echoed_back(env: Env) -> None:
    response = env.client.get("/v1/images", params={"cursor": "A" * 5000}, headers=env.bearer("admin"))
    assert response.status_code == 400 and len(response.text) < 300


def test_readiness_names_no_internal_path(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    state = env.client.app.state.receiver  # type: ignore[attr-defined]

    def unwritable() -> None:
        raise PermissionError(13, f"blob folder {env.data}/blobs is not writable")

    monkeypatch.setattr(state.blobs, "ping", unwritable)
    ready = env.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["blobs"] == "error: PermissionError: Permission denied"
    assert str(env.data) not in ready.text
