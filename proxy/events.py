"""The request event log: one JSON object per request, for cost attribution.

Fields (``edge-proxy report`` reads them; README "Event log" documents them):

    ts, request_id, namespace, endpoint, model, tier, outcome, similarity, stream, joined,
    prompt_tokens, completion_tokens, cost_usd, saved_usd, latency_ms, ttfb_ms,
    upstream_status, status [, prompt]

``outcome`` is the x-cache value (hit-exact, hit-semantic, miss, bypass) or ``error``;
``joined`` marks a miss that shared an identical request's upstream call (single-flight), so its
``cost_usd`` is 0 and ``saved_usd`` what its own call would have cost. ``ttfb_ms`` is set for
streams (first byte to the client); ``latency_ms`` runs to the last byte.

``namespace`` is the proxy's label (``ns:<x-cache-namespace>`` or ``key:<hash>``): never an API
key or any header. ``prompt`` (the last user message, or the prompt) is present only with
``events.log_prompts = true``.

Sinks: ``stdout`` or ``file`` (JSON lines: one object per line, nothing else on the line), or
``redis``: a Redis Stream (``XADD MAXLEN ~ events.stream_maxlen``) shared by every sidecar, each
record one field ``event`` holding the JSON, so any number of consumer groups can read it
(``XGROUP CREATE <stream> billing $ MKSTREAM``; ``XREADGROUP GROUP billing c1 STREAMS <stream>
>``).

``emit`` only appends to a bounded in-memory list (past ``events.max_pending`` an event is
dropped and counted); a background task writes batches every ``flush_interval_s``, the file in a
worker thread, so the event loop never waits for a disk or for Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from typing import IO, Any, Final

import orjson
from redis.exceptions import RedisError

from proxy.config import Config

log = logging.getLogger(__name__)

FIELDS: Final = ("ts", "request_id", "namespace", "endpoint", "model", "tier", "outcome",
                 "similarity", "stream", "joined", "prompt_tokens", "completion_tokens",
                 "cost_usd", "saved_usd", "latency_ms", "ttfb_ms", "upstream_status", "status")
BATCH: Final = 1000


def stream_key(config: Config) -> str:
    return config.events.stream or config.cache.redis_prefix + "events"


class EventLog:
    """Buffers events and writes them in batches to the configured sink."""

    def __init__(self, config: Config) -> None:
        self.cfg = config.events
        self.sink = self.cfg.sink
        self.log_prompts = self.cfg.log_prompts
        self.pending: list[bytes] = []
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one batch write at a time, in order
        self._file: IO[bytes] | None = None
        self._redis: Any = None
        self._stream = stream_key(config).encode()
        # the cache's Redis (cluster or not), or a Redis of its own
        self._redis_cfg = (dataclasses.replace(config.cache, redis_url=self.cfg.redis_url,
                                               redis_cluster=False)
                           if self.cfg.redis_url else config.cache)

    @property
    def enabled(self) -> bool:
        return bool(self.sink)

    def emit(self, event: dict[str, Any]) -> None:
        """Queue one event (a dict with FIELDS); never blocks, never raises."""
        if not self.sink:
            return
        if len(self.pending) >= self.cfg.max_pending:
            self.dropped += 1
            return
        if not self.log_prompts:
            event.pop("prompt", None)
        self.pending.append(orjson.dumps(event))
        if len(self.pending) >= BATCH:
            self._wake.set()

    async def start(self) -> None:
        if not self.sink:
            return
        if self.sink == "file":
            self._file = open(self.cfg.path, "ab")  # noqa: SIM115 - closed in close()
        elif self.sink == "redis":
            from proxy.exact import redis_client

            self._redis = redis_client(self._redis_cfg, socket_timeout=2.0,
                                       socket_connect_timeout=1.0)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.flush_interval_s)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending now (after any write already under way)."""
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:BATCH * 10], self.pending[BATCH * 10:]
            try:
                if self.sink == "stdout":
                    out = sys.stdout.buffer
                    out.write(b"\n".join(batch) + b"\n")
                    out.flush()
                elif self.sink == "file":
                    assert self._file is not None
                    await asyncio.to_thread(_write_file, self._file, batch)
                else:
                    await self._xadd(batch)
                self.written += len(batch)
            except (OSError, RedisError) as exc:
                self.failed += len(batch)
                log.warning("event log: %d events not written (%s)", len(batch), exc)
                return

    async def _xadd(self, batch: list[bytes]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for e in batch:
            pipe.xadd(self._stream, {b"event": e}, maxlen=self.cfg.stream_maxlen,
                      approximate=True)
        await pipe.execute()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 5.0)
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def _write_file(fh: IO[bytes], batch: list[bytes]) -> None:
    fh.write(b"\n".join(batch) + b"\n")
    fh.flush()


def event(*, request_id: str, namespace: str, endpoint: str, model: str, tier: str,
          outcome: str, status: int, latency_s: float, ttfb_s: float | None = None,
          similarity: float | None = None, stream: bool = False, joined: bool = False,
          prompt_tokens: int = 0,
          completion_tokens: int = 0, cost_usd: float = 0.0, saved_usd: float = 0.0,
          upstream_status: int | None = None, prompt: str | None = None) -> dict[str, Any]:
    """One event, fields in FIELDS order (``prompt`` last, dropped unless log_prompts)."""
    out: dict[str, Any] = {
        "ts": round(time.time(), 3), "request_id": request_id, "namespace": namespace,
        "endpoint": endpoint, "model": model, "tier": tier, "outcome": outcome,
        "similarity": None if similarity is None else round(similarity, 4), "stream": stream,
        "joined": joined,
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "cost_usd": round(cost_usd, 10), "saved_usd": round(saved_usd, 10),
        "latency_ms": round(latency_s * 1000, 3),
        "ttfb_ms": None if ttfb_s is None else round(ttfb_s * 1000, 3),
        "upstream_status": upstream_status, "status": status}
    if prompt is not None:
        out["prompt"] = prompt
    return out
