"""/docs is Swagger UI served by the receiver itself under its strict Content-Security-Policy: in headless
Chromium against a real uvicorn server it shows every operation of /openapi.json and runs one, with no
CSP violation or other error in the console and no request to another origin (the machine running the
tests has no internet, as many receivers have none: a page that needed a CDN would stay blank here).

Why: FastAPI's default pages load their script from a public CDN, ran with the CSP lifted on the origin
that holds the gallery's admin session, and did not load on an offline receiver."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import receiver_support
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, ServerThread
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

browser = receiver_support.browser

_OPERATIONS_JS = """
return [...document.querySelectorAll('.opblock')].map(o => [
  o.querySelector('.opblock-summary-method').textContent.toLowerCase(),
  o.querySelector('.opblock-summary-path').dataset.path]);
"""


def _app(tmp_path: Path) -> Any:
    settings = ReceiverSettings(data_dir=tmp_path / "data", admin_token="api-docs-admin-token")
    return create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))


def _operations(document: dict[str, Any]) -> list[list[str]]:
    return sorted([method, path] for path, item in document["paths"].items() for method in item)


def test_docs_page_names_nothing_but_this_origin(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path)) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "<script>" not in page.text and "http" not in page.text
        assert "'unsafe-inline'" not in page.headers["content-security-policy"]
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        for asset in ("/docs/swagger-ui/swagger-ui-bundle.js", "/docs/swagger-ui/swagger-ui.css",
                      "/static/api-docs.js"):
            assert client.get(asset).status_code == 200, asset
        # Redoc needs inline styles and FastAPI's OAuth2 redirect page inline script: neither is served.
        assert client.get("/redoc").status_code == 404
        assert client.get("/docs/oauth2-redirect").status_code == 404
        assert client.get("/openapi.json").json()["paths"]


def test_docs_files_are_compressed_and_named_by_their_content(tmp_path: Path) -> None:
    """Swagger UI's files went out uncompressed, 1.87 MB (the page took 13.5 s on Chrome's "3G" profile), under
    bare names with no Cache-Control, so browsers kept them by heuristic, unchecked, and after an upgrade of
    the package could run the old one. They are now gzipped and named by their content hash (cached for a year;
    the bare name is revalidated); the page answers HEAD as the gallery's pages do."""
    with TestClient(_app(tmp_path)) as client:
        assert client.head("/docs").status_code == 200
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', client.get("/docs").text)
        assert sorted(url.split("?")[0] for url in assets) == [
            "/docs/swagger-ui/swagger-ui-bundle.js", "/docs/swagger-ui/swagger-ui.css", "/static/api-docs.js"]
        moved = whole = 0
        for url in assets:
            path, _, query = url.partition("?")
            assert re.fullmatch(r"v=[0-9a-f]{16}", query), url
            packed = client.get(url, headers={"Accept-Encoding": "gzip"})
            plain = client.get(path, headers={"Accept-Encoding": "identity"})
            assert packed.content == plain.content, url  # httpx undid the gzip
            assert packed.headers["cache-control"] == "max-age=31536000, immutable", url
            assert plain.headers["cache-control"] == "no-cache", url
            assert client.get(path, headers={"If-None-Match": plain.headers["etag"]}).status_code == 304
            if len(plain.content) > 100_000:
                assert packed.headers["content-encoding"] == "gzip", url
            moved, whole = moved + packed.num_bytes_downloaded, whole + len(plain.content)
        assert whole > 1_800_000 and moved < whole / 3, (moved, whole)


def test_swagger_ui_renders_and_runs_the_operations_offline_under_the_csp(tmp_path: Path, browser: Any) -> None:
    with ServerThread(_app(tmp_path)) as server:
        expected = _operations(httpx.get(f"{server.url}/openapi.json").json())
        browser.get(f"{server.url}/docs")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == len(expected))
        assert sorted(browser.execute_script(_OPERATIONS_JS)) == expected

        # Try it out on GET /healthz: Swagger UI's request is same-origin, which the policy allows.
        health = browser.find_element(By.XPATH, "//div[contains(concat(' ', @class, ' '), ' opblock ')]"
                                                "[.//*[@data-path='/healthz']]")
        health.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
        wait.until(lambda d: health.find_elements(By.CSS_SELECTOR, ".try-out__btn"))[0].click()
        health.find_element(By.CSS_SELECTOR, ".execute").click()
        status = wait.until(lambda d: health.find_elements(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"))
        assert status[0].text.strip() == "200"

        origin = server.url
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(name.startswith(origin + "/") for name in resources), resources
        console = browser.get_log("browser")
        assert not console, console
