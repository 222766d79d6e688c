"""The gallery for people on a phone, with a keyboard only or with a screen reader, in headless Chromium
against a real uvicorn server (the decoder is the instant test double, so these run in seconds)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import receiver_support
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from receiver_support import BlockingCodec, ServerThread, gallery_app, make_tokens
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

ADMIN = "gallery-a11y-admin-token"

browser = receiver_support.browser

# WCAG 2.x contrast of an element's text against the first opaque background behind it.
_CONTRAST_JS = """
function rgb(s) { const m = s.match(/[\\d.]+/g).map(Number); return m.length > 3 ? m : [...m, 1]; }
function lum(c) {
  const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
  return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]);
}
function background(el) {
  for (let e = el; e; e = e.parentElement) {
    const c = rgb(getComputedStyle(e).backgroundColor);
    if (c[3] > 0.99) return c;
  }
  return [255, 255, 255, 1];
}
return [...document.querySelectorAll(arguments[0])].filter(e => e.getClientRects().length).map(e => {
  const a = lum(rgb(getComputedStyle(e).color)), b = lum(background(e));
  return [e.tagName + '.' + e.className + ' ' + e.textContent.trim().slice(0, 30),
          (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
});
"""


def _app(tmp_path: Path, **overrides: Any) -> tuple[Any, str]:
    """A receiver with the instant test decoder, and a device token for "cam1"."""
    app, tokens = gallery_app(tmp_path, ADMIN, **overrides)
    return app, tokens["cam1"]


_upload = receiver_support.upload_stream


def _status(base: str, token: str, image_id: str) -> str:
    return str(httpx.get(f"{base}/v1/images/{image_id}", headers={"Authorization": f"Bearer {token}"}).json()["status"])


def _wait_settled(base: str, token: str, *ids: str) -> None:
    # WebDriverWait as a plain poller: it never touches its driver, so none is given (the stubs want one)
    WebDriverWait(None, 20, poll_frequency=0.05).until(  # type: ignore[type-var]
        lambda _: all(_status(base, token, i) in ("done", "failed") for i in ids))


def _attribute(element: WebElement, name: str) -> str:
    """An attribute the page must set."""
    value = element.get_attribute(name)
    assert value is not None, f"no {name} on <{element.tag_name}>"
    return value


def _sign_in(driver: Chrome, base: str) -> None:
    driver.get(f"{base}/login?token={ADMIN}")


def _focused(driver: Chrome) -> dict[str, Any]:
    return dict(driver.execute_script(
        "const a = document.activeElement, s = getComputedStyle(a);"
        "return {tag: a.tagName, id: a.id, href: a.getAttribute('href'), outline: s.outlineStyle,"
        " width: parseFloat(s.outlineWidth)};"))


def _tab(driver: Chrome) -> dict[str, Any]:
    driver.switch_to.active_element.send_keys(Keys.TAB)
    return _focused(driver)


def _low_contrast(driver: Chrome, selector: str) -> list[Any]:
    return [pair for pair in driver.execute_script(_CONTRAST_JS, selector) if pair[1] < 4.5]


def test_sign_in_form_is_labelled_and_its_errors_are_announced(tmp_path: Path, browser: Chrome) -> None:
    """The token field has a label; a wrong token and the rate limit are said in an alert tied to the field."""
    app, _ = _app(tmp_path, login_attempts_per_minute=1)
    with ServerThread(app) as server:
        browser.get(f"{server.url}/")
        assert browser.execute_script("return document.documentElement.lang") == "en"
        assert browser.title == "Sign in · AEIC receiver"
        assert browser.execute_script("return document.getElementById('token').labels[0].textContent") == "Token"
        assert _focused(browser)["id"] == "token"  # autofocus: type at once
        browser.switch_to.active_element.send_keys("wrong-token", Keys.ENTER)
        error = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "login-error"))
        assert error.get_attribute("role") == "alert" and error.text == "That token is not valid."
        field = browser.find_element(By.ID, "token")
        assert "login-error" in _attribute(field, "aria-describedby").split()
        assert field.get_attribute("aria-invalid") == "true"
        browser.switch_to.active_element.send_keys("wrong-again", Keys.ENTER)
        # the submit reloads the page: an element found on the old one may go stale before its text is read
        WebDriverWait(browser, 10, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda d: "Too many" in d.find_element(By.ID, "login-error").text)
        error = browser.find_element(By.ID, "login-error")
        assert error.get_attribute("role") == "alert"
        assert error.text.startswith("Too many failed sign-ins") and error.text.endswith(" s.")
        assert not _low_contrast(browser, "main *")


def test_pages_have_landmarks_headings_titles_and_meaningful_alt_text(
    tmp_path: Path, browser: Chrome
) -> None:
    app, token = _app(tmp_path)
    with ServerThread(app) as server:
        good = _upload(server.url, token)
        bad = _upload(server.url, token, payload=b"FAIL")
        _wait_settled(server.url, token, good, bad)
        _sign_in(browser, server.url)
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .card img"))
        assert browser.title == "Received images · AEIC receiver"
        for landmark in ("header", "main", "nav"):
            assert len(browser.find_elements(By.TAG_NAME, landmark)) == 1, landmark
        assert [h.text for h in browser.find_elements(By.CSS_SELECTOR, "h1, h2, h3")] == ["Received images"]
        alts = browser.execute_script("return [...document.querySelectorAll('img')].map(i => i.alt)")
        assert alts == ["Decoded image from cam1"]  # says what it is, not a hex id
        # a failed image says so in words, not only in red
        assert browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{bad}"] .badge').text == "failed"
        assert not _low_contrast(browser, "body, body *")

        browser.get(f"{server.url}/images/{good}")
        assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Image from cam1")
        # a tab's title says whose image and when, not a hex id (two tabs of one device's images differ)
        assert re.fullmatch(r"Image from cam1, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC · AEIC receiver", browser.title)
        viewer = browser.find_element(By.ID, "viewer")
        assert "48 × 32 px, from cam1" in _attribute(viewer, "aria-label")
        assert good not in _attribute(browser.find_element(By.ID, "reconstruction"), "alt")
        assert browser.find_element(By.ID, "zoom-level").get_attribute("aria-live") == "polite"
        assert not _low_contrast(browser, "body, body *")

        browser.get(f"{server.url}/images/{bad}")
        assert browser.find_element(By.ID, "failure").text.startswith("Decoding failed:")

        browser.get(f"{server.url}/images/{'0' * 32}")
        assert browser.title == "Image not found · AEIC receiver"
        assert browser.find_element(By.TAG_NAME, "h1").text == "Image not found"


# Each form field: its edge against the first opaque background outside it (WCAG 1.4.11: 3:1 at least) and
# its placeholder's text against the field (4.5:1, as any text).
_FIELD_EDGES_JS = _CONTRAST_JS.split("return [...")[0] + """
const ratio = (x, y) => { const a = lum(x), b = lum(y); return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); };
return [...document.querySelectorAll('input:not([type=hidden]), select, form.filter button')].map(e =>
  [e.id, ratio(rgb(getComputedStyle(e).borderTopColor), background(e.parentElement)),
   e.placeholder ? ratio(rgb(getComputedStyle(e, '::placeholder').color), background(e)) : null]);
"""


def test_form_fields_have_edges_and_placeholders_that_can_be_seen(tmp_path: Path, browser: Chrome) -> None:
    """The token field and the filter's fields were drawn with a border of 1.4:1 against the page (1.2:1 on
    the sign-in panel), so where a field begins and ends was all but invisible to a low-vision user (WCAG
    1.4.11 asks 3:1 of a component's edges), and their placeholders ("any": the device filter left empty)
    were Chromium's grey at 4.2:1, under the 4.5:1 of text."""
    app, _ = _app(tmp_path, worker=False)
    with ServerThread(app) as server:
        browser.get(f"{server.url}/login")
        sign_in_page = browser.execute_script(_FIELD_EDGES_JS)
        _sign_in(browser, server.url)
        grid = browser.execute_script(_FIELD_EDGES_JS)
        assert [name for name, *_ in sign_in_page] == ["token"]
        assert [name for name, *_ in grid] == ["filter-device", "filter-status", "filter-apply"]
        assert [(name, edge) for name, edge, _ in sign_in_page + grid if edge < 3] == []
        assert [(name, text) for name, _, text in sign_in_page + grid if text is not None and text < 4.5] == []


def test_status_badges_are_readable_and_say_the_status(tmp_path: Path, browser: Chrome) -> None:
    """Pending cards and the waiting image page: the status is words with AA contrast (4.5:1)."""
    app, token = _app(tmp_path, worker=False)
    with ServerThread(app) as server:
        image_id = _upload(server.url, token)
        _sign_in(browser, server.url)
        assert browser.find_element(By.CSS_SELECTOR, "#grid .badge").text == "pending"
        assert not _low_contrast(browser, ".badge")
        browser.get(f"{server.url}/images/{image_id}")
        assert browser.find_element(By.ID, "waiting").get_attribute("role") == "status"
        assert not _low_contrast(browser, ".badge")


def test_keyboard_reaches_everything_in_order_with_a_visible_focus_ring(
    tmp_path: Path, browser: Chrome
) -> None:
    """Tab walks header, the filter, cards and back; Enter opens an image and its "Gallery" link closes it."""
    app, token = _app(tmp_path)
    with ServerThread(app) as server:
        ids = [_upload(server.url, token) for _ in range(2)]
        _wait_settled(server.url, token, *ids)
        _sign_in(browser, server.url)
        stops = [_tab(browser) for _ in range(7)]
        assert [(s["tag"], s["id"] or s["href"]) for s in stops] == [
            ("A", "/"), ("BUTTON", "logout"), ("INPUT", "filter-device"), ("SELECT", "filter-status"),
            ("BUTTON", "filter-apply"), ("A", f"/images/{ids[1]}"), ("A", f"/images/{ids[0]}")]
        assert all(s["outline"] == "solid" and s["width"] >= 2 for s in stops), stops
        browser.switch_to.active_element.send_keys(Keys.ENTER)  # open the focused (older) image
        WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith(f"/images/{ids[0]}"))
        stops = [_tab(browser) for _ in range(5)]
        assert [(s["tag"], s["id"] or s["href"]) for s in stops] == [
            ("A", "/"), ("BUTTON", "logout"), ("A", "/"), ("A", "newer-image"), ("DIV", "viewer")]
        assert all(s["outline"] == "solid" and s["width"] >= 2 for s in stops), stops
        browser.switch_to.active_element.send_keys("+")
        assert browser.find_element(By.ID, "zoom-level").text == "150%"
        browser.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)  # back past "Newer image"
        browser.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)  # to the "Gallery" link
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "grid"))


