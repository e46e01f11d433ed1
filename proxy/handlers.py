"""The OpenAI endpoints: the request path of ARCHITECTURE.md.

parse + validate -> resolve model/tier -> keys -> L1 -> L2 -> single-flight -> upstream tee.
The HTTP layer stays thin: caching is exact.py, upstream calls are flight.py/upstream.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Any, Final

import numpy as np
import orjson
from aiohttp import web

from proxy.answer import CachedAnswer
from proxy.config import Config
from proxy.errors import ProxyError, model_not_found, payload_too_large, sse_error_event
from proxy.exact import ExactCache
from proxy.flight import Flight, cancel_all, drain
from proxy.keys import CHAT, COMPLETIONS, RequestKeys, namespace_of, request_keys
from proxy.metrics import Metrics
from proxy.router import Router
from proxy.semcache import SemanticCache
from proxy.shadow import Traffic
from proxy.upstream import TierClient
from proxy.validate import check_content_length, parse_json, validate

log = logging.getLogger(__name__)

JSON: Final = "application/json"
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                      "X-Accel-Buffering": "no"}
_DONE: Final = b"data: [DONE]\n\n"


_RID_PREFIX: Final = os.urandom(6).hex()
_rid_counter = itertools.count(1)


def _request_id(request: web.Request) -> str:
    """The client's x-request-id, else this process's random prefix + a counter: unique across
    sidecars, and a third of the cost of 12 random bytes per request."""
    return request.headers.get("x-request-id") or f"{_RID_PREFIX}{next(_rid_counter):010x}"


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


def _prompt_text(endpoint: str, body: dict[str, Any]) -> str:
    """Text for the router when there is no single user query (tool turns, prompt lists)."""
    if endpoint == CHAT:
        return "\n".join(m.get("content") for m in body["messages"]
                         if isinstance(m.get("content"), str))
    p = body["prompt"]
    return p if isinstance(p, str) else " ".join(x for x in p if isinstance(x, str))


class Proxy:
    """State shared by the handlers: config, tiers, caches, metrics, flights in progress."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.tiers: dict[str, TierClient] = {t.name: TierClient(t, metrics) for t in config.tiers}
        self.cache = ExactCache(config.cache, metrics)
        order = [t.name for t in config.tiers]
        self.semantic = (SemanticCache(config.semantic, metrics, self.cache, order)
                         if config.semantic.enabled and config.cache.enabled else None)
        self.router = (Router(order, cuts=config.router.cuts or None,
                              weights_path=config.router.weights_path or None)
                       if config.router.enabled and order else None)
        self.traffic = Traffic(config, self.tiers, metrics)
        self.flights: dict[Any, Flight] = {}
        self.by_model: dict[str, str] = {}
        self.auto_models = {"auto", *config.router.aliases}

    async def start(self) -> None:
        await self.cache.start()
        await asyncio.gather(*(t.start() for t in self.tiers.values()))
        self.by_model = {t.model: name for name, t in self.tiers.items()}
        if self.semantic is not None:
            await self.semantic.start()

    async def close(self) -> None:
        await cancel_all(self.flights)
        await self.traffic.close()
        await asyncio.gather(*(t.close() for t in self.tiers.values()))
        if self.semantic is not None:
            await self.semantic.close()
        await self.cache.close()

    async def purge_namespace(self, namespace: str) -> dict[str, int]:
        """Drop a namespace from every layer of this proxy, L2, and (shared mode) every
        sidecar."""
        l1, l2 = await self.cache.purge_namespace(namespace)
        sem = 0
        if self.semantic is not None:
            sem = self.semantic.index.purge_namespace(namespace)
            if self.semantic.shared is not None:
                self.semantic.shared.publish_purge(namespace)
        return {"l1": l1, "l2": l2, "semantic": sem}

    async def purge_key(self, key: bytes, namespace: str) -> bool:
        """Drop one exact key (and its semantic entry), everywhere."""
        found = await self.cache.delete(key, namespace)
        if self.semantic is not None:
            found = self.semantic.index.remove(key) or found
            if self.semantic.shared is not None:
                self.semantic.shared.publish_purge(namespace, key)
        return found

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

    def chain(self, tier: str) -> list[TierClient]:
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
        if len(raw) > server_cfg.max_body_bytes:  # a chunked body has no Content-Length
            raise payload_too_large(server_cfg.max_body_bytes)
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
        cache_on = self.config.cache.enabled
        lookup, store = lookup and cache_on, store and cache_on
        keys = request_keys(namespace, endpoint, model, body) if (store or lookup) else None
        if keys is not None:
            headers["x-cache-key"] = keys.exact.hex()  # what /admin/purge takes

        if keys is not None and lookup:
            answer = self.cache.get_l1(keys.exact)
            if answer is None:
                answer = await self.cache.get_l2(keys.exact, namespace)
            if answer is not None and answer.fits(max_tokens):
                if model in self.auto_models:  # not routed again: the tier that answered
                    tier_name = answer.tier
                return self._serve_hit(endpoint, answer, "hit-exact", tier_name, namespace,
                                       stream, include_usage, headers, t0)
        headers["x-cache"] = outcome = "miss" if lookup else "bypass"
        fkey = (keys.exact, stream) if keys is not None and store else None
        flight = self.flights.get(fkey) if fkey is not None else None
        if flight is None or flight.done:
            # Not in flight: the embedding serves the semantic lookup, the router and the store.
            routed = model in self.auto_models
            sem = self.semantic
            query = keys.query_text if keys is not None else ""
            vec = None
            if sem is not None and sem.eligible(query):
                try:
                    vec = await sem.embed(query)
                except Exception:  # the semantic layer is an optimisation: never fail for it
                    log.exception("embedding failed; serving without the semantic layer")
                    self.metrics.semantic_rejects.labels("embed_error").inc()
            if routed:
                tier_name = self._route(query or _prompt_text(endpoint, body), vec, headers)
            if sem is not None and lookup and vec is not None and keys is not None:
                hit = await sem.lookup(vec, keys, tier_name, max_tokens, sem.threshold(
                    namespace, request.headers.get("x-cache-threshold")))
                if hit is not None:
                    headers["x-cache-similarity"] = f"{hit.similarity:.4f}"
                    return self._serve_hit(endpoint, hit.answer, "hit-semantic", tier_name,
                                           namespace, stream, include_usage, headers, t0)
            # an identical request may have started its flight while this one was embedding
            flight = self.flights.get(fkey) if fkey is not None else None
            if flight is None or flight.done:
                flight = self._flight(fkey, keys, namespace, endpoint, body, stream, tier_name,
                                      vec)
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

    def _route(self, text: str, vec: np.ndarray | None, headers: dict[str, str]) -> str:
        """The tier for a routed request: the router's choice (or the default), then A/B."""
        if self.router is None:
            tier = self.config.default_tier
        else:
            decision = self.router.route(text, vec, self.tiers)
            tier = decision.tier
            headers["x-route-score"] = f"{decision.score:.3f}"
        tier = self.traffic.divert(tier)
        headers["x-route-tier"] = tier
        self.metrics.route_decisions.labels(tier).inc()
        return tier

    def _flight(self, fkey: tuple[bytes, bool] | None, keys: RequestKeys | None,
                namespace: str, endpoint: str, body: dict[str, Any], stream: bool,
                tier_name: str, vec: np.ndarray | None) -> Flight:
        """Start the upstream call for this request; identical requests may join it (fkey).

        With ``fkey`` None (no-store), the call is never shared and its answer never stored.
        """
        payload = dict(body)
        if stream:  # always ask for usage: the ledger needs it; clients get it only if asked
            payload["stream_options"] = {**(body.get("stream_options") or {}),
                                         "include_usage": True}
        started = time.perf_counter()

        def on_complete(answer: CachedAnswer, tier: TierClient) -> None:
            if fkey is not None and keys is not None:
                self.cache.put(keys.exact, answer, namespace)
                if vec is not None and self.semantic is not None:
                    self.semantic.add(vec, keys, namespace, tier.name)
            self.traffic.maybe_mirror(tier.name, endpoint, payload, answer,
                                      time.perf_counter() - started)

        def on_finish(f: Flight) -> None:
            if fkey is not None and self.flights.get(fkey) is f:
                del self.flights[fkey]

        flight = Flight(fkey, namespace, endpoint, payload, stream, self.chain(tier_name),
                        self.metrics, on_complete, on_finish)
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

    def _serve_hit(self, endpoint: str, answer: CachedAnswer, outcome: str, tier_name: str,
                   namespace: str, stream: bool, include_usage: bool, headers: dict[str, str],
                   t0: float) -> web.Response:
        headers["x-cache"] = outcome
        tier = self.tiers.get(tier_name)
        if tier is not None:
            self.metrics.save(tier.cfg, namespace, answer.prompt_tokens, answer.completion_tokens)
        if stream:
            resp = web.Response(body=answer.sse(include_usage), headers={**SSE_HEADERS, **headers})
        else:
            resp = web.Response(body=answer.body, content_type=JSON, headers=headers)
        self.metrics.observe_request(endpoint, outcome, tier_name, time.perf_counter() - t0)
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
        sem = self.semantic
        embedder = "disabled" if sem is None else ("ready" if sem.embedder.ready else "loading")
        ready = ready and embedder != "loading"
        # Redis down degrades (L1 + upstream still serve) but does not make the sidecar unready:
        # taking the pod out of service would hurt more than a colder cache.
        status = "ready" if ready and redis != "down" else ("degraded" if ready else "not_ready")
        return web.Response(status=200 if ready else 503, content_type=JSON,
                            body=orjson.dumps({"status": status, "redis": redis,
                                               "embedder": embedder, "tiers": tiers,
                                               "semantic_entries": len(sem.index) if sem else 0}))

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self.cache.update_gauges()
        for name, tier in self.tiers.items():
            for ep in tier.endpoints:
                self.metrics.breaker_open.labels(name, ep.url).set(ep.state != ep.CLOSED)
        if self.semantic is not None:
            self.semantic.update_gauges()
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
