"""One upstream call and everyone waiting for it: fallback across tiers, the streaming tee, and
single-flight of identical requests.

A ``Flight`` runs in its own task, so it does not die with the client that started it. It tries
the tiers of its chain in order until one answers: a tier may be abandoned only before anything
was published, so fallback never happens after the first byte reached a client. Streamed
events are appended to ``events`` as they arrive and every subscriber (the client that started
the flight and any identical request that joined it) writes them to its own connection, starting
from the first event. When the last subscriber leaves before the end, the task is cancelled and
the upstream connection closed, which is what makes vLLM abort the generation.

On a complete, successful answer (HTTP 200, every choice finished with ``stop``, the stream
reached ``[DONE]``) ``on_complete`` receives the ``CachedAnswer``; on anything else nothing is
stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError

from proxy.answer import CachedAnswer, StreamAssembler, is_complete, usage_of
from proxy.errors import ProxyError, upstream_timeout, upstream_unavailable
from proxy.metrics import Metrics
from proxy.tokens import completion_text, count_tokens, prompt_text
from proxy.upstream import OpenResponse, TierClient, UpstreamFailure, read_limited

log = logging.getLogger(__name__)

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


#: Bytes of SSE frames a stream keeps for identical requests that join late. Past it the flight
#: takes no new joiners (they start their own call) and drops every frame all its subscribers
#: have written, so a long stream holds about one frame per slow subscriber, not every frame.
REPLAY_BYTES: Final = 256 * 1024


class Cursor:
    """One subscriber's position in a flight's frames (absolute index)."""

    __slots__ = ("flight", "pos")

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self.pos = 0

    def take(self) -> bytes:
        """The frames this subscriber has not written yet (b"" if none), joined."""
        f = self.flight
        events = f.events
        i = self.pos - f.base
        if i >= len(events):
            return b""
        chunk = events[i] if len(events) - i == 1 else b"".join(events[i:])
        self.pos = f.base + len(events)
        if not f.replayable:
            f._trim()
        return chunk


class Flight:
    """An upstream request shared by its subscribers."""

    __slots__ = ("_changed", "_task", "auth", "base", "body", "buffered", "chain", "cursors",
                 "done", "endpoint", "error", "events", "key", "metrics", "namespace",
                 "on_complete", "on_finish", "payload", "replayable", "started", "stream",
                 "streamed", "subscribers", "tier", "usage",
                 "usage_frame")

    def __init__(self, key: Any, namespace: str, endpoint: str, payload: dict[str, Any],
                 stream: bool,
                 chain: Sequence[TierClient], metrics: Metrics,
                 on_complete: Callable[[CachedAnswer, TierClient], None],
                 on_finish: Callable[[Flight], None]) -> None:
        self.key = key
        self.namespace = namespace
        self.endpoint = endpoint
        self.payload = payload
        self.stream = stream
        self.chain = chain
        self.metrics = metrics
        self.on_complete = on_complete
        self.on_finish = on_finish
        self.events: list[bytes] = []       # SSE frames, as received (stream), from ``base``
        self.base = 0                       # absolute index of events[0]
        self.buffered = 0                   # bytes in events
        self.streamed = 0                   # bytes of every frame so far
        self.replayable = True              # all frames kept: a late joiner can still join
        self.cursors: set[Cursor] = set()
        self.usage_frame: bytes | None = None
        self.usage: tuple[int, int] | None = None  # (prompt, completion) tokens billed
        self.body: bytes | None = None      # JSON body (non-stream)
        self.tier: TierClient | None = None  # the tier that answered
        self.started = False                # first event / body available
        self.done = False
        self.error: ProxyError | None = None
        self.subscribers = 0
        self.auth: str | None = None        # the client's Authorization (tiers' forward_auth)
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    # -- subscriber side ------------------------------------------------------------------
    async def wait(self) -> None:
        """Until something new is published."""
        await asyncio.shield(self._changed)

    @property
    def joinable(self) -> bool:
        """Can an identical request still join (and get every frame from the first)?"""
        return not self.done and self.replayable

    def subscribe(self) -> Cursor:
        """Join; the cursor reads the frames from the first one (streams)."""
        self.subscribers += 1
        cursor = Cursor(self)
        self.cursors.add(cursor)
        return cursor

    def unsubscribe(self, cursor: Cursor | None = None) -> None:
        """A subscriber is gone; the last one to leave an unfinished flight cancels it."""
        if cursor is not None:
            self.cursors.discard(cursor)
            if not self.replayable:
                self._trim()
        self.subscribers -= 1
        if self.subscribers <= 0 and not self.done and self._task is not None:
            self._task.cancel()

    def _trim(self) -> None:
        """Drop the frames every subscriber has written (once no one can join any more)."""
        low = min((c.pos for c in self.cursors), default=self.base + len(self.events))
        drop = low - self.base
        if drop > 0:
            self.buffered -= sum(map(len, self.events[:drop]))
            del self.events[:drop]
            self.base = low

    def _publish(self, frame: bytes) -> None:
        self.events.append(frame)
        self.buffered += len(frame)
        self.streamed += len(frame)
        if self.replayable and self.streamed > REPLAY_BYTES:
            self.replayable = False
            self._trim()

    # -- publisher side -------------------------------------------------------------------
    def _notify(self) -> None:
        fut, self._changed = self._changed, asyncio.get_running_loop().create_future()
        fut.set_result(None)

    def _fail(self, err: ProxyError) -> None:
        self.error = err
        self.done = True
        self._notify()

    async def _run(self) -> None:
        try:
            await self._attempts()
        except asyncio.CancelledError:
            self.error = self.error or ProxyError(499, "client closed request",
                                                  err_type="cancelled", code="cancelled")
            self.done = True
            self._notify()
            raise
        except Exception as exc:  # a bug must not leave subscribers hanging
            log.exception("flight failed")
            self._fail(ProxyError(500, f"internal error: {type(exc).__name__}",
                                  err_type="server_error", code="internal_error"))
        finally:
            self.on_finish(self)

    async def _attempts(self) -> None:
        last: UpstreamFailure | None = None
        for tier in self.chain:
            t0 = time.perf_counter()
            try:
                opened, first = await self._open(tier)
            except UpstreamFailure as fail:
                self.metrics.upstream_errors.labels(tier.name, fail.kind).inc()
                log.warning("tier %s failed before first byte: %s", tier.name, fail)
                last = fail
                continue
            except ProxyError as err:  # a 4xx: the client's error, no fallback
                self._fail(err)
                return
            self.metrics.upstream_ttft.labels(tier.name).observe(time.perf_counter() - t0)
            self.tier = tier
            try:
                if self.stream:
                    await self._tee(opened, first)
                else:
                    self._finish_json(first)
                    opened.close(reuse=True, ok=self.error is None)
            finally:
                opened.close()
            self.metrics.upstream_duration.labels(tier.name).observe(time.perf_counter() - t0)
            return
        assert last is not None
        self._fail(last.error)

    async def _open(self, tier: TierClient) -> tuple[OpenResponse, Any]:
        """Open on ``tier`` and read up to the first event (stream) or the body (JSON), within
        the first-token timeout: until then, failing over to another tier is still possible."""
        opened: OpenResponse | None = None
        # vLLM sends a JSON answer's headers only when the whole answer is done: a non-streamed
        # request is bounded by the total timeout, a stream by the first-token one.
        limit = tier.cfg.first_token_timeout_s if self.stream else tier.cfg.total_timeout_s
        try:
            async with asyncio.timeout(limit):
                opened = await tier.open(PATHS[self.endpoint], self.payload, self.stream,
                                         self.auth)
                if self.stream:
                    first = await _next_event(opened.resp)
                    if first is None:
                        raise UpstreamFailure(upstream_unavailable(
                            f"tier {tier.name}: stream ended before the first event"), "cut")
                else:
                    first = await read_limited(opened.resp, tier.cfg.max_response_bytes,
                                               tier.name)
            return opened, first
        except UpstreamFailure:
            if opened is not None:
                opened.close(ok=False)
            raise
        except TimeoutError:
            if opened is not None:
                opened.close(ok=False)
            raise UpstreamFailure(upstream_timeout(
                f"tier {tier.name}: no {'first token' if self.stream else 'answer'} within "
                f"{limit} s"), "timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            if opened is not None:
                opened.close(ok=False)
            raise UpstreamFailure(upstream_unavailable(
                f"tier {tier.name}: upstream failed ({type(exc).__name__})"), "connect") from None
        except BaseException:
            if opened is not None:
                opened.close()
            raise

    def _finish_json(self, raw: bytes) -> None:
        assert self.tier is not None
        self.body = raw
        self.started = True
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.body = None
            self._fail(upstream_unavailable(f"tier {self.tier.name}: invalid JSON from upstream"))
            return
        problem = _error_in_ok(obj)
        if problem is not None:  # a 200 carrying an error (or no answer): 502 with its message
            self.body = None
            self._fail(upstream_unavailable(f"tier {self.tier.name}: upstream answered 200 "
                                            f"with an error: {problem}"))
            return
        pt, ct = usage_of(obj)
        self._complete(obj, raw, pt, ct)
        self.done = True
        self._notify()

    def _usage(self, obj: dict[str, Any], pt: int, ct: int) -> tuple[int, int]:
        """The upstream's usage, or a count with the tokenizer when it sent none."""
        if pt or ct:
            return pt, ct
        self.metrics.usage_estimated.inc()
        return (count_tokens(prompt_text(self.endpoint, self.payload)),
                count_tokens(completion_text(self.endpoint, obj)))

    def _complete(self, obj: dict[str, Any], raw: bytes | None, pt: int, ct: int) -> None:
        assert self.tier is not None
        pt, ct = self.usage = self._usage(obj, pt, ct)
        self.metrics.spend(self.tier.cfg, self.namespace, pt, ct)
        if is_complete(obj):
            body = raw if raw is not None else orjson.dumps(obj)
            self.on_complete(CachedAnswer(self.endpoint, body, self.tier.name, pt, ct), self.tier)
        else:
            self.metrics.cache_skips.labels("incomplete").inc()

    async def _tee(self, opened: OpenResponse, first: bytes) -> None:
        assert self.tier is not None
        asm = StreamAssembler(self.endpoint, self.payload.get("tool_choice"))
        event: bytes | None = first
        finished = False
        held: bytes | None = None  # a finish chunk waiting for the usage chunk's fingerprint
        limit, received = self.tier.cfg.max_response_bytes, 0
        try:
            while event is not None:
                received += len(event)
                if received > limit:
                    opened.close(ok=False)
                    self._fail(upstream_unavailable(
                        f"tier {self.tier.name}: upstream stream larger than {limit} bytes"))
                    return
                if event == b"[DONE]":
                    finished = True
                    break
                try:
                    obj = orjson.loads(event)
                except orjson.JSONDecodeError:
                    opened.close(ok=False)
                    self._fail(upstream_unavailable(
                        f"tier {self.tier.name}: malformed SSE event from upstream"))
                    return
                asm.feed(obj)
                if isinstance(obj, dict) and "error" in obj:
                    opened.close(ok=True)  # the upstream answered; the request was refused
                    self._fail(_stream_error(self.tier.name, obj["error"], self.started))
                    return
                frame = b"data: " + event + b"\n\n"
                if isinstance(obj, dict) and not obj.get("choices") and obj.get("usage"):
                    self.usage_frame = frame  # forwarded only to those who asked for usage
                    if held is not None and obj.get("system_fingerprint"):
                        held = _with_fingerprint(held, obj["system_fingerprint"])
                else:
                    if held is not None:
                        self._publish(held)
                        held = None
                    if _finishes(obj):
                        # vLLM puts system_fingerprint on the finish chunk, or (asked for usage,
                        # as the proxy always does) on the usage chunk, which a client that did
                        # not ask never sees: hold the finish chunk until the next event
                        held = frame
                    else:
                        self._publish(frame)
                self.started = True
                self._notify()
                event = await _next_event(opened.resp)
            if held is not None:
                self._publish(held)
        except TimeoutError:
            opened.close(ok=False)
            self._fail(upstream_timeout(f"tier {self.tier.name}: stream stalled"))
            return
        except (aiohttp.ClientError, OSError):
            opened.close(ok=False)
            self._fail(upstream_unavailable(
                f"tier {self.tier.name}: upstream connection lost mid-stream"))
            return
        if not finished:
            opened.close(ok=False)
            self._fail(upstream_unavailable(
                f"tier {self.tier.name}: upstream stream ended before [DONE]"))
            return
        opened.close(reuse=True, ok=True)
        pt, ct = usage_of({"usage": asm.usage})
        if asm.cacheable:
            self._complete(asm.body(), None, pt, ct)
        else:
            pt, ct = self.usage = self._usage(asm.body(), pt, ct)
            self.metrics.spend(self.tier.cfg, self.namespace, pt, ct)
            self.metrics.cache_skips.labels("not_cacheable").inc()
        self.done = True
        self._notify()


