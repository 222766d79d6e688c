"""The gallery as a person uses it, in headless Chromium against a real uvicorn server (the instant test
decoder): the longest device names, a link opened while signed out, a tab left open in the background,
and the pages' HEAD answers."""

from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import receiver_support
from fastapi import FastAPI
from fastapi.testclient import TestClient
from receiver_support import ServerThread, gallery_app, make_bitstream
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ADMIN = "gallery-usability-admin-token"
# The longest name a device may have (128 of A-Z a-z 0-9 . _ -), with no space or hyphen, where a line may break.
LONG_DEVICE = ("warehouse_north.loading_dock.camera_" * 4)[:128]

browser = receiver_support.browser


def _app(tmp_path: Path, devices: tuple[str, ...] = ("cam1",), **overrides: Any) -> tuple[FastAPI, dict[str, str]]:
    return gallery_app(tmp_path, ADMIN, devices, **overrides)


def _timed_listings(app: FastAPI) -> list[float]:
    """When the store listed images for a page or a poll, or read the catalogue's change token for a poll (an
    unchanged listing reads nothing else): the list the app's store appends to from now on."""
    store = app.state.receiver.store
    listings: list[float] = []

    def counted(original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            listings.append(time.monotonic())
            return original(*args, **kwargs)
        return call

    store.list_images, store.catalogue_token = counted(store.list_images), counted(store.catalogue_token)
    return listings


def _upload(base: str, token: str, size: tuple[int, int] = (48, 32)) -> str:
    reply = httpx.post(f"{base}/v1/images", content=make_bitstream(*size), timeout=10,
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
    assert reply.status_code == 202, reply.text
    return str(reply.json()["id"])


def _upload_with(client: TestClient, token: str) -> str:
    reply = client.post("/v1/images", content=make_bitstream(), headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
    assert reply.status_code == 202, reply.text
    return str(reply.json()["id"])


def _wait_done(base: str, token: str, image_id: str) -> None:
    def done(_: object) -> bool:
        reply = httpx.get(f"{base}/v1/images/{image_id}", headers={"Authorization": f"Bearer {token}"})
        return bool(reply.json()["status"] == "done")

    # WebDriverWait as a plain poller: it never touches its driver, so none is given (the stubs want one)
    WebDriverWait(None, 20, poll_frequency=0.05).until(done)  # type: ignore[type-var]


# Text cut off: an element whose content is wider than its box (the card and the page hide or scroll it).
_CLIPPED_JS = """
return [...document.querySelectorAll(arguments[0])].filter(e => e.getClientRects().length)
  .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => [e.tagName + '.' + e.className, e.scrollWidth,
                                                              e.clientWidth]);
"""


def _sideways(driver: Chrome) -> list[int]:
    return list(driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"))


def test_no_text_is_cut_off_or_scrolls_the_page_sideways_on_a_phone(tmp_path: Path, browser: Chrome) -> None:
    """A 128-character device name (no spaces) was cut off on its card and pushed the image page and the
    header three times wider than a phone's screen; the image page's "Entropy decoding" label ran into its
    value."""
    app, tokens = _app(tmp_path, devices=(LONG_DEVICE,))
    token = tokens[LONG_DEVICE]
    with ServerThread(app) as server:
        image_id = _upload(server.url, token)
        _wait_done(server.url, token, image_id)
        browser.set_window_size(360, 740)
        for who in (ADMIN, token):  # the device's own sign-in puts its name in the header too
            browser.get(f"{server.url}/login?token={who}")
            WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .card img"))
            for path in ("/", f"/images/{image_id}"):
                browser.get(f"{server.url}{path}")
                assert LONG_DEVICE in browser.find_element(By.TAG_NAME, "body").text, path
                width, visible = _sideways(browser)
                assert width <= visible, (path, width, visible)
                clipped = browser.execute_script(_CLIPPED_JS, ".caption, h1, .bar, .bar *, th, td")
                assert not clipped, (who == ADMIN, path, clipped)
            browser.find_element(By.ID, "logout").click()
            WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "token"))


def test_no_page_scrolls_sideways_at_the_reflow_width(tmp_path: Path, browser: Chrome) -> None:
    """WCAG 1.4.10 asks that a page read without scrolling sideways at 320 CSS pixels (a 1280 px window zoomed
    to 400%): "No image" and the 32 hex digits of its id, one word, pushed the page 9 px wider than that."""
    app, tokens = _app(tmp_path)
    with ServerThread(app) as server:
        image_id = _upload(server.url, tokens["cam1"])
        _wait_done(server.url, tokens["cam1"], image_id)
        browser.set_window_size(320, 640)
        assert browser.execute_script("return innerWidth") == 320
        browser.get(f"{server.url}/login")
        assert _sideways_by(browser) <= 0
        browser.get(f"{server.url}/login?token={ADMIN}")
        for path in ("/", f"/images/{image_id}", f"/images/{'0' * 32}", "/no/such/page"):
            browser.get(f"{server.url}{path}")
            assert _sideways_by(browser) <= 0, path


def _sideways_by(driver: Chrome) -> int:
    wide, shown = _sideways(driver)
    return wide - shown


_GAP_JS = """
const picture = document.getElementById(arguments[0]).getBoundingClientRect();
return [document.getElementById('meta').getBoundingClientRect().left - picture.right, picture.width];
"""


def test_on_a_wide_screen_an_images_details_stay_beside_it(tmp_path: Path, browser: Chrome) -> None:
    """On a 2560 px screen an 800x600 picture (shown at its true size) and its details table were 1,280 px
    apart, the table pinned to the window's right edge: the eye crossed half a metre of empty screen between a
    picture and its numbers. The table now follows the picture, and a picture wider than the room left is
    still scaled to fit beside it."""
    app, tokens = _app(tmp_path)
    with ServerThread(app) as server:
        small = _upload(server.url, tokens["cam1"], size=(800, 600))
        large = _upload(server.url, tokens["cam1"], size=(4000, 3000))
        _wait_done(server.url, tokens["cam1"], large)
        browser.set_window_size(2560, 1400)
        browser.get(f"{server.url}/login?token={ADMIN}")
        shown = "const i = document.getElementById('reconstruction'); return i.complete && i.naturalWidth > 0"
        browser.get(f"{server.url}/images/{small}")
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(shown))
        gap, width = browser.execute_script(_GAP_JS, "viewer")
        assert 0 < gap <= 40 and abs(width - 800) < 1, (gap, width)
        browser.get(f"{server.url}/images/{large}")
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(shown))
        gap, width = browser.execute_script(_GAP_JS, "viewer")
        assert 0 < gap <= 40 and width < 2560 - 360, (gap, width)
        assert _sideways_by(browser) <= 0


