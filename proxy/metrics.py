"""Prometheus metrics and the cost ledger.

One ``Metrics`` object per server, on its own registry (several servers can live in one process,
as in the tests). The cost ledger is the pair of counters ``edge_proxy_cost_spent_usd_total`` and
``edge_proxy_cost_saved_usd_total``; ``Ledger`` keeps the same numbers in plain floats for
/admin/stats and the demo's table, so every report agrees with /metrics.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.config import TierConfig
from proxy.keys import tenant_of

# No NAME_created series: they double the counters' series and no dashboard or alert uses them.
prometheus_client.disable_created_metrics()

#: cgroup v2, then v1: the container's memory limit (absent or "max" = unlimited).
CGROUP_MEMORY_LIMIT: Final = (Path("/sys/fs/cgroup/memory.max"),
                              Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))

LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
                          0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def cost_usd(tier: TierConfig, prompt_tokens: int, completion_tokens: int) -> float:
    """What a call with these token counts costs on ``tier``."""
    return (prompt_tokens * tier.price_input_per_m
            + completion_tokens * tier.price_output_per_m) / 1e6


class Ledger:
    """Spent and saved USD, tokens and calls per tier (the numbers behind the counters)."""

    __slots__ = ("calls", "hits", "joined", "saved", "spent", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.spent: defaultdict[str, float] = defaultdict(float)
        self.saved: defaultdict[str, float] = defaultdict(float)
        self.calls: defaultdict[str, int] = defaultdict(int)
        self.hits: defaultdict[str, int] = defaultdict(int)
        #: requests served by joining an identical request's upstream call (single-flight)
        self.joined: defaultdict[str, int] = defaultdict(int)
        self.tokens_in: defaultdict[str, int] = defaultdict(int)
        self.tokens_out: defaultdict[str, int] = defaultdict(int)

    def summary(self) -> dict[str, object]:
        """Totals and per-tier figures, JSON-ready."""
        tiers = sorted(set(self.spent) | set(self.saved) | set(self.calls) | set(self.hits)
                       | set(self.joined))
        return {
            "spent_usd": round(sum(self.spent.values()), 8),
            "saved_usd": round(sum(self.saved.values()), 8),
            "tiers": {t: {"spent_usd": round(self.spent[t], 8),
                          "saved_usd": round(self.saved[t], 8),
                          "upstream_calls": self.calls[t], "cache_hits": self.hits[t],
                          "joined": self.joined[t],
                          "prompt_tokens": self.tokens_in[t],
                          "completion_tokens": self.tokens_out[t]} for t in tiers},
        }


class HotPath(Collector):
    """Counters touched by every request, kept in plain dicts and exported at scrape time.

    prometheus-client's Counter/Histogram take a lock per update (~8 % of an exact hit's CPU
    in a py-spy profile); the event loop is the only writer, and /metrics (rendered in a worker
    thread) reads one-step copies taken under the GIL, so no lock is needed.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        # per outcome: a count per bucket (le=LATENCY_BUCKETS[i], then +Inf), then the sum
        self.latency: dict[str, list[float]] = {}
        self.saved: dict[tuple[str, str], float] = {}

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("edge_proxy_requests", "Requests by outcome and tier",
                                labels=["endpoint", "outcome", "tier"])
        # list(d.items()) copies under the GIL in one step: collect() runs in a worker thread
        # (/metrics) while the loop keeps counting
        for labels, n in list(self.requests.items()):
            c.add_metric(list(labels), n)
        yield c
        h = HistogramMetricFamily("edge_proxy_request_seconds",
                                  "Time to the full response (JSON) or to the first byte (SSE)",
                                  labels=["outcome"])
        for outcome, counts in [(k, list(v)) for k, v in list(self.latency.items())]:
            cum, buckets = 0.0, []
            for le, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts[:-1], strict=True):
                cum += count
                buckets.append((le, cum))
            h.add_metric([outcome], buckets, counts[-1])
        yield h
        s = CounterMetricFamily("edge_proxy_cost_saved_usd", "USD saved by cache hits and "
                                "single-flight joins (the cost on the tier that would have "
                                "answered)",
                                labels=["tier", "namespace"])
        for tier_ns, usd in list(self.saved.items()):
            s.add_metric(list(tier_ns), usd)
        yield s

    def outcomes(self) -> dict[str, int]:
        """Requests per outcome, all endpoints and tiers."""
        out: dict[str, int] = {}
        for (_, outcome, _), n in self.requests.items():
            out[outcome] = out.get(outcome, 0) + n
        return out


#: Label value of every namespace past the cap.
OTHER: Final = "other"


class OptionalGauge(Collector):
    """A gauge with no sample until set: "not configured" is absent, never a false 0.

    ``edge_proxy_redis_up`` without a configured Redis has no sample (so an alert on
    ``edge_proxy_redis_up == 0`` means a configured Redis is down, never "disabled").
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self.value = float(value)

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(self.name, self.documentation)
        if self.value is not None:
            g.add_metric([], self.value)
        yield g


def memory_limit_bytes() -> float | None:
    """The cgroup's memory limit, or None when unlimited or unknown."""
    for path in CGROUP_MEMORY_LIMIT:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "unlimited" with ~2^63
            return float(text)
        return None
    return None


