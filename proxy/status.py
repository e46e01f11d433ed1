"""What the status page (/admin/, ``proxy/static/status.html``) shows beyond the counters.

``Series`` samples the cumulative counters every few seconds into a short ring (10 minutes by
default) so the page can plot requests per second, hit rate by layer and spend over the last
minutes without a Prometheus. ``status_extras`` computes the rest of /admin/stats from the same
numbers /metrics exports: latency percentiles per outcome (from the request histogram, as
Prometheus' histogram_quantile does), the top namespaces by cost, Redis and shared-stream state
and lag, the embed queue. Nothing here runs per request; sampling is one dict copy per interval.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import re
import time
from collections import deque
from importlib import resources
from typing import Any, Final

from redis.exceptions import RedisError

from proxy.metrics import LATENCY_BUCKETS, HotPath, Metrics

SAMPLE_INTERVAL_S: Final = 5.0
SAMPLES: Final = 120  # 10 minutes at 5 s
TOP_NAMESPACES: Final = 10
HITS: Final = ("hit-exact", "hit-semantic")


class Series:
    """A ring of cumulative samples: (unix time, requests per outcome, spent, saved)."""

    def __init__(self, metrics: Metrics, interval_s: float = SAMPLE_INTERVAL_S,
                 samples: int = SAMPLES) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.samples: deque[tuple[float, dict[str, int], float, float]] = deque(
            maxlen=samples + 1)
        self._task: asyncio.Task[None] | None = None

    def _now(self) -> tuple[float, dict[str, int], float, float]:
        led = self.metrics.ledger
        return (time.time(), self.metrics.hot.outcomes(), sum(led.spent.values()),
                sum(led.saved.values()))

    def sample(self) -> None:
        self.samples.append(self._now())

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def body(self) -> dict[str, Any]:
        """Per interval (between consecutive samples, the last one ending now): requests per
        second by outcome, hit rate by layer, USD spent and saved."""
        pts = [*self.samples, self._now()]
        out: dict[str, Any] = {"interval_s": self.interval_s, "t": [], "rps": {},
                               "hit_rate": {"all": [], "exact": [], "semantic": []},
                               "spent_usd": [], "saved_usd": []}
        outcomes = sorted({o for _, c, _, _ in pts for o in c})
        for o in outcomes:
            out["rps"][o] = []
        for (t0, c0, sp0, sv0), (t1, c1, sp1, sv1) in itertools.pairwise(pts):
            dt = t1 - t0
            if dt <= 0:
                continue
            out["t"].append(round(t1, 3))
            delta = {o: c1.get(o, 0) - c0.get(o, 0) for o in outcomes}
            for o in outcomes:
                out["rps"][o].append(round(delta[o] / dt, 4))
            served = sum(v for o, v in delta.items() if o != "error")
            for name, layers in (("all", HITS), ("exact", HITS[:1]), ("semantic", HITS[1:])):
                hits = sum(delta.get(o, 0) for o in layers)
                out["hit_rate"][name].append(round(hits / served, 4) if served else None)
            out["spent_usd"].append(round(sp1 - sp0, 8))
            out["saved_usd"].append(round(sv1 - sv0, 8))
        return out


def quantile(q: float, counts: list[float]) -> float | None:
    """The q-quantile (seconds) of one outcome's latency histogram (a count per bucket of
    LATENCY_BUCKETS, then +Inf, then the sum), interpolated linearly within the bucket as
    Prometheus' histogram_quantile does; None without observations."""
    buckets = counts[:-1]
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    cum = 0.0
    for i, n in enumerate(buckets):
        if n and cum + n >= rank:
            if i == len(LATENCY_BUCKETS):  # +Inf: the highest finite bound
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i else 0.0
            return lower + (LATENCY_BUCKETS[i] - lower) * (rank - cum) / n
        cum += n
    return LATENCY_BUCKETS[-1]


