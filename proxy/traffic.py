"""Shadow traffic and A/B splits: the evidence a tier migration needs.

- A/B split (``router.split``): a fraction of the requests routed to one tier goes to another,
  and is served from there (the answers are real; compare them in the metrics by tier).
- Shadow (``router.shadow``): a fraction of one tier's answered misses is sent again, in the
  background and non-streamed, to another tier; the shadow answer is never served. Each pair
  (both answers, latency, tokens) is appended to a JSONL file for offline quality comparison.
  Shadow calls are real upstream calls: they are spent in the ledger under namespace "shadow".
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import orjson

from proxy.answer import CachedAnswer
from proxy.config import Config, parse_flows
from proxy.errors import ProxyError
from proxy.flight import PATHS
from proxy.metrics import Metrics
from proxy.tokens import completion_text
from proxy.upstream import TierClient, UpstreamFailure

log = logging.getLogger(__name__)


class Traffic:
    """Decides A/B diversions and runs shadow calls."""

    def __init__(self, config: Config, tiers: dict[str, TierClient], metrics: Metrics,
                 rng: random.Random | None = None) -> None:
        names = [t.name for t in config.tiers]
        self.split = parse_flows(config.router.split, "router.split", names)
        self.shadow = parse_flows(config.router.shadow, "router.shadow", names)
        self.log_path = config.router.shadow_log
        self.tiers = tiers
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.tasks: set[asyncio.Task[None]] = set()
        self.pairs = 0
        self._lock = asyncio.Lock()

    def divert(self, tier: str) -> str:
        """The tier that serves a request routed to ``tier`` after the A/B split."""
        flows = self.split.get(tier)
        if not flows:
            return tier
        r = self.rng.random()
        for dst, frac in flows:
            if r < frac:
                return dst
            r -= frac
        return tier

    def maybe_mirror(self, tier: str, endpoint: str, payload: dict[str, Any],
                     answer: CachedAnswer, latency_s: float) -> None:
        """After ``tier`` answered: mirror the request to shadow tiers, by their fractions."""
        for dst, frac in self.shadow.get(tier, ()):
            if self.rng.random() < frac:
                task = asyncio.create_task(self._mirror(tier, dst, endpoint, payload, answer,
                                                        latency_s))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _mirror(self, src: str, dst: str, endpoint: str, payload: dict[str, Any],
                      answer: CachedAnswer, latency_s: float) -> None:
        shadow_payload = {k: v for k, v in payload.items() if k not in ("stream",
                                                                        "stream_options")}
        client = self.tiers[dst]
        t0 = time.perf_counter()
        record: dict[str, Any] = {"ts": time.time(), "endpoint": endpoint, "primary_tier": src,
                                  "shadow_tier": dst}
        try:
            opened = await client.open(PATHS[endpoint], shadow_payload, stream=False)
            try:
                raw = await opened.resp.read()
            finally:
                opened.close(reuse=True, ok=True)
            body = orjson.loads(raw)
            pt = int((body.get("usage") or {}).get("prompt_tokens") or 0)
            ct = int((body.get("usage") or {}).get("completion_tokens") or 0)
            self.metrics.spend(client.cfg, "shadow", pt, ct)
            record["shadow"] = {"text": completion_text(endpoint, body), "latency_ms":
                                round((time.perf_counter() - t0) * 1000, 2),
                                "prompt_tokens": pt, "completion_tokens": ct}
        except (UpstreamFailure, ProxyError, OSError, ValueError) as exc:
            record["shadow"] = {"error": str(exc)}
        except Exception as exc:  # a shadow must never hurt the primary path
            log.exception("shadow call failed")
            record["shadow"] = {"error": repr(exc)}
        prompt = payload.get("messages") if endpoint == "chat" else payload.get("prompt")
        record["request"] = prompt
        record["primary"] = {"text": completion_text(endpoint, orjson.loads(answer.body)),
                             "latency_ms": round(latency_s * 1000, 2),
                             "prompt_tokens": answer.prompt_tokens,
                             "completion_tokens": answer.completion_tokens}
        self.pairs += 1
        self.metrics.shadow_pairs.labels(src, dst).inc()
        if self.log_path:
            line = orjson.dumps(record) + b"\n"
            async with self._lock:
                await asyncio.to_thread(self._append, line)

    def _append(self, line: bytes) -> None:
        with open(self.log_path, "ab") as fh:
            fh.write(line)

    async def close(self) -> None:
        """Let running shadow calls finish (briefly)."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2.0)
