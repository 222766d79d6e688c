"""A receiver served under a sub-path (`root_path`): https://host/aeic/ behind nginx or an ingress that strips
the prefix before passing the request on. Every address a page, a script, a redirect or /docs names must
stay under the prefix: one that left it reached the proxy's other sites (or nothing) instead of the receiver.

`_StrippingProxy` stands in for the proxy (nginx's `location /aeic/ { proxy_pass http://receiver/; }`): it
answers only under the prefix and passes the rest of the path on, with no `root_path` of its own, so the
receiver knows the prefix from its setting alone, as it would behind a real proxy.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import receiver_support
from aeic.receiver.settings import ReceiverSettings
from aeic.sender.uploader import Uploader
from receiver_support import ServerThread, gallery_app, make_bitstream
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from starlette.types import ASGIApp, Receive, Scope, Send

ADMIN = "sub-path-admin-token"
PREFIX = "/aeic"

browser = receiver_support.browser

# Every address a page names in its markup.
_ADDRESS = re.compile(r'(?:href|src|action|data-exact|data-openapi-url)="([^"]*)"')


class _StrippingProxy:
    """Pass requests under PREFIX on with the prefix cut off; anything else is a 404 from "the proxy"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if not path.startswith(PREFIX + "/"):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain"), (b"x-proxy", b"outside")]})
            await send({"type": "http.response.body", "body": b"not the receiver"})
            return
        inner = path[len(PREFIX):]
        await self.app({**scope, "path": inner, "raw_path": scope["raw_path"][len(PREFIX):]}, receive, send)


def _addresses(page: str) -> list[str]:
    return [address for address in _ADDRESS.findall(page) if not address.startswith(("data:", "#"))]


def _under_prefix(client: httpx.Client, page: str) -> None:
    """Every address on `page` is under the prefix, and each one that is a file loads through the proxy."""
    addresses = _addresses(page)
    assert addresses
    outside = [address for address in addresses if not address.startswith(PREFIX + "/")]
    assert not outside, outside
    for address in addresses:
        if "/static/" in address or "/swagger-ui/" in address:
            assert client.get(address).status_code == 200, address


def test_pages_redirects_and_docs_stay_under_the_prefix(tmp_path: Path) -> None:
    app, tokens = gallery_app(tmp_path, ADMIN, root_path=PREFIX)
    with ServerThread(_StrippingProxy(app)) as server, httpx.Client(base_url=server.url) as client:  # type: ignore[arg-type]
        auth = {"Authorization": f"Bearer {tokens['cam1']}", "Content-Type": "application/octet-stream"}
        upload = client.post(f"{PREFIX}/v1/images", content=make_bitstream(), headers=auth)
        assert upload.status_code == 202, upload.text
        image_id = upload.json()["id"]

        # Anonymous, an image page is the sign-in form, which comes back to that page through the prefix.
        form = client.get(f"{PREFIX}/images/{image_id}")
        assert form.status_code == 200
        _under_prefix(client, form.text)
        assert f'name="next" value="/images/{image_id}"' in form.text
        signed_in = client.post(f"{PREFIX}/login", data={"token": ADMIN, "next": f"/images/{image_id}"})
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == f"{PREFIX}/images/{image_id}"
        link = client.get(f"{PREFIX}/login", params={"token": ADMIN})
        assert link.status_code == 303 and link.headers["location"] == f"{PREFIX}/"

        grid = client.get(f"{PREFIX}/")
        assert grid.status_code == 200 and image_id in grid.text
        _under_prefix(client, grid.text)
        page = client.get(f"{PREFIX}/images/{image_id}")
        assert page.status_code == 200
        _under_prefix(client, page.text)
        bitstream = client.get(f"{PREFIX}/images/{image_id}/bitstream")
        assert bitstream.status_code == 200 and bitstream.content == make_bitstream()

        # A browser's 404 page and the image a page cannot find lead back into the gallery.
        for nowhere in ("/nowhere", "/static/nowhere.css", "/docs/swagger-ui/nowhere.js"):  # in a mount too
            lost = client.get(f"{PREFIX}{nowhere}", headers={"Accept": "text/html"})
            assert lost.status_code == 404 and "Page not found" in lost.text, nowhere
            _under_prefix(client, lost.text)
        assert client.get(f"{PREFIX}/v1/nowhere", headers={"Accept": "text/html"}).json()["error"]["code"] == "not_found"

        # /docs loads Swagger UI and its document through the prefix; the document names the prefix as its
        # server, so "Try it out" sends its requests there.
        docs = client.get(f"{PREFIX}/docs")
        assert docs.status_code == 200
        _under_prefix(client, docs.text)
        assert f'data-openapi-url="{PREFIX}/openapi.json"' in docs.text
        assert client.get(f"{PREFIX}/openapi.json").json()["servers"] == [{"url": PREFIX}]

        out = client.post(f"{PREFIX}/logout")
        assert out.status_code == 303 and out.headers["location"] == f"{PREFIX}/"