def test_phone_viewport_needs_no_sideways_scrolling_and_has_touch_sized_targets(
    tmp_path: Path, browser: Chrome
) -> None:
    app, token = _app(tmp_path)
    with ServerThread(app) as server:
        image_id = _upload(server.url, token, size=(640, 480))
        _wait_settled(server.url, token, image_id)
        browser.set_window_size(360, 740)
        assert browser.execute_script("return innerWidth") == 360
        browser.get(f"{server.url}/")
        pages = ["/login", "/", f"/images/{image_id}", f"/images/{'0' * 32}", "/nope"]
        for n, path in enumerate(pages):
            if n == 1:
                _sign_in(browser, server.url)
            browser.get(f"{server.url}{path}")
            root = browser.execute_script("return [document.documentElement.scrollWidth,"
                                          " document.documentElement.clientWidth]")
            assert root[0] <= root[1], (path, root)
            small = browser.execute_script(
                "return [...document.querySelectorAll('a, button, input, [tabindex]')]"
                ".filter(e => e.getClientRects().length).map(e => [e.textContent.trim() || e.id,"
                " e.getBoundingClientRect().width, e.getBoundingClientRect().height])"
                ".filter(([, w, h]) => w < 44 || h < 44)")
            assert not small, (path, small)


def test_live_updates_keep_focus_and_scroll_and_say_problems_in_words(
    tmp_path: Path, browser: Chrome
) -> None:
    app, token = _app(tmp_path, worker=False)
    state = app.state.receiver
    with ServerThread(app) as server:
        for _ in range(12):
            _upload(server.url, token)
        browser.set_window_size(360, 740)
        _sign_in(browser, server.url)
        live = browser.find_element(By.ID, "live")
        assert live.get_attribute("role") == "status" and live.text == "Updating live"
        assert browser.find_element(By.TAG_NAME, "h1").text == "Received images"  # the status is not in it
        browser.execute_script("const c = document.querySelectorAll('#grid .card')[6]; c.focus();"
                               "c.scrollIntoView({block: 'center'});")
        before = browser.execute_script("return [document.activeElement.dataset.id,"
                                        " document.activeElement.getBoundingClientRect().top]")
        _upload(server.url, token)
        WebDriverWait(browser, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 13)
        after = browser.execute_script("return [document.activeElement.dataset.id,"
                                       " document.activeElement.getBoundingClientRect().top]")
        assert after[0] == before[0] and abs(after[1] - before[1]) < 1, (before, after)

        original = state.store.list_images, state.store.catalogue_token

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("database unavailable")

        state.store.list_images = state.store.catalogue_token = broken  # what an unchanged listing reads too
        try:
            WebDriverWait(browser, 10).until(lambda d: "HTTP 5" in d.find_element(By.ID, "live").text)
        finally:
            state.store.list_images, state.store.catalogue_token = original
        assert "error" in _attribute(live, "class")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "live").text == "Updating live")
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/images*"]})
        WebDriverWait(browser, 10).until(
            lambda d: "cannot reach the receiver" in d.find_element(By.ID, "live").text)
        assert browser.execute_script("return document.activeElement.dataset.id") == before[0]