def test_signing_in_from_a_link_opens_the_page_it_asked_for(tmp_path: Path, browser: Chrome) -> None:
    """An image link opened while signed out (or after the session expired) showed the token form, and
    signing in there landed on the grid, not on that image: the link's target was lost."""
    app, tokens = _app(tmp_path)
    with ServerThread(app) as server:
        image_id = _upload(server.url, tokens["cam1"])
        _wait_done(server.url, tokens["cam1"], image_id)
        browser.get(f"{server.url}/images/{image_id}")
        field = browser.find_element(By.ID, "token")
        field.send_keys("wrong-token\n")  # a mistake first: the form it answers with keeps the target
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "login-error"))
        browser.find_element(By.ID, "token").send_keys(f"{ADMIN}\n")
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "reconstruction"))
        assert browser.current_url == f"{server.url}/images/{image_id}"

        # The session ends (expired, or signed out in another tab) while the page is open: its next load
        # asks for the token and, once given, shows the same page again.
        cookie = browser.get_cookie("aeic_session")
        assert cookie is not None
        assert httpx.post(f"{server.url}/logout", cookies={"aeic_session": cookie["value"]}).status_code == 303
        browser.refresh()
        browser.find_element(By.ID, "token").send_keys(f"{ADMIN}\n")
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "reconstruction"))
        assert browser.current_url == f"{server.url}/images/{image_id}"


