"""Keep secrets out of the access log.

Why: `/login?token=...` (the sign-in link the demo prints) puts a token in a URL, and uvicorn's access
log writes every URL with its query string; log files are read far more widely than the token store.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

__all__ = ["TokenRedactingFilter", "install_log_redaction", "redact"]

# A query parameter: its name (group 1, with the `?`/`&` before it) and its value.
_PARAM = re.compile(r"((?:^|[?&])([^=&\s\"?]*)=)[^&\s\"]*")
_SECRET_NAMES = {"token", "access_token"}
# A device token wherever it stands (`auth.create_device_token`: `aeic_` and 43 URL-safe characters): a sign-in
# link mistyped (`/login;token=...`) or a token pasted as a path is no parameter the app reads, but still a token.
_DEVICE_TOKEN = re.compile(r"aeic_[A-Za-z0-9_-]{43}")
_ACCESS_LOGGER = "uvicorn.access"


def redact(text: str) -> str:
    """`text` with the value of every token-like query parameter replaced, and every device token. The name
    is compared decoded, as the app reads it: `/login?%74oken=...` signs in like `?token=...` (uvicorn logs
    the raw query)."""

    def hide(match: re.Match[str]) -> str:
        secret = unquote_plus(match.group(2)).lower() in _SECRET_NAMES
        return match.group(1) + "[redacted]" if secret else match.group(0)

    return _DEVICE_TOKEN.sub("aeic_[redacted]", _PARAM.sub(hide, text))


class TokenRedactingFilter(logging.Filter):
    """Rewrites the arguments of each record (uvicorn passes the path with its query as one of them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    """Attach the filter to uvicorn's access logger once (it survives uvicorn's logging set-up)."""
    logger = logging.getLogger(_ACCESS_LOGGER)
    if not any(isinstance(f, TokenRedactingFilter) for f in logger.filters):
        logger.addFilter(TokenRedactingFilter())
