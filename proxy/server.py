"""The aiohttp application and its lifecycle: startup (Redis, tiers), serving, graceful shutdown.

``Server(config).run()`` is all the CLI does; tests use ``build_app`` on their own loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time as _time

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy import gcwatch, passthrough
from proxy.admin import Admin
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.handlers import Proxy
from proxy.metrics import Metrics

log = logging.getLogger(__name__)

PROXY_KEY = web.AppKey("proxy", Proxy)


def _fallback_route(app: web.Application) -> None:
    """Unknown paths (404) and wrong methods (405) as OpenAI-style JSON.

    A catch-all route rather than a middleware: a middleware wraps every request, this costs
    nothing on the routes that match.
    """
    known = {r.canonical: r for r in app.router.resources()}

    async def fallback(request: web.Request) -> web.Response:
        res = known.get(request.path)
        if res is not None:
            allowed = sorted({route.method for route in res})
            return ProxyError(405, f"method {request.method} not allowed on {request.path}; "
                              f"use {', '.join(allowed)}", code="method_not_allowed",
                              headers={"Allow": ", ".join(allowed)}).response()
        return ProxyError(404, f"no route {request.path}", code="not_found").response()

    app.router.add_route("*", "/{tail:.*}", fallback)


def build_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    """The application; its startup connects Redis and discovers the tiers' models."""
    metrics = metrics or Metrics()
    metrics.max_namespaces = config.server.metrics_max_namespaces
    proxy = Proxy(config, metrics)
    # client_max_size a little above the limit so the handler, not aiohttp, answers with our 413
    app = web.Application(client_max_size=config.server.max_body_bytes + 1,
                          handler_args={"max_field_size": 16384})
    app[PROXY_KEY] = proxy
    app.router.add_post("/v1/chat/completions", proxy.chat)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/healthz", proxy.healthz)
    app.router.add_get("/readyz", proxy.readyz)
    app.router.add_get("/metrics", proxy.metrics_endpoint)
    Admin(proxy).routes(app)
    passthrough.routes(app, proxy)
    _fallback_route(app)

    async def startup(app: web.Application) -> None:
        await proxy.start()

    async def cleanup(app: web.Application) -> None:
        await proxy.close()

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app


def freeze_startup_heap() -> None:
    """Move everything alive after start-up out of the cyclic GC's sight (``gc.freeze``).

    Modules, onnxruntime, numpy, the tokenizer and the replayed cache are ~110k tracked objects
    that never become cyclic garbage, yet every full collection walks them all, on the event
    loop: measured up to 212 ms per gen-2 pass during the load suite's interference phase. Frozen
    objects are still freed by reference counting; only cycles among them would never be
    collected.
    """
    gc.collect()
    gc.freeze()


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON object per request (server.access_log = true): what a log pipeline can parse
    without regexes. Never logs the Authorization header or the body."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        h = response.headers
        rec = {"ts": round(_time.time(), 3), "method": request.method, "path": request.path,
               "status": response.status, "ms": round(time * 1000, 3),
               "bytes": response.body_length, "cache": h.get("x-cache"),
               "tier": h.get("x-route-tier"), "request_id": h.get("x-request-id"),
               "remote": request.remote}
        try:
            line = orjson.dumps(rec)
        except TypeError:
            # a path or header with a lone surrogate (a non-UTF-8 byte): escape it, never raise
            line = orjson.dumps({k: v.encode("utf-8", "backslashreplace").decode()
                                 if isinstance(v, str) else v for k, v in rec.items()})
        self.logger.info(line.decode())


class Server:
    """Runs the proxy until SIGTERM/SIGINT, then drains and closes."""

    def __init__(self, config: Config) -> None:
        self.config = config

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        cfg = self.config.server
        app = build_app(self.config)
        # handler_cancellation: a client that disconnects cancels its handler, and so its
        # share of the upstream request
        access: dict[str, object] = {"access_log": None}
        if cfg.access_log:
            access = {"access_log": logging.getLogger("edge_proxy.access"),
                      "access_log_class": JsonAccessLogger}
        runner = web.AppRunner(app, handler_cancellation=True,
                               shutdown_timeout=cfg.shutdown_timeout_s, **access)  # type: ignore[arg-type]
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise RuntimeError(f"cannot listen on {cfg.host}:{cfg.port}: {reason}") from None
        proxy = app[PROXY_KEY]
        log.info("edge-proxy listening on http://%s:%d (tiers: %s; redis: %s)", cfg.host,
                 cfg.port, ", ".join(f"{n}={t.model}" for n, t in proxy.tiers.items()),
                 self.config.cache.redis_url or "off")
        freeze_startup_heap()
        gcwatch.install(proxy.metrics, cfg.gc_thresholds)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await runner.cleanup()

    def run(self) -> None:
        """Block until stopped, on uvloop unless configured otherwise."""
        if self.config.server.loop == "uvloop":
            import uvloop

            uvloop.run(self.serve())
        else:
            asyncio.run(self.serve())