def test_sign_in_goes_back_only_to_a_page_of_this_site(tmp_path: Path) -> None:
    """The page to return to travels in the form: anything but a path on this origin (another host, a
    scheme, a protocol-relative `//host` or `/\\host`, which browsers read as one) sends the browser to `/`."""
    app, _ = _app(tmp_path, worker=False, login_attempts_per_minute=1000)
    image = "/images/" + "0" * 32
    expected = {image: image, "/?cursor=abc": "/?cursor=abc", "": "/", "https://evil.example/": "/",
                "//evil.example/": "/", "/\\evil.example/": "/", "/\t/evil.example": "/", "images/x": "/",
                "javascript:alert(1)": "/"}
    with ServerThread(app) as server:
        for target, location in expected.items():
            posted = httpx.post(f"{server.url}/login", data={"token": ADMIN, "next": target})
            linked = httpx.get(f"{server.url}/login", params={"token": ADMIN, "next": target})
            assert posted.status_code == linked.status_code == 303, target
            assert posted.headers["location"] == linked.headers["location"] == location, target
        form = httpx.get(f"{server.url}/login", params={"next": '/"><script>alert(1)</script>'}).text
        assert '<input type="hidden" name="next" value="/&#34;&gt;&lt;script&gt;' in form and "<script>alert" not in form


def test_a_grid_in_a_background_tab_stops_polling_and_catches_up_when_shown(
    tmp_path: Path, browser: Chrome
) -> None:
    """A grid left open in a background tab fetched the whole first page every 1.5 s (40 KB at 60 images:
    1.6 MB a minute, and a database query each time) for nobody; shown again, it updates at once."""
    app, tokens = _app(tmp_path, worker=False)
    listings = _timed_listings(app)
    with ServerThread(app) as server:
        _upload(server.url, tokens["cam1"])
        browser.get(f"{server.url}/login?token={ADMIN}")
        grid = browser.current_window_handle
        WebDriverWait(browser, 10).until(lambda _: len(listings) >= 2)  # the page, then its first poll
        browser.switch_to.new_window("tab")  # the grid's tab goes to the background
        hidden_at = time.monotonic()
        time.sleep(0.5)  # a poll already on its way when the tab was hidden may still arrive
        newest = _upload(server.url, tokens["cam1"])
        time.sleep(4.5)
        assert [t for t in listings if t > hidden_at + 0.5] == []
        shown_at = time.monotonic()  # before the switch: the page may ask while switch_to returns
        browser.switch_to.window(grid)
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(
            "return document.querySelector('#grid .card').dataset.id") == newest)
        assert min(t for t in listings if t > shown_at) - shown_at < 1.0  # at once, not after a poll interval


def test_a_waiting_image_page_in_a_background_tab_stops_asking_and_catches_up_when_shown(
    tmp_path: Path, browser: Chrome
) -> None:
    """A waiting image's page left open in a background tab asked for the image's status every second, for
    nobody (a query each time; an operator with a tab per image queued overnight asked all night). It now
    asks nothing while hidden, and at once when shown again."""
    app, tokens = _app(tmp_path, worker=False)
    store = app.state.receiver.store
    asked: list[float] = []
    original = store.get_image

    def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append(time.monotonic())
        return original(*args, **kwargs)

    store.get_image = counted
    with ServerThread(app) as server:
        image_id = _upload(server.url, tokens["cam1"])
        browser.get(f"{server.url}/login?token={ADMIN}&next=/images/{image_id}")
        page = browser.current_window_handle
        WebDriverWait(browser, 10).until(lambda _: len(asked) >= 3)  # the page, then its polls
        browser.switch_to.new_window("tab")
        hidden_at = time.monotonic()
        time.sleep(3.5)
        assert [t for t in asked if t > hidden_at + 0.5] == []  # a poll on its way when hidden may arrive
        shown_at = time.monotonic()
        browser.switch_to.window(page)
        WebDriverWait(browser, 10).until(lambda _: any(t > shown_at for t in asked))
        assert min(t for t in asked if t > shown_at) - shown_at < 0.9  # at once, not after a poll interval


