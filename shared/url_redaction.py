"""A URL as log and error lines may show it: without the password its user part may carry.

Both sides print URLs that can hold one (a proxy's or a camera's on the sender; a database's, a queue's or
an object store's on the receiver), so both use this one rule.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["without_password"]


def without_password(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***``; the rest (an IPv6 host's brackets,
    the host's case, the port) exactly as given."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