def _wait_done(client: httpx.Client, address: str, headers: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        image: dict[str, Any] = client.get(address, headers=headers).json()
        if image["status"] == "done":
            return image
        time.sleep(0.05)
    raise AssertionError(f"{address} not decoded: {image}")


def test_every_address_the_api_answers_with_is_under_the_prefix(tmp_path: Path) -> None:
    """An API client behind https://host/aeic/ that followed the upload's Location or an image's `links` (in
    its status, the upload's answer and the listing) got the proxy's 404: they were paths from `/`."""
    app, tokens = gallery_app(tmp_path, ADMIN, root_path=PREFIX)
    with ServerThread(_StrippingProxy(app)) as server, httpx.Client(base_url=server.url) as client:  # type: ignore[arg-type]
        auth = {"Authorization": f"Bearer {tokens['cam1']}"}
        upload = client.post(f"{PREFIX}/v1/images", content=make_bitstream(),
                             headers={**auth, "Content-Type": "application/octet-stream"})
        assert upload.status_code == 202, upload.text
        image_id = upload.json()["id"]
        base = f"{PREFIX}/v1/images/{image_id}"
        assert upload.headers["location"] == base
        links = {"self": base, "reconstruction": f"{base}/reconstruction", "thumbnail": f"{base}/thumbnail"}
        assert upload.json()["links"] == links

        image = _wait_done(client, upload.headers["location"], auth)
        assert image["links"] == links
        listing = client.get(f"{PREFIX}/v1/images", headers=auth, params={"limit": 1}).json()
        assert [item["links"] for item in listing["items"]] == [links]
        for name, address in links.items():  # each one reaches the receiver through the proxy
            answer = client.get(address, headers=auth)
            assert answer.status_code == 200 and "x-proxy" not in answer.headers, (name, answer.text)
        assert client.get(f"{links['reconstruction']}.webp", headers=auth).status_code == 200

    # At the host's root (no prefix) the addresses are as they were.
    app, tokens = gallery_app(tmp_path / "root", ADMIN, worker=False)
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        upload = client.post("/v1/images", content=make_bitstream(), headers={
            "Authorization": f"Bearer {tokens['cam1']}", "Content-Type": "application/octet-stream"})
        image_id = upload.json()["id"]
        assert upload.headers["location"] == upload.json()["links"]["self"] == f"/v1/images/{image_id}"


def test_settings_take_a_prefix_as_a_proxy_gives_it() -> None:
    assert ReceiverSettings(root_path="/aeic/").root_path == "/aeic"
    assert ReceiverSettings(root_path="/").root_path is None
    assert ReceiverSettings(root_path="").root_path is None
    assert ReceiverSettings().root_path is None
    for wrong in ("aeic", "/ae ic", "/aeic?x=1", "https://host/aeic", "//host"):
        try:
            ReceiverSettings(root_path=wrong)
        except ValueError:
            continue
        raise AssertionError(f"{wrong!r} was taken as a root path")


def test_a_browser_uses_the_gallery_under_the_prefix(tmp_path: Path, browser: Chrome) -> None:
    app, tokens = gallery_app(tmp_path, ADMIN, root_path=PREFIX)
    with ServerThread(_StrippingProxy(app)) as server:  # type: ignore[arg-type]
        base = f"{server.url}{PREFIX}"
        browser.get(f"{base}/login?token={ADMIN}")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_elements(By.ID, "grid"))
        assert browser.current_url == f"{base}/"

        # The sender, given the receiver's address with its prefix, uploads there; the live grid (its
        # listing polled through the prefix) shows the picture once decoded.
        with Uploader(base, tokens["cam1"]) as uploader:
            sent = uploader.upload(make_bitstream(), "first")
        assert sent.status == 202 and sent.receiver_id is not None, sent
        image_id = sent.receiver_id
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#grid .card img'); return i !== null && i.complete && "
            "i.naturalWidth > 0 && i.closest('.card').dataset.id;") == image_id)
        assert browser.find_element(By.ID, "live").text == "Updating live"

        browser.find_element(By.CSS_SELECTOR, f'#grid .card[data-id="{image_id}"]').click()
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('reconstruction'); return i !== null && i.complete && i.naturalWidth;"))
        assert browser.current_url == f"{base}/images/{image_id}"
        styled = browser.execute_script("return getComputedStyle(document.querySelector('header.bar')).display")
        assert styled == "flex"  # gallery.css loaded
        links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "a[href]")]
        assert links and all(str(link).startswith(f"{base}/") for link in links), links

        browser.find_element(By.ID, "logout").click()
        wait.until(lambda d: d.find_elements(By.ID, "token"))
        assert browser.current_url == f"{base}/"


