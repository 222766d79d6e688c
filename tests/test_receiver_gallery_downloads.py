"""The image page's plain downloads (the PNG and the stream as sent) once the session has ended, in headless
Chromium against a real uvicorn server (the instant test decoder)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import receiver_support
from receiver_support import ServerThread, gallery_app
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ADMIN = "gallery-downloads-admin-token"

browser = receiver_support.browser


def _done(base: str, token: str) -> str:
    image_id = receiver_support.upload_stream(base, token)
    WebDriverWait(None, 20, poll_frequency=0.05).until(  # type: ignore[type-var]
        lambda _: httpx.get(f"{base}/v1/images/{image_id}",
                            headers={"Authorization": f"Bearer {token}"}).json()["status"] == "done")
    return image_id


@pytest.mark.parametrize("link", ["PNG", "Bitstream (.aeic)"])
def test_a_download_after_the_session_ended_asks_for_the_token_again(
    tmp_path: Path, browser: Chrome, link: str
) -> None:
    """Signed out elsewhere, the PNG and bitstream links failed silently in the browser's download bar (the
    WebP and JPEG reload to the token form): they now open the token form in the tab, which leads back to
    the image's page, and signed in they still download, the page staying where it was."""
    app, tokens = gallery_app(tmp_path, ADMIN)
    folder = tmp_path / "downloads"
    folder.mkdir()
    with ServerThread(app) as server:
        image_id = _done(server.url, tokens["cam1"])
        browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
        page = f"{server.url}/images/{image_id}"
        browser.get(f"{server.url}/login?token={ADMIN}&next=/images/{image_id}")
        cookie = browser.get_cookie("aeic_session")
        assert cookie is not None
        assert httpx.post(f"{server.url}/logout", cookies={"aeic_session": cookie["value"]}).status_code == 303
        browser.find_element(By.LINK_TEXT, link).click()
        field = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "token"))
        assert "sign in again to download" in browser.find_element(By.ID, "login-error").text
        assert list(folder.iterdir()) == []  # nothing saved
        field.send_keys(f"{ADMIN}\n")
        WebDriverWait(browser, 10).until(lambda d: d.current_url == page)

        browser.find_element(By.LINK_TEXT, link).click()  # signed in: it downloads, the page staying
        WebDriverWait(None, 20, poll_frequency=0.05).until(  # type: ignore[type-var]
            lambda _: [p.name for p in folder.iterdir() if not p.name.endswith(".crdownload")])
        time.sleep(0.2)
        saved = [p.name for p in folder.iterdir()]
        assert saved == [f"{image_id}.png" if link == "PNG" else f"{image_id}.aeic"], saved
        assert browser.current_url == page


def test_the_png_download_is_the_exact_picture_as_a_file(tmp_path: Path) -> None:
    """`/images/{id}/png` is the API's PNG with a file name; another device's or an unknown image is the
    "not found" page, and without a session the token form (a 401), never the picture."""
    app, tokens = gallery_app(tmp_path, ADMIN, ("cam1", "cam2"))
    with ServerThread(app) as server:
        image_id = _done(server.url, tokens["cam1"])
        url = f"{server.url}/images/{image_id}/png"
        mine = httpx.get(url, headers={"Authorization": f"Bearer {tokens['cam1']}"})
        api = httpx.get(f"{server.url}/v1/images/{image_id}/reconstruction.png",
                        headers={"Authorization": f"Bearer {tokens['cam1']}"})
        assert mine.status_code == 200 and mine.content == api.content and mine.content.startswith(b"\x89PNG")
        assert mine.headers["content-disposition"] == f'attachment; filename="{image_id}.png"'
        assert mine.headers["cache-control"] == "private, max-age=86400"
        again = httpx.get(url, headers={"Authorization": f"Bearer {tokens['cam1']}",
                                        "If-None-Match": mine.headers["etag"]})
        assert again.status_code == 304
        other = httpx.get(url, headers={"Authorization": f"Bearer {tokens['cam2']}"})
        assert other.status_code == 404 and "Image not found" in other.text
        anonymous = httpx.get(url)
        assert anonymous.status_code == 401 and 'name="token"' in anonymous.text and b"PNG" not in anonymous.content

