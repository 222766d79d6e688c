"""Gallery routes: grid of thumbnails (newest first), one page per image and its deletion, sign-in and sign-out."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

from aeic.receiver.api import (
    BlobDownload,
    client_address,
    image_json,
    optional_principal,
    read_body,
    receiver_state,
    visible_image,
)
from aeic.receiver.api.conditional import matches
from aeic.receiver.api.downloads import get_reconstruction_as
from aeic.receiver.api.images import delete_image
from aeic.receiver.api.shapes import root_path
from aeic.receiver.auth import DEVICE_NAME, Principal
from aeic.receiver.errors import ApiError, error_response
from aeic.receiver.sessions import COOKIE_NAMES, session_cookie
from aeic.receiver.static_files import VersionedFiles
from aeic.receiver.storage import BlobNotFoundError, ImageFilter, InvalidCursorError, MetadataStore, Status
from aeic.receiver.storage.blobs import bitstream_key, open_blob
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import pass_context
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

__all__ = ["install_gallery"]

_HERE = Path(__file__).parent
_STATIC = _HERE / "static"


def _app_path(request: Request) -> str:
    """The request's path in the app, without the `root_path` a proxy that keeps the prefix leaves on it."""
    path, prefix = request.url.path, root_path(request)
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix):] or "/"
    return path


def _page_context(request: Request) -> dict[str, str]:
    """Every address a page names starts with `root`: an absolute `/images/...` left the prefix, and behind
    https://host/aeic/ reached the proxy's other sites instead of the receiver. The app's prefix, not a
    mount's: the 404 page of a missing `/static/x` would have put `/static` before every address."""
    return {"root": root_path(request)}


_templates = Jinja2Templates(directory=str(_HERE / "templates"), context_processors=[_page_context])
_FIRST_PAGE = 60
_FORM_BYTES = 4096  # the sign-in form: one token field
_IMAGE_ID = re.compile(r"[0-9a-f]{32}")  # what `api.visible_image` looks up
_STATUSES = [status.value for status in Status]


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _fmt_utc(iso: str | None) -> str:
    """A time as UTC text (a page's title, which no script rewrites)."""
    return iso[:19].replace("T", " ") + " UTC" if iso else "-"


def _fmt_when(iso: str | None) -> Markup:
    """A time as UTC text in a `<time>` that page.js shows in the visitor's own zone."""
    if not iso:
        return Markup("-")
    return Markup('<time datetime="{}">{}</time>').format(iso, _fmt_utc(iso))


_templates.env.filters["ms"] = _fmt_ms
_templates.env.filters["utc"] = _fmt_utc
_templates.env.filters["when"] = _fmt_when

# Each script and style sheet by the hash of its content: a page names it `ROOT/static/NAME?v=HASH` (`asset`).
_ASSETS = VersionedFiles(_STATIC, "/static")


@pass_context
def _asset(context: Any, name: str) -> str:
    return f"{context['root']}{_ASSETS.url(name)}"


_templates.env.globals["asset"] = _asset


def _return_path(value: str | None) -> str:
    """The page to open after signing in: `value` when it is a path on this site, else `/`. Refused are other
    origins and schemes, `//host` and `/\\host` (browsers read both as another host) and any space or control
    character (browsers drop a tab or newline from a URL, so `/<tab>/host` would become `//host`)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value if all("!" <= ch <= "~" for ch in value) else "/"


def _here(request: Request) -> str:
    """This request's page (its path in the app, under `root`), to come back to once the visitor has signed in."""
    query = request.url.query
    return _return_path(_app_path(request) + (f"?{query}" if query else ""))


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200,
          headers: dict[str, str] | None = None) -> HTMLResponse:
    """A page, `no-store` whatever it says (the token form and "not found" pages too): a browser may keep an
    answer without it and show it again, and a private page must not come back after signing out."""
    page = _templates.TemplateResponse(request, name, context, status_code=status, headers=headers)
    page.headers["Cache-Control"] = "no-store"
    return page


def _login_page(request: Request, message: str | None = None, status: int = 200, target: str = "/") -> HTMLResponse:
    """The token form; signing in opens `target` (a page of this site, checked by `_return_path`)."""
    return _page(request, "login.html", {"message": message, "target": target}, status)


def _narrowing(who: Principal, device: str | None, status: str | None) -> dict[str, str]:
    """The grid's filter as query parameters: a device (the admin's choice; a device's session lists only its
    own images anyway) and a status. A value that names nothing valid is dropped, as an unreadable cursor is."""
    shown: dict[str, str] = {}
    if who.admin and device and DEVICE_NAME.match(device):
        shown["device"] = device
    if status in _STATUSES:
        shown["status"] = status
    return shown


