"""The gallery over a slow link, in headless Chromium against a real uvicorn server (the instant test decoder):
the image page must not pull the whole lossless PNG to show a picture the visitor has not zoomed into."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import receiver_support
from receiver_support import ServerThread, gallery_app, make_bitstream
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ADMIN = "gallery-slow-network-admin-token"

browser = receiver_support.browser

_SHOWN_JS = """
const i = document.getElementById('reconstruction');
return i.complete && i.naturalWidth > 0 ? i.currentSrc.split('/').pop() : null;
"""
_FETCHED_JS = """
return performance.getEntriesByType('resource').map(r => r.name.split('/').pop())
  .filter(n => n.startsWith('reconstruction'));
"""


def _done_image(base: str, token: str) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    reply = httpx.post(f"{base}/v1/images", content=make_bitstream(640, 480), timeout=10,
                       headers={**headers, "Content-Type": "application/octet-stream"})
    assert reply.status_code == 202, reply.text
    image_id = str(reply.json()["id"])

    def done(_: object) -> bool:
        return bool(httpx.get(f"{base}/v1/images/{image_id}", headers=headers).json()["status"] == "done")

    WebDriverWait(None, 20, poll_frequency=0.05).until(done)  # type: ignore[type-var]
    return image_id


def _open(browser: Chrome, base: str, token: str) -> None:
    image_id = _done_image(base, token)
    browser.get(f"{base}/login?token={ADMIN}&next=/images/{image_id}")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(_SHOWN_JS))


def test_the_image_page_shows_a_jpeg_until_zoomed_in_then_the_exact_png(tmp_path: Path, browser: Chrome) -> None:
    """A 12 MP photo's reconstruction is a 13.5 MB PNG: its page took 76 s to load on Chrome's "3G" profile,
    for a picture shown a few hundred pixels wide. The page now shows the JPEG (1.1 MB) and fetches the PNG
    only when the visitor zooms in, where the exact pixels matter."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server:
        _open(browser, server.url, tokens["cam1"])
        assert browser.execute_script(_SHOWN_JS) == "reconstruction.jpg"
        assert browser.execute_script(_FETCHED_JS) == ["reconstruction.jpg"]
        assert "JPEG" in browser.find_element(By.ID, "shown-as").text

        browser.find_element(By.ID, "viewer").click()  # zoom 2x
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(_SHOWN_JS) == "reconstruction.png")
        assert browser.find_element(By.ID, "viewer").get_attribute("data-scale") == "2"  # the swap kept the zoom
        assert "exact PNG" in browser.find_element(By.ID, "shown-as").text
        # the PNG is still the first download
        first = browser.find_element(By.CSS_SELECTOR, ".downloads a")
        assert first.text == "PNG" and str(first.get_attribute("href")).endswith("/png")


