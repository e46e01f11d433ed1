"""Logging: every line carries the request id; the access log is plain JSON lines.

The request path sets ``REQUEST_ID`` (a ContextVar) when a request arrives; every task the
request starts (its upstream flight, a shadow call) inherits it, so a warning about an upstream
names the request that caused it: ``... WARNING proxy.flight [3f2a...0001c]: tier small failed``.
Outside a request the field is ``-``.

The access log (``server.access_log = true``) goes to stdout on its own handler, one JSON object
per line and nothing else on the line (no timestamp prefix: the object has ``ts``); the other
logs go to stderr.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Final

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
ACCESS_LOGGER: Final = "edge_proxy.access"
FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from the current context."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def setup(level: str) -> None:
    """Root logger to stderr with the request id; the access log to stdout as JSON lines."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RequestIdFilter())
    root.handlers[:] = [handler]
    access = logging.getLogger(ACCESS_LOGGER)
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    access.handlers[:] = [out]
    access.setLevel(logging.INFO)
    access.propagate = False