def index(request: Request, cursor: str | None = None, device: str | None = None,
          status: str | None = None, deleted: str | None = None) -> Response:
    """The grid (newest first; the first page updates live, `cursor` pages through older images), narrowed to
    one device or status when asked (`/?device=cam1&status=failed`); anonymous visitors get the token form."""
    who = optional_principal(request)
    if who is None:
        return _login_page(request, target=_here(request))
    narrowing = _narrowing(who, device, status)
    flt = ImageFilter(device=narrowing.get("device", None if who.admin else who.device),
                      status=Status(narrowing["status"]) if "status" in narrowing else None)
    store = receiver_state(request).store
    try:
        page = store.list_images(flt, _FIRST_PAGE, cursor)
    except InvalidCursorError:
        cursor, page = None, store.list_images(flt, _FIRST_PAGE, None)
    context: dict[str, Any] = {"images": [image_json(r) for r in page.items], "who": who, "limit": _FIRST_PAGE,
                               "next": page.next, "live": cursor is None, "cursor": cursor,
                               "narrowing": narrowing, "query": urlencode(narrowing), "statuses": _STATUSES,
                               "deleted": _was_deleted(store, deleted)}
    return _page(request, "index.html", context)


def _was_deleted(store: MetadataStore, image_id: str | None) -> bool:
    """Whether the grid may say "Image deleted" for `?deleted=ID` (where a delete returns to): only when no
    such image exists, so a link cannot make the page claim that an image still there is gone."""
    return bool(image_id and _IMAGE_ID.fullmatch(image_id) and store.get_image(image_id) is None)


def _missing(request: Request, image_id: str) -> Response:
    """The 404 page, quoting only an id: other text would be an attacker's message shown on our origin."""
    shown = image_id if _IMAGE_ID.fullmatch(image_id) else None
    return _page(request, "missing.html", {"image_id": shown}, 404)


def image_page(image_id: str, request: Request) -> Response:
    """True size, bytes, bpp, timings and the zoomable reconstruction of one image."""
    who = optional_principal(request)
    if who is None:
        return _login_page(request, target=_here(request))
    try:
        record = visible_image(receiver_state(request), who, image_id)
    except ApiError:
        return _missing(request, image_id)
    return _page(request, "image.html", {"image": image_json(record), "who": who})


def _image_target(image_id: str) -> str:
    """An image's page, or the grid for a path that is no image id: where a sign-in or a stray GET leads."""
    return f"/images/{image_id}" if _IMAGE_ID.fullmatch(image_id) else "/"


def _signed_out_download(request: Request, image_id: str) -> Response:
    """The token form, as a 401, for a download link followed after the session ended. The links are plain
    navigations (no `download` attribute), so the form shows in the tab and leads back to the image's page;
    with the attribute, the browser saved nothing and said only "Failed" in its download bar."""
    page = _login_page(request, "Your session has ended; sign in again to download.", status=401,
                       target=_image_target(image_id))
    page.headers["WWW-Authenticate"] = 'Bearer realm="aeic"'
    return page


def picture_png(image_id: str, request: Request) -> Response:
    """The exact PNG as a download (`{id}.png`), as the API's `.png` is, but the token form after the session
    ended, where the API's JSON 401 went to the download bar as a failed download."""
    who = optional_principal(request)
    if who is None:
        return _signed_out_download(request, image_id)
    try:
        response = get_reconstruction_as(image_id, "png", request, who)
    except ApiError as exc:
        if exc.status != 404:
            raise
        return _missing(request, image_id)  # deleted meanwhile, another device's, or no such image
    response.headers["Content-Disposition"] = f'attachment; filename="{image_id}.png"'
    return response


def bitstream(image_id: str, request: Request) -> Response:
    """The stream as the device sent it (any status: a failed image's is all there is of it), to read with
    `aeic info` or decode elsewhere; it never changes, so the browser may keep it."""
    who = optional_principal(request)
    if who is None:
        return _signed_out_download(request, image_id)
    state = receiver_state(request)
    try:
        record = visible_image(state, who, image_id)
        # Strong: the SHA-256 of the bytes the device sent, recorded at upload. A copy the browser holds is revalidated
        # with no blob read (a 304 of headers), as the reconstruction and thumbnail are.
        cache = {"Cache-Control": "private, max-age=86400", "ETag": f'"{record.sha256}"'}
        if matches(request, cache["ETag"]):
            return Response(status_code=304, headers=cache)
        blob = open_blob(state.blobs, bitstream_key(record.id))
    except (ApiError, BlobNotFoundError):  # unknown, another device's, or deleted meanwhile
        return _missing(request, image_id)
    return BlobDownload(blob, "application/octet-stream",
                        {"Content-Disposition": f'attachment; filename="{record.id}.aeic"', **cache})


