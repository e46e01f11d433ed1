"""One semantic cache for every sidecar: entries and purges travel on a Redis Stream.

Each new semantic entry is written next to the exact entries (``<prefix>s:<ns tag>:<key>``, with
the entry's TTL) and announced on a Redis Stream (``<prefix>stream``, trimmed with MAXLEN ~ the
index capacity). Every sidecar tails the stream (XREAD BLOCK) into its own index; at start it
replays the stream, so a new or restarted pod is warm before it reports ready. Purges from the
admin API travel on the same stream, in order, so a replay never resurrects a purged entry.

If Redis goes away the proxy keeps serving from its local caches; the tailer reconnects with
backoff and continues from the last id it applied (catching up on what it missed while the
stream still holds it). Its own announcements are skipped by origin id.

Redis Cluster: the stream is one key (one slot); entry keys and exact keys spread over slots;
nothing here needs two keys in one command, so no hash tags are required (purge by namespace
SCANs each node). See README "Shared mode".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Final

import numpy as np
from redis.exceptions import RedisError

from proxy.config import CacheConfig, SemanticConfig
from proxy.exact import PipelineWriter, ns_tag, redis_client
from proxy.metrics import Metrics
from proxy.semantic.index import SemanticEntry

log = logging.getLogger(__name__)

BLOCK_MS: Final = 1000
REPLAY_BATCH: Final = 5000


def _f(d: dict[bytes, bytes], k: bytes) -> str:
    return d[k].decode("utf-8", "surrogatepass")


class SharedIndex:
    """Publishes local semantic entries and applies everyone's (the stream tailer)."""

    def __init__(self, cache_cfg: CacheConfig, sem_cfg: SemanticConfig, semcache: Any,
                 metrics: Metrics) -> None:
        self.semcache = semcache  # proxy.semantic.cache.SemanticCache
        self.metrics = metrics
        self.prefix = cache_cfg.redis_prefix.encode()
        self.stream = self.prefix + b"stream"
        self.maxlen = max(1000, sem_cfg.capacity)
        self.ttl_s = int(sem_cfg.ttl_s)
        self.origin = os.urandom(8).hex().encode()
        # Its own client: XREAD BLOCK needs a socket timeout longer than the block, the hot
        # path's client has a short one.
        self.client = redis_client(cache_cfg, socket_timeout=BLOCK_MS / 1000 + 2,
                                   socket_connect_timeout=1.0)
        self.last_id = b"0-0"
        self.up = False
        self.applied = 0
        self._tail: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self.writer = PipelineWriter(self.client, self._write_failed)
        self._closed = False

    # -- start: replay ------------------------------------------------------------------------
    async def start(self) -> None:
        """Replay what the stream holds (a warm start), then tail it in the background."""
        t0 = time.perf_counter()
        try:
            n = await self._replay()
            self.up = True
            log.info("shared index: replayed %d stream records in %.2f s", n,
                     time.perf_counter() - t0)
        except (RedisError, OSError) as exc:
            log.warning("shared index: Redis unreachable at start (%s); tailing later", exc)
        self.metrics.shared_replay_seconds.set(time.perf_counter() - t0)
        self._tail = asyncio.create_task(self._tail_loop())

    async def _replay(self) -> int:
        n = 0
        start = b"-"
        while True:
            recs = await self.client.xrange(self.stream, min=start, max=b"+", count=REPLAY_BATCH)
            if not recs:
                break
            adds: list[tuple[np.ndarray, SemanticEntry]] = []
            for _rid, fields in recs:
                if fields.get(b"op") == b"add":
                    item = self._decode(fields)
                    if item is not None:
                        adds.append(item)
                else:  # a purge: apply the adds before it first, in order
                    self._add_many(adds)
                    adds = []
                    self._apply_control(fields)
            self._add_many(adds)
            n += len(recs)
            self.last_id = recs[-1][0]
            start = b"(" + self.last_id
            await asyncio.sleep(0)  # let requests in between batches
        return n

    def _add_many(self, adds: list[tuple[np.ndarray, SemanticEntry]]) -> None:
        if adds:
            self.semcache.index.add_many(np.stack([v for v, _ in adds]), [e for _, e in adds])
            self.applied += len(adds)

    # -- tail ---------------------------------------------------------------------------------
    async def _tail_loop(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                resp = await self.client.xread({self.stream: self.last_id}, block=BLOCK_MS,
                                               count=1000)
                if not self.up:
                    log.info("shared index: Redis back, catching up from %s", self.last_id)
                self.up, delay = True, 0.1
                self.metrics.shared_up.set(1)
                for _, recs in resp or ():
                    for rid, fields in recs:
                        self._apply(fields)
                        self.last_id = rid
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.up:
                    log.warning("shared index: stream read failed (%s); retrying", exc)
                self.up = False
                self.metrics.shared_up.set(0)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:  # a bad record must not stop the tail
                log.exception("shared index: record not applied")

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        op = fields.get(b"op")
        if op == b"add":
            if fields.get(b"o") == self.origin:
                return  # our own entry: already in the index
            item = self._decode(fields)
            if item is None:
                return
            vec, entry = item
            self.semcache.index.add(vec, entry)
            self.applied += 1
            self.metrics.shared_lag.observe(max(0.0, time.time() - entry.created))
        else:
            self._apply_control(fields)

    def _apply_control(self, fields: dict[bytes, bytes]) -> None:
        op = fields.get(b"op")
        if op == b"purge_ns":
            ns = _f(fields, b"n")
            self.semcache.index.purge_namespace(ns)
            self.semcache.exact.l1.purge_namespace(ns)
        elif op == b"purge_key":
            key = fields[b"k"]
            self.semcache.index.remove(key)
            self.semcache.exact.l1.delete(key)

    def _decode(self, f: dict[bytes, bytes]) -> tuple[np.ndarray, SemanticEntry] | None:
        try:
            expires = float(f[b"e"])
            if expires <= time.time():
                return None
            vec = np.frombuffer(f[b"v"], dtype=np.float16).astype(np.float32)
            entry = SemanticEntry(key=f[b"k"], scope=f[b"s"], namespace=_f(f, b"n"),
                                  query_text=_f(f, b"q"), tier=_f(f, b"t"), max_tokens=None,
                                  created=float(f[b"c"]), expires=expires)
            return vec, entry
        except (KeyError, ValueError):
            log.warning("shared index: malformed stream record skipped")
            return None

    # -- publish ------------------------------------------------------------------------------
    def publish(self, vec: np.ndarray, entry: SemanticEntry) -> None:
        """Store and announce a new local entry (background; never delays the response)."""
        fields = {b"op": b"add", b"o": self.origin, b"k": entry.key, b"s": entry.scope,
                  b"n": entry.namespace.encode("utf-8", "surrogatepass"),
                  b"q": entry.query_text.encode("utf-8", "surrogatepass"),
                  b"t": entry.tier.encode(), b"c": repr(entry.created).encode(),
                  b"e": repr(entry.expires).encode(),
                  b"v": np.asarray(vec, dtype=np.float16).tobytes()}
        key = self.prefix + b"s:" + ns_tag(entry.namespace) + b":" + entry.key
        stream, ttl, maxlen = self.stream, self.ttl_s, self.maxlen

        def write(pipe: Any) -> None:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, ttl)
            pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)

        self.writer.submit(write)

    def _write_failed(self, exc: BaseException) -> None:
        self.metrics.redis_errors.labels("stream").inc()
        log.debug("shared index: write failed: %s", exc)

    def publish_purge(self, namespace: str, key: bytes | None = None) -> None:
        """Announce a purge so every sidecar applies it (and replays apply it in order)."""
        fields = {b"op": b"purge_key" if key is not None else b"purge_ns", b"o": self.origin,
                  b"n": namespace.encode("utf-8", "surrogatepass")}
        if key is not None:
            fields[b"k"] = key
        self._bg(self._purge(namespace, key, fields))

    async def _purge(self, namespace: str, key: bytes | None, fields: dict[bytes, bytes]) -> None:
        if key is not None:
            await self.client.unlink(self.prefix + b"s:" + ns_tag(namespace) + b":" + key)
        else:
            batch = [k async for k in self.client.scan_iter(
                match=self.prefix + b"s:" + ns_tag(namespace) + b":*", count=1000)]
            for i in range(0, len(batch), 500):
                await self.client.unlink(*batch[i:i + 500])
        await self.client.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)

    def _bg(self, coro: Any) -> None:
        async def guarded() -> None:
            try:
                await coro
            except (RedisError, OSError) as exc:
                self.metrics.redis_errors.labels("stream").inc()
                log.debug("shared index: write failed: %s", exc)

        task = asyncio.create_task(guarded())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def close(self) -> None:
        self._closed = True
        await self.writer.flush()
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=1.0)
        if self._tail is not None:
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tail
        await self.client.aclose()