def test_pages_answer_head_as_their_get(tmp_path: Path) -> None:
    """Uptime monitors and link checkers ask with HEAD: the pages answered 405, so a working gallery read
    as down. HEAD is the GET's status and headers with no body."""
    app, tokens = _app(tmp_path, worker=False)
    with ServerThread(app) as server:
        image_id = _upload(server.url, tokens["cam1"])
        cookie = httpx.get(f"{server.url}/login", params={"token": ADMIN}).cookies
        for path in ("/", f"/images/{image_id}", f"/images/{'0' * 32}", "/login", "/?cursor=bad"):
            for cookies in (None, cookie):
                got = httpx.get(f"{server.url}{path}", cookies=cookies)
                head = httpx.head(f"{server.url}{path}", cookies=cookies)
                assert (head.status_code, head.content) == (got.status_code, b""), path
                for name in ("content-type", "content-length", "cache-control"):
                    assert head.headers.get(name) == got.headers.get(name), (path, name)


def test_every_page_is_no_store_whatever_it_says(tmp_path: Path) -> None:
    """The grid and the image page were `no-store`, but not the token form shown in their place to a visitor
    signed out, the refused sign-out or the "not found" pages, which a browser may then keep in its cache.
    Every page the gallery answers is `no-store`, as docs/receiver.md says."""
    app, tokens = _app(tmp_path, worker=False)
    html = {"Accept": "text/html"}
    with TestClient(app) as client:
        image_id = _upload_with(client, tokens["cam1"])
        signed_out = [client.get("/", headers=html), client.get(f"/images/{image_id}", headers=html),
                      client.get(f"/images/{image_id}/bitstream", headers=html),
                      client.post("/logout", headers={"Origin": "https://elsewhere.example"})]
        client.get(f"/login?token={ADMIN}")
        signed_in = [client.get(f"/images/{'0' * 32}", headers=html), client.get("/images/nope", headers=html),
                     client.get("/no/such/page", headers=html), client.get("/static/none.js?v=1", headers=html)]
        for page in signed_out + signed_in:
            assert page.headers["content-type"].startswith("text/html"), page.request.url
            assert page.headers.get("cache-control") == "no-store", (page.request.url, page.status_code)


def test_back_from_an_image_returns_to_the_same_place_in_the_grid(tmp_path: Path, browser: Chrome) -> None:
    """Back from an image opened far down the grid went to the top of the grid: the page hid its body
    going into the back/forward cache, which collapsed it to no height, and its reload kept that scroll."""
    app, tokens = _app(tmp_path)
    with ServerThread(app) as server:
        ids = [_upload(server.url, tokens["cam1"]) for _ in range(40)]
        _wait_done(server.url, tokens["cam1"], ids[-1])
        browser.get(f"{server.url}/login?token={ADMIN}")
        browser.execute_script("document.querySelectorAll('#grid .card')[30].scrollIntoView({block: 'center'})")
        card_top = browser.execute_script("return document.querySelectorAll('#grid .card')[30]"
                                          ".getBoundingClientRect().top")
        assert browser.execute_script("return scrollY") > 1000
        browser.execute_script("document.querySelectorAll('#grid .card')[30].click()")
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "reconstruction"))
        browser.back()
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(
            "return document.readyState === 'complete' && !!document.getElementById('grid')"))
        time.sleep(0.5)  # a reload out of the back/forward cache, if any, has begun by now
        WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")
        top = browser.execute_script("return document.querySelectorAll('#grid .card')[30].getBoundingClientRect().top")
        assert abs(top - card_top) < 2, (card_top, top)


def test_back_from_an_image_opened_by_keyboard_gives_the_focus_back_to_its_card(
    tmp_path: Path, browser: Chrome
) -> None:
    """Back from an image opened with the keyboard restored the grid's scroll but not its focus: the next Tab
    went to the header's first link, and a keyboard user had to Tab through every card again to get back to
    the 20th (25 presses). The card the image was opened from has the focus again."""
    app, tokens = _app(tmp_path)
    with ServerThread(app) as server:
        ids = [_upload(server.url, tokens["cam1"]) for _ in range(30)]
        _wait_done(server.url, tokens["cam1"], ids[-1])
        browser.get(f"{server.url}/login?token={ADMIN}")
        opened = ids[-20]  # the 20th card, newest first
        browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{opened}"]').send_keys(Keys.ENTER)
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "detail"))
        browser.back()
        time.sleep(0.5)  # a reload out of the back/forward cache, if any, has begun by now
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(
            "return document.readyState === 'complete' && !!document.getElementById('grid')"))
        focused = "return document.activeElement.dataset.id || document.activeElement.tagName"
        WebDriverWait(browser, 5).until(lambda d: d.execute_script(focused) == opened)
        browser.switch_to.active_element.send_keys(Keys.TAB)
        assert browser.execute_script(focused) == ids[-21]  # Tab goes on from there


