"""The gallery in headless Chromium against a real uvicorn server: thumbnails newest first, live
updates when a new image arrives, and an image page with metadata and a working zoom."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import receiver_support
from aeic.receiver.api import create_app
from aeic.receiver.settings import ReceiverSettings
from receiver_support import ServerThread
from selenium.webdriver import Chrome
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ADMIN = "gallery-admin-token"

# Fixtures shared with the other receiver tests.
browser = receiver_support.browser
tiny_package = receiver_support.tiny_package


def _device_token(settings: ReceiverSettings, device: str) -> str:
    return receiver_support.make_tokens(settings, device)[device]


def _upload_and_wait(base: str, token: str, data: bytes) -> str:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    reply = httpx.post(f"{base}/v1/images", content=data, headers=headers, timeout=10)
    assert reply.status_code == 202, reply.text
    image_id = str(reply.json()["id"])
    deadline = time.monotonic() + 180  # the first decode waits for the decoder to load on a busy machine
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/v1/images/{image_id}", headers=headers).json()["status"] == "done":
            return image_id
        time.sleep(0.05)
    raise AssertionError(f"{image_id} was not decoded")


def _card_ids(driver: Chrome) -> list[str]:
    # One script call: the live grid may replace cards between separate element look-ups.
    return list(driver.execute_script("return [...document.querySelectorAll('#grid .card')].map(c => c.dataset.id)"))


def _thumbs_loaded(driver: Chrome) -> bool:
    return bool(driver.execute_script(
        "const imgs = [...document.querySelectorAll('#grid .card img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"))


def _settings(tmp_path: Path, package: Path, **overrides: Any) -> ReceiverSettings:  # its fields
    """A receiver of the tiny package on the CPU with its data in ``tmp_path``."""
    return ReceiverSettings(data_dir=tmp_path / "data", admin_token=ADMIN, model_packages=[package], device="cpu",
                            **overrides)


def _stream(package: Path, width: int, height: int, seed: int) -> bytes:
    from aeic.sender.encoder import SenderCodec

    return SenderCodec.from_package(package).encode(receiver_support.natural_photo(width, height, seed), 0)


def _scale(driver: Chrome) -> str:
    return str(driver.find_element(By.ID, "viewer").get_attribute("data-scale"))


def test_gallery_live_grid_and_zoomable_image_page(
    tmp_path: Path, browser: Chrome, tiny_package: Path
) -> None:
    from aeic.sender.encoder import SenderCodec

    sender = SenderCodec.from_package(tiny_package)
    streams = [sender.encode(receiver_support.natural_photo(w, h, seed), 0)
               for w, h, seed in ((96, 64, 1), (64, 64, 2), (400, 300, 3))]
    settings = _settings(tmp_path, tiny_package, poll_interval_s=0.05)
    token = _device_token(settings, "cam1")
    with ServerThread(create_app(settings)) as server:
        first = _upload_and_wait(server.url, token, streams[0])
        second = _upload_and_wait(server.url, token, streams[1])
        browser.get(f"{server.url}/login?token={ADMIN}")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: _card_ids(d) == [second, first] and _thumbs_loaded(d))

        third = _upload_and_wait(server.url, token, streams[2])
        wait.until(lambda d: _card_ids(d) == [third, second, first] and _thumbs_loaded(d))
        # the server's cards and the one the live script added say the time the same way (in this browser's
        # zone: test_receiver_gallery_usability.py checks the zone)
        times = [card.find_element(By.CSS_SELECTOR, ".caption.dim time").text
                 for card in browser.find_elements(By.CSS_SELECTOR, "#grid .card")]
        zone = browser.execute_script("return new Intl.DateTimeFormat('en', {timeZoneName: 'short'})"
                                      ".formatToParts(new Date()).find(p => p.type === 'timeZoneName').value")
        assert len(times) == 3 and all(t.endswith(f" {zone}") for t in times), (times, zone)

        browser.find_element(By.CSS_SELECTOR, f'#grid .card[data-id="{third}"]').click()
        wait.until(lambda d: d.find_elements(By.ID, "reconstruction"))
        assert browser.find_element(By.ID, "m-size").text == "400 × 300 px"
        size = len(streams[2])
        assert browser.find_element(By.ID, "m-bytes").text == f"{size} bytes"
        assert browser.find_element(By.ID, "m-bpp").text == f"{size * 8 / (400 * 300):.4f}"
        assert browser.find_element(By.ID, "m-scale").text == "full size"
        assert browser.find_element(By.ID, "m-decode").text.endswith("ms")
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('reconstruction'); return i.complete && i.naturalWidth;") == 400)

        viewer = browser.find_element(By.ID, "viewer")
        assert _scale(browser) == "1"
        viewer.click()
        style = browser.find_element(By.ID, "reconstruction").get_attribute("style")
        assert _scale(browser) == "2" and style is not None and "scale(2)" in style
        assert browser.find_element(By.ID, "zoom-level").text == "200%"
        ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(viewer), 0, -120).perform()
        wait.until(lambda d: float(_scale(d)) > 2.0)
        ActionChains(browser).double_click(viewer).perform()
        wait.until(lambda d: _scale(d) == "1")
        # the keyboard does it too: + zooms, an arrow pans, 0 resets
        viewer.send_keys("+")
        assert _scale(browser) == "1.5"
        before = browser.find_element(By.ID, "reconstruction").get_attribute("style")
        viewer.send_keys(Keys.ARROW_LEFT)
        assert browser.find_element(By.ID, "reconstruction").get_attribute("style") != before
        viewer.send_keys("0")
        assert _scale(browser) == "1"


def _upload(base: str, token: str, data: bytes) -> str:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    reply = httpx.post(f"{base}/v1/images", content=data, headers=headers, timeout=10)
    assert reply.status_code == 202, reply.text
    return str(reply.json()["id"])


def test_live_first_page_keeps_the_older_link_in_step(
    tmp_path: Path, browser: Chrome, tiny_package: Path
) -> None:
    """Images pushed off the live first page stay reachable through "Older images", the favicon does not
    404, and a signed-out page goes back to the token form instead of polling 401s forever."""
    stream = _stream(tiny_package, 64, 64, 4)
    settings = _settings(tmp_path, tiny_package, worker=False, rate_limit_burst=1000)
    token = _device_token(settings, "cam1")
    with ServerThread(create_app(settings)) as server:
        ids = [_upload(server.url, token, stream) for _ in range(60)]  # exactly one gallery page, all pending
        browser.get(f"{server.url}/login?token={ADMIN}")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: len(_card_ids(d)) == 60)
        assert not browser.find_elements(By.ID, "older")
        newest = _upload(server.url, token, stream)
        wait.until(lambda d: _card_ids(d)[:1] == [newest] and d.find_elements(By.ID, "older"))
        assert len(_card_ids(browser)) == 60 and ids[0] not in _card_ids(browser)
        browser.find_element(By.ID, "older").click()
        wait.until(lambda d: _card_ids(d) == [ids[0]])
        assert not [e for e in browser.get_log("browser") if "favicon" in e["message"]]

        browser.get(f"{server.url}/")
        wait.until(lambda d: len(_card_ids(d)) == 60)
        # Signed out elsewhere (another tab's "log out"): the session ends server-side, so the cookie this
        # tab still holds is refused and the live grid goes back to the token form.
        cookie = browser.get_cookie("aeic_session")
        assert cookie is not None
        session = cookie["value"]
        assert httpx.post(f"{server.url}/logout", cookies={"aeic_session": session}).status_code == 303
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "form.login input[name=token]"))


def test_image_page_fits_a_tall_image_in_the_viewer(
    tmp_path: Path, browser: Chrome, tiny_package: Path
) -> None:
    """At 100% the whole reconstruction is visible: a tall image is scaled to the viewer, not cropped."""
    stream = _stream(tiny_package, 64, 1600, 5)
    settings = _settings(tmp_path, tiny_package, poll_interval_s=0.05)
    token = _device_token(settings, "cam1")
    with ServerThread(create_app(settings)) as server:
        image_id = _upload_and_wait(server.url, token, stream)
        browser.get(f"{server.url}/login?token={ADMIN}")
        browser.get(f"{server.url}/images/{image_id}")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('reconstruction'); return i.complete && i.naturalWidth;") == 64)
        img, box = browser.execute_script(
            "const i = document.getElementById('reconstruction').getBoundingClientRect();"
            "const v = document.getElementById('viewer').getBoundingClientRect();"
            "return [[i.width, i.height], [v.width, v.height]];")
        assert img[1] <= box[1] + 0.5 and img[0] <= box[0] + 0.5, (img, box)
        assert abs(img[0] / img[1] - 64 / 1600) < 0.01  # aspect ratio kept
        assert img[1] <= browser.execute_script("return innerHeight")


def test_waiting_image_page_notices_the_image_was_deleted(
    tmp_path: Path, browser: Chrome, tiny_package: Path
) -> None:
    """A page waiting for a pending image shows "No image" once that image is deleted, instead of waiting forever."""
    stream = _stream(tiny_package, 64, 64, 6)
    settings = _settings(tmp_path, tiny_package, worker=False)
    token = _device_token(settings, "cam1")
    with ServerThread(create_app(settings)) as server:
        image_id = _upload(server.url, token, stream)
        browser.get(f"{server.url}/login?token={ADMIN}")
        browser.get(f"{server.url}/images/{image_id}")
        assert browser.find_element(By.ID, "waiting").text == "pending…"
        reply = httpx.delete(f"{server.url}/v1/images/{image_id}", headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 204
        WebDriverWait(browser, 10).until(lambda d: f"No image {image_id}." in d.find_element(By.TAG_NAME, "main").text)


def test_panoramas_and_strips_are_shown_whole(tmp_path: Path, browser: Chrome, tiny_package: Path) -> None:
    """A thumbnail more than 3:1 is letterboxed, not cropped to a sliver: on the served page and on a card the
    live script adds."""
    settings = _settings(tmp_path, tiny_package, poll_interval_s=0.05)
    token = _device_token(settings, "cam1")
    with ServerThread(create_app(settings)) as server:
        strip = _upload_and_wait(server.url, token, _stream(tiny_package, 64, 320, 7))
        photo = _upload_and_wait(server.url, token, _stream(tiny_package, 96, 64, 8))
        browser.get(f"{server.url}/login?token={ADMIN}")
        panorama = _upload_and_wait(server.url, token, _stream(tiny_package, 320, 48, 9))
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: _card_ids(d) == [panorama, photo, strip] and _thumbs_loaded(d))
        fits = {card.get_attribute("data-id"): card.find_element(By.CSS_SELECTOR, ".thumb img").value_of_css_property(
            "object-fit") for card in browser.find_elements(By.CSS_SELECTOR, "#grid .card")}
        assert fits == {strip: "contain", photo: "cover", panorama: "contain"}
