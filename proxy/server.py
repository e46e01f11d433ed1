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
from collections.abc import Callable, Mapping
from typing import Final

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy import fastpath, gcwatch, passthrough
from proxy.admin import ADMIN_KEY, Admin
from proxy.config import Config
from proxy.errors import ProxyError, add_fallback_route
from proxy.handlers import Proxy
from proxy.logs import ACCESS_LOGGER
from proxy.metrics import Metrics

log = logging.getLogger(__name__)

PROXY_KEY = web.AppKey("proxy", Proxy)


async def _admin_slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect("/admin/")


def build_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    """The application; its startup connects Redis and discovers the tiers' models."""
    metrics = metrics or Metrics()
    metrics.max_namespaces = config.server.metrics_max_namespaces
    proxy = Proxy(config, metrics)
    # client_max_size a little above the limit so the handler, not aiohttp, answers with our 413
    # keepalive_timeout: aiohttp arms it when a connection opens and after every response, and
    # closes the connection if no complete request head arrived by then: the head timeout
    # (slowloris) and the idle keep-alive timeout in one
    app = web.Application(client_max_size=config.server.max_body_bytes + 1,
                          handler_args={"max_field_size": 16384,
                                        "keepalive_timeout": config.server.idle_timeout_s})
    app[PROXY_KEY] = proxy
    app.router.add_post("/v1/chat/completions", proxy.chat)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_post("/v1/feedback", proxy.feedback)
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/healthz", proxy.healthz)
    app.router.add_get("/readyz", proxy.readyz)
    app.router.add_get("/metrics", proxy.metrics_endpoint)
    admin = Admin(proxy)
    app.router.add_get("/admin", _admin_slash)  # before the sub-app, which would 404 it
    app[ADMIN_KEY] = admin  # the status page test reads its series
    app.add_subapp("/admin/", admin.app())
    passthrough.routes(app, proxy)
    add_fallback_route(app)

    async def startup(app: web.Application) -> None:
        await proxy.start()

    async def cleanup(app: web.Application) -> None:
        await proxy.close()

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app


def freeze_startup_heap() -> None:
    """Move everything alive after start-up out of the cyclic GC's sight (``gc.freeze``).

    Modules, onnxruntime, numpy, the tokenizer and the replayed cache are objects that never
    become cyclic garbage, yet every full collection walks them all, on the event loop (the
    pauses measured are in benchmarks/README.md). Frozen objects are still freed by reference
    counting; only cycles among them would never be collected.
    """
    gc.collect()
    gc.freeze()


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON object per request (server.access_log = true): what a log pipeline can parse
    without regexes. Never logs the Authorization header or the body."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.log_fields(request.method, request.path, response.status, time,
                        response.body_length, response.headers, request.remote)

    def log_fields(self, method: str, path: str, status: int, seconds: float, nbytes: int,
                   headers: Mapping[str, str], remote: str | None) -> None:
        """The record itself; the exact-hit fast path (no aiohttp request) logs through it."""
        rec = {"ts": round(_time.time(), 3), "method": method, "path": path,
               "status": status, "ms": round(seconds * 1000, 3),
               "bytes": nbytes, "cache": headers.get("x-cache"),
               "tier": headers.get("x-route-tier"), "request_id": headers.get("x-request-id"),
               "remote": remote}
        try:
            line = orjson.dumps(rec)
        except TypeError:
            # a path or header with a lone surrogate (a non-UTF-8 byte): escape it, never raise
            line = orjson.dumps({k: v.encode("utf-8", "backslashreplace").decode()
                                 if isinstance(v, str) else v for k, v in rec.items()})
        self.logger.info(line.decode())


_BUSY: Final = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")


class _Busy(asyncio.Protocol):
    """A connection over server.max_connections: read its head (at most 1 s), answer 503,
    close. Reading first lets the client see the answer instead of a reset."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(1.0, self.answer)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf or len(self.buf) > 16384:
            self.answer()

    def answer(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            body = ProxyError(503, "too many open connections; retry later",
                              err_type="server_error", code="too_many_connections").body()
            raw = orjson.dumps(body)
            t.write(_BUSY % (len(raw), raw))
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None


class CappedServer:
    """aiohttp's protocol factory with a connection cap: over ``limit`` open connections a new
    one gets ``_Busy`` (503) instead of a request handler; with a proxy whose fast path is on,
    the handler is a ``fastpath.FastHandler``. Everything else is delegated."""

    def __init__(self, inner: web.Server, limit: int, proxy: Proxy | None = None) -> None:
        self._inner = inner
        self.limit = limit
        self.refused = 0
        self._make: Callable[[], asyncio.BaseProtocol] = (
            fastpath.handler_factory(inner, proxy) if proxy is not None
            and proxy.memo is not None else inner)

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._inner._connections) >= self.limit:
            self.refused += 1
            return _Busy()
        return self._make()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def connection_limit(configured: int) -> int:
    """server.max_connections, or (0) half the file limit after raising it to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if configured:
        return configured
    return max(64, (soft if soft != resource.RLIM_INFINITY else 65536) // 2)


def install_protocol(runner: web.AppRunner, limit: int) -> None:
    """Serve ``runner``'s connections through ``CappedServer`` (after ``runner.setup()``,
    before its site starts): the connection cap and the exact-hit fast path."""
    proxy = runner.app[PROXY_KEY]
    runner._server = CappedServer(runner.server, limit, proxy)  # type: ignore[arg-type,assignment]


class Server:
    """Runs the proxy until SIGTERM/SIGINT, then drains and closes."""

    def __init__(self, config: Config, load: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.load = load  # SIGHUP loads the configuration again with it (proxy/reload.py)

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        cfg = self.config.server
        app = build_app(self.config)
        # handler_cancellation: a client that disconnects cancels its handler, and so its
        # share of the upstream request
        access: dict[str, object] = {"access_log": None}
        if cfg.access_log:
            access = {"access_log": logging.getLogger(ACCESS_LOGGER),
                      "access_log_class": JsonAccessLogger}
        runner = web.AppRunner(app, handler_cancellation=True,
                               shutdown_timeout=cfg.shutdown_timeout_s, **access)  # type: ignore[arg-type]
        await runner.setup()
        limit = connection_limit(cfg.max_connections)
        install_protocol(runner, limit)
        site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise RuntimeError(f"cannot listen on {cfg.host}:{cfg.port}: {reason}") from None
        proxy = app[PROXY_KEY]
        log.info("edge-proxy listening on http://%s:%d (tiers: %s; redis: %s; up to %d "
                 "connections)", cfg.host, cfg.port,
                 ", ".join(f"{n}={t.model}" for n, t in proxy.tiers.items()),
                 self.config.cache.redis_url or "off", limit)
        freeze_startup_heap()
        gcwatch.install(proxy.metrics, cfg.gc_thresholds)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if self.load is not None:
            from proxy import reload

            load = self.load
            loop.add_signal_handler(signal.SIGHUP, lambda: reload.reload(proxy, load))
        else:  # nothing to reload from: say so instead of dying of the default action
            loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
                "SIGHUP ignored: no configuration source to reload"))
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
