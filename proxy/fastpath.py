"""The exact-hit fast path: a repeated request answered from L1 below aiohttp's request layer.

An exact hit costs the proxy little (a key digest, an L1 lookup, a replay), yet aiohttp's server
layer around it (a ``Request``, a task, a ``StreamWriter``, a ``Response`` and its headers)
costs more per request than a whole bare aiohttp handler (benchmarks/README.md). Most exact
hits are the *same bytes* again: a client retrying, a batch job re-run, a popular prompt from
one SDK. So:

- **learn**: when the normal path serves an exact hit, it records the request exactly as
  aiohttp's parser delivered it (raw path, raw header lines, body bytes) together with what the
  normal path derived from it (namespace, exact key, stream form, token limit, tier): a
  ``HitPlan``. The memo's key is those bytes themselves, compared for equality, not a digest:
  the Authorization header is in them, so a plan is only ever found by a request carrying the
  same credential, namespace header and body, and no collision can cross tenants.
- **serve**: ``FastHandler`` (aiohttp's ``RequestHandler``) lets aiohttp's own parser read
  every byte, so message boundaries, limits and errors are aiohttp's. When an idle keep-alive
  connection delivers exactly one complete request whose bytes are in the memo and whose entry
  is still in L1, the answer is written at once from ``Proxy.replay_exact`` (a fresh request
  id, the ledger record, metrics, event log, the same headers as the normal path). Anything
  else (a busy or pipelined connection, an unknown request, an entry gone from L1 or too long
  for the token limit) goes to aiohttp's normal path untouched.

The memo is bounded in entries and bytes, holds no answers (L1 does), and is cleared whenever
what a plan was derived from may change: a configuration reload, a tier's model identity.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import sys
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web_protocol
from aiohttp.http import SERVER_SOFTWARE

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.call import Call

log = logging.getLogger(__name__)

#: Requests with a larger body are not memoised (their bytes would crowd the memo).
MAX_BODY_BYTES: Final = 8192
#: Answers are written here only while the connection's write buffer holds less than this
#: (aiohttp's own high-water mark); a client that does not read its answers goes to the
#: normal path, whose drain and read pause bound what it can make the proxy buffer.
MAX_WRITE_BUFFER: Final = 64 * 1024
#: Seconds a known head may wait for the rest of its body here; then aiohttp's handler takes
#: the request (and applies server.body_timeout_s from there).
HOLD_S: Final = 1.0
#: The attributes of aiohttp's RequestHandler and StreamReader the fast path relies on; on an
#: aiohttp without them the fast path stays off (tests/test_fastpath.py fails loudly).
_NEEDS: Final = ("_waiter", "_messages", "_parser", "_payload_parser", "_upgraded",
                 "_next_keepalive_close_time", "_keepalive_timeout", "_force_close", "_close",
                 "_buffer_paused", "_msg_queue_resume_size", "_resume_reading_if_drained",
                 "access_logger", "_logging_enabled", "_paused")

RawKey = tuple[str, tuple[tuple[bytes, bytes], ...], bytes]


def supported() -> bool:
    """Whether this aiohttp has what FastHandler needs."""
    slots: set[str] = set()
    for cls in web_protocol.RequestHandler.__mro__:
        slots.update(getattr(cls, "__slots__", ()))
        slots.update(vars(cls))
    return all(n in slots for n in _NEEDS)


class HitPlan:
    """What the normal path derived from one exact request: enough to replay its hit."""

    __slots__ = ("client_rid", "endpoint", "include_usage", "keys", "max_tokens", "model",
                 "namespace", "routed", "sampled", "size", "stream", "tier")

    def __init__(self, call: Call, client_rid: str | None, size: int) -> None:
        assert call.keys is not None
        self.keys = call.keys                # the exact key, x-cache-key, the query text
        self.namespace = call.namespace
        self.endpoint = call.endpoint
        self.model = call.model
        self.tier = call.tier                # the tier the request resolved to (not routed)
        self.routed = call.routed
        self.sampled = call.sampled          # x-cache-sampled
        self.stream = call.stream
        self.include_usage = call.include_usage
        self.max_tokens = call.max_tokens
        self.client_rid = client_rid         # the client's own x-request-id, echoed
        self.size = size                     # bytes this plan's key holds


class HitMemo:
    """Raw request -> HitPlan, LRU, bounded in entries and in the bytes of the keys."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[RawKey, HitPlan] = OrderedDict()
        # (path, header lines) of the plans, counted: a head worth waiting for its body
        self._heads: dict[tuple[str, tuple[tuple[bytes, bytes], ...]], int] = {}
        self.served = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: RawKey) -> HitPlan | None:
        return self._d.get(key)

    def knows_head(self, path: str, raw_headers: tuple[tuple[bytes, bytes], ...]) -> bool:
        return (path, raw_headers) in self._heads

    def learn(self, request: web.Request, raw: bytes, call: Call) -> None:
        """Remember an exact hit the normal path just served, when a later identical request
        can be replayed from it (a keep-alive HTTP/1.1 POST with a small Content-Length
        body, no Expect)."""
        given = request.headers
        if (call.keys is None or len(raw) > MAX_BODY_BYTES or not request.keep_alive
                or request.version != (1, 1)
                or not isinstance(request.protocol, FastHandler) or "Expect" in given
                or "Transfer-Encoding" in given or "Upgrade" in given):
            return
        raw_headers = tuple(request.raw_headers)
        key: RawKey = (request.raw_path, raw_headers, raw)
        d = self._d
        if key in d:
            d.move_to_end(key)
            return
        # the key's bytes, the plan's query text (JSON escapes can make it larger than its
        # bytes in the body) and the objects around them
        size = (len(raw) + len(key[0]) + sum(len(k) + len(v) + 80 for k, v in raw_headers)
                + sys.getsizeof(call.keys.query_text) + 600)
        client = request.headers.get("x-request-id")
        d[key] = HitPlan(call, call.request_id if client == call.request_id else None, size)
        heads = self._heads
        head = key[:2]
        heads[head] = heads.get(head, 0) + 1
        self.bytes += size
        while d and (len(d) > self.max_entries or self.bytes > self.max_bytes):
            (path, hdrs, _), old = d.popitem(last=False)
            self.bytes -= old.size
            n = heads.pop((path, hdrs)) - 1
            if n:
                heads[(path, hdrs)] = n

    def clear(self) -> None:
        self._d.clear()
        self._heads.clear()
        self.bytes = 0


