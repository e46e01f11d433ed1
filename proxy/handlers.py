"""The OpenAI endpoints: the request path of ARCHITECTURE.md.

parse + validate -> resolve model/tier -> keys -> L1 -> L2 -> single-flight -> upstream tee.
The HTTP layer stays thin: caching is exact.py, upstream calls are flight.py/upstream.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import orjson
from aiohttp import web

from proxy.answer import CachedAnswer
from proxy.call import Call, cache_directives, new_request_id
from proxy.config import Config, time_sensitive
from proxy.errors import ProxyError, model_not_found, sse_error_event
from proxy.events import EventLog, event
from proxy.exact import ExactCache
from proxy.fastpath import HitMemo, HitPlan, supported
from proxy.feedback import ServedLedger
from proxy.flight import Cursor, Flight, cancel_all, drain
from proxy.keys import CHAT, COMPLETIONS, namespace_of, request_keys
from proxy.logs import REQUEST_ID
from proxy.metrics import Metrics, cost_usd
from proxy.router import Router
from proxy.semantic.cache import SemanticCache
from proxy.semantic_path import SemanticPath, prompt_text
from proxy.traffic import Traffic
from proxy.upstream import TierClient
from proxy.validate import check_headers, parse_json, read_json_body, validate

log = logging.getLogger(__name__)

JSON: Final = "application/json"
#: Characters of a long prompt's head and of its tail that the time-sensitive patterns read.
TTL_SCAN_CHARS: Final = 4096
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                      "X-Accel-Buffering": "no"}
_DONE: Final = b"data: [DONE]\n\n"


def is_sampled(body: dict[str, Any]) -> bool:
    """A random sample rather than the model's one answer: several choices (n > 1), or a
    temperature above 0 (vLLM's default when unset is 1) without a seed."""
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        return True
    t = body.get("temperature")
    return (t is None or t > 0) and body.get("seed") is None


class Proxy(SemanticPath):
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
        self.key_model: dict[str, str] = {}
        self.auto_identity = ""
        self.auto_models = {"auto", *config.router.aliases}
        sc = config.semantic
        # what each request id was answered with, for POST /v1/feedback (issue 13)
        self.ledger = (ServedLedger(sc.feedback_max_entries, sc.feedback_window_s)
                       if config.cache.enabled and sc.feedback_max_entries else None)
        # questions whose answer depends on the moment: short exact TTL (and no semantic layer)
        self.time_sensitive = time_sensitive(sc)
        self._audits: set[Flight] = set()
        self._audit_tasks: set[asyncio.Task[None]] = set()
        self.events = EventLog(config)
        srv = config.server
        # repeated exact requests answered below aiohttp's request layer (proxy/fastpath.py)
        self.memo = (HitMemo(srv.fast_path_entries, srv.fast_path_max_bytes)
                     if srv.fast_path and config.cache.enabled
                     and supported() else None)

    async def start(self) -> None:
        await self.cache.start()
        for t in self.tiers.values():
            t.on_change = self._index_models
        await asyncio.gather(*(t.start() for t in self.tiers.values()))
        self._index_models()
        if self.semantic is not None:
            await self.semantic.start()
        await self.events.start()

    async def close(self) -> None:
        await cancel_all(self.flights)
        await cancel_all({id(f): f for f in self._audits})
        for t in list(self._audit_tasks):
            t.cancel()
        await self.traffic.close()
        await asyncio.gather(*(t.close() for t in self.tiers.values()))
        if self.semantic is not None:
            await self.semantic.close()
        await self.cache.close()
        await self.events.close()

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

    async def purge_key(self, key: bytes, namespace: str) -> dict[str, int]:
        """Drop one exact key of ``namespace`` (and its semantic entry), everywhere; what was
        removed here and in Redis, per layer (a key of another namespace: nothing)."""
        l1, l2 = await self.cache.delete(key, namespace)
        sem = 0
        if self.semantic is not None:
            if self.semantic.index.namespace_of(key) == namespace:
                sem = int(self.semantic.index.remove(key))
            if self.semantic.shared is not None:
                self.semantic.shared.publish_purge(namespace, key)
        return {"l1": l1, "l2": l2, "semantic": sem}

    # -- resolution ------------------------------------------------------------------------
    def _index_models(self) -> None:
        """Served model name -> tier, and each tier's model identity for the cache key (re-run
        when a tier learns or changes its model): the served name plus what /v1/models says of
        the checkpoint, so a new checkpoint under the same name misses instead of being served
        the old one's answers. Routed requests (auto) depend on every tier's identity."""
        self.by_model = {t.model: name for name, t in self.tiers.items() if t.model}
        self.key_model = {name: f"{t.model}\x1f{t.identity}" for name, t in self.tiers.items()}
        self.auto_identity = "\x1e".join(t.identity for t in self.tiers.values())
        if self.memo is not None:  # its plans hold keys made with the old identities
            self.memo.clear()

    def resolve_tier(self, model: str) -> str:
        """The tier that serves ``model``; "auto" (and aliases) -> the default tier."""
        if model in self.auto_models:
            return self.config.default_tier
        name = self.by_model.get(model)
        if name is None:
            name = model if model in self.tiers else None
        if name is None:
            waiting = [n for n, t in self.tiers.items() if not t.ready]
            if waiting:  # it may be the model of a tier not reached yet
                raise ProxyError(503, f"model {model!r} is not known yet: tier(s) "
                                 f"{', '.join(waiting)} not reachable since start",
                                 err_type="service_unavailable", code="tier_not_ready",
                                 headers={"Retry-After": "1"})
            raise model_not_found(model)
        return name

    def healthy_tier(self, tier: str) -> str:
        """``tier`` if it is up, else the next larger tier that is, else the next smaller one
        (routed requests avoid a tier whose upstreams are all down or breaker-open)."""
        if self.tiers[tier].up:
            return tier
        names = list(self.tiers)
        i = names.index(tier)
        for name in [*names[i + 1:], *reversed(names[:i])]:
            if self.tiers[name].up and self.tiers[name].ready:
                return name
        return tier

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
        """A completion request; the one place where its ProxyError becomes a response."""
        call = Call(request, endpoint, time.perf_counter())
        REQUEST_ID.set(call.request_id)  # every log line of this request (and its tasks) names it
        try:
            resp = await self._complete(call)
        except ProxyError as err:
            self.metrics.errors.labels(str(err.status), err.code or "").inc()
            self.metrics.observe_request(endpoint, "error", call.tier,
                                         time.perf_counter() - call.t0)
            call.outcome = "error"
            resp = err.response(call.headers())
        except asyncio.CancelledError:  # the client went away
            if self.events.enabled:
                self.events.emit(self._event(call, 499))
            raise
        # the one place a request's outcome is complete (a stream: after its last byte)
        if self.events.enabled:
            self.events.emit(self._event(call, resp.status))
        return resp

    def _event(self, call: Call, status: int) -> dict[str, Any]:
        """The request's event-log record (proxy/events.py)."""
        now = time.perf_counter()
        prompt = None
        if self.events.log_prompts:  # a fast-path replay has its keys but no parsed body
            if call.keys is not None and call.keys.query_text:
                prompt = call.keys.query_text
            elif call.body:
                prompt = prompt_text(call.endpoint, call.body)
        return event(request_id=call.request_id, namespace=call.namespace or "-",
                     endpoint=call.endpoint, model=call.model, tier=call.tier,
                     outcome=call.outcome or "error", status=status, latency_s=now - call.t0,
                     ttfb_s=None if call.ttfb is None else call.ttfb - call.t0,
                     similarity=None if call.similarity is None else float(call.similarity),
                     stream=call.stream, prompt_tokens=call.usage[0],
                     completion_tokens=call.usage[1], cost_usd=call.cost_usd,
                     saved_usd=call.saved_usd, joined=call.joined,
                     upstream_status=200 if call.outcome in ("miss", "bypass") and status == 200
                     else None, prompt=prompt)

    async def _complete(self, call: Call) -> web.StreamResponse:
        """The request path: parse, resolve, exact lookup, then (on a miss) join or start the
        upstream flight, with the semantic layer and the router in between."""
        await self._read_body(call)
        self._resolve(call)
        if call.lookup:
            answer = self._l1_lookup(call)  # synchronous: the fastest path has no await
            if answer is None:
                answer = await self._l2_lookup(call)
            if answer is not None and answer.fits(call.max_tokens):
                if self.ledger is not None and call.keys is not None:
                    self.ledger.record(call.request_id, call.namespace, call.keys.exact,
                                       "hit-exact")
                if self.memo is not None:  # the same bytes again: proxy/fastpath.py
                    self.memo.learn(call.request, call.raw, call)
                return self._serve_hit(call, answer, "hit-exact", answer.tier if call.routed
                                       else call.tier)  # an auto hit counts where it was made
        call.outcome = "miss" if call.lookup else "bypass"
        flight = self._joinable(call)
        if flight is None and self._speculate(call):
            return await self._speculative_miss(call)
        if flight is None:
            hit = await self._prepare_miss(call)
            if hit is not None:
                return self._serve_hit(call, hit, "hit-semantic", call.tier)
            # an identical request may have started its flight while this one was embedding
            flight = self._joinable(call)
            if flight is None:
                flight = self._flight(call)
                call.joined = False
            else:
                call.joined = True
        else:
            call.joined = True
        return await self._answer(call, flight)

    async def _read_body(self, call: Call) -> None:
        """Read, bound, parse and validate the JSON body."""
        request, cfg = call.request, self.config.server
        check_headers(request.headers)
        raw = await read_json_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
        call.raw = raw
        call.body = body = parse_json(raw)
        validate(body, call.endpoint, self.config.server)

    def _resolve(self, call: Call) -> None:
        """Model and tier, stream options, cache directives, namespace and keys."""
        body, headers = call.body, call.request.headers
        call.model = model = body["model"]
        call.tier = self.resolve_tier(model)
        call.routed = model in self.auto_models
        call.stream = stream = body.get("stream") is True
        call.include_usage = stream and bool((body.get("stream_options") or {})
                                             .get("include_usage"))
        call.max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        lookup, store = cache_directives(headers.get("Cache-Control"))
        cache_cfg = self.config.cache
        cache_on = cache_cfg.enabled
        if is_sampled(body):  # one stored sample served to every identical request, or none
            call.sampled = cache_cfg.sampled
            cache_on = cache_on and cache_cfg.sampled == "store"
        call.lookup, call.store = lookup and cache_on, store and cache_on
        call.namespace = self.caller_namespace(call.request)
        if call.store or call.lookup:
            key_model = (f"{model}\x1f{self.auto_identity}" if call.routed
                         else self.key_model.get(call.tier, model))
            call.keys = keys = request_keys(call.namespace, call.endpoint, key_model, body)
            if call.store:
                # only requests with the same token limit share a flight: another limit could
                # get an answer longer than it allows, or one cut short it did not ask for
                call.flight_key = (keys.exact, stream, call.max_tokens)

    def _l1_lookup(self, call: Call) -> CachedAnswer | None:
        assert call.keys is not None
        return self.cache.get_l1(call.keys.exact)

    async def _l2_lookup(self, call: Call) -> CachedAnswer | None:
        assert call.keys is not None
        return await self.cache.get_l2(call.keys.exact, call.namespace,
                                       self._ttl_for(call.keys.query_text))

    def _ttl_for(self, query: str) -> float | None:
        """The short TTL of a time-sensitive question ("today", prices, weather), else None.

        A prompt longer than 2 x TTL_SCAN_CHARS is judged by its head and its tail (where a
        long prompt's question is), not scanned whole on the loop: the patterns cost ~25 ns a
        character, 10 ms for a 400k-character prompt, two or three times per miss."""
        if self.time_sensitive is None or not query:
            return None
        if len(query) > 2 * TTL_SCAN_CHARS:
            query = query[:TTL_SCAN_CHARS] + "\n" + query[-TTL_SCAN_CHARS:]
        if self.time_sensitive.search(query):
            return self.config.semantic.time_sensitive_ttl_s
        return None

    def _joinable(self, call: Call) -> Flight | None:
        """The flight of an identical request still in progress, if any."""
        if call.flight_key is None:
            return None
        flight = self.flights.get(call.flight_key)
        return None if flight is None or not flight.joinable else flight

    def caller_namespace(self, request: web.Request) -> str:
        """The namespace a request's credentials (and x-cache-namespace) select."""
        cache_cfg = self.config.cache
        return namespace_of(request.headers.get("x-cache-namespace"),
                            request.headers.get("Authorization"),
                            trust_header=cache_cfg.trust_namespace_header,
                            anonymous=cache_cfg.anonymous)

    async def feedback(self, request: web.Request) -> web.Response:
        """POST /v1/feedback {"request_id": ..., "rating": "bad" | "good"}.

        Same credentials as the rated request (an id from another namespace is unknown: 404).
        "bad" removes the served answer from L1, Redis and every sidecar's index, and counts
        as an error of the verifier at the probability it was served with."""
        try:
            raw = await read_json_body(request, 4096, self.config.server.body_timeout_s)
            body = parse_json(raw)
            if not isinstance(body, dict):
                raise ProxyError(400, "expected a JSON object", code="invalid_request")
            rid, rating = body.get("request_id"), body.get("rating")
            if not isinstance(rid, str) or not 0 < len(rid) <= 256:
                raise ProxyError(400, "request_id: expected a non-empty string",
                                 param="request_id", code="invalid_request")
            if rating not in ("bad", "good"):
                raise ProxyError(400, "rating: expected \"bad\" or \"good\"",
                                 param="rating", code="invalid_request")
            # keyed by the caller's namespace too: another tenant's id (or one it reused) is
            # unknown here, and nobody can overwrite another tenant's record
            namespace = self.caller_namespace(request)
            rec = self.ledger.get(rid, namespace) if self.ledger is not None else None
            if rec is None:
                raise ProxyError(404, f"unknown or expired request_id {rid[:64]!r}",
                                 err_type="not_found_error", code="request_not_found")
        except ProxyError as err:
            self.metrics.errors.labels(str(err.status), err.code or "").inc()
            return err.response()
        removed = False
        if rating == "bad":
            assert self.ledger is not None
            self.ledger.pop(rid, namespace)
            removed = sum((await self.purge_key(rec.key, rec.namespace)).values()) > 0
            if rec.outcome == "hit-semantic" and self.semantic is not None:
                self.semantic.bad_feedback(rec.namespace, rec.p, rec.vec)
        self.metrics.semantic_feedback.labels(rating, rec.outcome).inc()
        return web.Response(body=orjson.dumps({"request_id": rid, "rating": rating,
                                               "outcome": rec.outcome, "removed": removed}),
                            content_type=JSON)

    def _route(self, call: Call, text: str) -> None:
        """The tier for a routed request: the router's choice (or the default), then A/B."""
        if self.router is None:
            tier = self.config.default_tier
        else:
            decision = self.router.route(text, call.vec, self.tiers)
            tier = decision.tier
            call.route_score = f"{decision.score:.3f}"
        call.tier = tier = self.healthy_tier(self.traffic.divert(tier))
        self.metrics.route_decisions.labels(tier).inc()

    def _flight(self, call: Call) -> Flight:
        """Start the upstream call for this request; identical requests may join it.

        Without a flight key (no-store), the call is never shared and its answer never stored.
        """
        body, endpoint, namespace = call.body, call.endpoint, call.namespace
        fkey, keys = call.flight_key, call.keys
        payload = dict(body)
        if call.stream:  # always ask for usage: the ledger needs it; clients get it only if asked
            payload["stream_options"] = {**(body.get("stream_options") or {}),
                                         "include_usage": True}
        started = time.perf_counter()

        def on_complete(answer: CachedAnswer, tier: TierClient) -> None:
            if fkey is not None and keys is not None:
                self.cache.put(keys.exact, answer, namespace, self._ttl_for(keys.query_text))
                if self.semantic is not None:
                    call.stored_tier = tier.name
                    if call.vec is not None:  # else: indexed when the vector arrives
                        self._index_later(call)
            self.traffic.maybe_mirror(tier.name, endpoint, payload, answer,
                                      time.perf_counter() - started)

        def on_finish(f: Flight) -> None:
            if fkey is not None and self.flights.get(fkey) is f:
                del self.flights[fkey]

        flight = Flight(fkey, namespace, endpoint, payload, call.stream, self.chain(call.tier),
                        self.metrics, on_complete, on_finish)
        flight.auth = call.request.headers.get("Authorization")
        if fkey is not None:
            self.flights[fkey] = flight
        flight.start()
        return flight

    async def _answer(self, call: Call, flight: Flight) -> web.StreamResponse:
        """Subscribe to the flight and answer from it: streamed as it comes, or the JSON body."""
        if self.ledger is not None and call.keys is not None and call.store:
            # a bad rating of a miss removes the answer it stored
            self.ledger.record(call.request_id, call.namespace, call.keys.exact, "miss")
        cursor = flight.subscribe()
        try:
            if call.stream:
                return await self._stream_out(call, flight, cursor)
            await drain(flight)
        finally:
            flight.unsubscribe(cursor)
        if flight.error is not None:
            raise flight.error
        assert flight.body is not None and flight.tier is not None
        call.tier = flight.tier.name
        self.metrics.observe_request(call.endpoint, call.outcome, call.tier,
                                     time.perf_counter() - call.t0)
        self._account(call, flight)
        return web.Response(body=flight.body, content_type=JSON, headers=call.headers())

    def _account(self, call: Call, flight: Flight) -> None:
        """What an answer from a flight cost: the leader's upstream call, or (a request that
        joined it) the saving of not making its own, so spent + saved is what the traffic would
        have cost without the proxy."""
        if flight.usage is None or flight.tier is None:
            return
        call.usage = flight.usage
        if call.joined:
            call.saved_usd = self.metrics.save(flight.tier.cfg, call.namespace, *flight.usage,
                                               joined=True)
        else:
            call.cost_usd = cost_usd(flight.tier.cfg, *flight.usage)

    async def _stream_out(self, call: Call, flight: Flight, cursor: Cursor
                          ) -> web.StreamResponse:
        """Write a flight's events to one client as they arrive."""
        while not flight.started and not flight.done:
            await flight.wait()
        if not flight.started:
            assert flight.error is not None
            raise flight.error
        assert flight.tier is not None
        call.tier = flight.tier.name
        resp = web.StreamResponse(headers={**SSE_HEADERS, **call.headers()})
        await resp.prepare(call.request)
        call.ttfb = time.perf_counter()
        self.metrics.observe_request(call.endpoint, call.outcome, call.tier,
                                     call.ttfb - call.t0)
        try:
            while True:
                chunk = cursor.take()  # everything already there, in one write
                if chunk:
                    await resp.write(chunk)
                    continue
                if flight.done:
                    break
                await flight.wait()
            if flight.error is not None:
                await resp.write(sse_error_event(flight.error))
            else:
                if call.include_usage and flight.usage_frame is not None:
                    await resp.write(flight.usage_frame)
                await resp.write(_DONE)
                self._account(call, flight)
            await resp.write_eof()
        except ConnectionResetError:
            # the client went away (an ordinary event, not an error to log); unsubscribe (in
            # the caller) cancels the upstream if alone
            log.debug("client left mid-stream")
        return resp

    def _serve_hit(self, call: Call, answer: CachedAnswer, outcome: str, tier_name: str
                   ) -> web.Response:
        """Answer from the cache; ``tier_name`` is the tier the hit is counted (and saved) on,
        and the one x-route-tier names (an "auto" exact hit: the tier that made the answer)."""
        body, headers = self._hit(call, answer, outcome, tier_name)
        return web.Response(body=body, headers=headers)

    def replay_exact(self, plan: HitPlan, t0: float) -> tuple[bytes, dict[str, str]] | None:
        """The body and headers answering a request the fast path recognised
        (proxy/fastpath.py): the exact hit the normal path would serve, or None (entry gone
        from L1, or longer than the request's token limit: the normal path decides)."""
        answer = self.cache.get_l1(plan.keys.exact)
        if answer is None or not answer.fits(plan.max_tokens):
            return None
        call = Call.replayed(plan.endpoint, t0, plan.client_rid or new_request_id())
        call.model, call.tier, call.routed = plan.model, plan.tier, plan.routed
        call.stream, call.include_usage = plan.stream, plan.include_usage
        call.max_tokens, call.namespace, call.keys = plan.max_tokens, plan.namespace, plan.keys
        call.lookup = call.store = True
        call.sampled = plan.sampled
        body, headers = self._hit(call, answer, "hit-exact",
                                  answer.tier if call.routed else call.tier)
        if self.ledger is not None:
            self.ledger.record(call.request_id, call.namespace, plan.keys.exact, "hit-exact")
        if self.events.enabled:
            self.events.emit(self._event(call, 200))
        return body, headers

    def _hit(self, call: Call, answer: CachedAnswer, outcome: str, tier_name: str
             ) -> tuple[bytes, dict[str, str]]:
        """A hit's accounting, body and headers (``_serve_hit`` and ``replay_exact``)."""
        call.outcome = outcome
        call.tier = tier_name  # the tier that made the answer (an auto hit is not re-routed)
        # the body first: nothing is counted for a hit that could not be replayed
        body = answer.replay(True, call.include_usage) if call.stream else answer.replay(False)
        tier = self.tiers.get(tier_name)
        call.usage = (answer.prompt_tokens, answer.completion_tokens)
        if tier is not None:
            call.saved_usd = self.metrics.save(tier.cfg, call.namespace, answer.prompt_tokens,
                                               answer.completion_tokens)
        if call.stream:
            headers = {**SSE_HEADERS, **call.headers()}
        else:
            headers = call.headers()
            headers["Content-Type"] = JSON
        self.metrics.observe_request(call.endpoint, outcome, tier_name,
                                     time.perf_counter() - call.t0)
        return body, headers

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
        redis = self.cache.redis_state
        tiers = {n: t.state() for n, t in self.tiers.items()}
        down = [n for n, t in self.tiers.items() if not (t.ready and t.up)]
        # ready: every tier's model known and some tier up (a down tier is routed around)
        ready = (bool(self.tiers) and all(t.ready for t in self.tiers.values())
                 and len(down) < len(self.tiers))
        sem = self.semantic
        embedder = "disabled" if sem is None else sem.embedder_state
        ready = ready and embedder != "loading"
        # Redis down degrades (L1 + upstream still serve) but does not make the sidecar unready:
        # taking the pod out of service would hurt more than a colder cache.
        status = ("ready" if ready and redis != "down" and not down
                  else ("degraded" if ready else "not_ready"))
        return web.Response(status=200 if ready else 503, content_type=JSON,
                            body=orjson.dumps({"status": status, "down": down, "redis": redis,
                                               "embedder": embedder, "tiers": tiers,
                                               "semantic_entries": len(sem.index) if sem else 0}))

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self.cache.update_gauges()
        for name, tier in self.tiers.items():
            for up in tier.upstreams:
                self.metrics.breaker_open.labels(name, up.url).set(up.state != up.CLOSED)
        if self.semantic is not None:
            self.semantic.update_gauges()
        # rendered in a worker thread: the loop is never held for the whole text (prometheus
        # objects lock their own state; HotPath hands out snapshots of its dicts)
        body = await asyncio.to_thread(self.metrics.render)
        return web.Response(body=body,
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
