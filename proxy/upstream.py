"""Per-tier upstream clients: keep-alive pools to vLLM base URLs, least-in-flight balancing,
model discovery, and opening one request with connect / first-byte timeouts.

Fallback across tiers and the streaming tee live in ``flight.py``; this module knows one tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, Final

import aiohttp
import orjson

from proxy.config import TierConfig
from proxy.errors import ProxyError, upstream_timeout, upstream_unavailable
from proxy.metrics import Metrics

log = logging.getLogger(__name__)


class UpstreamFailure(Exception):
    """A tier failed before anything reached the client; another tier may be tried."""

    def __init__(self, error: ProxyError, kind: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.kind = kind


class Upstream:
    """One vLLM base URL of a tier, with its circuit breaker.

    closed: requests flow; ``breaker_failures`` consecutive failures open it. open: no requests
    for ``breaker_cooldown_s``; then half-open: one probe request is let through, its success
    closes the breaker, its failure opens it again for another cool-down.
    """

    __slots__ = ("cooldown_s", "failures", "healthy", "in_flight", "last_kind", "max_failures",
                 "opened_at", "probing", "state", "url")

    CLOSED: Final = "closed"
    OPEN: Final = "open"
    HALF_OPEN: Final = "half_open"

    def __init__(self, url: str, max_failures: int = 5, cooldown_s: float = 10.0) -> None:
        self.url = url
        self.in_flight = 0
        self.failures = 0
        self.max_failures = max_failures
        self.cooldown_s = cooldown_s
        self.state = self.CLOSED
        self.opened_at = 0.0
        self.probing = False
        #: False while its health check fails (or a connection to it was refused since)
        self.healthy = True
        self.last_kind = ""  # what the last failure was: "connect" or another kind

    def available(self, now: float) -> bool:
        """May a request go to this upstream now? (Moves open -> half-open after cool-down.)"""
        if not self.healthy:
            return False
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN and now - self.opened_at >= self.cooldown_s:
            self.state = self.HALF_OPEN
            self.probing = False
        return self.state == self.HALF_OPEN and not self.probing

    def on_success(self) -> None:
        self.failures = 0
        self.state = self.CLOSED
        self.probing = False

    def on_failure(self, now: float, kind: str = "") -> None:
        self.last_kind = kind
        self.failures += 1
        self.probing = False
        if self.state == self.HALF_OPEN or self.failures >= self.max_failures:
            if self.state != self.OPEN:
                log.warning("breaker open for %s after %d failures", self.url, self.failures)
            self.state = self.OPEN
            self.opened_at = now

    def on_health(self, ok: bool) -> bool:
        """A health check's result; True when it changed whether the upstream is up.

        A healthy answer also closes a breaker that opened because the upstream could not be
        reached (it can be now); one opened by 5xx answers keeps its cool-down, since a vLLM
        that answers /health may still fail requests."""
        changed = ok != self.healthy
        self.healthy = ok
        if ok and self.state != self.CLOSED and self.last_kind == "connect":
            self.on_success()
            changed = True
        return changed


def error_from_upstream(status: int, raw: bytes) -> ProxyError:
    """Translate a vLLM error body ({"object":"error","message",...} or OpenAI's) to ours."""
    message, etype, param = f"upstream returned HTTP {status}", "upstream_error", None
    try:
        obj = orjson.loads(raw)
        if isinstance(obj, dict):
            err = obj.get("error")
            inner = err if isinstance(err, dict) else obj
            message = str(inner.get("message") or message)
            param = inner.get("param") if isinstance(inner.get("param"), str) else None
            if 400 <= status < 500:
                etype = "invalid_request_error"
    except orjson.JSONDecodeError:
        if raw:
            message = f"{message}: {raw[:200].decode('utf-8', 'replace')}"
    if status >= 500 or status < 400:  # 5xx, or a 1xx/3xx: redirects are never followed
        return upstream_unavailable(f"upstream error (HTTP {status}): {message}")
    return ProxyError(status, message, err_type=etype, param=param, code=f"upstream_{status}")


class TierClient:
    """The client side of one tier."""

    def __init__(self, cfg: TierConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.model = cfg.model
        self.metrics = metrics
        self.upstreams = [Upstream(u, cfg.breaker_failures, cfg.breaker_cooldown_s)
                          for u in cfg.urls]
        self.active = 0  # requests holding a concurrency slot
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.session: aiohttp.ClientSession | None = None
        self._inflight_gauge = metrics.upstream_inflight.labels(cfg.name)
        #: what /v1/models reports for the checkpoint (part of the cache key: a new checkpoint
        #: under the same served name must not be served the old one's answers)
        self.root = ""
        self.max_model_len = 0
        self.identity = cfg.model
        self.discovery_error = ""
        #: called when the served model or its identity changed (the proxy re-indexes)
        self.on_change: Callable[[], None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._checked_at = 0.0
        auth = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self._auth = auth
        self._headers = {"Content-Type": "application/json", **auth}

    async def start(self) -> None:
        """Open the keep-alive pool, try once to learn the served model, then keep watching
        (health checks, model identity) in the background: the proxy starts whatever the
        upstreams' state, and a tier whose model is not known yet is simply not ready."""
        connector = aiohttp.TCPConnector(limit=self.cfg.max_concurrency, limit_per_host=0,
                                         keepalive_timeout=60, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=self.cfg.total_timeout_s,
                                        sock_connect=self.cfg.connect_timeout_s,
                                        sock_read=self.cfg.first_token_timeout_s)
        # A stream may idle at most first_token_timeout_s between events; a JSON answer is
        # silent until it is complete, so only the total bounds it.
        self._stream_timeout = timeout
        self._json_timeout = aiohttp.ClientTimeout(total=self.cfg.total_timeout_s,
                                                   sock_connect=self.cfg.connect_timeout_s)
        # auto_decompress off: we relay bytes; json_serialize unused (bodies are pre-encoded)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                             auto_decompress=False)
        try:
            await self.discover()
        except RuntimeError as exc:
            log.warning("%s; retrying in the background", exc)
        self._watch_task = asyncio.create_task(self._watch())

    def auth_headers(self, client_auth: str | None) -> dict[str, str]:
        """The Authorization for an upstream request: the client's (forward_auth) or the
        tier's api_key, or none."""
        if client_auth and self.cfg.forward_auth:
            return {"Authorization": client_auth}
        return self._auth

    @property
    def ready(self) -> bool:
        """The served model is known."""
        return bool(self.model)

    @property
    def up(self) -> bool:
        """Some upstream is healthy with its breaker not open."""
        now = time.monotonic()
        return any(ep.healthy and (ep.state != Upstream.OPEN or
                                   now - ep.opened_at >= ep.cooldown_s) for ep in self.upstreams)

    def state(self) -> dict[str, Any]:
        """For /readyz and /health."""
        return {"model": self.model, "ready": self.ready, "up": self.up,
                **({"error": self.discovery_error} if self.discovery_error else {}),
                "endpoints": [{"url": e.url, "healthy": e.healthy, "breaker": e.state}
                              for e in self.upstreams]}

    async def _watch(self) -> None:
        """Health checks every health_interval_s; /v1/models until the model is known, then
        every model_check_interval_s."""
        cfg = self.cfg
        while True:
            await asyncio.sleep(cfg.health_interval_s)
            try:
                if cfg.health_path:
                    await asyncio.gather(*(self._check_health(ep) for ep in self.upstreams))
                if (not self.model or not self._checked_at or
                        time.monotonic() - self._checked_at >= cfg.model_check_interval_s):
                    with contextlib.suppress(RuntimeError):
                        await self.discover(quiet=bool(self.discovery_error))
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the watcher die
                log.exception("tier %s: health/model check failed", self.name)

    async def _check_health(self, ep: Upstream) -> None:
        assert self.session is not None
        try:
            async with self.session.get(ep.url + self.cfg.health_path, headers=self._auth,
                                        timeout=aiohttp.ClientTimeout(
                                            total=max(self.cfg.health_interval_s, 1.0))) as r:
                ok = r.status == 200
                await r.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok = False
        if ep.on_health(ok):
            if ok:
                log.warning("tier %s: upstream %s is up", self.name, ep.url)
            else:
                log.warning("tier %s: upstream %s is down (health check failed)", self.name,
                            ep.url)

    def stats(self) -> dict[str, Any]:
        """For the admin API: model, slots in use, each upstream's breaker state and load."""
        return {"model": self.model, "active": self.active,
                "endpoints": [{"url": e.url, "state": e.state, "in_flight": e.in_flight}
                              for e in self.upstreams]}

    async def discover(self, quiet: bool = False) -> str:
        """Ask each base URL's /v1/models for the served model and its checkpoint identity;
        the first answer wins. Raises RuntimeError naming every upstream's failure."""
        assert self.session is not None
        errors = []
        for ep in self.upstreams:
            try:
                async with self.session.get(ep.url + "/v1/models", headers=self._auth,
                                            timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status in (401, 403):
                        errors.append(f"{ep.url}: HTTP {r.status} (set tiers.{self.name}.api_key)")
                        continue
                    if r.status != 200:
                        errors.append(f"{ep.url}: HTTP {r.status}")
                        continue
                    data = await r.json(loads=orjson.loads, content_type=None)
                    entries = data["data"]
                    entry = entries[0]
                    if self.cfg.model:  # configured: that entry, if listed
                        entry = next((e for e in entries if e.get("id") == self.cfg.model),
                                     entry)
                    self._learn(str(self.cfg.model or entry["id"]), entry)
                    return self.model
            except (TimeoutError, aiohttp.ClientError, KeyError, IndexError, ValueError,
                    TypeError, AttributeError) as exc:
                errors.append(f"{ep.url}: {type(exc).__name__}" + (f" {exc}" if str(exc) else ""))
        self.discovery_error = f"no upstream answered /v1/models ({'; '.join(errors)})"
        msg = f"tier {self.name}: {self.discovery_error}"
        if not quiet:
            log.warning("%s", msg)
        raise RuntimeError(msg)

    def _learn(self, model: str, entry: dict[str, Any]) -> None:
        self._checked_at = time.monotonic()
        self.discovery_error = ""
        root = str(entry.get("root") or "")
        max_len = entry.get("max_model_len")
        identity = f"{model}|{root}|{max_len if isinstance(max_len, int) else ''}"
        changed = identity != self.identity or model != self.model
        if self.root and identity != self.identity:
            log.warning("tier %s: upstream model changed: %r -> %r", self.name, self.identity,
                        identity)
        elif changed:
            log.info("tier %s serves %r (root %r, max_model_len %s)", self.name, model, root,
                     max_len)
        self.model, self.root = model, root
        self.max_model_len = max_len if isinstance(max_len, int) else 0
        self.identity = identity
        if changed and self.on_change is not None:
            self.on_change()

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        if self.session is not None:
            await self.session.close()

    def pick(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        """The available upstream with the fewest requests in flight; None if all breakers
        are open."""
        now = time.monotonic()
        best: Upstream | None = None
        for ep in self.upstreams:
            if ep in exclude or not ep.available(now):
                continue
            if best is None or ep.in_flight < best.in_flight:
                best = ep
        return best

    @property
    def breaker_open(self) -> bool:
        """True when no upstream of this tier accepts requests now."""
        return self.pick() is None

    async def _admit(self) -> None:
        """Take a concurrency slot, waiting in a bounded queue; 429 when the queue is full."""
        if self.active < self.cfg.max_concurrency and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.cfg.max_queue:
            raise UpstreamFailure(ProxyError(
                429, f"tier {self.name} is at capacity ({self.cfg.max_concurrency} in flight, "
                f"{self.cfg.max_queue} queued); retry later", err_type="rate_limit_error",
                code="tier_overloaded", headers={"Retry-After": "1"}), "overloaded")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.cfg.queue_timeout_s):
                await fut
        except TimeoutError:
            raise UpstreamFailure(ProxyError(
                429, f"tier {self.name}: waited {self.cfg.queue_timeout_s} s for a slot; retry "
                "later", err_type="rate_limit_error", code="tier_overloaded",
                headers={"Retry-After": "1"}), "overloaded") from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._leave()  # the slot was handed to us: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of the tier's concurrency slots for a request made outside ``open`` (the
        pass-through relay): waits in the same bounded queue, UpstreamFailure (429) past it."""
        await self._admit()
        try:
            yield
        finally:
            self._leave()

    def _leave(self) -> None:
        """Give a slot back, directly to the first waiter if any."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to this waiter; active is unchanged
                return
        self.active -= 1

    async def open(self, path: str, payload: dict[str, Any], stream: bool,
                   auth: str | None = None) -> OpenResponse:
        """Send one request; return the response once its headers arrived with status 200.

        A refused connection is retried on the tier's next upstream (safe: nothing was sent).
        Raises UpstreamFailure (refused, timeout, 5xx, breaker open, overloaded, a stream
        without SSE) when another tier may be tried, ProxyError for a 4xx the client must see.
        """
        assert self.session is not None
        if not self.model:
            raise UpstreamFailure(upstream_unavailable(
                f"tier {self.name}: not ready ({self.discovery_error or 'model unknown'})"),
                "not_ready")
        headers = self._headers
        if auth and self.cfg.forward_auth:
            headers = {"Content-Type": "application/json", **self.auth_headers(auth)}
        await self._admit()
        data = orjson.dumps({**payload, "model": self.model})
        tried: list[Upstream] = []
        while True:
            ep = self.pick(tried)
            if ep is None:
                self._leave()
                if tried:
                    raise UpstreamFailure(upstream_unavailable(
                        f"tier {self.name}: every upstream refused the connection"), "connect")
                raise UpstreamFailure(upstream_unavailable(
                    f"tier {self.name}: circuit breaker open for every upstream"), "breaker_open")
            tried.append(ep)
            try:
                return await self._send(ep, path, data, stream, headers)
            except _Refused:
                continue
            except BaseException:
                self._leave()
                raise

    async def _send(self, ep: Upstream, path: str, data: bytes, stream: bool,
                    headers: dict[str, str]) -> OpenResponse:
        assert self.session is not None
        ep.in_flight += 1
        if ep.state == Upstream.HALF_OPEN:
            ep.probing = True
        self._inflight_gauge.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                ep.in_flight -= 1
                self._inflight_gauge.dec()

        def fail(err: ProxyError, kind: str) -> UpstreamFailure:
            release()
            ep.on_failure(time.monotonic(), kind)
            if kind == "connect" and self.cfg.health_path:
                ep.healthy = False  # skipped until its health check answers again
            return UpstreamFailure(err, kind)

        try:
            # allow_redirects=False: a redirect (to another host) is an upstream failure
            resp = await self.session.post(ep.url + path, data=data, headers=headers,
                                           allow_redirects=False,
                                           timeout=self._stream_timeout if stream
                                           else self._json_timeout)
        except TimeoutError:
            raise fail(upstream_timeout(f"tier {self.name}: no response from {ep.url} in time"),
                       "timeout") from None
        except aiohttp.ClientConnectorError:
            fail(upstream_unavailable(""), "connect")
            raise _Refused() from None
        except (aiohttp.ClientError, OSError) as exc:
            raise fail(upstream_unavailable(
                f"tier {self.name}: upstream {ep.url} failed ({type(exc).__name__})"),
                "connect") from None
        except BaseException:
            release()
            raise
        if resp.status != 200:
            try:
                raw = await resp.read()
            except (TimeoutError, aiohttp.ClientError):
                raw = b""
            finally:
                resp.release()
            err = error_from_upstream(resp.status, raw)
            if resp.status >= 500 or resp.status == 429 or resp.status < 400:
                raise fail(err, f"http_{resp.status}")
            release()
            ep.on_success()  # a 4xx is the request's fault, not the upstream's
            raise err
        ctype = resp.headers.get("Content-Type", "")
        expected = "text/event-stream" if stream else "application/json"
        if not ctype.startswith(expected):
            detail = f"upstream sent content-type {ctype!r}, expected {expected}"
            if stream and ctype.startswith("application/json"):
                # a 200 carrying an error instead of a stream: pass its message on
                try:
                    raw = await read_limited(resp, 65536, self.name)
                    detail = "upstream answered 200 with an error: " + \
                        error_from_upstream(502, raw).message.partition(": ")[2]
                except (TimeoutError, UpstreamFailure, aiohttp.ClientError):
                    pass
            resp.close()
            raise fail(upstream_unavailable(f"tier {self.name}: {detail}"), "content_type")
        return OpenResponse(resp, ep, release, self._leave)


async def read_limited(resp: aiohttp.ClientResponse, limit: int, tier: str) -> bytes:
    """The whole body, or UpstreamFailure past ``limit`` bytes (never buffers more)."""
    too_large = UpstreamFailure(upstream_unavailable(
        f"tier {tier}: upstream answer larger than {limit} bytes"), "too_large")
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        buf += chunk
        if len(buf) > limit:
            raise too_large
    return bytes(buf)


class _Refused(Exception):
    """Connection refused: nothing was sent, another upstream may be tried."""


class OpenResponse:
    """A 200 response being read; ``close`` frees its connection and its slots."""

    __slots__ = ("_closed", "_leave", "_release", "resp", "upstream")

    def __init__(self, resp: aiohttp.ClientResponse, upstream: Upstream,
                 release: Callable[[], None], leave: Callable[[], None]) -> None:
        self.resp = resp
        self.upstream = upstream
        self._release = release
        self._leave = leave
        self._closed = False

    def close(self, reuse: bool = False, ok: bool | None = None) -> None:
        """Give the connection back to the pool (``reuse``, after a complete read) or drop it
        (a cancelled or broken stream: closing it is what cancels the request in vLLM).
        ``ok`` tells the upstream's breaker how the response ended."""
        if self._closed:
            return
        self._closed = True
        if reuse:
            self.resp.release()
        else:
            self.resp.close()
        if ok is True:
            self.upstream.on_success()
        elif ok is False:
            self.upstream.on_failure(time.monotonic())
        self._release()
        self._leave()
