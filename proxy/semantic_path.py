"""The semantic layer on the request path: a Proxy mixin (handlers.py composes it).

The speculative miss (upstream call started while the query is embedded; a semantic hit
cancels it), the embedding and semantic lookup of an ordinary miss, indexing a stored answer's
vector after the answer went out, and the background audits of semantic hits (issue 13).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from proxy.answer import CachedAnswer
from proxy.call import Call
from proxy.config import Config
from proxy.feedback import ServedLedger, answer_text, texts_agree
from proxy.flight import Flight
from proxy.keys import CHAT
from proxy.metrics import Metrics
from proxy.router import Router
from proxy.semantic.cache import SemanticCache, SemanticHit
from proxy.upstream import TierClient

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("proxy.handlers")  # the logger these messages always had

#: A miss's vector goes into the semantic index this long after its answer is stored: the
#: waiting responses are written first.
INDEX_DELAY_S: Final = 0.001


def prompt_text(endpoint: str, body: dict[str, Any]) -> str:
    """Text for the router when there is no single user query (tool turns, prompt lists)."""
    if endpoint == CHAT:
        return "\n".join(m.get("content") for m in body["messages"]
                         if isinstance(m.get("content"), str))
    p = body["prompt"]
    return p if isinstance(p, str) else " ".join(x for x in p if isinstance(x, str))


class SemanticPath:
    """The semantic-layer stages of ``Proxy`` (which provides the state and stages below)."""

    config: Config
    metrics: Metrics
    semantic: SemanticCache | None
    router: Router | None
    tiers: dict[str, TierClient]
    ledger: ServedLedger | None
    _audits: set[Flight]
    _audit_tasks: set[asyncio.Task[None]]

    if TYPE_CHECKING:
        def chain(self, tier: str) -> list[TierClient]: ...
        def _joinable(self, call: Call) -> Flight | None: ...
        def _flight(self, call: Call) -> Flight: ...
        def _route(self, call: Call, text: str) -> None: ...
        async def _answer(self, call: Call, flight: Flight) -> web.StreamResponse: ...
        def _serve_hit(self, call: Call, answer: CachedAnswer, outcome: str, tier_name: str
                       ) -> web.Response: ...

    def _speculate(self, call: Call) -> bool:
        """Start the upstream call before the embedding is ready? Only when the semantic layer
        looks for this request, its vector is not already known, and the router does not need
        the vector to pick the tier."""
        sem = self.semantic
        if sem is None or not sem.cfg.speculative or not call.lookup or call.keys is None:
            return False
        if call.routed and self.router is not None and len(self.tiers) > 1:
            return False
        query = call.keys.query_text
        return sem.eligible(query) and not sem.embedder.has(query, call.namespace)

    async def _embed(self, call: Call, query: str) -> np.ndarray | None:
        assert self.semantic is not None
        try:
            return await self.semantic.embed(query, call.namespace)
        except Exception:  # the semantic layer is an optimisation: never fail for it
            log.exception("embedding failed; serving without the semantic layer")
            self.metrics.semantic_rejects.labels("embed_error").inc()
            return None

    async def _speculative_miss(self, call: Call) -> web.StreamResponse:
        """An exact miss whose upstream call starts at once (after ``speculative_delay_s`` at
        most), while the query is embedded and looked up; a semantic hit cancels the call."""
        sem = self.semantic
        assert sem is not None and call.keys is not None
        query = call.keys.query_text
        if call.routed:
            self._route(call, query)  # one tier or no router: the vector changes nothing
        delay = sem.cfg.speculative_delay_s
        flight: Flight | None = None
        t_flight = 0.0
        hit = None
        try:
            if delay <= 0:
                flight, t_flight = self._flight(call), time.perf_counter()
                vec = await self._embed(call, query)
            else:
                task = asyncio.ensure_future(self._embed(call, query))
                done, _ = await asyncio.wait({task}, timeout=delay)
                if not done:
                    flight = self._joinable(call) or self._flight(call)
                    t_flight = time.perf_counter()
                vec = await task
            call.vec = vec
            if vec is not None:
                threshold = sem.threshold(call.namespace,
                                          call.request.headers.get("x-cache-threshold"))
                hit = await sem.lookup(vec, call.keys, call.tier, call.max_tokens,
                                       threshold, call.namespace)
        except BaseException:
            # the client went away (or a bug) before subscribing: do not leave the upstream
            # call running for nobody
            if flight is not None and flight.subscribers == 0 and not flight.done:
                flight.subscribe()
                flight.unsubscribe()
            raise
        if hit is not None:
            if flight is not None:
                self._abandon(flight, t_flight)
            call.similarity = f"{hit.similarity:.4f}"
            self._semantic_served(call, hit)
            return self._serve_hit(call, hit.answer, "hit-semantic", call.tier)
        if flight is None:
            flight = self._joinable(call) or self._flight(call)
        else:
            self.metrics.speculative.labels("used").inc()
            if call.stored_tier is not None and vec is not None:
                self._index_later(call)  # the answer was stored before the vector was ready
        return await self._answer(call, flight)

    def _abandon(self, flight: Flight, t_flight: float) -> None:
        """A semantic hit made this speculative flight unnecessary: cancel it unless an
        identical request joined it (or it already finished)."""
        if flight.done:
            self.metrics.speculative.labels("finished").inc()
        elif flight.subscribers > 0:
            self.metrics.speculative.labels("joined").inc()
        else:
            # the last (only) subscriber leaving cancels the upstream call
            flight.unsubscribe(flight.subscribe())
            self.metrics.speculative.labels("cancelled").inc()
            self.metrics.speculative_cancel.observe(time.perf_counter() - t_flight)

    def _index_later(self, call: Call) -> None:
        """Index a stored answer's vector after the answer went out, not before (the insert,
        ~0.1-0.5 ms, would delay the waiting responses)."""
        asyncio.get_running_loop().call_later(INDEX_DELAY_S, self._index, call)

    def _index(self, call: Call) -> None:
        if (call.indexed or call.vec is None or call.stored_tier is None or call.keys is None
                or self.semantic is None):
            return
        call.indexed = True
        self.semantic.add(call.vec, call.keys, call.namespace, call.stored_tier)

    async def _prepare_miss(self, call: Call) -> CachedAnswer | None:
        """Not in flight: embed the query (it serves the semantic lookup, the router and the
        store), route, and look in the semantic cache."""
        sem = self.semantic
        query = call.keys.query_text if call.keys is not None else ""
        if sem is not None and sem.eligible(query):
            try:
                call.vec = await sem.embed(query, call.namespace)
            except Exception:  # the semantic layer is an optimisation: never fail for it
                log.exception("embedding failed; serving without the semantic layer")
                self.metrics.semantic_rejects.labels("embed_error").inc()
        if call.routed:
            self._route(call, query or prompt_text(call.endpoint, call.body))
        if sem is None or not call.lookup or call.vec is None or call.keys is None:
            return None
        threshold = sem.threshold(call.namespace, call.request.headers.get("x-cache-threshold"))
        hit = await sem.lookup(call.vec, call.keys, call.tier, call.max_tokens, threshold,
                               call.namespace)
        if hit is None:
            return None
        call.similarity = f"{hit.similarity:.4f}"
        self._semantic_served(call, hit)
        return hit.answer

    def _semantic_served(self, call: Call, hit: SemanticHit) -> None:
        """Remember what a semantic hit served (for feedback) and maybe audit it."""
        sem = self.semantic
        assert sem is not None
        if self.ledger is not None:
            self.ledger.record(call.request_id, call.namespace, hit.entry.key, "hit-semantic",
                               hit.p, sem.index.vector(hit.entry.key))
        rate = self.config.semantic.audit_rate
        if rate > 0 and random.random() < rate:
            self._audit(call, hit.answer, hit.p, hit.entry.key)

    # -- audits and feedback (issue 13) -------------------------------------------------------
    def _audit(self, call: Call, served: CachedAnswer, p: float, key: bytes) -> None:
        """Ask upstream too, in the background, and compare: a disagreement is evidence that
        the hit was wrong (the error budget tightens), an agreement that it was right."""
        payload = {k: v for k, v in call.body.items() if k not in ("stream", "stream_options")}
        namespace = call.namespace

        def on_complete(answer: CachedAnswer, tier: TierClient) -> None:
            task = asyncio.get_running_loop().create_task(
                self._judge(namespace, served, answer, p))
            self._audit_tasks.add(task)
            task.add_done_callback(self._audit_tasks.discard)

        def on_finish(f: Flight) -> None:
            self._audits.discard(f)
            if f.error is not None:
                self.metrics.semantic_audits.labels("upstream_error").inc()

        flight = Flight(None, namespace, call.endpoint, payload, False, self.chain(call.tier),
                        self.metrics, on_complete, on_finish)
        self._audits.add(flight)
        flight.start()

    async def _judge(self, namespace: str, served: CachedAnswer, fresh: CachedAnswer,
                     p: float) -> None:
        sem = self.semantic
        if sem is None:
            return
        a, b = answer_text(served.body), answer_text(fresh.body)
        agree = texts_agree(a, b)
        if agree is None:
            va, vb = await sem.embed(a, namespace), await sem.embed(b, namespace)
            if va is None or vb is None:
                self.metrics.semantic_audits.labels("undecided").inc()
                return
            agree = float(va @ vb) >= self.config.semantic.audit_agree_cosine
        self.metrics.semantic_audits.labels("agree" if agree else "disagree").inc()
        sem.evidence(namespace, p, wrong=not agree)