def test_a_waiting_image_page_polls_under_the_prefix(tmp_path: Path, browser: Chrome) -> None:
    app, tokens = gallery_app(tmp_path, ADMIN, root_path=PREFIX, worker=False)
    with ServerThread(_StrippingProxy(app)) as server:  # type: ignore[arg-type]
        base = f"{server.url}{PREFIX}"
        with Uploader(base, tokens["cam1"]) as uploader:
            image_id = uploader.upload(make_bitstream(), "waits").receiver_id
        browser.get(f"{base}/login?token={ADMIN}")
        browser.get(f"{base}/images/{image_id}")
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "waiting"))
        browser.execute_script("window.sameLoad = true;")  # gone if a poll's 404 reloaded the page
        time.sleep(2.5)  # two of image.js's polls, one a second
        assert browser.execute_script("return window.sameLoad === true;")
        assert "not updating" not in browser.find_element(By.ID, "waiting").text
        polls = browser.execute_script(
            "return performance.getEntriesByType('resource').filter(e => e.initiatorType === 'fetch')"
            ".map(e => [e.name, e.responseStatus]);")
        assert [f"{base}/v1/images/{image_id}", 200] in polls, polls


def test_a_proxy_that_keeps_the_prefix_and_probes_without_it_reach_the_same_receiver(tmp_path: Path) -> None:
    app, _ = gallery_app(tmp_path, ADMIN, root_path=PREFIX, worker=False)
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        form = client.get(f"{PREFIX}/login")  # as a proxy that passes /aeic/login on whole sends it
        assert form.status_code == 200
        _under_prefix(client, form.text)
        signed_in = client.post(f"{PREFIX}/login", data={"token": ADMIN})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == f"{PREFIX}/"
        assert client.get("/healthz").status_code == 200  # a probe of the pod itself, with no proxy
        assert client.get("/metrics").status_code == 200


def test_the_live_grid_shows_thumbnails_behind_a_proxy_that_keeps_the_prefix(tmp_path: Path, browser: Chrome) -> None:
    """The listing's links carry the prefix: the grid's script that added it again asked for /aeic/aeic/...,
    which a proxy passing the path on whole (here, none) left outside the receiver's routes."""
    app, tokens = gallery_app(tmp_path, ADMIN, root_path=PREFIX)
    with ServerThread(app) as server:
        base = f"{server.url}{PREFIX}"
        browser.get(f"{base}/login?token={ADMIN}")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_elements(By.ID, "grid"))
        with Uploader(base, tokens["cam1"]) as uploader:
            image_id = uploader.upload(make_bitstream(), "kept-prefix").receiver_id
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#grid .card img'); return i !== null && i.complete && "
            "i.naturalWidth > 0 && i.closest('.card').dataset.id;") == image_id)
        thumbnail = browser.find_element(By.CSS_SELECTOR, "#grid .card img").get_attribute("src")
        assert thumbnail == f"{base}/v1/images/{image_id}/thumbnail", thumbnail


def test_swagger_ui_runs_an_operation_through_the_prefix(tmp_path: Path, browser: Chrome) -> None:
    app, _ = gallery_app(tmp_path, ADMIN, root_path=PREFIX, worker=False)
    with ServerThread(_StrippingProxy(app)) as server:  # type: ignore[arg-type]
        base = f"{server.url}{PREFIX}"
        browser.get(f"{base}/docs")
        wait = WebDriverWait(browser, 30)
        health = wait.until(lambda d: d.find_elements(
            By.XPATH, "//div[contains(concat(' ', @class, ' '), ' opblock ')][.//*[@data-path='/healthz']]"))[0]
        health.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
        wait.until(lambda d: health.find_elements(By.CSS_SELECTOR, ".try-out__btn"))[0].click()
        health.find_element(By.CSS_SELECTOR, ".execute").click()
        status = wait.until(lambda d: health.find_elements(
            By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"))
        assert status[0].text.strip() == "200"  # the proxy answers 404 to anything outside the prefix
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert f"{base}/healthz" in resources and all(name.startswith(f"{base}/") for name in resources), resources