def test_a_screen_reader_hears_what_the_live_grid_adds_and_decodes(tmp_path: Path, browser: Chrome) -> None:
    """New cards appeared at the top of the live grid and badges turned into pictures without a word: a screen
    reader user heard nothing of an image arriving or being decoded unless they went through the grid again.
    A polite live region, not shown on screen, counts what changed since the page was opened."""
    settings = ReceiverSettings(data_dir=tmp_path / "data", admin_token=ADMIN, poll_interval_s=0.05,
                                retry_delay_s=0.0, rate_limit_burst=1000)
    token = make_tokens(settings, "cam1")["cam1"]
    codec = BlockingCodec(hold_s=20)
    app = create_app(settings, registry=CodecRegistry.from_codecs([codec]))
    with ServerThread(app) as server:
        first = _upload(server.url, token)
        assert codec.entered.wait(10)  # decoding, held
        _sign_in(browser, server.url)
        news = browser.find_element(By.ID, "news")
        assert news.get_attribute("role") == "status" and news.text == ""
        assert browser.execute_script("return arguments[0].getBoundingClientRect().width", news) <= 1  # not seen
        _upload(server.url, token)
        said = "return arguments[0].textContent"
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(said, news) == "Since this page opened: 1 new image.")
        codec.release.set()
        _wait_settled(server.url, token, first)
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(said, news)
                                         == "Since this page opened: 1 new image, 2 decoded.")