STATIC = Path(__file__).resolve().parents[1] / "receiver" / "gallery" / "static"


def test_scripts_and_styles_are_named_by_their_content_so_an_upgrade_reaches_the_browser(tmp_path: Path) -> None:
    """The pages' scripts and styles were served with no Cache-Control, so browsers kept them by heuristic
    (a tenth of their age, unchecked: measured, Chromium fetched none of them again on later page loads)
    and after an upgrade a page could run the last release's script. A page now names each file by its
    content hash, cached for a year; the bare name is revalidated every time."""
    app, tokens = _app(tmp_path, worker=False)
    with ServerThread(app) as server:
        image_id = _upload(server.url, tokens["cam1"])
        cookie = httpx.get(f"{server.url}/login", params={"token": ADMIN}).cookies
        pages = [httpx.get(f"{server.url}{path}", cookies=cookies).text
                 for path in ("/", f"/images/{image_id}", f"/images/{'0' * 32}") for cookies in (None, cookie)]
        assets = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', "".join(pages)))
        names = {url.split("?")[0].removeprefix("/static/") for url in assets}
        assert names == {"gallery.css", "page.js", "gallery.js", "image.js"}, assets
        for url in assets:
            name, _, query = url.removeprefix("/static/").partition("?")
            assert query == "v=" + hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:16], url
            versioned = httpx.get(f"{server.url}{url}")
            assert versioned.headers["cache-control"] == "max-age=31536000, immutable", url
            for other in (f"/static/{name}", f"/static/{name}?v=0000000000000000"):
                plain = httpx.get(f"{server.url}{other}")
                assert plain.content == versioned.content and plain.headers["cache-control"] == "no-cache"
                again = httpx.get(f"{server.url}{other}", headers={"If-None-Match": plain.headers["etag"]})
                assert again.status_code == 304 and again.headers["cache-control"] == "no-cache"


def test_a_waiting_image_page_says_an_attempt_failed_and_counts_the_attempts(
    tmp_path: Path, browser: Chrome
) -> None:
    """Between a failed attempt and its retry the image page said only "pending…", and its Attempts row
    kept the number it was loaded with: nothing told the user that decoding had failed and would be tried
    again. Both now follow the image in place (no reload), and the outcome is shown when it comes."""
    app, tokens = _app(tmp_path, retry_delay_s=2.0, max_attempts=3)
    with ServerThread(app) as server:
        reply = httpx.post(f"{server.url}/v1/images", content=make_bitstream(48, 32, payload=b"FAIL"), timeout=10,
                           headers={"Authorization": f"Bearer {tokens['cam1']}",
                                    "Content-Type": "application/octet-stream"})
        image_id = reply.json()["id"]
        browser.get(f"{server.url}/login?token={ADMIN}")
        browser.get(f"{server.url}/images/{image_id}")
        browser.execute_script("window.aeicMark = 1;")
        wait = WebDriverWait(browser, 20, poll_frequency=0.1)
        # the second attempt fails 2 s after the first and the third 4 s after that
        wait.until(lambda d: d.find_element(By.ID, "m-attempts").text == "2")
        note = browser.find_element(By.ID, "retrying")
        assert note.text == "Attempt 2 failed: ValueError: corrupt payload: rANS stream ended early; trying again."
        assert browser.find_element(By.ID, "waiting").text == "pending…"
        assert browser.execute_script("return window.aeicMark") == 1  # said in place
        wait.until(lambda d: d.find_elements(By.ID, "failure"))
        assert browser.find_element(By.ID, "m-attempts").text == "3" and not browser.find_elements(By.ID, "retrying")


def _downloaded(folder: Path, name: str) -> bytes:
    """The bytes of a finished download (Chromium writes NAME.crdownload until it is complete)."""
    path = folder / name
    WebDriverWait(None, 20, poll_frequency=0.05).until(  # type: ignore[type-var]
        lambda _: path.exists() and not list(folder.glob("*.crdownload")))
    return path.read_bytes()


