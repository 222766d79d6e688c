"""Deleting an image from the gallery: the image page's two-step "Delete this image…" form, who may use it,
that no other site's page can, what it leaves of an image being decoded, and what open pages see. Against a
real uvicorn server, over HTTP and in headless Chromium (the decoder is the instant test double)."""

from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import receiver_support
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from fastapi import FastAPI
from receiver_support import BlockingCodec, FakeCodec, ServerThread, gallery_app, make_tokens
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from test_receiver_api import DeletesFailing
from test_receiver_gallery_a11y import _low_contrast
from test_receiver_sub_path import PREFIX, _StrippingProxy, _under_prefix

ADMIN = "gallery-delete-admin-token-0123456789"
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}  # what Chromium sends with the image page's own form

browser = receiver_support.browser


_upload = receiver_support.upload_stream


def _status(base: str, image_id: str) -> str | None:
    """The image's status as the admin sees it; None once it is gone."""
    reply = httpx.get(f"{base}/v1/images/{image_id}", headers={"Authorization": f"Bearer {ADMIN}"})
    return None if reply.status_code == 404 else str(reply.json()["status"])


def _wait_done(base: str, *ids: str) -> None:
    deadline = time.monotonic() + 20
    while not all(_status(base, i) == "done" for i in ids):
        assert time.monotonic() < deadline, [_status(base, i) for i in ids]
        time.sleep(0.05)


def _files_of(tmp_path: Path, image_id: str) -> list[str]:
    """Every file the receiver keeps of the image (bitstream, PNG, thumbnail, conversions)."""
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "data").rglob(f"{image_id}*"))


@contextmanager
def _session(base: str, token: str) -> Iterator[httpx.Client]:
    """A client signed in to the gallery with `token`, holding its session cookie."""
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.post("/login", data={"token": token}).status_code == 303
        yield client


def _delete(client: httpx.Client, image_id: str, **headers: str) -> httpx.Response:
    return client.post(f"/images/{image_id}/delete", headers=headers or SAME_ORIGIN)


def test_the_owner_deletes_from_the_image_page_and_returns_to_the_grid_saying_so(tmp_path: Path) -> None:
    """A device's session deletes its own image: the row and every file go (a JPEG made by a download too),
    and the grid it lands on says so, in its title as well (what a screen reader reads out on arrival)."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server, _session(server.url, tokens["cam1"]) as cam1:
        image_id, kept = _upload(server.url, tokens["cam1"]), _upload(server.url, tokens["cam1"], b"\x04")
        _wait_done(server.url, image_id, kept)
        assert cam1.get(f"/v1/images/{image_id}/reconstruction.jpg").status_code == 200  # a kept conversion
        page = cam1.get(f"/images/{image_id}").text
        assert f'<form method="post" action="/images/{image_id}/delete">' in page
        assert len(_files_of(tmp_path, image_id)) == 4, _files_of(tmp_path, image_id)

        answer = _delete(cam1, image_id)
        assert answer.status_code == 303 and answer.headers["location"] == f"/?deleted={image_id}"
        assert _status(server.url, image_id) is None and _files_of(tmp_path, image_id) == []
        assert _status(server.url, kept) == "done" and len(_files_of(tmp_path, kept)) == 3
        grid = cam1.get(answer.headers["location"])
        assert '<p id="notice" class="notice" role="status">Image deleted.</p>' in grid.text
        assert "<title>Image deleted · Received images · AEIC receiver</title>" in grid.text
        assert image_id not in grid.text.replace(f"?deleted={image_id}", "") and kept in grid.text
        # Sent again (a second tab, Back and resubmit): nothing is left to delete, and the page says so.
        again = _delete(cam1, image_id)
        assert again.status_code == 404 and f"No image {image_id}." in again.text


def test_who_may_delete_is_whom_the_api_lets_delete(tmp_path: Path) -> None:
    """Another device's session deletes nothing (404, as the API answers); the admin's deletes any image."""
    app, tokens = gallery_app(tmp_path, ADMIN, ("cam1", "cam2"))
    with (ServerThread(app) as server, _session(server.url, tokens["cam2"]) as cam2,
          _session(server.url, ADMIN) as admin):
        image_id = _upload(server.url, tokens["cam1"])
        _wait_done(server.url, image_id)
        refused = _delete(cam2, image_id)
        assert refused.status_code == 404 and "Image not found" in refused.text
        assert _status(server.url, image_id) == "done"
        assert "delete" in admin.get(f"/images/{image_id}").text
        assert _delete(admin, image_id).status_code == 303 and _status(server.url, image_id) is None


def test_a_post_from_another_site_or_without_a_session_deletes_nothing(tmp_path: Path) -> None:
    """The session cookie goes with a form another site's page posts (SameSite=Lax lets a same-site one, a
    sibling subdomain's, through): such a post is refused whatever it carries. Without a session it is the
    token form, which leads back to the image. The API still takes no cookie for a DELETE."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server, _session(server.url, tokens["cam1"]) as cam1:
        image_id = _upload(server.url, tokens["cam1"])
        _wait_done(server.url, image_id)
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Origin": "http://attacker.example"}, {"Origin": "null"}):
            answer = _delete(cam1, image_id, **headers)
            assert answer.status_code == 403 and "Not deleted" in answer.text, headers
        assert cam1.delete(f"/v1/images/{image_id}").status_code == 401
        anonymous = httpx.post(f"{server.url}/images/{image_id}/delete", headers=SAME_ORIGIN)
        assert anonymous.status_code == 401 and "Your session has ended" in anonymous.text
        assert f'<input type="hidden" name="next" value="/images/{image_id}">' in anonymous.text
        assert _status(server.url, image_id) == "done" and len(_files_of(tmp_path, image_id)) == 3
        assert _delete(cam1, image_id).status_code == 303  # the same session, from the gallery's own page


