"""Redis, in one place: the client, a connection's up-flag and its gauge, one reconnect loop with
backoff, one batch writer, and SCAN + UNLINK.

The exact cache's L2 (exact.py) and the shared semantic stream (shared.py) each hold one
``RedisLink``: Redis being down is a state with a metric, entered on the first failed command
and left when a background probe gets an answer, never a per-request connect attempt. The split
follows redis-py's ``redis/retry.py`` + ``redis/backoff.py``: the policy (``Backoff``) apart from
the loop that applies it. No retries inside a command: a failed read falls through to the
upstream, which is the retry, and a failed write is only a colder cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.config import CacheConfig

log = logging.getLogger(__name__)

#: Keys per UNLINK when purging by pattern.
UNLINK_BATCH: Final = 500


def redis_client(cfg: CacheConfig, socket_timeout: float, socket_connect_timeout: float) -> Any:
    """A Redis client for ``cache.redis_url``: one server, or a Redis Cluster
    (``cache.redis_cluster``), without retries (see the module docstring)."""
    if cfg.redis_cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(cfg.redis_url, socket_timeout=socket_timeout,
                                     socket_connect_timeout=socket_connect_timeout,
                                     max_connections=cfg.redis_max_connections)
    return aioredis.Redis.from_url(cfg.redis_url, socket_timeout=socket_timeout,
                                   socket_connect_timeout=socket_connect_timeout,
                                   retry=Retry(NoBackoff(), 0), health_check_interval=0,
                                   max_connections=cfg.redis_max_connections)


def ns_tag(namespace: str) -> bytes:
    """A short, fixed-size tag of a namespace for Redis key names: bounded key length whatever
    the x-cache-namespace header says, and SCAN patterns free of glob characters. (The shared
    stream carries the namespace itself, which receivers need to scope entries; it is a tenant
    label or a hash of an API key, never the key.)"""
    return hashlib.blake2b(namespace.encode("utf-8", "replace"), digest_size=6).hexdigest().encode()


class Backoff:
    """Exponential backoff with a cap: ``base``, 2x, 4x ... up to ``cap`` seconds (redis-py's
    ``ExponentialBackoff``, without jitter: one prober per process)."""

    __slots__ = ("base", "cap")

    def __init__(self, base: float = 0.1, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap

    def compute(self, failures: int) -> float:
        """The wait before attempt ``failures + 1``."""
        return min(self.cap, self.base * 2 ** min(failures, 32))


class RedisLink:
    """One Redis client's health: the up-flag, its gauge, and the one reconnect loop.

    ``mark_down`` (after a failed command) sets the flag and gauge to down and starts a probe
    that pings with backoff; the first answer sets them up again. Callers skip Redis while it is
    down (``up``), or wait for it (``wait_up``).
    """

    def __init__(self, client: Any, name: str, gauge: Any, backoff: Backoff,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.name = name            # for the log: "redis://host:6379/0", "shared stream"
        self.gauge = gauge          # a prometheus Gauge (no labels), 1 while up
        self.backoff = backoff
        self.on_error = on_error    # counts a failure by operation (the redis_errors metric)
        self.up = False
        self._up_event = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None
        self._closed = False

    async def connect(self) -> bool:
        """One ping; up on an answer, else down with the probe running. Never raises."""
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            log.warning("%s unreachable (%s); probing in the background", self.name, exc)
            self.mark_down("ping")
            return False
        self.set_up(True)
        return True

    def set_up(self, up: bool) -> None:
        if up != self.up:
            log.info("%s is %s", self.name, "up" if up else "down")
        self.up = up
        self.gauge.set(1 if up else 0)
        if up:
            self._up_event.set()
        else:
            self._up_event.clear()

    def mark_down(self, op: str | None) -> None:
        """A command failed: count it under ``op`` (None: not counted), go down, probe."""
        if op is not None and self.on_error is not None:
            self.on_error(op)
        self.set_up(False)
        if (self._probe is None or self._probe.done()) and not self._closed:
            self._probe = asyncio.create_task(self._reconnect())

    async def wait_up(self) -> None:
        """Until the link is up (at once if it is)."""
        await self._up_event.wait()

    async def _reconnect(self) -> None:
        failures = 0
        while not self._closed:
            await asyncio.sleep(self.backoff.compute(failures))
            try:
                # drop pooled connections to the old server first: with no retries, a stale
                # one would fail the next command and mark Redis down again
                pool = getattr(self.client, "connection_pool", None)
                if pool is not None:
                    await pool.disconnect()
                await self.client.ping()
            except (RedisError, OSError):
                failures += 1
                continue
            self.set_up(True)
            return

    async def close(self) -> None:
        """Stop probing (the client is closed by its owner)."""
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe


class PipelineWriter:
    """Fire-and-forget Redis writes, batched: one task drains everything queued into one
    pipeline, so a burst of stores takes one connection and one round trip instead of one each
    (and cannot exhaust the connection pool the lookups need)."""

    MAX_BATCH = 1000

    def __init__(self, client: Any, on_error: Callable[[BaseException], None]) -> None:
        self.client = client
        self.on_error = on_error
        self.pending: list[Callable[[Any], None]] = []
        self.task: asyncio.Task[None] | None = None

    def submit(self, op: Callable[[Any], None]) -> None:
        """Queue ``op(pipeline)``; it runs with the next batch."""
        self.pending.append(op)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self.pending:
            ops = self.pending[:self.MAX_BATCH]
            del self.pending[:self.MAX_BATCH]
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for op in ops:
                        op(pipe)
                    await pipe.execute()
            except (TimeoutError, RedisError, OSError) as exc:
                self.on_error(exc)

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait (briefly) for queued writes."""
        if self.task is not None and not self.task.done():
            await asyncio.wait([self.task], timeout=timeout)


async def unlink_matching(client: Any, pattern: bytes, batch: int = UNLINK_BATCH) -> int:
    """UNLINK every key matching ``pattern`` (SCAN in pages, UNLINK in batches); the count.

    Raises what the client raises: the caller knows what a failure means for it."""
    n = 0
    keys: list[bytes] = []
    async for k in client.scan_iter(match=pattern, count=1000):
        keys.append(k)
        if len(keys) >= batch:
            n += await client.unlink(*keys)
            keys = []
    if keys:
        n += await client.unlink(*keys)
    return n