def test_the_image_page_downloads_the_stream_as_sent_and_the_decoded_picture(
    tmp_path: Path, browser: Chrome
) -> None:
    """The page offered the decoded picture only: the stream the device sent, which `aeic info` and
    `aeic decode` read (and which is all there is of an image whose decoding failed), could not be had
    from the gallery."""
    app, tokens = _app(tmp_path, devices=("cam1", "cam2"), max_attempts=1)
    stream, broken = make_bitstream(48, 32), make_bitstream(48, 32, payload=b"FAIL")
    folder = tmp_path / "downloads"
    folder.mkdir()
    with ServerThread(app) as server:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", "Content-Type": "application/octet-stream"}
        done, failed = (httpx.post(f"{server.url}/v1/images", content=data, headers=headers).json()["id"]
                        for data in (stream, broken))
        _wait_done(server.url, tokens["cam1"], done)
        browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
        browser.get(f"{server.url}/login?token={ADMIN}")
        browser.get(f"{server.url}/images/{done}")
        browser.find_element(By.LINK_TEXT, "Bitstream (.aeic)").click()
        assert _downloaded(folder, f"{done}.aeic") == stream
        browser.find_element(By.LINK_TEXT, "PNG").click()
        assert _downloaded(folder, f"{done}.png").startswith(b"\x89PNG\r\n\x1a\n")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "m-status").text == "done")
        browser.get(f"{server.url}/images/{failed}")
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "failure"))
        browser.find_element(By.LINK_TEXT, "Bitstream (.aeic)").click()
        assert _downloaded(folder, f"{failed}.aeic") == broken

        url = f"{server.url}/images/{done}/bitstream"
        reply = httpx.get(url, headers={"Authorization": f"Bearer {tokens['cam1']}"})
        assert reply.headers["content-type"] == "application/octet-stream"
        assert reply.headers["content-disposition"] == f'attachment; filename="{done}.aeic"'
        assert reply.headers["cache-control"] == "private, max-age=86400"
        other = httpx.get(url, headers={"Authorization": f"Bearer {tokens['cam2']}"})
        assert other.status_code == 404 and stream not in other.content  # another device's: as if none
        anonymous = httpx.get(url)  # the sign-in form, as a 401: a download link saves no page as a stream
        assert anonymous.status_code == 401 and 'name="next"' in anonymous.text and stream not in anonymous.content
        # a link followed once the session has ended: test_receiver_gallery_downloads.py