def test_the_grid_says_deleted_only_of_an_image_that_is_gone(tmp_path: Path) -> None:
    """`/?deleted=ID` is a link anyone can make: it must not make the gallery claim a present image is gone."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server, _session(server.url, ADMIN) as admin:
        present = _upload(server.url, tokens["cam1"])
        for value, said in ((present, False), ("0" * 32, True), ("<b>x</b>", False), ("", False)):
            page = admin.get("/", params={"deleted": value})
            assert page.status_code == 200 and ('id="notice"' in page.text) is said, value


def _tab_to(driver: Chrome, element_id: str, most: int = 20) -> None:
    for _ in range(most):
        driver.switch_to.active_element.send_keys(Keys.TAB)
        if driver.execute_script("return document.activeElement.id") == element_id:
            return
    raise AssertionError(f"Tab never reached #{element_id}")


def _accessible(driver: Chrome, name: str) -> tuple[str, dict[str, Any]]:
    """The role and properties a screen reader is given for the (unignored) node named `name`."""
    for node in driver.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]:
        if not node.get("ignored") and node.get("name", {}).get("value") == name and node["role"]["value"] not in (
                "StaticText", "InlineTextBox"):
            return node["role"]["value"], {p["name"]: p["value"].get("value") for p in node.get("properties", [])}
    raise AssertionError(f"nothing named {name!r} in the accessibility tree")


def test_delete_by_keyboard_and_a_grid_open_in_another_tab_drops_the_image(tmp_path: Path, browser: Chrome) -> None:
    """Keyboard only: Tab to "Delete this image…", Enter opens the step that says what goes, Tab and Enter on
    "Delete permanently" delete it and land on the grid with a status line. The grid left open in another
    tab drops the card when shown again. On a phone the open step fits, its targets touch-sized, and it meets
    AA contrast."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server:
        image_id, kept = _upload(server.url, tokens["cam1"]), _upload(server.url, tokens["cam1"], b"\x04")
        _wait_done(server.url, image_id, kept)
        browser.get(f"{server.url}/login?token={tokens['cam1']}")
        grid_tab = browser.current_window_handle
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, f'.card[data-id="{image_id}"]'))
        browser.switch_to.new_window("tab")
        browser.get(f"{server.url}/images/{image_id}")
        assert not browser.find_element(By.ID, "delete-confirm").is_displayed()  # one step is not enough
        _tab_to(browser, "delete-open")
        role, says = _accessible(browser, "Delete this image…")
        assert role == "DisclosureTriangle" and says["expanded"] is False, (role, says)
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        assert browser.execute_script("return document.getElementById('delete').open") is True
        assert _accessible(browser, "Delete this image…")[1]["expanded"] is True
        assert _accessible(browser, "Delete permanently")[0] == "button"
        _tab_to(browser, "delete-confirm", most=1)
        button = browser.find_element(By.ID, "delete-confirm")
        assert button.accessible_name == "Delete permanently"
        assert browser.execute_script(
            "return document.getElementById('delete-confirm').ariaDescribedByElements.map(e => e.textContent)"
        ) == [("The picture, its downloads and the bitstream as the device sent it are removed from the receiver. "
               "This cannot be undone.")]
        browser.set_window_size(360, 740)  # a phone: the open step fits its width, its targets are touch-sized
        width = browser.execute_script("return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width[0] <= width[1], width
        sizes = browser.execute_script(
            "return ['#delete-open', '#delete-confirm'].map(s => document.querySelector(s).getBoundingClientRect())"
            ".map(r => [r.width, r.height])")
        assert all(w >= 44 and h >= 44 for w, h in sizes), sizes
        assert not _low_contrast(browser, "#delete, #delete *")
        browser.switch_to.active_element.send_keys(Keys.ENTER)

        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "notice"))
        assert browser.current_url == f"{server.url}/?deleted={image_id}"
        assert browser.title == "Image deleted · Received images · AEIC receiver"
        notice = browser.find_element(By.ID, "notice")
        assert notice.text == "Image deleted." and notice.get_attribute("role") == "status"
        assert not _low_contrast(browser, "#notice")
        assert browser.execute_script("return [...document.querySelectorAll('#grid .card')].map(c => c.dataset.id)"
                                      ) == [kept]

        browser.switch_to.window(grid_tab)
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#grid .card')].map(c => c.dataset.id)") == [kept])