def _session_principal(request: Request) -> Principal | None:
    """The signed-in visitor behind the session cookie of a gallery form post. The API honours the cookie for
    reads only (`optional_principal`); the delete form is the one write the gallery makes with it, and only
    after `_cross_site` has refused a post another site's page made."""
    state = receiver_state(request)
    return state.sessions.principal(request.cookies.get(session_cookie(request, state.settings.cookie_secure).name))


def _grid_after_delete(back: str | None, image_id: str) -> str:
    """The grid page to land on after a delete, saying so: `back`, the grid the tab last showed (image.js
    names it: its filter and older page), when it is a grid address of this site; else the whole grid."""
    path, _, query = _return_path(back).partition("?")
    kept = [(k, v) for k, v in parse_qsl(query) if k != "deleted"] if path == "/" else []
    return "/?" + urlencode([*kept, ("deleted", image_id)])


def delete_page_image(image_id: str, request: Request, back: str | None = None) -> Response:
    """The image page's "Delete permanently" form: whoever may see the image (its device's session or the
    admin's, as `DELETE /v1/images/{id}` allows) deletes it, then lands on the grid (`back`), which says
    so. A post from another site is refused before the cookie is looked at (its SameSite=Lax still goes
    with a same-site page's post, a sibling subdomain's)."""
    if _cross_site(request):
        return _page(request, "refused.html", {}, 403)
    who = _session_principal(request)
    if who is None:  # the session ended while the page was open: sign in, back on the image's page
        target = _image_target(image_id)
        return _login_page(request, "Your session has ended; sign in again to delete the image.", status=401,
                           target=target)
    try:
        delete_image(image_id, request, who)
    except ApiError as exc:
        if exc.status != 503:  # deleted already (another tab, a second click), another device's, or no such image
            return _missing(request, image_id)
        # The storage failed part way: the image stays, and the same post, sent again, finishes the delete.
        context = {"who": who, "image_id": image_id, "retry": _here(request)}
        return _page(request, "not_deleted.html", context, 503, exc.headers)
    response = RedirectResponse(root_path(request) + _grid_after_delete(back, image_id), status_code=303)
    # Its thumbnail and picture are cached privately for a day: the browser still gave the deleted photo's
    # thumbnail from its cache. This empties the site's cache (the grid then fetches its thumbnails again).
    response.headers["Clear-Site-Data"] = '"cache"'
    return response


def delete_address(image_id: str, request: Request) -> Response:
    """`GET /images/{id}/delete`, the delete form's address opened as a page (typed, bookmarked, or the
    browser's history): the image's page, whose form deletes. A GET deletes nothing; this was a JSON 405."""
    target = _image_target(image_id)
    return RedirectResponse(root_path(request) + target, status_code=303)


def _sign_in(request: Request, token: str, target: str) -> Response:
    """Open a session for a valid token and go to `target`; failures count against the client's sign-in
    budget. The attempt takes its token before the check, so guesses sent at once cannot all pass it; a
    success gives it back."""
    state = receiver_state(request)
    wait = state.login_limiter.acquire(client_address(request))
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        page = _login_page(request, f"Too many failed sign-ins from this address; try again in {seconds} s.",
                           status=429, target=target)
        page.headers["Retry-After"] = str(seconds)
        return page
    session = state.sessions.open(token)
    if session is None:
        return _login_page(request, "That token is not valid.", status=401, target=target)
    state.login_limiter.refund(client_address(request))
    for name in COOKIE_NAMES:  # the browser's previous session ends: a stolen copy of its cookie with it
        state.sessions.close(request.cookies.get(name))
    response = RedirectResponse(root_path(request) + target, status_code=303)
    cookie = session_cookie(request, state.settings.cookie_secure)
    response.set_cookie(cookie.name, session, httponly=True, samesite="lax", path="/",
                        max_age=max(1, math.ceil(state.sessions.ttl_s)), secure=cookie.secure)
    return response


