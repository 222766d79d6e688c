"""The OpenAPI document tells the truth: it is valid OpenAPI 3.1, every /v1 route declares the error body
for each status it can answer, and real answers (errors and successes) match what their route declares.

Why: clients are generated from /openapi.json; a status or body it does not declare breaks them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aeic.receiver.api import create_app
from aeic.receiver.auth import create_device_token
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import SqlMetadataStore
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from receiver_support import FakeCodec, make_bitstream

if TYPE_CHECKING:
    from httpx2 import (
        Response,  # what starlette's TestClient answers with (httpx2, not the httpx of the sender)
    )

ADMIN = "admin-secret-token"
ERROR_REF = "#/components/schemas/ErrorBody"


class Api:
    """A running app, its OpenAPI document and a device token."""

    def __init__(self, client: TestClient, device_token: str) -> None:
        self.client, self.doc = client, client.get("/openapi.json").json()
        self.auth = {"Authorization": f"Bearer {device_token}"}

    def check(self, response: Response, method: str, template: str) -> None:
        """The status is declared for the operation, and a JSON body matches the declared schema."""
        declared = self.doc["paths"][template][method.lower()]["responses"]
        status = str(response.status_code)
        assert status in declared, f"{method} {template}: {status} not declared ({sorted(declared)})"
        content = declared[status].get("content", {})
        media = response.headers.get("content-type", "").split(";")[0]
        if response.status_code in (204, 304) or method == "HEAD":
            return
        assert any(m.split(";")[0] == media for m in content), f"{media} not declared for {status}"
        if media == "application/json":
            schema = {**content["application/json"]["schema"], "components": self.doc["components"]}
            Draft202012Validator(schema).validate(response.json())


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[Api]:
    settings = ReceiverSettings(data_dir=tmp_path / "data", admin_token=ADMIN, poll_interval_s=0.05,
                                retry_delay_s=0.0, max_dimension=2048, max_upload_bytes=4096,
                                rate_limit_per_minute=60, rate_limit_burst=8)
    settings.data_dir.mkdir(parents=True)
    store = SqlMetadataStore.from_url(settings.resolved_database_url())
    store.migrate()
    token = create_device_token(store, "cam1")
    store.close()
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        yield Api(client, token)


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation


def test_the_document_is_valid_openapi(api: Api) -> None:
    assert api.doc["openapi"].startswith("3.")
    validate(api.doc)


def test_every_error_is_declared_with_the_error_body(api: Api) -> None:
    assert "HTTPValidationError" not in api.doc["components"]["schemas"]  # FastAPI's shape is never sent
    assert api.doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, method, operation in _operations(api.doc):
        responses = operation["responses"]
        if path.startswith("/v1/"):
            assert {"401", "503"} <= set(responses), f"{method} {path}"
            assert operation["security"] == [{"HTTPBearer": []}]
        for status, response in responses.items():
            if status.startswith(("4", "5")) and path not in ("/readyz", "/healthz"):  # their status bodies
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref == ERROR_REF, f"{method} {path} {status}"


def test_error_answers_match_the_document(api: Api) -> None:
    c, auth, octet = api.client, api.auth, {"Content-Type": "application/octet-stream"}
    missing = "/v1/images/" + "0" * 32
    cases: list[tuple[Response, str, str]] = [
        (c.get("/v1/images"), "GET", "/v1/images"),
        (c.get("/v1/images?device=cam2", headers=auth), "GET", "/v1/images"),
        (c.get("/v1/images?cursor=zz", headers=auth), "GET", "/v1/images"),
        (c.get("/v1/images?limit=0", headers=auth), "GET", "/v1/images"),
        (c.get("/v1/images?since=soon", headers=auth), "GET", "/v1/images"),
        (c.get("/v1/images?device=%00", headers={"Authorization": f"Bearer {ADMIN}"}), "GET", "/v1/images"),
        (c.post("/v1/images", content=b"x", headers={"Authorization": f"Bearer {ADMIN}", **octet}),
         "POST", "/v1/images"),
        (c.post("/v1/images", content=b"x", headers=auth), "POST", "/v1/images"),
        (c.post("/v1/images", content=b"", headers={**auth, **octet}), "POST", "/v1/images"),
        (c.post("/v1/images", content=b"x" * 5000, headers={**auth, **octet}), "POST", "/v1/images"),
        (c.post("/v1/images", content=make_bitstream(model_id=b"NOPE"), headers={**auth, **octet}),
         "POST", "/v1/images"),
        (c.get(missing, headers=auth), "GET", "/v1/images/{image_id}"),
        (c.delete(missing, headers=auth), "DELETE", "/v1/images/{image_id}"),
        (c.get(f"{missing}/reconstruction.gif", headers=auth), "GET", "/v1/images/{image_id}/reconstruction.{ext}"),
        (c.get(f"{missing}/thumbnail", headers=auth), "GET", "/v1/images/{image_id}/thumbnail"),
    ]
    for response, method, template in cases:
        assert 400 <= response.status_code < 500, response.text
        api.check(response, method, template)


def test_upload_conflicts_and_rate_limits_match_the_document(api: Api) -> None:
    headers = {**api.auth, "Content-Type": "application/octet-stream", "Idempotency-Key": "k1"}
    statuses = []
    for payload in (b"\x01", b"\x02", *[b"\x03"] * 8):
        response = api.client.post("/v1/images", content=make_bitstream(payload=payload), headers=headers)
        api.check(response, "POST", "/v1/images")
        statuses.append(response.status_code)
    assert statuses[:2] == [202, 409] and 429 in statuses


def _done(api: Api, image_id: str) -> Response:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        response = api.client.get(f"/v1/images/{image_id}", headers=api.auth)
        if response.json()["status"] == "done":
            return response
        time.sleep(0.02)
    raise AssertionError(f"{image_id} was not decoded")


def test_successful_answers_match_their_schemas(api: Api) -> None:
    c, auth = api.client, api.auth
    upload = c.post("/v1/images", content=make_bitstream(), headers={**auth, "Content-Type": "application/octet-stream"})
    api.check(upload, "POST", "/v1/images")
    image = f"/v1/images/{upload.json()['id']}"
    api.check(_done(api, upload.json()["id"]), "GET", "/v1/images/{image_id}")
    api.check(c.get("/v1/images", headers=auth), "GET", "/v1/images")
    for accept in ("image/png", "image/jpeg", "image/webp"):
        api.check(c.get(f"{image}/reconstruction", headers={**auth, "Accept": accept}),
                  "GET", "/v1/images/{image_id}/reconstruction")
    refused = c.get(f"{image}/reconstruction", headers={**auth, "Accept": "text/html"})
    api.check(refused, "GET", "/v1/images/{image_id}/reconstruction")
    api.check(c.get(f"{image}/reconstruction.webp", headers=auth), "GET", "/v1/images/{image_id}/reconstruction.{ext}")
    thumb = c.get(f"{image}/thumbnail", headers=auth)
    api.check(thumb, "GET", "/v1/images/{image_id}/thumbnail")
    cached = c.get(f"{image}/thumbnail", headers={**auth, "If-None-Match": thumb.headers["etag"]})
    assert cached.status_code == 304
    api.check(cached, "GET", "/v1/images/{image_id}/thumbnail")
    for path in ("/healthz", "/readyz", "/metrics"):
        api.check(c.get(path), "GET", path)
    api.check(c.delete(image, headers=auth), "DELETE", "/v1/images/{image_id}")


def test_method_not_allowed_names_every_method_of_the_path(api: Api) -> None:
    response = api.client.request("OPTIONS", "/v1/images/" + "0" * 32, headers=api.auth)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == "DELETE, GET, HEAD"
    assert api.client.put("/v1/images").headers["allow"] == "GET, HEAD, POST"
