"""Getting around the gallery with a keyboard, in headless Chromium against a real uvicorn server (the instant
test decoder): past a page of cards to the pager, and from one image to the next."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import receiver_support
from aeic.receiver.gallery import routes
from receiver_support import ServerThread, gallery_app
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ADMIN = "gallery-navigation-admin-token"

browser = receiver_support.browser
_upload = receiver_support.upload_stream


def _focused(driver: Chrome) -> dict[str, Any]:
    return dict(driver.execute_script(
        "const a = document.activeElement, r = a.getBoundingClientRect();"
        "return {tag: a.tagName, id: a.id, text: a.textContent.trim(), shown: r.width > 1 && r.height > 1};"))


def _tab(driver: Chrome) -> dict[str, Any]:
    driver.switch_to.active_element.send_keys(Keys.TAB)
    return _focused(driver)


def test_a_keyboard_reaches_older_images_without_tabbing_past_every_card(
    tmp_path: Path, browser: Chrome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """"Older images" came after every card: 60 Tabs past a full page. A skip link before the grid, shown when
    it has the focus, leads to the pager; a grid with no other page has none (nothing to skip to)."""
    monkeypatch.setattr(routes, "_FIRST_PAGE", 3)
    app, tokens = gallery_app(tmp_path, ADMIN, worker=False)
    with ServerThread(app) as server:
        for _ in range(3):
            _upload(server.url, tokens["cam1"])
        browser.get(f"{server.url}/login?token={ADMIN}")
        assert "skip-pages" not in [_tab(browser)["id"] for _ in range(7)]  # one page: nothing to skip to
        _upload(server.url, tokens["cam1"])  # the live grid grows a second page
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "older"))
        assert browser.execute_script("return document.getElementById('skip-pages').hidden") is False
        browser.get(f"{server.url}/")
        stops = [_tab(browser) for _ in range(6)]
        assert [s["id"] for s in stops[:5]] == ["", "logout", "filter-device", "filter-status", "filter-apply"]
        assert stops[5]["id"] == "skip-pages" and stops[5]["shown"], stops[5]
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        assert _tab(browser)["id"] == "older"
        browser.switch_to.active_element.send_keys(Keys.ENTER)  # the older page: "Newest" is skipped to
        WebDriverWait(browser, 10).until(lambda d: "cursor=" in d.current_url)
        stops = [_tab(browser) for _ in range(6)]
        assert stops[5]["id"] == "skip-pages"
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        assert _tab(browser)["text"] == "Newest"



def _zoom(driver: Chrome) -> tuple[str, float]:
    """The zoom the page says, and the picture's drawn width in CSS pixels."""
    said, width = driver.execute_script(
        "return [document.getElementById('zoom-level').textContent,"
        " document.getElementById('reconstruction').getBoundingClientRect().width]")
    return str(said), float(width)


def test_the_zoom_level_is_of_the_true_size_and_a_key_shows_true_pixels(tmp_path: Path, browser: Chrome) -> None:
    """"Zoom 100%" was said of the picture fitted to the view, 55% of its true size here: the level is now of
    the true size (the fit says so), 1 shows the true pixels and 0 fits the picture again."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    with ServerThread(app) as server:
        image_id = _upload(server.url, tokens["cam1"], size=(640, 480))
        browser.set_window_size(400, 800)
        browser.get(f"{server.url}/login?token={ADMIN}&next=/images/{image_id}")
        WebDriverWait(browser, 20).until(lambda d: d.execute_script(
            "const i = document.getElementById('reconstruction'); return i && i.complete && i.naturalWidth > 0"))
        said, width = _zoom(browser)
        fit = round(width / 640 * 100)
        assert fit < 90 and said == f"{fit}% (fitted to the view)", (said, width)
        viewer = browser.find_element(By.ID, "viewer")
        viewer.send_keys("1")
        said, width = _zoom(browser)
        assert said == "100% (true pixels)" and abs(width - 640) < 1, (said, width)
        viewer.send_keys("+")
        assert _zoom(browser)[0] == "150%"
        viewer.send_keys("0")
        assert _zoom(browser)[0] == f"{fit}% (fitted to the view)"
        assert "1 shows the true pixels, 0 fits" in (viewer.get_attribute("aria-label") or "")


def _steps(driver: Chrome) -> dict[str, str | None]:
    """The image page's links to the newer and older image, as the grid it was opened from ordered them."""
    return dict(driver.execute_script(
        "const at = (id) => { const a = document.getElementById(id);"
        " return a && !a.hidden ? a.getAttribute('href') : null; };"
        "return {newer: at('newer-image'), older: at('older-image')};"))


def test_an_image_page_steps_to_the_next_image_of_the_grid_it_was_opened_from(
    tmp_path: Path, browser: Chrome
) -> None:
    """From an image's page the only way to the next one was back to the grid and a Tab past the cards to it.
    Its page now links the newer and older image of the grid it was opened from, its filter kept (a failed
    image's page steps through the failed ones), as links a keyboard reaches after "Gallery"."""
    app, tokens = gallery_app(tmp_path, ADMIN, max_attempts=1)
    with ServerThread(app) as server:
        token = tokens["cam1"]
        old_bad = _upload(server.url, token, b"FAIL")
        good = _upload(server.url, token)
        new_bad = _upload(server.url, token, b"FAIL")
        browser.get(f"{server.url}/login?token={ADMIN}&next=/%3Fstatus%3Dfailed")
        WebDriverWait(browser, 10).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, '#grid .card[data-status="failed"]')) == 2)
        browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{new_bad}"]').click()
        WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith(new_bad))
        assert _steps(browser) == {"newer": None, "older": f"/images/{old_bad}"}  # the decoded one is not in it
        stops = [_tab(browser) for _ in range(4)]
        assert [s["text"] for s in stops[2:]] == ["← Gallery", "Older image →"]
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith(old_bad))
        assert _steps(browser) == {"newer": f"/images/{new_bad}", "older": None}

        browser.get(f"{server.url}/")  # the whole grid: every image in its order
        WebDriverWait(browser, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 3)
        browser.get(f"{server.url}/images/{good}")
        assert _steps(browser) == {"newer": f"/images/{new_bad}", "older": f"/images/{old_bad}"}