def _cross_site(request: Request) -> bool:
    """True for a form another site made the browser post (login CSRF, forced sign-out or delete). The
    browser's Sec-Fetch-Site is authoritative; older browsers are checked by their Origin against our Host."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return False  # not a browser form post (browsers send Origin on every POST)
    return origin == "null" or urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()


def _no_store(response: Response) -> Response:
    """A sign-in's redirect, which sets the cookie: no cache may keep it (the pages are `_page`'s)."""
    response.headers["Cache-Control"] = "no-store"
    return response


def login_form(request: Request, token: str | None = None,
               target: Annotated[str | None, Query(alias="next")] = None) -> Response:
    """`/login?token=...` (the link the demo prints; the access log redacts the token) or the plain form;
    `next` is the page to open once signed in. The link opened from another site is refused, as the form's
    post is: it would sign the browser in to the gallery of the attacker's token."""
    target = _return_path(target)
    if not token:
        return _login_page(request, target=target)
    if _cross_site(request):
        return _login_page(request, "Open the sign-in link directly, not from another site.", status=403,
                           target=target)
    return _no_store(_sign_in(request, token, target))


# What the form page says when its body cannot be read (`read_body`'s statuses).
_FORM_FAILURES = {413: "That form is too large.", 408: "The form did not arrive in time; send it again.",
                  400: "The form arrived incomplete; send it again."}


async def login_submit(request: Request) -> Response:
    """The form post (urlencoded; parsed here to avoid a multipart dependency). Its body is read as the
    upload's is: an anonymous client can make the server hold neither more than a form's bytes nor a request
    for longer than `upload_timeout_s` (a trickled body held it as long as the client liked)."""
    if _cross_site(request):
        return _login_page(request, "Sign in from this site's own form.", status=403)
    try:
        body = await read_body(request, _FORM_BYTES, receiver_state(request).settings.upload_timeout_s)
    except ApiError as exc:
        page = _login_page(request, _FORM_FAILURES[exc.status], status=exc.status)
        page.headers.update(exc.headers)  # 408: Connection: close
        return page
    fields = parse_qs(body.decode("utf-8", "replace"))
    token = (fields.get("token") or [""])[0].strip()
    target = _return_path((fields.get("next") or [""])[0])
    if not token:
        return _login_page(request, "Paste a token.", status=400, target=target)
    return _no_store(await run_in_threadpool(_sign_in, request, token, target))


def logout(request: Request) -> Response:
    """End the session server-side (a copied cookie stops working too) and forget the cookie."""
    if _cross_site(request):
        return _login_page(request, "Sign out from this site's own button.", status=403)
    state = receiver_state(request)
    cookie = session_cookie(request, state.settings.cookie_secure)
    state.sessions.close(request.cookies.get(cookie.name))
    response = RedirectResponse(f"{root_path(request)}/", status_code=303)
    response.delete_cookie(cookie.name, path="/", secure=cookie.secure, httponly=True, samesite="lax")
    # Thumbnails and pictures are cached privately for a day: on a shared computer the next user of the
    # browser would still see them. Browsers honour this over HTTPS and on localhost.
    response.headers["Clear-Site-Data"] = '"cache"'
    return response


async def _not_found(request: Request, exc: Exception) -> Response:
    """A browser opening an address with nothing at it gets a page with the way back to the gallery; the
    API, scripts, images and every other client get the standard JSON error, as before."""
    page = request.headers.get("sec-fetch-dest") == "document" or "text/html" in request.headers.get("accept", "")
    if page and request.method in ("GET", "HEAD") and not _app_path(request).startswith("/v1/"):
        return _page(request, "not_found.html", {}, 404)
    return error_response(404, "not_found", str(getattr(exc, "detail", "Not Found")), getattr(exc, "headers", None))


def install_gallery(app: FastAPI) -> None:
    """Mount the gallery pages and their static files on `app`."""
    router = APIRouter(include_in_schema=False)
    # HEAD as GET (uvicorn drops the body): monitors and link checkers ask with it.
    router.add_api_route("/", index, methods=["GET", "HEAD"], response_class=HTMLResponse)
    router.add_api_route("/images/{image_id}", image_page, methods=["GET", "HEAD"], response_class=HTMLResponse)
    router.add_api_route("/images/{image_id}/bitstream", bitstream, methods=["GET", "HEAD"])
    router.add_api_route("/images/{image_id}/png", picture_png, methods=["GET", "HEAD"])
    router.add_api_route("/images/{image_id}/delete", delete_page_image, methods=["POST"])
    router.add_api_route("/images/{image_id}/delete", delete_address, methods=["GET", "HEAD"])
    router.add_api_route("/login", login_form, methods=["GET", "HEAD"], response_class=HTMLResponse)
    router.add_api_route("/login", login_submit, methods=["POST"], response_class=HTMLResponse)
    router.add_api_route("/logout", logout, methods=["POST"])
    app.include_router(router)
    app.mount("/static", _ASSETS.compressed(), name="static")
    app.add_exception_handler(404, _not_found)  # before errors.py's handler of every HTTP error (Starlette)