def test_times_are_shown_in_the_visitors_own_time_zone(tmp_path: Path, browser: Chrome) -> None:
    """Every time was shown in UTC, so someone in India read an image received at 16:05 their time as
    10:35. Times are shown in the browser's zone, named, with the UTC time in the tooltip (and as the
    text of a page whose scripts do not run)."""
    app, tokens = _app(tmp_path)
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "Asia/Kolkata"})  # UTC+05:30
    kolkata = timezone(timedelta(hours=5, minutes=30))

    def local(iso: str) -> tuple[str, str]:
        when = datetime.fromisoformat(iso)
        return (when.astimezone(kolkata).strftime("%Y-%m-%d %H:%M:%S GMT+5:30"),
                when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))

    def card_time(driver: Chrome, image_id: str) -> tuple[str, str]:
        time_ = driver.find_element(By.CSS_SELECTOR, f'.card[data-id="{image_id}"] time')
        return time_.text, str(time_.get_attribute("title"))

    with ServerThread(app) as server:
        served = _upload(server.url, tokens["cam1"])
        _wait_done(server.url, tokens["cam1"], served)
        browser.get(f"{server.url}/login?token={ADMIN}")
        added = _upload(server.url, tokens["cam1"])  # a card the live script makes
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, f'.card[data-id="{added}"]'))
        records = {i: httpx.get(f"{server.url}/v1/images/{i}", headers={"Authorization": f"Bearer {ADMIN}"}).json()
                   for i in (served, added)}
        for image_id, record in records.items():
            assert card_time(browser, image_id) == local(record["created_at"]), image_id

        _wait_done(server.url, tokens["cam1"], added)
        browser.get(f"{server.url}/images/{added}")
        record = httpx.get(f"{server.url}/v1/images/{added}", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        shown = browser.execute_script("return [...document.querySelectorAll('time')].map(t => [t.textContent, t.title])")
        assert [tuple(pair) for pair in shown] == [local(record["created_at"]), local(record["created_at"]),
                                                   local(record["decoded_at"])]
        page = httpx.get(f"{server.url}/images/{added}", headers={"Authorization": f"Bearer {ADMIN}"}).text
        assert f'<time datetime="{record["created_at"]}">{local(record["created_at"])[1]}</time>' in page


def test_an_address_with_nothing_at_it_is_a_page_with_the_way_back(tmp_path: Path, browser: Chrome) -> None:
    """A mistyped or stale address showed a browser the API's raw JSON error. A browser's page request now
    gets a 404 page that leads back to the gallery; the API, scripts and other clients keep the JSON."""
    app, _ = _app(tmp_path, worker=False)
    with ServerThread(app) as server:
        for path in ("/nope", "/images/", "/images/abc/def", "/static/nope.css"):
            browser.get(f"{server.url}{path}")
            assert browser.title == "Page not found · AEIC receiver", path
            assert browser.find_element(By.TAG_NAME, "h1").text == "Page not found"
            assert browser.find_element(By.CSS_SELECTOR, "main a").get_attribute("href") == f"{server.url}/"
        page = httpx.get(f"{server.url}/nope", headers={"Accept": "text/html"})
        assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
        for path, accept in (("/nope", "*/*"), ("/v1/nope", "text/html"), ("/static/nope.js", "*/*")):
            reply = httpx.get(f"{server.url}{path}", headers={"Accept": accept})
            assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found", path


def test_an_older_page_follows_its_waiting_images_until_they_settle(tmp_path: Path, browser: Chrome) -> None:
    """Only the first page updated: after a backlog (a sender's spool flushed after a night offline) the
    older pages showed "pending" until reloaded by hand. An older page now follows its own images while
    any of them waits, and then stops asking."""
    app, tokens = _app(tmp_path, worker=False)
    store, listings = app.state.receiver.store, _timed_listings(app)
    with ServerThread(app) as server:
        ids = [_upload(server.url, tokens["cam1"]) for _ in range(62)]  # the two oldest go to the second page
        browser.get(f"{server.url}/login?token={ADMIN}")
        browser.find_element(By.ID, "older").click()
        WebDriverWait(browser, 10).until(lambda d: sorted(d.execute_script(
            "return [...document.querySelectorAll('#grid .card')].map(c => c.dataset.id)")) == sorted(ids[:2]))

        def badge(image_id: str) -> str:
            return str(browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{image_id}"] .badge').text)

        claim = store.claim_batch(1)  # the oldest, first in the decode order
        assert claim is not None and [r.id for r in claim.records] == [ids[0]]
        WebDriverWait(browser, 10).until(lambda _: badge(ids[0]) == "decoding")
        assert store.fail_attempt(ids[0], claim.token, "test", max_attempts=1, retry_at=0.0)
        store.delete_image(ids[1])
        WebDriverWait(browser, 10).until(lambda d: badge(ids[0]) == "failed" and len(
            d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 1)
        settled = time.monotonic()
        time.sleep(4)
        assert [t for t in listings if t > settled + 0.5] == []  # nothing left to wait for: no more polls


def test_an_older_page_whose_session_ended_signs_in_back_to_itself(tmp_path: Path, browser: Chrome) -> None:
    """A polling grid that found its session gone went to `/login`, so signing in again opened the first
    page instead of the older page the visitor was on."""
    app, tokens = _app(tmp_path, worker=False)
    with ServerThread(app) as server:
        for _ in range(61):
            _upload(server.url, tokens["cam1"])
        browser.get(f"{server.url}/login?token={ADMIN}")
        browser.find_element(By.ID, "older").click()
        WebDriverWait(browser, 10).until(lambda d: "cursor=" in d.current_url)
        older = browser.current_url
        cookie = browser.get_cookie("aeic_session")
        assert cookie is not None
        assert httpx.post(f"{server.url}/logout", cookies={"aeic_session": cookie["value"]}).status_code == 303
        field = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "token"))
        field.send_keys(f"{ADMIN}\n")
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "grid"))
        assert browser.current_url == older


