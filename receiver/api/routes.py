"""The `/v1` and operations routes, each with every status it can answer, so the OpenAPI document tells a
client the truth (tests/test_receiver_openapi.py holds it to that)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aeic.receiver import schemas
from aeic.receiver.api.downloads import get_reconstruction, get_reconstruction_as, get_thumbnail
from aeic.receiver.api.health import healthz, metrics, readyz
from aeic.receiver.api.images import delete_image, get_image, list_images
from aeic.receiver.api.uploads import upload_image
from fastapi import APIRouter, Response, Security
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["api_router"]


_BEARER = HTTPBearer(auto_error=False, description="a device token or the admin token")
_V1 = [Security(_BEARER)]  # declares the bearer scheme in the OpenAPI document; `principal` checks it
_READ = (401, 404, 422, 503)
_FILE = (*_READ, 304, 409)
_PNG_JPEG_WEBP = ("image/png", "image/jpeg", "image/webp")


def _add_read(router: APIRouter, path: str, endpoint: Callable[..., Any], summary: str,
              responses: dict[int | str, dict[str, Any]]) -> None:
    """GET and HEAD (RFC 9110: a GET resource answers HEAD with the same headers and no body; uvicorn drops
    the body). HEAD stays out of the OpenAPI document, where it would repeat the GET's operation id."""
    router.add_api_route(path, endpoint, methods=["GET"], summary=summary, responses=responses,
                         dependencies=_V1, response_class=Response)
    router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)


def api_router() -> APIRouter:
    """Every route with every status it can answer in `responses`, so the OpenAPI document tells a client
    the truth (tests/test_receiver_openapi.py holds it to that)."""
    router = APIRouter()
    router.add_api_route("/v1/images", upload_image, methods=["POST"], status_code=202,
                         summary="Upload a bitstream", dependencies=_V1, response_class=Response,
                         responses={202: {"model": schemas.Accepted, "description": "Stored; decoding follows"},
                                    **schemas.errors(400, 401, 403, 408, 409, 413, 415, 422, 429, 503)},
                         openapi_extra={"requestBody": {
                             "required": True,
                             "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}}}})
    _add_read(router, "/v1/images", list_images, "List images, newest first",
              {200: {"model": schemas.ImageList}, **schemas.errors(304, 400, 401, 403, 422, 503)})
    _add_read(router, "/v1/images/{image_id}", get_image, "Image status",
              {200: {"model": schemas.ImageOut}, **schemas.errors(*_READ)})
    router.add_api_route("/v1/images/{image_id}", delete_image, methods=["DELETE"], status_code=204,
                         summary="Delete an image", dependencies=_V1, response_class=Response,
                         responses=schemas.errors(*_READ))
    _add_read(router, "/v1/images/{image_id}/reconstruction", get_reconstruction,
              "Reconstruction (PNG; JPEG/WebP by Accept)", {**schemas.binary(*_PNG_JPEG_WEBP),
                                                            **schemas.errors(*_FILE, 406)})
    _add_read(router, "/v1/images/{image_id}/reconstruction.{ext}", get_reconstruction_as,
              "Reconstruction in the suffix's format", {**schemas.binary(*_PNG_JPEG_WEBP),
                                                        **schemas.errors(*_FILE)})
    _add_read(router, "/v1/images/{image_id}/thumbnail", get_thumbnail, "Thumbnail",
              {**schemas.binary("image/jpeg"), **schemas.errors(*_FILE)})
    router.add_api_route("/healthz", healthz, methods=["GET"], summary="Liveness", response_class=Response,
                         responses={200: {"model": schemas.Health, "description": "Alive"},
                                    503: {"model": schemas.Health, "description": "The decode worker is hung"}})
    router.add_api_route("/readyz", readyz, methods=["GET"], summary="Readiness", response_class=Response,
                         responses={200: {"model": schemas.Readiness, "description": "Ready"},
                                    503: {"model": schemas.Readiness, "description": "Not ready"}})
    router.add_api_route("/metrics", metrics, methods=["GET"], summary="Prometheus metrics",
                         response_class=Response, responses={200: {"description": "Prometheus text format",
                                                                  "content": {CONTENT_TYPE_LATEST: {
                                                                      "schema": {"type": "string"}}}}})
    return router
