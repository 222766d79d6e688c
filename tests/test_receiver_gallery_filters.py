"""A catalogue of many devices' images, narrowed to one device or one status in the gallery, in headless
Chromium against a real uvicorn server (the instant test decoder). Before, the grid showed every image
newest first and nothing else: an operator looking for one camera's images, or for the decodes that
failed, among a few hundred paged through them 60 at a time (the API had both filters)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import receiver_support
from receiver_support import ServerThread, gallery_app
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

ADMIN = "gallery-filters-admin-token"

browser = receiver_support.browser


_upload = receiver_support.upload_stream


def _settled(base: str, *ids: str) -> None:
    def done(_: object) -> bool:
        reply = httpx.get(f"{base}/v1/images?limit=200", headers={"Authorization": f"Bearer {ADMIN}"})
        states = {item["id"]: item["status"] for item in reply.json()["items"]}
        return all(states.get(i) in ("done", "failed") for i in ids)

    WebDriverWait(None, 30, poll_frequency=0.05).until(done)  # type: ignore[type-var]


def _cards(driver: Chrome) -> list[str]:
    return list(driver.execute_script("return [...document.querySelectorAll('#grid .card')].map(c => c.dataset.id)"))


def test_the_grid_narrows_to_one_device_or_status_and_stays_live(tmp_path: Path, browser: Chrome) -> None:
    app, tokens = gallery_app(tmp_path, ADMIN, ("cam1", "cam2"))
    with ServerThread(app) as server:
        base = server.url
        one = [_upload(base, tokens["cam1"]) for _ in range(2)]
        two = _upload(base, tokens["cam2"])
        broken = _upload(base, tokens["cam2"], b"FAIL")
        _settled(base, *one, two, broken)
        browser.get(f"{base}/login?token={ADMIN}&next=/images/{two}")
        wait = WebDriverWait(browser, 10)

        # the image page's device leads to that device's images, and the grid follows its new ones only
        browser.find_element(By.LINK_TEXT, "cam2").click()
        wait.until(lambda d: _cards(d) == [broken, two])
        assert "cam2" in browser.find_element(By.TAG_NAME, "h1").text
        newer_two, newer_one = _upload(base, tokens["cam2"]), _upload(base, tokens["cam1"])
        wait.until(lambda d: _cards(d) == [newer_two, broken, two])
        _settled(base, newer_one)
        assert newer_one not in _cards(browser)

        # the form narrows by status, for every device; "All images" undoes it
        browser.find_element(By.LINK_TEXT, "All images").click()
        wait.until(lambda d: len(_cards(d)) == 6)
        Select(browser.find_element(By.ID, "filter-status")).select_by_value("failed")
        browser.find_element(By.ID, "filter-apply").click()
        wait.until(lambda d: _cards(d) == [broken])
        assert browser.current_url.endswith("/?status=failed")


def test_older_pages_keep_the_filter_and_a_device_sees_only_its_own(tmp_path: Path) -> None:
    app, tokens = gallery_app(tmp_path, ADMIN, ("cam1", "cam2"), worker=False)
    with ServerThread(app) as server:
        base = server.url
        for _ in range(61):
            _upload(base, tokens["cam2"])
        _upload(base, tokens["cam1"])
        admin = httpx.get(f"{base}/login", params={"token": ADMIN}).cookies
        page = httpx.get(f"{base}/", params={"device": "cam2"}, cookies=admin).text
        assert len(re.findall(r'class="card ', page)) == 60
        older = re.search(r'id="older" href="([^"]+)"', page)
        assert older is not None and "device=cam2" in older.group(1)
        last = httpx.get(base + older.group(1).replace("&amp;", "&"), cookies=admin).text
        assert len(re.findall(r'class="card ', last)) == 1 and "cam1 ·" not in last

        # a device's session lists its own images whatever the address asks for
        device = httpx.get(f"{base}/login", params={"token": tokens["cam1"]}).cookies
        own = httpx.get(f"{base}/", params={"device": "cam2"}, cookies=device).text
        assert len(re.findall(r'class="card ', own)) == 1 and "cam2 ·" not in own
        # a filter that names nothing valid is no filter, as an unreadable cursor is no cursor
        everything = httpx.get(f"{base}/", params={"device": "no such/device", "status": "lost"}, cookies=admin)
        assert everything.status_code == 200 and len(re.findall(r'class="card ', everything.text)) == 60


def test_a_device_name_that_cannot_be_one_is_explained_before_it_is_sent(tmp_path: Path, browser: Chrome) -> None:
    """The device field refuses what no device can be named (`garden cam`, with a space): Chromium said only
    "Please match the requested format.", which told the admin nothing of the format. It now says it."""
    app, _ = gallery_app(tmp_path, ADMIN, worker=False)
    with ServerThread(app) as server:
        browser.get(f"{server.url}/login?token={ADMIN}")
        field = browser.find_element(By.ID, "filter-device")
        field.send_keys("garden cam")
        browser.find_element(By.ID, "filter-apply").click()
        assert browser.current_url == f"{server.url}/"  # not sent
        message = str(browser.execute_script("return arguments[0].validationMessage", field))
        assert "letters, digits" in message and "space" in message, message
        field.clear()
        field.send_keys("garden-cam")
        assert browser.execute_script("return arguments[0].validationMessage", field) == ""
        browser.find_element(By.ID, "filter-apply").click()
        WebDriverWait(browser, 10).until(lambda d: d.current_url == f"{server.url}/?device=garden-cam")