def latency(hot: HotPath) -> dict[str, dict[str, Any]]:
    """Per outcome: count, P50 and P99 in ms, mean in ms (all since start)."""
    out = {}
    for outcome, counts in sorted(hot.latency.items()):
        n = int(sum(counts[:-1]))
        p50, p99 = quantile(0.5, counts), quantile(0.99, counts)
        out[outcome] = {"count": n,
                        "p50_ms": None if p50 is None else round(p50 * 1000, 3),
                        "p99_ms": None if p99 is None else round(p99 * 1000, 3),
                        "mean_ms": round(counts[-1] / n * 1000, 3) if n else None}
    return out


def namespaces(metrics: Metrics, top: int = TOP_NAMESPACES) -> list[dict[str, Any]]:
    """The namespaces that cost the most (spent), with what their hits saved: read from the
    same series /metrics exports, so the page and Prometheus agree."""
    spent: dict[str, float] = {}
    for fam in metrics.cost_spent.collect():
        for s in fam.samples:
            if s.name.endswith("_total"):
                ns = s.labels["namespace"]
                spent[ns] = spent.get(ns, 0.0) + s.value
    saved: dict[str, float] = {}
    for (_, ns), usd in metrics.hot.saved.items():
        saved[ns] = saved.get(ns, 0.0) + usd
    names = sorted(set(spent) | set(saved),
                   key=lambda ns: (-spent.get(ns, 0.0), -saved.get(ns, 0.0), ns))
    return [{"namespace": ns, "spent_usd": round(spent.get(ns, 0.0), 8),
             "saved_usd": round(saved.get(ns, 0.0), 8)} for ns in names[:top]]


def _id_ms(stream_id: bytes | str | None) -> int | None:
    if not stream_id:
        return None
    s = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    head = s.split("-", 1)[0]
    return int(head) if head.isdigit() else None


async def stream_state(semantic: Any, timeout_s: float = 0.25) -> dict[str, Any]:
    """The shared semantic stream as this sidecar sees it: disabled / up / down, the last id
    it applied, and how far behind the stream's newest record it is (ms of record time)."""
    shared = getattr(semantic, "shared", None) if semantic is not None else None
    if shared is None:
        return {"state": "disabled"}
    last = shared.last_id.decode() if isinstance(shared.last_id, bytes) else str(shared.last_id)
    out: dict[str, Any] = {"state": "up" if shared.up else "down", "last_applied_id": last,
                           "applied": shared.applied, "length": None, "newest_id": None,
                           "lag_ms": None}
    with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
        info = await asyncio.wait_for(shared.client.xinfo_stream(shared.stream), timeout_s)
        newest = info.get("last-generated-id") or info.get(b"last-generated-id")
        out["length"] = info.get("length", info.get(b"length"))
        out["newest_id"] = newest.decode() if isinstance(newest, bytes) else newest
        a, b = _id_ms(shared.last_id), _id_ms(newest)
        if a is not None and b is not None:
            out["lag_ms"] = max(0, b - a)
    return out


async def status_extras(proxy: Any, series: Series | None) -> dict[str, Any]:
    """The parts of /admin/stats the status page needs besides the counters."""
    m = proxy.metrics
    sem = proxy.semantic
    emb = None if sem is None else {"queued": sem.embedder.queued, "ready": sem.embedder.ready,
                                    "priority": sem.embedder.priority}
    return {
        "latency": latency(m.hot),
        "namespaces": namespaces(m),
        "stream": await stream_state(sem),
        "embedder": emb,
        "series": series.body() if series is not None else None,
    }


# -- the page ---------------------------------------------------------------------------------

def page() -> bytes:
    """The status page, shipped as package data (proxy/static/status.html)."""
    return resources.files("proxy").joinpath("static/status.html").read_bytes()


def csp(html: bytes) -> str:
    """A Content-Security-Policy that allows exactly the page's own inline script and style
    (by hash), fetches to this origin and nothing else: no CDN, no other origin."""
    hashes = []
    for tag in (b"script", b"style"):
        for body in re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", html, re.S):
            digest = hashlib.sha256(body).digest()
            hashes.append((tag.decode(), base64.b64encode(digest).decode()))
    scripts = " ".join(f"'sha256-{h}'" for t, h in hashes if t == "script")
    styles = " ".join(f"'sha256-{h}'" for t, h in hashes if t == "style")
    return (f"default-src 'none'; script-src {scripts}; style-src {styles}; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
