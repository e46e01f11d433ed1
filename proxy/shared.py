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
import math
import os
import time
from typing import Any, Final, Protocol

import numpy as np
from redis.exceptions import RedisError

from proxy.config import CacheConfig, SemanticConfig
from proxy.hashing import DIGEST_SIZE
from proxy.metrics import Metrics
from proxy.redisconn import (
    Backoff,
    PipelineWriter,
    RedisLink,
    ns_tag,
    redis_client,
    unlink_matching,
)
from proxy.semantic.index import SemanticEntry

log = logging.getLogger(__name__)

BLOCK_MS: Final = 1000
REPLAY_BATCH: Final = 5000

#: Format version written in every record (field ``fv``). A record without one comes from a
#: sidecar older than the field and has the same layout (version 1). A sidecar applies records of
#: any version whose op it knows and whose fields pass the checks below, ignoring fields it does
#: not know: version N and N+1 share one stream as long as N+1 only adds fields and ops. A change
#: that breaks that must move to a new stream (a new ``cache.redis_prefix``).
FORMAT_VERSION: Final = 1
_FV: Final = str(FORMAT_VERSION).encode()
#: Ops this version applies; records with other ops are skipped (counted as "unknown_op").
OPS: Final = frozenset({b"add", b"purge_ns", b"purge_key"})
#: Size limits of record fields, bytes: a record from Redis is untrusted input.
MAX_NAMESPACE_BYTES: Final = 1024
MAX_QUERY_BYTES: Final = 4096
MAX_TIER_BYTES: Final = 128
MAX_ORIGIN_BYTES: Final = 64
KEY_BYTES: Final = DIGEST_SIZE


class BadRecord(ValueError):
    """A stream record that fails validation; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _text(fields: dict[bytes, bytes], name: bytes, limit: int) -> str:
    raw = fields.get(name)
    if not isinstance(raw, bytes):
        raise BadRecord("missing_field", f"field {name.decode()!r} missing")
    if len(raw) > limit:
        raise BadRecord("too_large", f"field {name.decode()!r} has {len(raw)} bytes (max {limit})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord("bad_value", f"field {name.decode()!r} is not UTF-8") from None
    return text


def _digest(fields: dict[bytes, bytes], name: bytes) -> bytes:
    raw = fields.get(name)
    if not isinstance(raw, bytes):
        raise BadRecord("missing_field", f"field {name.decode()!r} missing")
    if len(raw) != KEY_BYTES:
        raise BadRecord("bad_value", f"field {name.decode()!r} has {len(raw)} bytes, not "
                        f"{KEY_BYTES}")
    return raw


def _number(fields: dict[bytes, bytes], name: bytes) -> float:
    raw = fields.get(name)
    if not isinstance(raw, bytes):
        raise BadRecord("missing_field", f"field {name.decode()!r} missing")
    try:
        if len(raw) > 32:
            raise ValueError
        x = float(raw)
    except ValueError:
        raise BadRecord("bad_value", f"field {name.decode()!r} is not a number") from None
    if not math.isfinite(x):
        raise BadRecord("bad_value", f"field {name.decode()!r} is not finite")
    return x


def check_record(fields: Any) -> bytes:
    """Validate the envelope of a record (a mapping, a version, a known op); returns the op.

    Raises BadRecord. Op-specific fields are checked where they are decoded."""
    if not isinstance(fields, dict):
        raise BadRecord("malformed", "record is not a field map")
    fv = fields.get(b"fv", b"1")
    if not isinstance(fv, bytes) or not fv.isdigit() or len(fv) > 6 or int(fv) < 1:
        raise BadRecord("bad_version", f"format version {fv!r:.40} is not a positive integer")
    op = fields.get(b"op")
    if op not in OPS:
        raise BadRecord("unknown_op", f"op {op!r:.40} unknown to format version "
                        f"{FORMAT_VERSION}")
    origin = fields.get(b"o", b"")
    if not isinstance(origin, bytes) or len(origin) > MAX_ORIGIN_BYTES:
        raise BadRecord("bad_value", "field 'o' is not a short origin id")
    return op


def _clip_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes on a character boundary."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()


class StreamTarget(Protocol):
    """What the shared index applies the stream to: this sidecar's semantic cache."""

    @property
    def dim(self) -> int:
        """The vector dimension a record's ``v`` field must have."""

    def apply_entries(self, vecs: np.ndarray, entries: list[SemanticEntry]) -> None:
        """Index entries from the stream (a replay batch); nothing is published again."""

    def apply_entry(self, vec: np.ndarray, entry: SemanticEntry) -> None:
        """Index one entry from the stream; nothing is published again."""

    def apply_purge(self, namespace: str, key: bytes | None) -> None:
        """Drop a namespace (or one key of it) from this sidecar's index and L1."""