def test_the_image_page_shows_the_png_when_no_jpeg_can_be_made_now(tmp_path: Path, browser: Chrome) -> None:
    """The JPEG is converted on its first download under a shared budget, which answers 503 while other
    conversions hold it: the page then shows the PNG rather than a broken picture."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    budget = app.state.receiver.conversions
    assert budget.take(10**12)  # every pixel of the budget held by "another download"
    with ServerThread(app) as server:
        _open(browser, server.url, tokens["cam1"])
        assert browser.execute_script(_SHOWN_JS) == "reconstruction.png"
        assert "exact PNG" in browser.find_element(By.ID, "shown-as").text


def test_a_listing_that_never_answers_is_not_shown_as_live(tmp_path: Path, browser: Chrome) -> None:
    """A poll the receiver (or a dead link) never answers left the grid saying "Updating live" for as long as
    the browser waited, minutes, while nothing updated. A poll with no answer in 10 s is said; once answered,
    the line says "Updating live" again."""
    app, _ = gallery_app(tmp_path, ADMIN, worker=False)
    store = app.state.receiver.store
    with ServerThread(app) as server:
        browser.get(f"{server.url}/login?token={ADMIN}")
        live = browser.find_element(By.ID, "live")
        assert live.text == "Updating live"
        answer = threading.Event()
        original = store.catalogue_token

        def stalled(*args: Any, **kwargs: Any) -> Any:
            answer.wait(60)
            return original(*args, **kwargs)

        store.catalogue_token = stalled  # every poll reads it first
        try:
            WebDriverWait(browser, 15).until(lambda d: "has not answered for 10 s" in d.find_element(By.ID, "live").text)
            assert "error" in str(live.get_attribute("class"))
        finally:
            store.catalogue_token = original
            answer.set()
        WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "live").text == "Updating live")


def _saved(folder: Path, name: str) -> bytes:
    path = folder / name
    WebDriverWait(None, 20, poll_frequency=0.05).until(  # type: ignore[type-var]
        lambda _: path.exists() and not list(folder.glob("*.crdownload")))
    return path.read_bytes()


def test_a_converted_download_says_while_it_is_made_and_why_it_is_refused(tmp_path: Path, browser: Chrome) -> None:
    """A WebP or JPEG is converted by its first download: 1.5-3.1 s for a 12 MP photo's WebP here, 45-55 s at
    8192x8192, with nothing on screen meanwhile (the browser shows a download once its answer starts), and a
    click while other conversions held the budget was a 503 the browser reported as a failed download with
    no reason. The page now says it is preparing the file, and why one is refused."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    folder = tmp_path / "downloads"
    folder.mkdir()
    budget = app.state.receiver.conversions
    with ServerThread(app) as server:
        image_id = _done_image(server.url, tokens["cam1"])
        browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
        browser.get(f"{server.url}/login?token={ADMIN}&next=/images/{image_id}")
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(_SHOWN_JS))  # the view's JPEG is made now
        assert budget.take(10**12)  # every pixel of the budget held by "another download"
        browser.find_element(By.LINK_TEXT, "WebP").click()
        note = browser.find_element(By.ID, "download-note")
        WebDriverWait(browser, 10).until(lambda d: "converting other downloads" in note.text)
        assert "PNG" in note.text and not list(folder.iterdir())

        budget.give_back(10**12)
        browser.find_element(By.LINK_TEXT, "WebP").click()
        assert _saved(folder, f"{image_id}.webp")[8:12] == b"WEBP"
        WebDriverWait(browser, 10).until(lambda d: note.text == "")
        browser.find_element(By.LINK_TEXT, "JPEG").click()  # kept since the view converted it
        assert _saved(folder, f"{image_id}.jpg").startswith(b"\xff\xd8")


def test_a_waiting_image_page_whose_poll_is_not_answered_says_so(tmp_path: Path, browser: Chrome) -> None:
    """A waiting image's page asks for its status every second; a poll the receiver (or a dead link) never
    answered left "pending…" on screen for as long as the browser waited, minutes, with nothing said, as the
    grid once did. After 10 s without an answer the page says so; once answered, the words go."""
    app, tokens = gallery_app(tmp_path, ADMIN, worker=False)
    store = app.state.receiver.store
    with ServerThread(app) as server:
        reply = httpx.post(f"{server.url}/v1/images", content=make_bitstream(), timeout=10,
                           headers={"Authorization": f"Bearer {tokens['cam1']}",
                                    "Content-Type": "application/octet-stream"})
        browser.get(f"{server.url}/login?token={ADMIN}&next=/images/{reply.json()['id']}")
        waiting = browser.find_element(By.ID, "waiting")
        assert waiting.text == "pending…"
        answer = threading.Event()
        original = store.get_image

        def stalled(*args: Any, **kwargs: Any) -> Any:
            answer.wait(60)
            return original(*args, **kwargs)

        store.get_image = stalled  # each poll of the image's status reads it
        try:
            WebDriverWait(browser, 15).until(lambda _: "has not answered for 10 s" in waiting.text)
        finally:
            store.get_image = original
            answer.set()
        WebDriverWait(browser, 15).until(lambda _: waiting.text == "pending…")


def test_a_picture_that_cannot_be_had_is_not_said_to_be_shown(tmp_path: Path, browser: Chrome) -> None:
    """When the JPEG failed the page said "Shown as the exact PNG." at once, before the PNG had come; and when
    the PNG failed too (the blob store out, the link down) it went on saying so under a broken picture. It
    says the PNG is loading, then that it is shown, or that the picture did not load."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server:
        image_id = _done_image(server.url, tokens["cam1"])
        browser.get(f"{server.url}/login?token={ADMIN}")
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/reconstruction.*"]})
        browser.get(f"{server.url}/images/{image_id}")
        shown_as = browser.find_element(By.ID, "shown-as")
        WebDriverWait(browser, 10).until(lambda _: "did not load" in shown_as.text)
        assert "Shown as" not in shown_as.text
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/reconstruction.jpg"]})
        browser.refresh()
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(_SHOWN_JS) == "reconstruction.png")
        assert browser.find_element(By.ID, "shown-as").text == "Shown as the exact PNG."
