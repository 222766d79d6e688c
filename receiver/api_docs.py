"""The interactive API documentation at /docs: Swagger UI served by the receiver itself.

Why not FastAPI's own /docs and /redoc: they load Swagger UI and Redoc from a public CDN at a floating
version and start them with inline script, so they needed an exemption from the Content-Security-Policy,
ran third-party code on the origin of the gallery's admin session, and stayed blank on an offline receiver.
Here the Swagger UI distribution comes from the `fastapi-swagger` package (installed with the receiver, at
the version pip resolved and can audit), the page is fixed markup, and Swagger UI is started by our own
script file (`gallery/static/api-docs.js`), so every byte comes from this origin under the same policy as
the gallery. Redoc is not served: its bundle injects `<style>` elements, which that policy forbids, and it
shows the same document as Swagger UI (/openapi.json stays for clients and generators).
"""

from __future__ import annotations

import html
from importlib.resources import files
from pathlib import Path

from aeic.receiver.static_files import VersionedFiles, content_version
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

__all__ = ["DOCS_URL", "SWAGGER_UI_URL", "install_api_docs", "swagger_ui_dir"]

DOCS_URL = "/docs"
SWAGGER_UI_URL = "/docs/swagger-ui"  # swagger-ui-bundle.js and swagger-ui.css, as the package ships them
_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")

# The gallery's `/static` mount serves api-docs.js (install_gallery).
_STARTER = Path(__file__).parent / "gallery" / "static" / "api-docs.js"
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>AEIC receiver API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{style}">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi_url}"></div>
<script src="{bundle}"></script>
<script src="{root}/static/api-docs.js?v={starter}"></script>
</body>
</html>
"""


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's files in the installed `fastapi-swagger` package; a layout without them
    fails the receiver's start instead of serving a blank page."""
    folder = Path(str(files("fastapi_swagger") / "resources"))
    missing = [name for name in _ASSETS if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-swagger at {folder} lacks {', '.join(missing)}: reinstall the receiver extra")
    return folder


def install_api_docs(app: FastAPI) -> None:
    """Serve /docs and its Swagger UI files (create the app with docs_url=None and redoc_url=None)."""
    assert app.openapi_url is not None, "/docs shows the OpenAPI document"
    files = VersionedFiles(swagger_ui_dir(), SWAGGER_UI_URL)
    starter = content_version(_STARTER)
    openapi_url = app.openapi_url

    def api_docs(request: Request) -> HTMLResponse:
        """Swagger UI for /openapi.json, every address under the prefix a proxy serves the receiver under
        (`root_path`, as FastAPI's own /docs does), where the document names that prefix as its server."""
        root = html.escape(str(request.scope.get("root_path", "")).rstrip("/"))
        return HTMLResponse(_PAGE.format(style=root + files.url("swagger-ui.css"), starter=starter, root=root,
                                         bundle=root + files.url("swagger-ui-bundle.js"),
                                         openapi_url=root + html.escape(openapi_url)))

    # HEAD as GET, as the gallery's pages: monitors and link checkers ask with it.
    app.add_api_route(DOCS_URL, api_docs, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(SWAGGER_UI_URL, files.compressed(), name="swagger-ui")
