"""OpenAI-style error responses.

Every error the proxy itself produces has the body the OpenAI SDK understands:
``{"error": {"message", "type", "param", "code"}}``, so clients raise the right exception class
(BadRequestError, NotFoundError, RateLimitError, InternalServerError...).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


class ProxyError(Exception):
    """An error with an HTTP status and an OpenAI-style body; raised on the request path."""

    __slots__ = ("code", "err_type", "headers", "message", "param", "status")

    def __init__(
        self,
        status: int,
        message: str,
        *,
        err_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        """An aiohttp response carrying this error."""
        all_headers = dict(self.headers or {})
        if headers:
            all_headers.update(headers)
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=all_headers,
        )


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ProxyError:
    """400: the request body is malformed or has a wrong value."""
    return ProxyError(400, message, param=param, code=code)


def model_not_found(model: str) -> ProxyError:
    """404: no tier serves this model."""
    return ProxyError(
        404,
        f"The model `{model[:100]}` does not exist or is not served by this proxy.",
        param="model",
        code="model_not_found",
    )


def payload_too_large(limit: int) -> ProxyError:
    """413: the body exceeds the configured limit."""
    return ProxyError(
        413, f"Request body exceeds the limit of {limit} bytes.", code="payload_too_large"
    )


def no_route(path: str) -> ProxyError:
    """404: nothing is served at this path."""
    return ProxyError(404, f"no route {path}", code="not_found")


def method_not_allowed(method: str, path: str, allowed: list[str]) -> ProxyError:
    """405: the path exists, not with this method."""
    return ProxyError(405, f"method {method} not allowed on {path}; use {', '.join(allowed)}",
                      code="method_not_allowed", headers={"Allow": ", ".join(allowed)})


def add_fallback_route(app: web.Application) -> None:
    """Unknown paths (404) and wrong methods (405) of ``app`` as OpenAI-style JSON; add it
    last.

    A catch-all route rather than a middleware: a middleware wraps every request (one in a
    sub-application makes aiohttp run the middleware chain for the main app's requests too),
    this costs nothing on the routes that match. The known paths are read at the first miss,
    when a sub-application's routes carry their prefix.
    """
    known: dict[str, web.AbstractResource] = {}

    async def fallback(request: web.Request) -> web.Response:
        if not known:
            known.update((r.canonical, r) for r in app.router.resources())
        res = known.get(request.path)
        if res is not None:
            allowed = sorted({route.method for route in res})
            return method_not_allowed(request.method, request.path, allowed).response()
        return no_route(request.path).response()

    app.router.add_route("*", "/{tail:.*}", fallback)


def upstream_unavailable(message: str) -> ProxyError:
    """502: the upstream refused the connection or failed with a 5xx."""
    return ProxyError(502, message, err_type="upstream_error", code="upstream_unavailable")


def upstream_timeout(message: str) -> ProxyError:
    """504: the upstream did not answer in time."""
    return ProxyError(504, message, err_type="upstream_error", code="upstream_timeout")


def sse_error_event(err: ProxyError) -> bytes:
    """An SSE event carrying an error; the openai SDK raises APIError when it reads one."""
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"