class SharedIndex:
    """Publishes local semantic entries and applies everyone's (the stream tailer)."""

    def __init__(self, cache_cfg: CacheConfig, sem_cfg: SemanticConfig, target: StreamTarget,
                 metrics: Metrics) -> None:
        self.target = target
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
        self.link = RedisLink(self.client, "shared index: Redis stream", metrics.shared_up,
                              Backoff(0.1, 5.0))
        self.last_id = b"0-0"
        self.applied = 0
        self.bad_records = 0
        self._tail: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self.writer = PipelineWriter(self.client, self._write_failed)
        self._closed = False

    @property
    def up(self) -> bool:
        """False while the stream cannot be read (the link probes Redis with backoff)."""
        return self.link.up

    # -- start: replay ------------------------------------------------------------------------
    async def start(self) -> None:
        """Replay what the stream holds (a warm start), then tail it in the background."""
        t0 = time.perf_counter()
        try:
            n = await self._replay()
            self.link.set_up(True)
            log.info("shared index: replayed %d stream records in %.2f s", n,
                     time.perf_counter() - t0)
        except (RedisError, OSError) as exc:
            log.warning("shared index: Redis unreachable at start (%s); tailing later", exc)
            self.link.mark_down(None)
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
            for rid, fields in recs:
                try:
                    op = check_record(fields)
                    if op == b"add":
                        item = self._decode(fields)
                        if item is not None:
                            adds.append(item)
                    else:  # a purge: apply the adds before it first, in order
                        self._add_many(adds)
                        adds = []
                        self._apply_control(op, fields)
                except BadRecord as bad:
                    self._bad(rid, bad)
            self._add_many(adds)
            n += len(recs)
            self.last_id = recs[-1][0]
            start = b"(" + self.last_id
            await asyncio.sleep(0)  # let requests in between batches
        return n

    def _add_many(self, adds: list[tuple[np.ndarray, SemanticEntry]]) -> None:
        if adds:
            self.target.apply_entries(np.stack([v for v, _ in adds]), [e for _, e in adds])
            self.applied += len(adds)

    # -- tail ---------------------------------------------------------------------------------
    async def _tail_loop(self) -> None:
        while not self._closed:
            if not self.link.up:
                await self.link.wait_up()
                log.info("shared index: Redis back, catching up from %s", self.last_id)
            try:
                resp = await self.client.xread({self.stream: self.last_id}, block=BLOCK_MS,
                                               count=1000)
                for _, recs in resp or ():
                    for rid, fields in recs:
                        # advance first: a record that fails is skipped, never read again
                        self.last_id = rid
                        try:
                            self._apply(fields)
                        except BadRecord as bad:
                            self._bad(rid, bad)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.link.up:
                    log.warning("shared index: stream read failed (%s); retrying", exc)
                self.link.mark_down(None)
            except Exception:  # a bug must not stop the tail (nor spin: last_id moved on)
                log.exception("shared index: record not applied")
                self.metrics.shared_bad_records.labels("error").inc()
                await asyncio.sleep(self.link.backoff.base)

    def _bad(self, rid: bytes, bad: BadRecord) -> None:
        """Count a skipped record and log it (once: a skipped record is never read again)."""
        self.metrics.shared_bad_records.labels(bad.reason).inc()
        self.bad_records += 1
        log.warning("shared index: stream record %s skipped (%s): %s",
                    rid.decode("ascii", "replace"), bad.reason, bad)

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        op = check_record(fields)
        if op == b"add":
            if fields.get(b"o") == self.origin:
                return  # our own entry: already in the index
            item = self._decode(fields)
            if item is None:
                return
            vec, entry = item
            self.target.apply_entry(vec, entry)
            self.applied += 1
            self.metrics.shared_lag.observe(max(0.0, time.time() - entry.created))
        else:
            self._apply_control(op, fields)

    def _apply_control(self, op: bytes, fields: dict[bytes, bytes]) -> None:
        """A purge, validated before anything is removed."""
        if op == b"purge_ns":
            self.target.apply_purge(_text(fields, b"n", MAX_NAMESPACE_BYTES), None)
        elif op == b"purge_key":
            self.target.apply_purge(_text(fields, b"n", MAX_NAMESPACE_BYTES),
                                    _digest(fields, b"k"))

    def _decode(self, f: dict[bytes, bytes]) -> tuple[np.ndarray, SemanticEntry] | None:
        """The vector and entry of an add record; None when it has expired. BadRecord when a
        field is missing, of the wrong type or size."""
        expires = _number(f, b"e")
        created = _number(f, b"c")
        key, scope = _digest(f, b"k"), _digest(f, b"s")
        namespace = _text(f, b"n", MAX_NAMESPACE_BYTES)
        query = _text(f, b"q", MAX_QUERY_BYTES)
        tier = _text(f, b"t", MAX_TIER_BYTES)
        raw = f.get(b"v")
        dim = self.target.dim
        if not isinstance(raw, bytes) or len(raw) != 2 * dim:
            raise BadRecord("bad_value", f"field 'v' is not {dim} float16 values")
        vec = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        norm = float(np.linalg.norm(vec))
        if not math.isfinite(norm) or norm < 0.5 or norm > 1.5:
            raise BadRecord("bad_value", "field 'v' is not a unit vector")
        if expires <= time.time():
            return None
        entry = SemanticEntry(key=key, scope=scope, namespace=namespace,
                              query_text=query, tier=tier, max_tokens=None,
                              created=created, expires=expires)
        return vec, entry

    # -- publish ------------------------------------------------------------------------------
    def publish(self, vec: np.ndarray, entry: SemanticEntry) -> None:
        """Store and announce a new local entry (background; never delays the response)."""
        fields = {b"fv": _FV, b"op": b"add", b"o": self.origin, b"k": entry.key,
                  b"s": entry.scope, b"n": entry.namespace.encode("utf-8", "surrogatepass"),
                  b"q": _clip_utf8(entry.query_text, MAX_QUERY_BYTES),
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
        fields = {b"fv": _FV, b"op": b"purge_key" if key is not None else b"purge_ns",
                  b"o": self.origin,
                  b"n": namespace.encode("utf-8", "surrogatepass")}
        if key is not None:
            fields[b"k"] = key
        self._bg(self._purge(namespace, key, fields))

    async def _purge(self, namespace: str, key: bytes | None, fields: dict[bytes, bytes]) -> None:
        if key is not None:
            await self.client.unlink(self.prefix + b"s:" + ns_tag(namespace) + b":" + key)
        else:
            await unlink_matching(self.client, self.prefix + b"s:" + ns_tag(namespace) + b":*")
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
        await self.link.close()
        await self.writer.flush()
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=1.0)
        if self._tail is not None:
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tail
        await self.client.aclose()
