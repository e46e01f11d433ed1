"""The semantic cache layer: embed the query, search its scope, verify, fetch the answer.

Composes the embedder (worker thread), the scope-partitioned index and the verifier. The index
only points at answers (their exact keys); the answers themselves live in the exact cache
(L1/L2), so a semantic hit serves the very bytes an exact hit would, and an entry whose answer
has left the exact cache is dropped when met.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from proxy.answer import CachedAnswer
from proxy.config import (
    SemanticConfig,
    namespace_error_rates,
    namespace_thresholds,
    time_sensitive,
)
from proxy.exact import ExactCache
from proxy.keys import RequestKeys
from proxy.metrics import Metrics
from proxy.semantic.budget import BudgetController
from proxy.semantic.embedder import EWMA_ALPHA, Embedder, lower_thread_priority
from proxy.semantic.index import DEFAULT_DTYPE, SemanticEntry, SemanticIndex
from proxy.semantic.scope import PendingBuild
from proxy.semantic.snapshot import SnapshotError, write_snapshot
from proxy.semantic.verifier import Verifier
from proxy.shared import SharedIndex

if TYPE_CHECKING:
    from proxy.semantic.pairmodel import PairModel

log = logging.getLogger(__name__)

#: Seconds between sweeps of expired semantic entries.
EXPIRE_EVERY_S: Final = 60.0
#: Pair verifications queued or running at most; past it a lookup is shed (each holds a few ms
#: of the verifier thread, so the deadline sheds long before this in production).
VERIFY_MAX_PENDING: Final = 32


class SemanticHit:
    __slots__ = ("answer", "entry", "p", "similarity")

    def __init__(self, answer: CachedAnswer, entry: SemanticEntry, similarity: float,
                 p: float = 1.0) -> None:
        self.answer = answer
        self.entry = entry
        self.similarity = similarity
        self.p = p  # the pair verifier's calibrated probability (1.0 without it)


#: The repository root: relative model paths resolve here when not found from the cwd.
REPO: Final = Path(__file__).resolve().parents[2]


def _pair_model_path(spec: str) -> Path:
    path = Path(spec)
    return path if path.is_absolute() or path.exists() else REPO / path


class SemanticCache:
    """Lookup and store of semantic entries for one proxy."""

    def __init__(self, cfg: SemanticConfig, metrics: Metrics, exact: ExactCache,
                 tier_order: Sequence[str]) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.exact = exact
        self.rank = {name: i for i, name in enumerate(tier_order)}
        self.embedder = Embedder(cfg.model_path or None, cache_size=cfg.embed_cache_size,
                                 workers=cfg.embed_threads or None,
                                 priority=cfg.embed_priority, nice=cfg.embed_nice)
        self.index = SemanticIndex(capacity=cfg.capacity, ttl_s=cfg.ttl_s,
                                   brute_force_max=cfg.brute_force_max,
                                   max_text_bytes=cfg.max_text_bytes)
        self.verifier = Verifier(guards=cfg.guards, weights_path=cfg.verifier_weights or None)
        self.ns_thresholds = namespace_thresholds(cfg)
        # the learned pair verifier and the error budget (issue 13)
        self.pair: PairModel | None = None
        self.budget: BudgetController | None = None
        meta_path = _pair_model_path(cfg.pair_verifier) if cfg.pair_verifier else None
        if meta_path is not None and not meta_path.exists():
            # an installed package has no models/ directory: run with the guards alone
            log.warning("pair verifier %s not found: semantic hits use the threshold and the "
                        "guards only", meta_path)
            meta_path = None
        if meta_path is not None:
            from proxy.semantic.pairmodel import PairModel

            self.pair = PairModel(meta_path)
            self.budget = BudgetController(self.pair.curve, base_cut=self.pair.cut,
                                           default_budget=cfg.max_error_rate)
        self.ns_budgets = namespace_error_rates(cfg)
        self._pair_pool = ThreadPoolExecutor(1, thread_name_prefix="pair-verifier")
        # a scope's graph is built here when it grows past brute_force_max (SemanticIndex.offload)
        self._build_pool = ThreadPoolExecutor(
            1, thread_name_prefix="index-build", initializer=lower_thread_priority,
            initargs=(cfg.embed_priority, cfg.embed_nice))
        # verifications queued or running in that thread, and the moving average of one (s):
        # a lookup whose verification would start after verify_deadline_s is shed, as an
        # embedding is, and the queue never holds more than VERIFY_MAX_PENDING
        self._pair_pending = 0
        self._pair_service_s = 0.0
        self._budget_labels: set[str] = set()  # label values of the error-budget gauges
        # p per (scope, query, cached) digest: a repeated wording skips the cross-encoder.
        # Loop-only; the scope is in the key so one tenant's pairs never time another's.
        self._pair_memo: OrderedDict[bytes, float] = OrderedDict()
        self.bypass = time_sensitive(cfg)
        # shared mode: entries travel between sidecars on a Redis Stream
        self.shared = (SharedIndex(exact.cfg, cfg, self, metrics)
                       if exact.cfg.redis_url and cfg.shared else None)
        self._snapshotter: asyncio.Task[None] | None = None
        self._expirer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.embedder.start()
        if self.pair is not None:
            await asyncio.to_thread(self.pair.load)
        path = self.cfg.snapshot_path
        if path and Path(path).exists():
            try:
                self.index = await asyncio.to_thread(
                    SemanticIndex.load, path, capacity=self.cfg.capacity, ttl_s=self.cfg.ttl_s,
                    brute_force_max=self.cfg.brute_force_max,
                    # an old float16 snapshot is converted to the current row type
                    dtype=DEFAULT_DTYPE)
                log.info("semantic index: %d entries from %s", len(self.index), path)
            except (SnapshotError, OSError, ValueError) as exc:
                log.error("semantic snapshot %s ignored: %s", path, exc)
        self.index.offload = self._offload_build
        if self.shared is not None:
            await self.shared.start()
        if path and self.cfg.snapshot_interval_s > 0:
            self._snapshotter = asyncio.create_task(self._snapshot_loop())
        self._expirer = asyncio.create_task(self._expire_loop())

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.snapshot_interval_s)
            try:
                await self.snapshot_async()
            except OSError as exc:
                log.error("periodic semantic snapshot failed: %s", exc)

    async def _expire_loop(self) -> None:
        # search drops expired entries it meets; this reclaims the rest (one vectorised scan,
        # ~1.6 ms per million entries)
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            n = self.index.expire()
            if n:
                log.debug("semantic index: %d expired entries reclaimed", n)

    async def close(self) -> None:
        if self._snapshotter is not None:
            self._snapshotter.cancel()
        if self._expirer is not None:
            self._expirer.cancel()
        if self.shared is not None:
            await self.shared.close()
        await self.embedder.close()
        self._pair_pool.shutdown(wait=False, cancel_futures=True)
        self._build_pool.shutdown(wait=False, cancel_futures=True)
        if self.cfg.snapshot_path:
            try:
                self.snapshot()
            except OSError as exc:
                log.error("semantic snapshot failed: %s", exc)

    def _offload_build(self, build: PendingBuild) -> None:
        """Build a growing scope's usearch graph in the index-build thread, then adopt it on
        the loop (``SemanticIndex.offload``): 257 rows take ~10 ms, which the loop spent
        before, stalling every request in flight."""
        index = self.index

        def done(fut: asyncio.Future[PendingBuild]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                build.scope.building = False  # the next add tries again
                if not fut.cancelled():
                    log.error("semantic index: building a scope's graph failed: %r",
                              fut.exception())
                return
            index.finish_promotion(fut.result())

        loop = asyncio.get_running_loop()
        loop.run_in_executor(self._build_pool, build.run).add_done_callback(done)

    def snapshot(self) -> None:
        """Write the index to the configured snapshot file (blocking; shutdown)."""
        if self.cfg.snapshot_path:
            self.index.snapshot(self.cfg.snapshot_path)

    async def snapshot_async(self) -> int:
        """Snapshot now; returns the entry count. The copy is taken on the loop thread (the
        index is not thread-safe: ~0.25 s per 100k entries), the file is written in a worker."""
        data = self.index.snapshot_data()
        await asyncio.to_thread(write_snapshot, data, self.cfg.snapshot_path)
        return len(data)

    # -- the request path --------------------------------------------------------------------
    def eligible(self, query: str) -> bool:
        """Does this query take part in the semantic layer? Not when time-sensitive, nor when
        longer than ``semantic.max_query_chars``: the embedding sees only its first tokens, so
        two long texts differing further on look identical, and only the verifier on the
        whole texts would tell them apart; keeping whole long texts per entry is what made
        memory grow with prompt length. Long prompts are served by the exact cache only."""
        if not query or len(query) > self.cfg.max_query_chars:
            return False
        return not (self.bypass is not None and self.bypass.search(query))

    def threshold(self, namespace: str, requested: str | None) -> float:
        """The threshold for a request: config, raised by the namespace's and the header's."""
        # with the pair verifier, its calibrated similarity floor is the gate (the cuts were
        # calibrated with it); without it, semantic.threshold
        base = self.pair.floor if self.pair is not None else self.cfg.threshold
        t = max(base, self.ns_thresholds.get(namespace, 0.0))
        if requested:
            with contextlib.suppress(ValueError):  # a malformed header changes nothing
                t = max(t, min(1.0, float(requested)))
        return t

    def would_wait(self, text: str, scope: str = "") -> bool:
        """Is this query's vector estimated to miss ``embed_deadline_s``? (counted as a shed)"""
        deadline = self.cfg.embed_deadline_s
        if deadline <= 0 or self.embedder.estimate_s(text, scope) <= deadline:
            return False
        self.embedder.stats.skipped += 1
        self.metrics.semantic_skipped.labels("deadline").inc()
        return True

    async def embed(self, text: str, scope: str = "") -> np.ndarray | None:
        """The query's vector, or None: shed (estimated wait over ``embed_deadline_s``) or not
        ready within ``embed_timeout_s``. ``scope``: the tenant's namespace (the embedder's LRU
        answers a tenant only with vectors it asked for itself).

        Past its capacity the proxy sheds semantic work instead of queueing it: a request then
        goes on without the semantic layer. A timed-out embedding still completes in the
        background and lands in the embedder's LRU.
        """
        t0 = time.perf_counter()
        vec = self.embedder.cached(text, scope)
        if vec is not None:
            self.metrics.embed_seconds.observe(time.perf_counter() - t0)
            return vec
        if self.would_wait(text, scope):
            return None
        try:
            vec = await self.embedder.embed(text, self.cfg.embed_timeout_s, scope)
        except TimeoutError:
            self.metrics.semantic_rejects.labels("embed_timeout").inc()
            self.metrics.semantic_skipped.labels("timeout").inc()
            return None
        self.metrics.embed_seconds.observe(time.perf_counter() - t0)
        return vec

    def error_budget(self, namespace: str) -> float:
        return self.ns_budgets.get(namespace, self.cfg.max_error_rate)

    def _score(self, query: str, cached: str, sim: float, scope: bytes) -> float:
        """Pair verifier probability; runs in the pair-verifier thread, never on the loop."""
        pair = self.pair
        assert pair is not None
        t0 = time.perf_counter()
        if pair.same_form(query, cached, scope):  # as pair.score: 1.0 without the model
            self.metrics.semantic_verify_seconds.observe(time.perf_counter() - t0)
            return 1.0
        p = pair.model_score(query, cached, sim)
        dt = time.perf_counter() - t0
        self.metrics.semantic_verify_seconds.observe(dt)
        # the time of a model run (a float store is atomic; the loop reads it in
        # verify_would_wait): what a queued verification is expected to hold the thread
        self._pair_service_s = dt if self._pair_service_s == 0.0 else (
            (1 - EWMA_ALPHA) * self._pair_service_s + EWMA_ALPHA * dt)
        return p

    def verify_would_wait(self) -> bool:
        """Would a new verification wait past ``verify_deadline_s`` behind those queued (or the
        queue be at VERIFY_MAX_PENDING)? Then the lookup is shed (counted), not queued: one
        tenant's flood of candidates must not hold every other tenant's lookups."""
        if self._pair_pending >= VERIFY_MAX_PENDING:
            return True
        deadline = self.cfg.verify_deadline_s
        return deadline > 0 and self._pair_pending * self._pair_service_s > deadline

    async def _pair_p(self, keys: RequestKeys, cached: str, sim: float) -> float | None:
        """The pair verifier's probability: from the memo, else scored in its worker thread;
        None when the verifier is too busy (``verify_would_wait``). The same texts give the
        same vectors, cosine and logit, so the memo changes no decision; the budget's cut is
        still applied to ``p`` on every lookup."""
        size = self.cfg.verify_memo_entries
        key = b""
        if size > 0:
            h = hashlib.blake2b(keys.scope, digest_size=16)
            q = keys.query_text.encode("utf-8", "surrogatepass")
            h.update(len(q).to_bytes(8, "little"))
            h.update(q)
            h.update(cached.encode("utf-8", "surrogatepass"))
            key = h.digest()
            memo = self._pair_memo.get(key)
            if memo is not None:
                self._pair_memo.move_to_end(key)
                self.metrics.semantic_verify_memo.labels("hit").inc()
                return memo
            self.metrics.semantic_verify_memo.labels("miss").inc()
        if self.verify_would_wait():
            self.metrics.semantic_skipped.labels("verify_deadline").inc()
            return None
        self._pair_pending += 1
        try:
            p = await asyncio.get_running_loop().run_in_executor(
                self._pair_pool, self._score, keys.query_text, cached, sim, keys.scope)
        finally:
            self._pair_pending -= 1
        if size > 0:
            self._pair_memo[key] = p
            while len(self._pair_memo) > size:
                self._pair_memo.popitem(last=False)
        return p

    def evidence(self, namespace: str, p: float, *, wrong: bool) -> None:
        """An audit's verdict on a served hit."""
        if self.budget is not None:
            self.budget.observe(namespace, p, wrong)

    def bad_feedback(self, namespace: str, p: float, vec: np.ndarray | None) -> None:
        """A served hit was rated bad: evidence, and a stricter neighbourhood."""
        if self.budget is not None:
            self.budget.bad_feedback(namespace, p, vec)

    def budget_stats(self, limit: int | None = None) -> dict[str, dict[str, float | int]]:
        """Per namespace (the ``limit`` most recently used): cut, estimated error rate, audits,
        disagreements, bad ratings."""
        return {} if self.budget is None else self.budget.snapshot(limit)

    async def lookup(self, vec: np.ndarray, keys: RequestKeys, tier: str, max_tokens: int | None,
                     threshold: float, namespace: str = "") -> SemanticHit | None:
        """The best verified candidate whose answer fits, or None."""
        results = self.index.search(vec, keys.scope, k=4)
        need = self.rank.get(tier, 0)
        scored = 0
        for sim, entry in results:
            if sim < threshold:
                break
            if entry.key == keys.exact:
                continue  # the exact layer already looked there
            if self.rank.get(entry.tier, 0) < need:
                # a smaller tier's answer is not served to a request routed to a larger one
                self.metrics.semantic_rejects.labels("tier").inc()
                continue
            # learned interaction weights read both vectors; other verifiers ignore them
            cand_vec = self.index.vector(entry.key) if self.verifier.uses_vectors else None
            verdict = self.verifier.verify(keys.query_text, entry.query_text, sim, threshold,
                                           query_vec=vec, cand_vec=cand_vec, scope=keys.scope)
            if not verdict.ok:
                self.metrics.semantic_rejects.labels(verdict.reason.split(":")[0][:32]).inc()
                continue
            p = 1.0
            if self.pair is not None and self.budget is not None:
                if scored >= self.cfg.verify_max_candidates:
                    break
                scored += 1
                p_or_none = await self._pair_p(keys, entry.query_text, sim)
                if p_or_none is None:
                    return None  # shed: the verifier's queue is past its deadline
                p = p_or_none
                vec_c = cand_vec if cand_vec is not None else self.index.vector(entry.key)
                if not self.budget.allow(namespace, p, vec_c, self.error_budget(namespace)):
                    self.metrics.semantic_rejects.labels("pair_verifier").inc()
                    continue
            answer = self.exact.get_l1(entry.key)
            if answer is None:
                answer = await self.exact.get_l2(entry.key, entry.namespace)
            if answer is None:
                self.index.remove(entry.key)  # its answer expired or was evicted
                continue
            if not answer.fits(max_tokens):
                continue
            self.metrics.semantic_similarity.observe(sim)
            if self.budget is not None:
                self.budget.served(namespace)
            return SemanticHit(answer, entry, sim, p)
        return None

    def add(self, vec: np.ndarray, keys: RequestKeys, namespace: str, tier: str) -> None:
        """Index a stored answer under its query's vector (and share it, in shared mode)."""
        now = time.time()
        entry = SemanticEntry(key=keys.exact, scope=keys.scope, namespace=namespace,
                              query_text=keys.query_text, tier=tier, max_tokens=None,
                              created=now, expires=now + self.cfg.ttl_s)
        self.index.add(vec, entry)
        if self.shared is not None:
            self.shared.publish(vec, entry)

    def embedder_stats(self) -> dict[str, object]:
        e = self.embedder
        return {"workers": e.workers, "priority": e.priority,
                "service_ms": round(1000 * e.service_s, 3), "queued": len(e._pending),
                "texts": e.stats.texts, "cache_hits": e.stats.cache_hits,
                "skipped": e.stats.skipped}

    @property
    def embedder_state(self) -> str:
        """"ready" or "loading" (the model is still being loaded)."""
        return "ready" if self.embedder.ready else "loading"

    def stats(self) -> dict[str, Any]:
        """For the admin API."""
        return {"entries": len(self.index), **self.index.stats(),
                "memory_bytes": self.index.memory_bytes(),
                # issue 13: per namespace, the cut a hit needs and the error rate estimated
                # from the calibration curve plus this deployment's audits and bad ratings
                "pair_verifier": self.pair is not None,
                "max_error_rate": self.cfg.max_error_rate,
                "error_budget": self.budget_stats(1000)}

    # -- the shared stream's target (shared.StreamTarget) -----------------------------------
    @property
    def dim(self) -> int:
        return self.index.dim

    def apply_entries(self, vecs: np.ndarray, entries: list[SemanticEntry]) -> None:
        self.index.add_many(vecs, entries)

    def apply_entry(self, vec: np.ndarray, entry: SemanticEntry) -> None:
        self.index.add(vec, entry)

    def apply_purge(self, namespace: str, key: bytes | None) -> None:
        if key is None:
            self.index.purge_namespace(namespace)
            self.exact.l1.purge_namespace(namespace)
        else:  # only within that namespace: a purge names its key's namespace exactly
            if self.index.namespace_of(key) == namespace:
                self.index.remove(key)
            self.exact.l1.delete_in(key, namespace)

    def update_gauges(self) -> None:
        self.metrics.cache_entries.labels("semantic").set(len(self.index))
        self.metrics.cache_bytes.labels("semantic").set(self.index.memory_bytes())
        # per tenant label (metrics.ns_label: bounded, "other" past it), the worst of its
        # namespaces among the 1,000 most recently used; series of labels gone are removed
        worst: dict[str, tuple[float, float]] = {}
        for ns, st in self.budget_stats(1000).items():
            label = self.metrics.ns_label(ns)
            e, c = worst.get(label, (0.0, 0.0))
            worst[label] = (max(e, float(st["estimated_error_rate"])), max(c, float(st["cut"])))
        for label, (e, c) in worst.items():
            self.metrics.semantic_error_estimate.labels(label).set(e)
            self.metrics.semantic_cut.labels(label).set(c)
        for label in self._budget_labels - worst.keys():
            self.metrics.semantic_error_estimate.remove(label)
            self.metrics.semantic_cut.remove(label)
        self._budget_labels = set(worst)
        self.metrics.cache_capacity_entries.labels("semantic").set(self.cfg.capacity)
