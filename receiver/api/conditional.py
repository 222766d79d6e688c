"""Conditional requests: `If-None-Match` against the validators the listing and the downloads send."""

from __future__ import annotations

from fastapi import Request

__all__ = ["matches"]


def matches(request: Request, etag: str) -> bool:
    """If-None-Match by weak comparison (RFC 9110 13.1.2): a list of tags, or `*`."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags
