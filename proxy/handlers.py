"""The OpenAI endpoints: the request path of ARCHITECTURE.md.

parse + validate -> resolve model/tier -> keys -> L1 -> L2 -> single-flight -> upstream tee.
The HTTP layer stays thin: caching is exact.py, upstream calls are flight.py/upstream.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Final

import orjson
from aiohttp import web

from proxy.answer import CachedAnswer
from proxy.config import Config
from proxy.errors import ProxyError, model_not_found, payload_too_large, sse_error_event
from proxy.exact import ExactCache
from proxy.flight import Flight, drain
from proxy.keys import CHAT, COMPLETIONS, namespace_of, request_keys
from proxy.metrics import Metrics
from proxy.upstream import TierClient
from proxy.validate import check_content_length, parse_json, validate

log = logging.getLogger(__name__)

JSON: Final = "application/json"
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                      "X-Accel-Buffering": "no"}
_DONE: Final = b"data: [DONE]\n\n"


def _request_id(request: web.Request) -> str:
    return request.headers.get("x-request-id") or os.urandom(12).hex()


def _cache_directives(request: web.Request) -> tuple[bool, bool]:
    """(lookup, store) from Cache-Control: no-cache skips the lookup, no-store skips both."""
    cc = request.headers.get("Cache-Control")
    if not cc:
        return True, True
    cc = cc.lower()
    if "no-store" in cc:
        return False, False
    if "no-cache" in cc:
        return False, True
    return True, True


class Proxy:
    """State shared by the handlers: config, tiers, caches, metrics, flights in progress."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.tiers: dict[str, TierClient] = {t.name: TierClient(t, metrics) for t in config.tiers}
        self.cache = ExactCache(config.cache, metrics)
        self.flights: dict[Any, Flight] = {}
        self.by_model: dict[str, str] = {}
        self.auto_models = {"auto", *config.router.aliases}

    async def start(self) -> None:
        await self.cache.start()
        await asyncio.gather(*(t.start() for t in self.tiers.values()))
        self.by_model = {t.model: name for name, t in self.tiers.items()}

    async def close(self) -> None:
        from proxy.flight import cancel_all

        await cancel_all(self.flights)
        await asyncio.gather(*(t.close() for t in self.tiers.values()))
        await self.cache.close()

    # -- resolution ------------------------------------------------------------------------
    def resolve_tier(self, model: str) -> str:
        """The tier that serves ``model``; "auto" (and aliases) -> the default tier."""
        if model in self.auto_models:
            return self.config.default_tier
        name = self.by_model.get(model)
        if name is None:
            name = model if model in self.tiers else None
        if name is None:
            raise model_not_found(model)
        return name

    def chain(self, tier: str, routed: bool) -> list[TierClient]:
        """The tiers to try in order: the chosen one, then its configured fallbacks."""
        names = [tier, *self.tiers[tier].cfg.fallback]
        return [self.tiers[n] for n in dict.fromkeys(names)]

    # -- endpoints --------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, COMPLETIONS)

    async def complete(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        t0 = time.perf_counter()
        rid = _request_id(request)
        headers = {"x-request-id": rid}
        try:
            return await self._complete(request, endpoint, headers, t0)
        except ProxyError as err:
            self.metrics.errors.labels(str(err.status), err.code or "").inc()
            self.metrics.observe_request(endpoint, "error", headers.get("x-route-tier", ""),
                                         time.perf_counter() - t0)
            return err.response(headers)

    async def _complete(self, request: web.Request, endpoint: str, headers: dict[str, str],
                        t0: float) -> web.StreamResponse:
        server_cfg = self.config.server
        check_content_length(request.content_length, server_cfg.max_body_bytes)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise payload_too_large(server_cfg.max_body_bytes) from None
        body = parse_json(raw)
        validate(body, endpoint, server_cfg)
        model: str = body["model"]
        tier_name = self.resolve_tier(model)
        headers["x-route-tier"] = tier_name
        stream = body.get("stream") is True
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        lookup, store = _cache_directives(request)
        namespace = namespace_of(request.headers.get("x-cache-namespace"),
                                 request.headers.get("Authorization"))
        keys = request_keys(namespace, endpoint, model, body) if store or lookup else None
        cache_on = self.config.cache.enabled

        if keys is not None and lookup and cache_on:
            answer = self.cache.get_l1(keys.exact)
            if answer is None:
                answer = await self.cache.get_l2(keys.exact)
            if answer is not None and answer.fits(max_tokens):
                return await self._serve_hit(request, endpoint, answer, tier_name, namespace,
                                             stream, include_usage, headers, t0)
        headers["x-cache"] = "miss" if (lookup and cache_on) else "bypass"
        outcome = "miss" if (lookup and cache_on) else "bypass"
        do_store = store and cache_on and keys is not None
        flight = self._flight(keys.exact if keys is not None and store else None, namespace,
                              endpoint, body, stream, tier_name, do_store)
        flight.subscribe()
        try:
            if stream:
                return await self._stream_out(request, flight, include_usage, headers, endpoint,
                                              outcome, t0)
            await drain(flight)
        finally:
            flight.unsubscribe()
        if flight.error is not None:
            raise flight.error
        assert flight.body is not None and flight.tier is not None
        headers["x-route-tier"] = flight.tier.name
        self.metrics.observe_request(endpoint, outcome, flight.tier.name, time.perf_counter() - t0)
        return web.Response(body=flight.body, content_type=JSON, headers=headers)

    def _flight(self, key: bytes | None, namespace: str, endpoint: str, body: dict[str, Any],
                stream: bool, tier_name: str, store: bool) -> Flight:
        """Join the identical request in flight, or start one (key None: never shared)."""
        fkey = (key, stream) if key is not None else None
        if fkey is not None:
            existing = self.flights.get(fkey)
            if existing is not None and not existing.done:
                return existing
        payload = dict(body)
        if stream:  # always ask for usage: the ledger needs it; clients get it only if asked
            payload["stream_options"] = {**(body.get("stream_options") or {}),
                                         "include_usage": True}

        def on_complete(answer: CachedAnswer, tier: TierClient) -> None:
            if store and key is not None:
                self.cache.put(key, answer)

        def on_finish(f: Flight) -> None:
            if fkey is not None and self.flights.get(fkey) is f:
                del self.flights[fkey]

        flight = Flight(fkey, namespace, endpoint, payload, stream,
                        self.chain(tier_name, body["model"] in self.auto_models), self.metrics,
                        on_complete, on_finish)
        if fkey is not None:
            self.flights[fkey] = flight
        flight.start()
        return flight

    async def _stream_out(self, request: web.Request, flight: Flight, include_usage: bool,
                          headers: dict[str, str], endpoint: str, outcome: str, t0: float
                          ) -> web.StreamResponse:
        """Write a flight's events to one client as they arrive."""
        while not flight.started and not flight.done:
            await flight.wait()
        if not flight.started:
            assert flight.error is not None
            raise flight.error
        assert flight.tier is not None
        headers["x-route-tier"] = flight.tier.name
        resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await resp.prepare(request)
        self.metrics.observe_request(endpoint, outcome, flight.tier.name, time.perf_counter() - t0)
        sent = 0
        try:
            while True:
                events = flight.events
                if sent < len(events):
                    # everything already there in one write
                    chunk = b"".join(events[sent:]) if len(events) - sent > 1 else events[sent]
                    sent = len(events)
                    await resp.write(chunk)
                    continue
                if flight.done:
                    break
                await flight.wait()
            if flight.error is not None:
                await resp.write(sse_error_event(flight.error))
            else:
                if include_usage and flight.usage_frame is not None:
                    await resp.write(flight.usage_frame)
                await resp.write(_DONE)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            # the client went away; unsubscribe (in the caller) cancels the upstream if alone
            raise
        return resp

    async def _serve_hit(self, request: web.Request, endpoint: str, answer: CachedAnswer,
                         tier_name: str, namespace: str, stream: bool, include_usage: bool,
                         headers: dict[str, str], t0: float) -> web.StreamResponse:
        headers["x-cache"] = "hit-exact"
        tier = self.tiers.get(tier_name)
        if tier is not None:
            self.metrics.save(tier.cfg, namespace, answer.prompt_tokens, answer.completion_tokens)
        if stream:
            resp: web.StreamResponse = web.Response(body=answer.sse(include_usage),
                                                    headers={**SSE_HEADERS, **headers})
        else:
            resp = web.Response(body=answer.body, content_type=JSON, headers=headers)
        self.metrics.observe_request(endpoint, "hit-exact", tier_name, time.perf_counter() - t0)
        return resp

    # -- other endpoints ---------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        data = [{"id": "auto", "object": "model", "created": created, "owned_by": "edge-proxy"}]
        for name, t in self.tiers.items():
            data.append({"id": t.model, "object": "model", "created": created,
                         "owned_by": "vllm", "tier": name})
        return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                            content_type=JSON)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=JSON)

    async def readyz(self, request: web.Request) -> web.Response:
        l2 = self.cache.l2
        redis = "disabled" if l2 is None else ("up" if l2.up else "down")
        tiers = {n: {"model": t.model, "endpoints": [e.url for e in t.endpoints]}
                 for n, t in self.tiers.items()}
        ready = bool(self.tiers) and all(t.model for t in self.tiers.values())
        # Redis down degrades (L1 + upstream still serve) but does not make the sidecar unready:
        # taking the pod out of service would hurt more than a colder cache.
        status = "ready" if ready and redis != "down" else ("degraded" if ready else "not_ready")
        return web.Response(status=200 if ready else 503, content_type=JSON,
                            body=orjson.dumps({"status": status, "redis": redis, "tiers": tiers}))

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self.cache.update_gauges()
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
