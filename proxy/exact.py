"""The exact cache: L1 in-process LRU with TTL and a byte bound, L2 in Redis shared by sidecars.

L2 is best effort: a Redis that is slow or gone must never fail a request or add more than
``redis_timeout_s`` to it. After a failure L2 is marked down and skipped (no per-request connect
attempts) while a background task pings it with backoff; when it answers again, L2 is back.
Writes to Redis are fire-and-forget tasks so a miss does not wait for them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from redis.exceptions import MaxConnectionsError, RedisError

from proxy.answer import CachedAnswer
from proxy.config import CacheConfig
from proxy.metrics import Metrics
from proxy.redisconn import (
    Backoff,
    PipelineWriter,
    RedisLink,
    ns_tag,
    redis_client,
    unlink_matching,
)

log = logging.getLogger(__name__)


class L1Cache:
    """LRU of key -> (answer, expiry), bounded by entry count and bytes.

    Used from the event loop thread only, so it needs no lock.
    """

    __slots__ = ("_data", "bytes", "evictions", "max_bytes", "max_entries", "ttl_s")

    def __init__(self, max_bytes: int, max_entries: int, ttl_s: float) -> None:
        self._data: OrderedDict[bytes, tuple[CachedAnswer, float, str]] = OrderedDict()
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes, now: float) -> CachedAnswer | None:
        """The live entry under ``key``, refreshed as most recently used."""
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= now:
            self.delete(key)
            return None
        self._data.move_to_end(key)
        return item[0]

    def set(self, key: bytes, answer: CachedAnswer, now: float, ttl_s: float | None = None,
            namespace: str = "") -> None:
        """Store ``answer``; evicts least recently used entries past either bound."""
        size = answer.size
        if size > self.max_bytes or self.max_entries == 0:
            return
        self.delete(key)
        self._data[key] = (answer, now + (self.ttl_s if ttl_s is None else ttl_s), namespace)
        self.bytes += size
        while self.bytes > self.max_bytes or len(self._data) > self.max_entries:
            _, (old, _, _) = self._data.popitem(last=False)
            self.bytes -= old.size
            self.evictions += 1

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; True if it was there."""
        item = self._data.pop(key, None)
        if item is None:
            return False
        self.bytes -= item[0].size
        return True

    def delete_in(self, key: bytes, namespace: str) -> bool:
        """Remove ``key`` only if it belongs to ``namespace``; True if it was removed."""
        item = self._data.get(key)
        if item is None or item[2] != namespace:
            return False
        return self.delete(key)

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0

    def purge_namespace(self, namespace: str) -> int:
        """Remove every entry of ``namespace``; returns the count."""
        keys = [k for k, (_, _, ns) in self._data.items() if ns == namespace]
        for k in keys:
            self.delete(k)
        return len(keys)