def test_waiting_image_page_updates_in_place_and_explains_a_lost_connection(
    tmp_path: Path, browser: Chrome
) -> None:
    """pending -> decoding changes the words without reloading (focus stays); a dead poll is explained."""
    app, token = _app(tmp_path, worker=False)
    state = app.state.receiver
    with ServerThread(app) as server:
        image_id = _upload(server.url, token)
        _sign_in(browser, server.url)
        browser.get(f"{server.url}/images/{image_id}")
        assert browser.find_element(By.ID, "waiting").text == "pending…"
        browser.execute_script("document.querySelector('.back a').focus(); window.aeicMark = 1;")
        assert state.store.claim_batch(1) is not None  # a decoder picked it up
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "waiting").text == "decoding…")
        assert browser.find_element(By.ID, "m-status").text == "decoding"
        assert browser.execute_script("return window.aeicMark") == 1  # not reloaded
        assert _focused(browser)["href"] == "/"
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/images/*"]})
        WebDriverWait(browser, 10).until(
            lambda d: "cannot reach the receiver" in d.find_element(By.ID, "waiting").text)
        assert _focused(browser)["href"] == "/"


def test_sign_out_by_keyboard_and_back_shows_no_private_page(tmp_path: Path, browser: Chrome) -> None:
    """Chromium may restore even a no-store page from its back/forward cache: after sign-out, Back must show
    nothing private (the page hid itself going into the cache and reloads coming out of it)."""
    app, token = _app(tmp_path)
    with ServerThread(app) as server:
        image_id = _upload(server.url, token)
        _wait_settled(server.url, token, image_id)
        _sign_in(browser, server.url)
        browser.get(f"{server.url}/images/{image_id}")
        browser.get(f"{server.url}/")
        # the mechanism, deterministically: into the cache hides the page, out of it reloads it
        browser.execute_script("window.aeicMark = 1;"
                               "window.dispatchEvent(new PageTransitionEvent('pagehide', {persisted: true}));")
        assert browser.execute_script("return getComputedStyle(document.body).visibility") == "hidden"
        assert browser.execute_script("return document.body.innerText") == ""
        browser.execute_script("window.dispatchEvent(new PageTransitionEvent('pageshow', {persisted: true}));")
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(
            "return window.aeicMark === undefined && document.readyState === 'complete'"
            " && getComputedStyle(document.body).visibility === 'visible'"))

        browser.find_element(By.ID, "logout").send_keys(Keys.ENTER)
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "token"))
        for _ in range(3):
            browser.back()
            WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")
            visible = browser.execute_script("return document.body.innerText")
            assert image_id not in visible and "Received images" not in visible, visible
