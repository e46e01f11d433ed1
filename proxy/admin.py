"""Admin API: stats, purge (a namespace or one key), snapshot now.

Mounted as an aiohttp sub-application under ``/admin/`` with one middleware for auth and
errors, so the checks cost nothing on ``/v1/*``. Every route needs
``Authorization: Bearer <server.admin_token>``, compared in constant time; without a configured
token the admin API answers 404 (it does not exist). Namespaces are named as the proxy names
them: ``key:<hash of the API key>`` (or ``anon``), then ``/ns:<x-cache-namespace>`` for a
partition within it; ``ns:<x-cache-namespace>`` with ``cache.trust_namespace_header``.
A purge names one namespace exactly (a tenant's partitions are namespaces of their own).
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import gcwatch
from proxy.errors import ProxyError, bad_request, route_error
from proxy.handlers import Proxy


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


class Admin:
    """The /admin/* handlers of one proxy."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.token = proxy.config.server.admin_token.encode()

    def app(self) -> web.Application:
        """The sub-application to mount at /admin/."""
        app = web.Application(middlewares=[self.guard])
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/purge", self.purge)
        app.router.add_post("/snapshot", self.snapshot)
        return app

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Auth for every admin route, and every admin error as an OpenAI-style response."""
        try:
            match_error = request.match_info.http_exception
            if match_error is not None:  # unknown route or method: as on the main app
                raise route_error(request, match_error)
            self._check(request)
            return await handler(request)
        except ProxyError as err:
            return err.response()

    def _check(self, request: web.Request) -> None:
        if not self.token:
            raise ProxyError(404, "the admin API is disabled (set server.admin_token)",
                             code="not_found")
        auth = request.headers.get("Authorization", "")
        # surrogateescape: a non-UTF-8 byte in the header (decoded by aiohttp with
        # surrogateescape) is compared as the byte it was, never a 500
        given = auth[7:].encode("utf-8", "surrogateescape") if auth.startswith("Bearer ") else b""
        # constant time: the comparison must not tell how much of a guess was right
        if not hmac.compare_digest(given, self.token):
            raise ProxyError(401, "admin token missing or wrong", err_type="authentication_error",
                             code="invalid_admin_token",
                             headers={"WWW-Authenticate": 'Bearer realm="edge-proxy-admin"'})

    async def stats(self, request: web.Request) -> web.Response:
        p = self.proxy
        m = p.metrics
        outcomes = m.hot.outcomes()
        served = sum(v for k, v in outcomes.items() if k != "error")
        hits = outcomes.get("hit-exact", 0) + outcomes.get("hit-semantic", 0)
        return _json({
            "requests": outcomes,
            "hit_rate": round(hits / served, 4) if served else 0.0,
            "cost": m.ledger.summary(),
            "cache": p.cache.stats(),
            "semantic": None if p.semantic is None else p.semantic.stats(),
            "embedder": None if p.semantic is None else p.semantic.embedder_stats(),
            "gc": None if gcwatch.current is None else gcwatch.current.stats(),
            "feedback_ledger": 0 if p.ledger is None else len(p.ledger),
            "flights_in_progress": len(p.flights),
            "tiers": {n: t.stats() for n, t in p.tiers.items()},
        })

    async def purge(self, request: web.Request) -> web.Response:
        try:
            req = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise bad_request("body must be JSON: {\"namespace\": ...} or {\"key\": ..., "
                              "\"namespace\": ...}", code="invalid_json") from None
        if not isinstance(req, dict) or not isinstance(req.get("namespace"), str):
            raise bad_request("'namespace' (string) is required", "namespace")
        ns = req["namespace"]
        if "key" in req:
            try:
                key = bytes.fromhex(req["key"])
            except (TypeError, ValueError):
                raise bad_request("'key' must be the hex exact key", "key") from None
            found = await self.proxy.purge_key(key, ns)
            return _json({"purged": int(found)})
        return _json({"purged": await self.proxy.purge_namespace(ns)})

    async def snapshot(self, request: web.Request) -> web.Response:
        sem = self.proxy.semantic
        if sem is None or not sem.cfg.snapshot_path:
            raise ProxyError(409, "no semantic.snapshot_path configured",
                             code="snapshot_disabled")
        n = await sem.snapshot_async()
        return _json({"snapshot": sem.cfg.snapshot_path, "entries": n})