class _AttackerPage(BaseHTTPRequestHandler):
    """Another site's page that makes its visitor's browser post the gallery's delete form at once."""

    target = ""

    def do_GET(self) -> None:
        body = (f'<!doctype html><form method="post" action="{self.target}"></form>'
                "<script>document.forms[0].submit()</script>").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def attacker() -> Iterator[tuple[ThreadingHTTPServer, type[_AttackerPage]]]:
    """A web server for the attacker's page on another port of 127.0.0.1: the same site as the receiver (a
    site ignores the port), so the browser sends the SameSite=Lax session cookie with its post."""
    page = type("Page", (_AttackerPage,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, page
    finally:
        server.shutdown()
        server.server_close()


def test_a_signed_in_browser_on_another_page_cannot_be_made_to_delete(
    tmp_path: Path, browser: Chrome, attacker: tuple[ThreadingHTTPServer, type[_AttackerPage]]
) -> None:
    app, tokens = gallery_app(tmp_path, ADMIN)
    server_of_attacker, page = attacker
    with ServerThread(app) as server:
        image_id = _upload(server.url, tokens["cam1"])
        _wait_done(server.url, image_id)
        browser.get(f"{server.url}/login?token={ADMIN}")
        assert browser.find_elements(By.CSS_SELECTOR, f'.card[data-id="{image_id}"]')
        page.target = f"{server.url}/images/{image_id}/delete"
        browser.get(f"http://127.0.0.1:{server_of_attacker.server_address[1]}/")
        WebDriverWait(browser, 10).until(lambda d: d.title == "Not deleted · AEIC receiver")
        assert _status(server.url, image_id) == "done" and len(_files_of(tmp_path, image_id)) == 3


def _blocking_app(tmp_path: Path, codec: BlockingCodec) -> tuple[FastAPI, str]:
    settings = ReceiverSettings(data_dir=tmp_path / "data", admin_token=ADMIN, poll_interval_s=0.05,
                                retry_delay_s=0.0, rate_limit_burst=1000)
    token = make_tokens(settings, "cam1")["cam1"]
    return create_app(settings, registry=CodecRegistry.from_codecs([codec])), token


def test_an_image_deleted_while_it_decodes_stays_deleted_and_the_worker_goes_on(tmp_path: Path) -> None:
    """Deleted from the gallery while its decode runs: the decode's result, when it comes, writes no row back
    and leaves no file, and the worker decodes the next image."""
    codec = BlockingCodec(hold_s=20)
    app, token = _blocking_app(tmp_path, codec)
    with ServerThread(app) as server, _session(server.url, token) as cam1:
        image_id = _upload(server.url, token)
        assert codec.entered.wait(10) and _status(server.url, image_id) == "decoding"
        assert _delete(cam1, image_id).status_code == 303
        codec.release.set()
        following = _upload(server.url, token, b"\x04")
        _wait_done(server.url, following)  # the worker is past the deleted image's batch, and alive
        assert codec.batches == [1, 1]
        assert _status(server.url, image_id) is None and _files_of(tmp_path, image_id) == []


def test_under_a_path_prefix_the_delete_and_its_way_back_stay_under_it(tmp_path: Path) -> None:
    """Behind a proxy serving the receiver at /aeic/ and stripping it: the form posts there and lands on the
    grid there (an absolute /?deleted=... would be the proxy's own site)."""
    app, tokens = gallery_app(tmp_path, ADMIN, root_path=PREFIX)
    with ServerThread(_StrippingProxy(app)) as server, httpx.Client(base_url=server.url) as client:  # type: ignore[arg-type]
        image_id = _upload(f"{server.url}{PREFIX}", tokens["cam1"])
        assert client.post(f"{PREFIX}/login", data={"token": ADMIN}).status_code == 303
        page = client.get(f"{PREFIX}/images/{image_id}").text
        assert f'action="{PREFIX}/images/{image_id}/delete"' in page
        refused = client.post(f"{PREFIX}/images/{image_id}/delete", headers={"Sec-Fetch-Site": "cross-site"})
        assert refused.status_code == 403
        _under_prefix(client, refused.text)
        deleted = client.post(f"{PREFIX}/images/{image_id}/delete", headers=SAME_ORIGIN)
        assert deleted.status_code == 303 and deleted.headers["location"] == f"{PREFIX}/?deleted={image_id}"
        assert 'id="notice"' in client.get(deleted.headers["location"]).text
        opened = client.get(f"{PREFIX}/images/{image_id}/delete")  # the form's address as a page: no 405
        assert opened.status_code == 303 and opened.headers["location"] == f"{PREFIX}/images/{image_id}"


def test_the_delete_returns_to_the_grid_page_and_filter_the_image_was_opened_from(
    tmp_path: Path, browser: Chrome
) -> None:
    """An admin clearing out failed images (`/?status=failed`) landed on the whole grid after each delete
    and had to narrow it again; now the delete returns to the grid the tab last showed."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server:
        good, bad = _upload(server.url, tokens["cam1"]), _upload(server.url, tokens["cam1"], b"FAIL")
        _wait_done(server.url, good)
        browser.get(f"{server.url}/login?token={ADMIN}")
        browser.get(f"{server.url}/?status=failed")
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, f'.card[data-id="{bad}"]'))
        browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{bad}"]').click()
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "delete-open")).pop().click()
        browser.find_element(By.ID, "delete-confirm").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "notice"))
        assert browser.current_url == f"{server.url}/?status=failed&deleted={bad}"
        assert browser.find_element(By.TAG_NAME, "h1").text == "Received images, failed"
        assert _status(server.url, good) == "done"


def test_a_delete_returns_only_to_a_grid_of_this_site(tmp_path: Path) -> None:
    """Where the delete lands (`back`, as the tab's grid named it) is a grid page of this site or the grid."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server, _session(server.url, ADMIN) as admin:
        for back, landing in (("/?status=failed&deleted=0123", "/?status=failed&deleted={}"),
                              ("/?device=cam1&cursor=abc", "/?device=cam1&cursor=abc&deleted={}"),
                              ("//attacker.example/?x=1", "/?deleted={}"), ("/images/x", "/?deleted={}"),
                              ("https://attacker.example/", "/?deleted={}"), ("/?\tx", "/?deleted={}")):
            image_id = _upload(server.url, tokens["cam1"])
            answer = admin.post(f"/images/{image_id}/delete", params={"back": back}, headers=SAME_ORIGIN)
            assert answer.status_code == 303 and answer.headers["location"] == landing.format(image_id), back


_FROM_CACHE = ("const [url, done] = arguments;"  # only what the browser's HTTP cache holds, never the network
               "fetch(url, {cache: 'only-if-cached', mode: 'same-origin'}).then(r => done(r.status), () => done(null));")


def test_the_deleted_picture_is_not_left_in_the_browsers_cache(tmp_path: Path, browser: Chrome) -> None:
    """Thumbnails and pictures are cached privately for a day: after a delete the browser still showed the
    deleted photo's thumbnail from its cache (measured: `only-if-cached` answered 200). The delete empties
    this site's cache in the browser, as signing out does."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server:
        base = server.url.replace("127.0.0.1", "localhost")  # Clear-Site-Data needs a secure context
        image_id = _upload(server.url, tokens["cam1"])
        _wait_done(server.url, image_id)
        browser.get(f"{base}/login?token={tokens['cam1']}")
        thumbnail = f"{base}/v1/images/{image_id}/thumbnail"
        WebDriverWait(browser, 10).until(lambda d: d.execute_async_script(_FROM_CACHE, thumbnail) == 200)
        browser.get(f"{base}/images/{image_id}")
        browser.find_element(By.ID, "delete-open").click()
        browser.find_element(By.ID, "delete-confirm").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "notice"))
        assert browser.execute_async_script(_FROM_CACHE, thumbnail) is None


def test_a_delete_the_storage_stops_says_so_and_trying_again_finishes_it(tmp_path: Path) -> None:
    """The blob store fails part way through the delete: a page (not a JSON error) says the image is not
    deleted yet, with Retry-After, and the image is still there; its "Try again" posts the same form, back to
    the same grid, and once the store is back that deletes the image and every file of it."""
    settings = ReceiverSettings(data_dir=tmp_path / "data", admin_token=ADMIN, poll_interval_s=0.05,
                                retry_delay_s=0.0, rate_limit_burst=1000)
    token = make_tokens(settings, "cam1")["cam1"]
    blobs = DeletesFailing(tmp_path / "data" / "blobs")
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]), blobs=blobs)
    with ServerThread(app) as server, _session(server.url, token) as cam1:
        image_id = _upload(server.url, token)
        _wait_done(server.url, image_id)
        blobs.allowed = 1
        refused = cam1.post(f"/images/{image_id}/delete", params={"back": "/?status=done"}, headers=SAME_ORIGIN)
        assert refused.status_code == 503 and refused.headers["content-type"].startswith("text/html")
        assert refused.headers["retry-after"] == "5" and refused.headers["cache-control"] == "no-store"
        assert "<title>Not deleted yet" in refused.text and 'id="not-deleted"' in refused.text
        assert _status(server.url, image_id) == "done" and _files_of(tmp_path, image_id)
        retry = html.unescape(re.findall(r'<form method="post" action="([^"]+)"', refused.text)[-1])
        assert retry == f"/images/{image_id}/delete?back=%2F%3Fstatus%3Ddone"
        blobs.allowed = None
        done = cam1.post(retry, headers=SAME_ORIGIN)
        assert done.status_code == 303 and done.headers["location"] == f"/?status=done&deleted={image_id}"
        assert _status(server.url, image_id) is None and _files_of(tmp_path, image_id) == []


def test_the_delete_address_opened_as_a_page_goes_to_the_images_page(tmp_path: Path) -> None:
    """A GET of the form's address (typed, from history) deletes nothing and opens the image's page, where
    the form is; not an id, the grid."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server, _session(server.url, tokens["cam1"]) as cam1:
        image_id = _upload(server.url, tokens["cam1"])
        opened = cam1.get(f"/images/{image_id}/delete")
        assert opened.status_code == 303 and opened.headers["location"] == f"/images/{image_id}"
        assert cam1.head(f"/images/{image_id}/delete").headers["location"] == f"/images/{image_id}"
        assert cam1.get("/images/not-an-id/delete").headers["location"] == "/"
        assert _status(server.url, image_id) is not None