def _finishes(obj: Any) -> bool:
    """A chunk that finishes a choice and carries no system_fingerprint."""
    return (isinstance(obj, dict) and "system_fingerprint" not in obj and
            any(isinstance(c, dict) and c.get("finish_reason")
                for c in obj.get("choices") or ()))


def _with_fingerprint(frame: bytes, fingerprint: Any) -> bytes:
    """A held finish chunk with the usage chunk's system_fingerprint added."""
    obj = orjson.loads(frame[6:])
    obj["system_fingerprint"] = fingerprint
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _stream_error(tier: str, error: Any, started: bool) -> ProxyError:
    """An error event from the upstream. Before anything was sent (vLLM refuses some requests
    inside a 200 stream), a 4xx with vLLM's message; after, an error event with its message."""
    err = error if isinstance(error, dict) else {"message": str(error)}
    message = str(err.get("message") or "upstream error")
    code = err.get("code")
    param = err.get("param") if isinstance(err.get("param"), str) else None
    if not started and isinstance(code, int) and 400 <= code < 500:
        return ProxyError(code, message, err_type="invalid_request_error", param=param,
                          code=f"upstream_{code}")
    return upstream_unavailable(f"tier {tier}: upstream error mid-stream: {message[:500]}")


def _error_in_ok(obj: Any) -> str | None:
    """What is wrong with a 200 JSON body that is not an answer: its error message, or a
    description; None for an answer (an object with a ``choices`` list)."""
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object"
    err = obj.get("error")
    if err is not None or obj.get("object") == "error":
        inner = err if isinstance(err, dict) else obj
        msg = inner.get("message")
        return (msg if isinstance(msg, str) else str(err))[:500]
    if not isinstance(obj.get("choices"), list):
        return "no 'choices' in the answer"
    return None


async def _next_event(resp: aiohttp.ClientResponse) -> bytes | None:
    """The payload of the next SSE ``data:`` event; None at the end of the body."""
    content = resp.content
    while True:
        try:
            line = await content.readline()
        except (ValueError, HttpProcessingError):  # a line over the reader's limit: a broken
            # upstream, not our bug
            raise aiohttp.ClientPayloadError("SSE line too long") from None
        if not line:
            return None
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data:
                return data
        # blank separators, comments (":") and other fields are skipped


async def drain(flight: Flight) -> None:
    """Wait for a flight to end (JSON subscribers)."""
    while not flight.done:
        await flight.wait()


async def cancel_all(flights: dict[Any, Flight]) -> None:
    """Cancel every flight (shutdown)."""
    tasks = [f._task for f in flights.values() if f._task is not None]
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