class ProcessInfo(Collector):
    """edge_proxy_build_info and the container memory limit (process_* come from
    prometheus-client's ProcessCollector)."""

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("edge_proxy_build_info", "Always 1; the labels say what runs",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        limit = GaugeMetricFamily("edge_proxy_memory_limit_bytes",
                                  "The container's (cgroup) memory limit; no sample if unlimited")
        value = memory_limit_bytes()
        if value is not None:
            limit.add_metric([], value)
        yield limit


class Metrics:
    """Every metric the proxy exports, registered on one registry.

    Namespace labels are bounded: the first ``max_namespaces`` tenants get their own series,
    every later one is counted under "other" (a client minting API keys or partitions must not
    grow /metrics without bound).
    """

    def __init__(self, max_namespaces: int = 100) -> None:
        self.max_namespaces = max_namespaces
        self._ns_labels: set[str] = set()
        r = self.registry = CollectorRegistry()
        # The per-request metrics live in plain dicts (HotPath), exported at scrape time.
        self.hot = HotPath()
        r.register(self.hot)
        r.register(ProcessInfo())
        ProcessCollector(registry=r)  # process_resident_memory_bytes, _open_fds, _cpu_seconds
        self.errors = Counter("edge_proxy_errors", "Error responses by status and code",
                              ["status", "code"], registry=r)
        self.upstream_ttft = Histogram("edge_proxy_upstream_first_byte_seconds",
                                       "Upstream time to headers + first event", ["tier"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram("edge_proxy_upstream_seconds",
                                           "Upstream time to the end of the response", ["tier"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("edge_proxy_upstream_errors",
                                       "Upstream failures by tier and kind", ["tier", "kind"],
                                       registry=r)
        self.upstream_inflight = Gauge("edge_proxy_upstream_in_flight",
                                       "Upstream requests in flight", ["tier"], registry=r)
        self.breaker_open = Gauge("edge_proxy_upstream_breaker_open",
                                  "1 while an upstream's circuit breaker is open or half-open",
                                  ["tier", "upstream"], registry=r)
        self.usage_estimated = Counter("edge_proxy_usage_estimated",
                                       "Upstream answers without usage, counted by tokenizer",
                                       registry=r)
        self.tokens = Counter("edge_proxy_tokens", "Tokens billed by upstreams",
                              ["tier", "kind"], registry=r)
        self.cost_spent = Counter("edge_proxy_cost_spent_usd", "USD spent on upstream calls",
                                  ["tier", "namespace"], registry=r)
        self.cache_entries = Gauge("edge_proxy_cache_entries", "Entries per cache layer",
                                   ["layer"], registry=r)
        self.cache_bytes = Gauge("edge_proxy_cache_bytes", "Bytes per cache layer", ["layer"],
                                 registry=r)
        self.cache_capacity_bytes = Gauge("edge_proxy_cache_capacity_bytes",
                                          "Configured byte cap per cache layer", ["layer"],
                                          registry=r)
        self.cache_capacity_entries = Gauge("edge_proxy_cache_capacity_entries",
                                            "Configured entry cap per cache layer", ["layer"],
                                            registry=r)
        self.cache_stores = Counter("edge_proxy_cache_stores", "Answers stored, by layer",
                                    ["layer"], registry=r)
        self.cache_skips = Counter("edge_proxy_cache_store_skipped",
                                   "Answers not stored, by reason", ["reason"], registry=r)
        self.redis_up = OptionalGauge("edge_proxy_redis_up", "1 if the shared Redis answers, 0 "
                                      "if it does not; no sample when none is configured", r)
        self.redis_errors = Counter("edge_proxy_redis_errors", "Failed Redis commands", ["op"],
                                    registry=r)
        self.embed_seconds = Histogram("edge_proxy_embed_seconds",
                                       "Query embedding time, queue wait included",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.semantic_similarity = Histogram(
            "edge_proxy_semantic_hit_similarity", "Cosine similarity of served semantic hits",
            buckets=(0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 1.0), registry=r)
        self.semantic_rejects = Counter("edge_proxy_semantic_rejects",
                                        "Candidates over the threshold refused, by reason",
                                        ["reason"], registry=r)
        self.gc_pause = Histogram("edge_proxy_gc_pause_seconds",
                                  "Cyclic GC pauses (on the thread that allocated: the loop)",
                                  ["generation"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002,
                                                           0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
                                  registry=r)
        self.speculative = Counter("edge_proxy_speculative_upstream",
                                   "Upstream calls started beside the semantic lookup, by what "
                                   "became of them: used (a miss), cancelled (a hit), joined "
                                   "(a hit, kept for an identical request), finished (a hit "
                                   "found after the answer)", ["result"], registry=r)
        self.speculative_cancel = Histogram(
            "edge_proxy_speculative_cancel_seconds",
            "From a speculative upstream call's start to its cancel (the upstream's waste)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.semantic_skipped = Counter("edge_proxy_semantic_skipped",
                                        "Semantic lookups shed: embedding over its deadline "
                                        "(estimated) or its timeout (waited), pair verifier "
                                        "over its deadline", ["reason"],
                                        registry=r)
        self.semantic_verify_seconds = Histogram(
            "edge_proxy_semantic_verify_seconds",
            "Pair verifier time per scored candidate (worker thread)",
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1), registry=r)
        self.semantic_verify_memo = Counter("edge_proxy_semantic_verify_memo",
                                            "Pair verifier lookups by memo result (a hit skips "
                                            "the cross-encoder)", ["result"], registry=r)
        self.semantic_audits = Counter("edge_proxy_semantic_audits",
                                       "Audited semantic hits by verdict", ["verdict"],
                                       registry=r)
        self.semantic_feedback = Counter("edge_proxy_semantic_feedback",
                                         "POST /v1/feedback ratings applied", ["rating", "outcome"],
                                         registry=r)
        self.semantic_error_estimate = Gauge(
            "edge_proxy_semantic_error_rate_estimate",
            "Estimated share of wrong semantic hits (calibration + evidence), per tenant: the "
            "worst of its namespaces",
            ["namespace"], registry=r)
        self.semantic_cut = Gauge("edge_proxy_semantic_cut",
                                  "Pair-verifier probability a hit needs, per tenant: the "
                                  "strictest of its namespaces",
                                  ["namespace"], registry=r)
        self.route_decisions = Counter("edge_proxy_route_decisions",
                                       "Routed requests by chosen tier", ["tier"], registry=r)
        self.shared_up = OptionalGauge("edge_proxy_shared_stream_up", "1 while the shared "
                                       "semantic stream is tailed; no sample if not shared", r)
        self.shared_lag = Histogram("edge_proxy_shared_propagation_seconds",
                                    "From an entry's creation on one sidecar to its arrival here",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.shared_bad_records = Counter("edge_proxy_shared_bad_records",
                                          "Shared stream records skipped, by reason (malformed, "
                                          "unknown op or version, too large...)", ["reason"],
                                          registry=r)
        self.shared_replay_seconds = Gauge("edge_proxy_shared_replay_seconds",
                                           "Start-up replay time of the shared stream",
                                           registry=r)
        self.shadow_pairs = Counter("edge_proxy_shadow_pairs", "Shadow calls logged",
                                    ["primary_tier", "shadow_tier"], registry=r)
        self.ledger = Ledger()

    def observe_request(self, endpoint: str, outcome: str, tier: str, seconds: float) -> None:
        """Count one finished request and its latency."""
        hot = self.hot
        key = (endpoint, outcome, tier)
        hot.requests[key] = hot.requests.get(key, 0) + 1
        h = hot.latency.get(outcome)
        if h is None:
            h = hot.latency[outcome] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        h[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def ns_label(self, namespace: str) -> str:
        """The label value of a namespace: its tenant (the credential part), while fewer than
        ``max_namespaces`` tenants have one, else "other"."""
        tenant = tenant_of(namespace)
        labels = self._ns_labels
        if tenant in labels:
            return tenant
        if len(labels) >= self.max_namespaces or not tenant.isprintable():
            return OTHER
        labels.add(tenant)
        return tenant

    def spend(self, tier: TierConfig, namespace: str, prompt_tokens: int,
              completion_tokens: int) -> float:
        """Account an upstream call; returns its cost."""
        usd = cost_usd(tier, prompt_tokens, completion_tokens)
        self.cost_spent.labels(tier.name, self.ns_label(namespace)).inc(usd)
        self.tokens.labels(tier.name, "prompt").inc(prompt_tokens)
        self.tokens.labels(tier.name, "completion").inc(completion_tokens)
        led = self.ledger
        led.spent[tier.name] += usd
        led.calls[tier.name] += 1
        led.tokens_in[tier.name] += prompt_tokens
        led.tokens_out[tier.name] += completion_tokens
        return usd

    def save(self, tier: TierConfig, namespace: str, prompt_tokens: int,
             completion_tokens: int, joined: bool = False) -> float:
        """Account a cache hit (or, ``joined``, a request served by an identical request's
        upstream call): what its own call would have cost on ``tier``. So spent + saved is
        what the traffic would have cost without the proxy."""
        usd = cost_usd(tier, prompt_tokens, completion_tokens)
        key = (tier.name, self.ns_label(namespace))
        saved = self.hot.saved
        saved[key] = saved.get(key, 0.0) + usd
        self.ledger.saved[tier.name] += usd
        if joined:
            self.ledger.joined[tier.name] += 1
        else:
            self.ledger.hits[tier.name] += 1
        return usd

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
