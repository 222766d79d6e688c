"""The gallery's and Swagger UI's static files answer a revalidation (304) with the `Vary: Accept-Encoding`
their gzipped 200 carries (RFC 9110 15.4.5): without it a shared cache that refreshed its stored gzipped copy
from the 304 could lose the Vary and hand gzip to a client that never asked for it."""

from __future__ import annotations

from pathlib import Path

import pytest
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from fastapi.testclient import TestClient
from receiver_support import FakeCodec


@pytest.mark.parametrize("path", ["/docs/swagger-ui/swagger-ui-bundle.js", "/static/gallery.css"])
def test_a_304_of_a_gzipped_file_varies_on_accept_encoding(tmp_path: Path, path: str) -> None:
    settings = ReceiverSettings(data_dir=tmp_path / "data", admin_token="static-files-admin-token")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        whole = client.get(path, headers={"Accept-Encoding": "gzip"})
        assert whole.status_code == 200 and whole.headers["content-encoding"] == "gzip"
        assert whole.headers["vary"] == "Accept-Encoding"
        again = client.get(path, headers={"Accept-Encoding": "gzip", "If-None-Match": whole.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["vary"] == "Accept-Encoding"