_date_cache: list[Any] = [0, b""]


def http_date() -> bytes:
    """The Date header's value, formatted once per second (as aiohttp does)."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = email.utils.formatdate(now, usegmt=True).encode()
    return _date_cache[1]


_SERVER: Final = SERVER_SOFTWARE.encode()


def response_bytes(headers: dict[str, str], body: bytes) -> bytes:
    """A 200 response as aiohttp writes a ``web.Response`` with these headers and body."""
    parts = [b"HTTP/1.1 200 OK\r\n"]
    for k, v in headers.items():
        parts.append(f"{k}: {v}\r\n".encode())
    parts.append(b"Content-Length: %d\r\nDate: %s\r\nServer: %s\r\n\r\n"
                 % (len(body), http_date(), _SERVER))
    parts.append(body)
    return b"".join(parts)


_NO, _WAIT, _SERVED = 0, 1, 2


class FastHandler(web_protocol.RequestHandler):
    """aiohttp's request handler, answering memoised exact hits as soon as their bytes are
    parsed (see the module docstring); every other request takes aiohttp's path."""

    __slots__ = ("_fast", "_hold", "_log", "_off", "_pending")

    def __init__(self, manager: Any, fast: Any, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._fast = fast  # the Proxy: .memo and .replay_exact
        # an access logger that needs aiohttp's request objects: every request of this
        # connection takes the normal path
        access = self.access_logger
        self._log = getattr(access, "log_fields", None) if self._logging_enabled else None
        self._off = access is not None and not hasattr(access, "log_fields")
        # a known head arrived without its body (clients often write them separately): the
        # message waits, unseen by aiohttp's handler, for the rest of its body, HOLD_S at most
        self._pending = False
        self._hold: asyncio.TimerHandle | None = None

    def _release(self) -> None:
        """The held message goes to aiohttp's handler (its body is late, or never came)."""
        self._hold = None
        if self._pending:
            self._pending = False
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _unhold(self) -> None:
        self._pending = False
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._unhold()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        # only an idle connection (its handler waiting for the next request, nothing queued,
        # not inside a body or an upgrade) may be answered here, or answers could reorder
        if not self._pending and (
                self._off or waiter is None or waiter.done() or self._messages
                or self._payload_parser is not None or self._upgraded or not self._fast.memo):
            super().data_received(data)
            return
        # let aiohttp parse, without waking its handler for the message yet
        self._waiter = None
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        messages = self._messages
        if not messages:
            return
        if len(messages) == 1 and not self._upgraded:
            verdict = self._serve(*messages[0])
            if verdict == _SERVED:
                self._unhold()
                messages.popleft()
                if self._parser is not None:
                    self._parser.message_consumed()
                if self._buffer_paused and len(messages) <= self._msg_queue_resume_size:
                    self._resume_reading_if_drained()
                return
            if verdict == _WAIT:
                if not self._pending:  # one deadline from the head's arrival, never extended
                    self._pending = True
                    self._hold = self._loop.call_later(HOLD_S, self._release)
                    # aiohttp's idle timer must not take the held message for idleness
                    self._next_keepalive_close_time = max(
                        self._next_keepalive_close_time, self._loop.time() + HOLD_S + 1.0)
                return
        self._unhold()
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _serve(self, message: Any, payload: Any) -> int:
        """Answer ``message`` from the memo and L1 (_SERVED), wait for the rest of a known
        request's body (_WAIT), or leave it to aiohttp (_NO)."""
        t0 = time.perf_counter()
        if (getattr(message, "method", None) != "POST" or message.should_close
                or message.chunked or message.upgrade or message.version != (1, 1)):
            return _NO
        memo = self._fast.memo
        if not payload.is_eof():
            if payload.exception() is None and memo.knows_head(message.path,
                                                               message.raw_headers):
                return _WAIT
            return _NO
        buf = payload._buffer
        body = buf[0] if len(buf) == 1 else b"".join(buf)
        plan = memo.get((message.path, message.raw_headers, body))
        if plan is None:
            return _NO
        transport = self.transport
        if (transport is None or transport.is_closing() or self._paused
                or transport.get_write_buffer_size() >= MAX_WRITE_BUFFER):
            return _NO  # a client not reading its answers: the normal path's backpressure
        try:
            out = self._fast.replay_exact(plan, t0)
        except Exception:  # never lose a request to the fast path: aiohttp answers it
            log.exception("fast path failed; the request takes the normal path")
            return _NO
        if out is None:
            return _NO
        body, headers = out
        transport.write(response_bytes(headers, body))
        memo.served += 1
        if self._log is not None:
            peer = transport.get_extra_info("peername")
            try:
                self._log("POST", message.url.path, 200, time.perf_counter() - t0, len(body),
                          headers, peer[0] if isinstance(peer, (list, tuple)) else None)
            except Exception:  # the answer is out: a log failure must not drop the connection
                log.exception("access log failed for a fast-path answer")
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        return _SERVED


def handler_factory(server: Any, fast: Any) -> Any:
    """A protocol factory like ``web.Server.__call__`` that builds FastHandlers."""

    def make() -> asyncio.BaseProtocol:
        return FastHandler(server, fast, loop=server._loop, **server._kwargs)

    return make
