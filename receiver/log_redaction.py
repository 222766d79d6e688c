"""Keep secrets out of the access log.

Why: `/login?token=...` (the sign-in link the demo prints) puts a token in a URL, and uvicorn's access
log writes every URL with its query string; log files are read far more widely than the token store.
"""

from __future__ import annotations

import logging
import re

__all__ = ["TokenRedactingFilter", "install_log_redaction", "redact"]

_SECRET_PARAM = re.compile(r"(?i)((?:^|[?&])(?:token|access_token)=)[^&\s\"]*")
_ACCESS_LOGGER = "uvicorn.access"


def redact(text: str) -> str:
    """`text` with the value of every token-like query parameter replaced."""
    return _SECRET_PARAM.sub(r"\1[redacted]", text)


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
