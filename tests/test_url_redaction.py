"""aeic.shared.url_redaction: the one rule both sides' log lines use for URLs that may carry a password."""

from __future__ import annotations

import pytest
from aeic.shared.url_redaction import without_password


@pytest.mark.parametrize(("url", "shown"), [
    ("http://user:secret@proxy.example:3128", "http://user:***@proxy.example:3128"),
    ("rtsp://admin:p%40ss@Cam.Local/stream1", "rtsp://admin:***@Cam.Local/stream1"),  # case and path kept
    # the sender's copy rebuilt the host from .hostname: "user:***@::1:6379", not a URL any more
    ("redis://user:pw@[::1]:6379/0", "redis://user:***@[::1]:6379/0"),
    ("postgresql+psycopg://aeic:pw@db:5432/aeic", "postgresql+psycopg://aeic:***@db:5432/aeic"),
    ("http://user@host/", "http://user@host/"),  # no password: as given
    ("https://host:8443/path?q=1", "https://host:8443/path?q=1"),
])
def test_only_the_password_is_replaced(url: str, shown: str) -> None:
    assert without_password(url) == shown
