"""Gallery routes: grid of thumbnails (newest first), one page per image, cookie login."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from aeic.receiver.api import AUTH_COOKIE, image_json, optional_principal, receiver_state, visible_image
from aeic.receiver.errors import ApiError
from aeic.receiver.storage import ImageFilter, InvalidCursorError
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

__all__ = ["install_gallery"]

_HERE = Path(__file__).parent
_templates = Jinja2Templates(directory=str(_HERE / "templates"))
_FIRST_PAGE = 60


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _fmt_when(iso: str | None) -> str:
    return "-" if not iso else iso[:19].replace("T", " ") + " UTC"


_templates.env.filters["ms"] = _fmt_ms
_templates.env.filters["when"] = _fmt_when


def _login_page(request: Request, message: str | None = None, status: int = 200) -> HTMLResponse:
    return _templates.TemplateResponse(request, "login.html", {"message": message}, status_code=status)


def index(request: Request, cursor: str | None = None) -> Response:
    """The grid (newest first; the first page updates live, `cursor` pages through older images);
    anonymous visitors get the token form."""
    who = optional_principal(request)
    if who is None:
        return _login_page(request)
    flt = ImageFilter(device=None if who.admin else who.device)
    store = receiver_state(request).store
    try:
        page = store.list_images(flt, _FIRST_PAGE, cursor)
    except InvalidCursorError:
        cursor, page = None, store.list_images(flt, _FIRST_PAGE, None)
    context: dict[str, Any] = {"images": [image_json(r) for r in page.items], "who": who, "limit": _FIRST_PAGE,
                               "next": page.next, "live": cursor is None}
    return _templates.TemplateResponse(request, "index.html", context)


def image_page(image_id: str, request: Request) -> Response:
    """True size, bytes, bpp, timings and the zoomable reconstruction of one image."""
    who = optional_principal(request)
    if who is None:
        return _login_page(request)
    try:
        record = visible_image(receiver_state(request), who, image_id)
    except ApiError:
        return _templates.TemplateResponse(request, "missing.html", {"image_id": image_id}, status_code=404)
    return _templates.TemplateResponse(request, "image.html", {"image": image_json(record), "who": who})


def _set_cookie(request: Request, token: str) -> Response:
    if receiver_state(request).auth.authenticate(token) is None:
        return _login_page(request, "That token is not valid.", status=401)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(AUTH_COOKIE, token, httponly=True, samesite="lax", max_age=30 * 86400,
                        secure=request.url.scheme == "https")
    return response


def login_form(request: Request, token: str | None = None) -> Response:
    """`/login?token=...` (the link the demo prints) or the plain form."""
    return _login_page(request) if not token else _set_cookie(request, token)


async def login_submit(request: Request) -> Response:
    """The form post (urlencoded; parsed here to avoid a multipart dependency)."""
    fields = parse_qs((await request.body())[:4096].decode("utf-8", "replace"))
    token = (fields.get("token") or [""])[0].strip()
    if not token:
        return _login_page(request, "Paste a token.", status=400)
    return await run_in_threadpool(_set_cookie, request, token)


def logout() -> Response:
    """Forget the cookie."""
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(AUTH_COOKIE)
    return response


def install_gallery(app: FastAPI) -> None:
    """Mount the gallery pages and their static files on `app`."""
    router = APIRouter(include_in_schema=False)
    router.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    router.add_api_route("/images/{image_id}", image_page, methods=["GET"], response_class=HTMLResponse)
    router.add_api_route("/login", login_form, methods=["GET"], response_class=HTMLResponse)
    router.add_api_route("/login", login_submit, methods=["POST"], response_class=HTMLResponse)
    router.add_api_route("/logout", logout, methods=["GET"])
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static")