def _picture_on_a_phone(browser: Chrome, base: str, token: str, size: tuple[int, int]) -> list[float]:
    """Upload a picture of ``size``, open its page at a phone's width with touch, and return the viewer's box
    (left, top, width, height) once the picture has loaded."""
    image_id = _upload(base, token, size=size)
    _wait_done(base, token, image_id)
    browser.set_window_size(360, 740)
    browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5})
    browser.get(f"{base}/login?token={ADMIN}")
    browser.get(f"{base}/images/{image_id}")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "const i = document.getElementById('reconstruction'); return i.complete && i.naturalWidth > 0"))
    return list(browser.execute_script(
        "const b = document.getElementById('viewer').getBoundingClientRect(); return [b.left, b.top, b.width, b.height]"))


def test_two_fingers_pinch_the_picture_on_a_phone(tmp_path: Path, browser: Chrome) -> None:
    """The viewer takes the browser's own pinch-zoom away (touch-action: none, so that a drag pans the
    picture) but did not pinch itself: on a phone two fingers did nothing. They zoom now, by the change of
    their distance, about their midpoint."""
    app, tokens = _app(tmp_path)
    with ServerThread(app) as server:
        left, top, width, height = _picture_on_a_phone(browser, server.url, tokens["cam1"], (640, 480))
        mid_x, mid_y = left + width * 0.4, top + height / 2

        def fingers(apart: float) -> list[dict[str, float]]:
            return [{"x": mid_x - apart, "y": mid_y, "id": 1}, {"x": mid_x + apart, "y": mid_y, "id": 2}]

        def under_midpoint() -> list[float]:  # the point of the picture under the fingers' midpoint, 0..1
            return list(browser.execute_script(
                "const r = document.getElementById('reconstruction').getBoundingClientRect();"
                "return [(arguments[0] - r.left) / r.width, (arguments[1] - r.top) / r.height]", mid_x, mid_y))

        before = under_midpoint()
        browser.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": fingers(20)})
        for apart in range(25, 65, 5):
            browser.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": fingers(apart)})
        browser.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        scale = float(browser.find_element(By.ID, "viewer").get_attribute("data-scale") or "nan")
        assert abs(scale - 3) < 0.001  # 60 / 20 apart
        fitted = browser.execute_script("return document.getElementById('reconstruction').clientWidth")
        assert browser.find_element(By.ID, "zoom-level").text == f"{round(300 * fitted / 640)}%"  # of the true size
        after = under_midpoint()
        assert abs(after[0] - before[0]) < 0.01 and abs(after[1] - before[1]) < 0.01, (before, after)
        assert browser.execute_script("return visualViewport.scale") == 1  # the picture zoomed, not the page


def test_a_finger_on_the_picture_scrolls_the_page_until_it_is_zoomed_in(tmp_path: Path, browser: Chrome) -> None:
    """On a phone a swipe that began on the picture did not scroll the page (touch-action: none on the
    whole viewer): under a portrait photo, most of the screen could not be scrolled. At 100% it scrolls the
    page; zoomed in, it pans the picture."""
    app, tokens = _app(tmp_path)
    with ServerThread(app) as server:
        left, top, width, height = _picture_on_a_phone(browser, server.url, tokens["cam1"], (480, 640))  # portrait
        x, y = left + width / 2, top + height * 0.8

        def swipe_up() -> None:
            browser.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
            for step in range(1, 11):
                browser.execute_cdp_cmd("Input.dispatchTouchEvent",
                                        {"type": "touchMove", "touchPoints": [{"x": x, "y": y - 15 * step}]})
            browser.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})

        def picture() -> str:
            return str(browser.find_element(By.ID, "reconstruction").get_attribute("style"))

        swipe_up()
        WebDriverWait(browser, 5).until(lambda d: d.execute_script("return scrollY") > 50)
        assert browser.find_element(By.ID, "viewer").get_attribute("data-scale") == "1"
        browser.execute_script("scrollTo(0, 0)")
        browser.find_element(By.ID, "viewer").send_keys("+", "+")  # zoomed in (here by the keyboard)
        before, scrolled = picture(), browser.execute_script("return scrollY")
        swipe_up()
        WebDriverWait(browser, 5).until(lambda _: picture() != before)  # the picture moved
        assert browser.execute_script("return scrollY") == scrolled  # and the page did not
