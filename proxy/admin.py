"""Admin API: stats, purge (a namespace or one key), snapshot now, and the status page.

Mounted as an aiohttp sub-application under ``/admin/``; each route is wrapped in ``guard``
(auth and errors) rather than the sub-application having a middleware: aiohttp runs the
middleware chain for every request of the main app once any sub-application has one, and the
checks must cost nothing on ``/v1/*``. Every route needs
``Authorization: Bearer <server.admin_token>``, compared in constant time; without a configured
token the admin API answers 404 (it does not exist). Namespaces are named as the proxy names
them: ``key:<hash of the API key>`` (or ``anon``), then ``/ns:<x-cache-namespace>`` for a
partition within it; ``ns:<x-cache-namespace>`` with ``cache.trust_namespace_header``.
A purge names one namespace exactly (a tenant's partitions are namespaces of their own).
The status page (``/admin/``) is static HTML that asks for the token, then reads /admin/stats
with it.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import __version__, gcwatch, status
from proxy.errors import ProxyError, add_fallback_route, bad_request
from proxy.handlers import Proxy
from proxy.keys import namespace_of


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def resolve_namespace(req: dict[str, Any], trust_header: bool = False) -> str:
    """The namespace label from an admin request, as the client knows it:

    - ``"api_key"`` (+ optional ``"x_cache_namespace"``): the namespace the proxy files that
      caller's requests under (``key:<hash>``, ``key:<hash>/ns:<header>``);
    - ``"namespace"``: the label itself (``key:...``, ``ns:...``, ``anon...``), or, with
      ``cache.trust_namespace_header``, the bare header value (``team-a`` -> ``ns:team-a``);
    - ``"x_cache_namespace"`` alone: with ``cache.trust_namespace_header`` only (else the header
      is a partition of a tenant, and the tenant's API key is needed).
    """
    header = req.get("x_cache_namespace")
    header = header if isinstance(header, str) and header else None
    key = req.get("api_key")
    if isinstance(key, str) and key:
        return namespace_of(header, "Bearer " + key, trust_header=trust_header)
    ns = req.get("namespace")
    if isinstance(ns, str) and ns.startswith(("ns:", "key:", "anon")):
        return ns
    bare = header or (ns if isinstance(ns, str) and ns else None)
    if bare is None:
        raise bad_request("'namespace' (string), 'x_cache_namespace' or 'api_key' is required",
                          "namespace")
    if not trust_header:
        raise bad_request("x-cache-namespace partitions a tenant: give the tenant's 'api_key' "
                          "too, or the full label (key:<hash>/ns:<name>)", "api_key")
    return namespace_of(bare, None, trust_header=True)


class Admin:
    """The /admin/* handlers of one proxy (``app[ADMIN_KEY]``)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.token = proxy.config.server.admin_token.encode()
        self.series = status.Series(proxy.metrics)
        self.page_html = status.page()
        self.page_csp = status.csp(self.page_html)

    def app(self) -> web.Application:
        """The sub-application to mount at /admin/ (the status page at /admin/ itself)."""
        app = web.Application()
        app[ADMIN_KEY] = self
        app.router.add_get("/", self.guard(self.page, auth=False))
        app.router.add_get("/stats", self.guard(self.stats))
        app.router.add_post("/purge", self.guard(self.purge))
        app.router.add_post("/snapshot", self.guard(self.snapshot))
        app.router.add_post("/namespace", self.guard(self.namespace))
        add_fallback_route(app)

        async def start_series(app: web.Application) -> None:
            if self.token:
                self.series.start()

        async def stop_series(app: web.Application) -> None:
            await self.series.close()

        app.on_startup.append(start_series)
        app.on_cleanup.append(stop_series)
        return app

    def guard(self, handler: Handler, auth: bool = True) -> Handler:
        """``handler`` with the admin token checked (``auth``) and every admin error as an
        OpenAI-style response."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                if auth:
                    self._check(request)
                return await handler(request)
            except ProxyError as err:
                return err.response()

        return guarded

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The status page. The HTML holds no data (it reads /admin/stats with the token the
        user gives it), so it is served without the token, but only where the admin API
        exists."""
        if not self.token:
            raise ProxyError(404, "the admin API is disabled (set server.admin_token)",
                             code="not_found")
        return web.Response(body=self.page_html, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": self.page_csp,
                                     "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                                     "X-Content-Type-Options": "nosniff",
                                     "X-Frame-Options": "DENY"})

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
            # the exact-hit fast path (proxy/fastpath.py): requests remembered, their bytes,
            # hits it answered since start
            "fast_path": None if p.memo is None else {
                "entries": len(p.memo), "bytes": p.memo.bytes, "served": p.memo.served},
            "flights_in_progress": len(p.flights),
            "tiers": {n: t.stats() for n, t in p.tiers.items()},
            "version": __version__,
            **await status.status_extras(p, self.series),
        })

    async def purge(self, request: web.Request) -> web.Response:
        try:
            req = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise bad_request("body must be JSON: {\"namespace\": ...} or {\"key\": ..., "
                              "\"namespace\": ...}", code="invalid_json") from None
        if not isinstance(req, dict):
            raise bad_request("body must be a JSON object", "namespace")
        ns = resolve_namespace(req, self.proxy.config.cache.trust_namespace_header)
        if "key" in req:
            try:
                key = bytes.fromhex(req["key"])
            except (TypeError, ValueError):
                raise bad_request("'key' must be the hex exact key", "key") from None
            counts = await self.proxy.purge_key(key, ns)
        else:
            counts = await self.proxy.purge_namespace(ns)
        # what was really removed, per layer (a key given with another namespace: 0)
        return _json({"namespace": ns, "purged": counts, "total": sum(counts.values())})

    async def namespace(self, request: web.Request) -> web.Response:
        """POST {"api_key": "sk-..."} or {"x_cache_namespace": "team-a"}: the namespace the
        proxy files that caller's entries under (for purge, metrics, the event log). POST, so
        the key never lands in a URL or an access log; it is hashed, never stored."""
        try:
            req = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise bad_request("body must be JSON", code="invalid_json") from None
        if not isinstance(req, dict) or not ({"api_key", "x_cache_namespace"} & set(req)):
            raise bad_request("give 'api_key' or 'x_cache_namespace'", "api_key")
        return _json({"namespace": resolve_namespace(
            req, self.proxy.config.cache.trust_namespace_header)})

    async def snapshot(self, request: web.Request) -> web.Response:
        sem = self.proxy.semantic
        if sem is None or not sem.cfg.snapshot_path:
            raise ProxyError(409, "no semantic.snapshot_path configured",
                             code="snapshot_disabled")
        try:
            n = await sem.snapshot_async()
        except OSError as exc:
            raise ProxyError(500, f"snapshot not written: {exc.strerror or exc}",
                             err_type="server_error", code="snapshot_failed") from exc
        return _json({"snapshot": sem.cfg.snapshot_path, "entries": n})


ADMIN_KEY = web.AppKey("admin", Admin)