class RedisL2:
    """The shared L2 exact cache in Redis (redis.asyncio with hiredis)."""

    def __init__(self, cfg: CacheConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.prefix = cfg.redis_prefix.encode() + b"x:"
        self.client = redis_client(cfg, socket_timeout=cfg.redis_timeout_s,
                                   socket_connect_timeout=max(cfg.redis_timeout_s, 0.5))
        self.link = RedisLink(self.client, f"redis {cfg.redis_url}", metrics.redis_up,
                              Backoff(0.1, 2.0), self._count_error)
        self.writer = PipelineWriter(self.client, lambda exc: self.link.mark_down("set"))

    @property
    def up(self) -> bool:
        """False while Redis is down: L2 is skipped, the link probes in the background."""
        return self.link.up

    def _count_error(self, op: str) -> None:
        self.metrics.redis_errors.labels(op).inc()

    async def start(self) -> None:
        """Connect; a Redis that is down at start is not fatal (probed in the background)."""
        await self.link.connect()

    def rkey(self, key: bytes, namespace: str) -> bytes:
        """Redis key of an entry: prefix, x:, a tag of the namespace (purge by SCAN), the key."""
        return self.prefix + ns_tag(namespace) + b":" + key

    async def get(self, key: bytes, namespace: str) -> CachedAnswer | None:
        """The answer under ``key``, or None (absent, unreadable, or Redis down)."""
        if not self.up:
            return None
        try:
            raw = await self.client.get(self.rkey(key, namespace))
        except MaxConnectionsError:
            # every pooled connection busy: Redis is fine, this lookup goes on without it
            self.metrics.redis_errors.labels("pool_exhausted").inc()
            return None
        except (TimeoutError, RedisError, OSError):
            self.link.mark_down("get")
            return None
        return CachedAnswer.loads(raw) if raw else None

    def put(self, key: bytes, answer: CachedAnswer, namespace: str,
            ttl_s: float | None = None) -> None:
        """Store in the background (batched); the caller does not wait."""
        if not self.up:
            return
        rkey, raw = self.rkey(key, namespace), answer.dumps()
        ttl = self.cfg.redis_ttl_s if ttl_s is None else max(1, int(ttl_s))
        self.writer.submit(lambda pipe: pipe.set(rkey, raw, ex=ttl))
        self.metrics.cache_stores.labels("l2").inc()

    async def delete(self, key: bytes, namespace: str) -> bool:
        if self.up:
            try:
                return bool(await self.client.delete(self.rkey(key, namespace)))
            except (TimeoutError, RedisError, OSError):
                self.link.mark_down("delete")
        return False

    async def purge_namespace(self, namespace: str) -> int:
        """Delete every L2 entry of ``namespace`` (SCAN + UNLINK in batches)."""
        if not self.up:
            return 0
        try:
            return await unlink_matching(self.client, self.prefix + ns_tag(namespace) + b":*")
        except (TimeoutError, RedisError, OSError):
            self.link.mark_down("purge")
        return 0

    async def close(self) -> None:
        """Finish pending writes (briefly), stop probing, close connections."""
        await self.link.close()
        await self.writer.flush()
        await self.client.aclose()


class ExactCache:
    """L1 then L2; a hit in L2 fills L1."""

    def __init__(self, cfg: CacheConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.l1 = L1Cache(cfg.l1_max_bytes, cfg.l1_max_entries, cfg.l1_ttl_s)
        self.l2: RedisL2 | None = RedisL2(cfg, metrics) if cfg.redis_url else None

    async def start(self) -> None:
        if self.l2 is not None:
            await self.l2.start()

    async def close(self) -> None:
        if self.l2 is not None:
            await self.l2.close()

    def get_l1(self, key: bytes) -> CachedAnswer | None:
        """L1 only: no await on the fastest path."""
        return self.l1.get(key, time.monotonic())

    async def get_l2(self, key: bytes, namespace: str,
                     ttl_s: float | None = None) -> CachedAnswer | None:
        """L2, filling L1 on a hit (for at most ``ttl_s`` when given: a time-sensitive entry
        must not outlive its short Redis TTL in another sidecar's L1)."""
        if self.l2 is None:
            return None
        answer = await self.l2.get(key, namespace)
        if answer is not None:
            l1_ttl = None if ttl_s is None else min(ttl_s, self.l1.ttl_s)
            self.l1.set(key, answer, time.monotonic(), l1_ttl, namespace=namespace)
        return answer

    def put(self, key: bytes, answer: CachedAnswer, namespace: str,
            ttl_s: float | None = None) -> None:
        """Store a complete answer in L1 and (in the background) L2; ``ttl_s`` shortens both
        lifetimes (time-sensitive questions)."""
        if len(answer.body) > self.cfg.max_entry_bytes:
            self.metrics.cache_skips.labels("too_large").inc()
            return
        l1_ttl = None if ttl_s is None else min(ttl_s, self.l1.ttl_s)
        self.l1.set(key, answer, time.monotonic(), l1_ttl, namespace=namespace)
        self.metrics.cache_stores.labels("l1").inc()
        if self.l2 is not None:
            self.l2.put(key, answer, namespace, ttl_s)

    async def delete(self, key: bytes, namespace: str) -> tuple[int, int]:
        """Remove one entry of ``namespace`` from L1 and L2: (removed from L1, from L2). A key
        given with another namespace than its own removes nothing."""
        l1 = int(self.l1.delete_in(key, namespace))
        l2 = int(await self.l2.delete(key, namespace)) if self.l2 is not None else 0
        return l1, l2

    async def purge_namespace(self, namespace: str) -> tuple[int, int]:
        """Remove a namespace's entries; returns (L1 count, L2 count)."""
        l1 = self.l1.purge_namespace(namespace)
        l2 = await self.l2.purge_namespace(namespace) if self.l2 is not None else 0
        return l1, l2

    @property
    def redis_state(self) -> str:
        """"disabled" (no cache.redis_url), "up" or "down"."""
        return "disabled" if self.l2 is None else ("up" if self.l2.up else "down")

    def stats(self) -> dict[str, Any]:
        """For the admin API."""
        l1 = self.l1
        return {"l1_entries": len(l1), "l1_bytes": l1.bytes, "l1_evictions": l1.evictions,
                "redis": self.redis_state}

    def update_gauges(self) -> None:
        self.metrics.cache_entries.labels("l1").set(len(self.l1))
        self.metrics.cache_bytes.labels("l1").set(self.l1.bytes)
        self.metrics.cache_capacity_bytes.labels("l1").set(self.cfg.l1_max_bytes)
        self.metrics.cache_capacity_entries.labels("l1").set(self.cfg.l1_max_entries)
