"""Prometheus metrics and the cost ledger.

One ``Metrics`` object per server, on its own registry (several servers can live in one process,
as in the tests). The cost ledger is the pair of counters ``edge_proxy_cost_spent_usd_total`` and
``edge_proxy_cost_saved_usd_total``; ``Ledger`` keeps the same numbers in plain floats for
/admin/stats and the demo's table, so every report agrees with /metrics.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.config import TierConfig

LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
                          0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def cost_usd(tier: TierConfig, prompt_tokens: int, completion_tokens: int) -> float:
    """What a call with these token counts costs on ``tier``."""
    return (prompt_tokens * tier.price_input_per_m
            + completion_tokens * tier.price_output_per_m) / 1e6


class Ledger:
    """Spent and saved USD, tokens and calls per tier (the numbers behind the counters)."""

    __slots__ = ("calls", "hits", "saved", "spent", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.spent: defaultdict[str, float] = defaultdict(float)
        self.saved: defaultdict[str, float] = defaultdict(float)
        self.calls: defaultdict[str, int] = defaultdict(int)
        self.hits: defaultdict[str, int] = defaultdict(int)
        self.tokens_in: defaultdict[str, int] = defaultdict(int)
        self.tokens_out: defaultdict[str, int] = defaultdict(int)

    def summary(self) -> dict[str, object]:
        """Totals and per-tier figures, JSON-ready."""
        tiers = sorted(set(self.spent) | set(self.saved) | set(self.calls) | set(self.hits))
        return {
            "spent_usd": round(sum(self.spent.values()), 8),
            "saved_usd": round(sum(self.saved.values()), 8),
            "tiers": {t: {"spent_usd": round(self.spent[t], 8),
                          "saved_usd": round(self.saved[t], 8),
                          "upstream_calls": self.calls[t], "cache_hits": self.hits[t],
                          "prompt_tokens": self.tokens_in[t],
                          "completion_tokens": self.tokens_out[t]} for t in tiers},
        }


class Metrics:
    """Every metric the proxy exports, registered on one registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edge_proxy_requests", "Requests by outcome and tier",
                                ["endpoint", "outcome", "tier"], registry=r)
        self.latency = Histogram("edge_proxy_request_seconds",
                                 "Time to the full response (JSON) or to the first byte (SSE)",
                                 ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
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
        self.tokens = Counter("edge_proxy_tokens", "Tokens billed by upstreams",
                              ["tier", "kind"], registry=r)
        self.cost_spent = Counter("edge_proxy_cost_spent_usd", "USD spent on upstream calls",
                                  ["tier", "namespace"], registry=r)
        self.cost_saved = Counter("edge_proxy_cost_saved_usd",
                                  "USD saved by cache hits (the cost on the tier that would "
                                  "have answered)", ["tier", "namespace"], registry=r)
        self.cache_entries = Gauge("edge_proxy_cache_entries", "Entries per cache layer",
                                   ["layer"], registry=r)
        self.cache_bytes = Gauge("edge_proxy_cache_bytes", "Bytes per cache layer", ["layer"],
                                 registry=r)
        self.cache_stores = Counter("edge_proxy_cache_stores", "Answers stored, by layer",
                                    ["layer"], registry=r)
        self.cache_skips = Counter("edge_proxy_cache_store_skipped",
                                   "Answers not stored, by reason", ["reason"], registry=r)
        self.redis_up = Gauge("edge_proxy_redis_up", "1 if the shared Redis answers", registry=r)
        self.redis_errors = Counter("edge_proxy_redis_errors", "Failed Redis commands", ["op"],
                                    registry=r)
        self.ledger = Ledger()
        # Label children are cached: .labels() costs ~1 us per call on the hot path.
        self._req_children: dict[tuple[str, str, str], Counter] = {}
        self._lat_children: dict[str, Histogram] = {}

    def observe_request(self, endpoint: str, outcome: str, tier: str, seconds: float) -> None:
        """Count one finished request and its latency."""
        key = (endpoint, outcome, tier)
        c = self._req_children.get(key)
        if c is None:
            c = self._req_children[key] = self.requests.labels(endpoint, outcome, tier)
        c.inc()
        h = self._lat_children.get(outcome)
        if h is None:
            h = self._lat_children[outcome] = self.latency.labels(outcome)
        h.observe(seconds)

    def spend(self, tier: TierConfig, namespace: str, prompt_tokens: int,
              completion_tokens: int) -> float:
        """Account an upstream call; returns its cost."""
        usd = cost_usd(tier, prompt_tokens, completion_tokens)
        self.cost_spent.labels(tier.name, namespace).inc(usd)
        self.tokens.labels(tier.name, "prompt").inc(prompt_tokens)
        self.tokens.labels(tier.name, "completion").inc(completion_tokens)
        led = self.ledger
        led.spent[tier.name] += usd
        led.calls[tier.name] += 1
        led.tokens_in[tier.name] += prompt_tokens
        led.tokens_out[tier.name] += completion_tokens
        return usd

    def save(self, tier: TierConfig, namespace: str, prompt_tokens: int,
             completion_tokens: int) -> float:
        """Account a cache hit: what the call would have cost on ``tier``."""
        usd = cost_usd(tier, prompt_tokens, completion_tokens)
        self.cost_saved.labels(tier.name, namespace).inc(usd)
        self.ledger.saved[tier.name] += usd
        self.ledger.hits[tier.name] += 1
        return usd

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
