"""Per-tier upstream clients: keep-alive pools to vLLM base URLs, least-in-flight balancing,
model discovery, and opening one request with connect / first-byte timeouts.

Fallback across tiers and the streaming tee live in ``flight.py``; this module knows one tier.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

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


class Endpoint:
    """One vLLM base URL of a tier."""

    __slots__ = ("failures", "in_flight", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self.in_flight = 0
        self.failures = 0


def error_from_upstream(status: int, raw: bytes) -> ProxyError:
    """Translate a vLLM error body ({"object":"error","message",...} or OpenAI's) to ours."""
    message, etype, param = f"upstream returned HTTP {status}", "upstream_error", None
    try:
        obj = orjson.loads(raw)
        if isinstance(obj, dict):
            inner = obj.get("error") if isinstance(obj.get("error"), dict) else obj
            message = str(inner.get("message") or message)
            param = inner.get("param") if isinstance(inner.get("param"), str) else None
            if 400 <= status < 500:
                etype = "invalid_request_error"
    except orjson.JSONDecodeError:
        if raw:
            message = f"{message}: {raw[:200].decode('utf-8', 'replace')}"
    if status >= 500:
        return upstream_unavailable(f"upstream error (HTTP {status}): {message}")
    return ProxyError(status, message, err_type=etype, param=param, code=f"upstream_{status}")


class TierClient:
    """The client side of one tier."""

    def __init__(self, cfg: TierConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.model = cfg.model
        self.metrics = metrics
        self.endpoints = [Endpoint(u) for u in cfg.urls]
        self.session: aiohttp.ClientSession | None = None
        self._inflight_gauge = metrics.upstream_inflight.labels(cfg.name)

    async def start(self) -> None:
        """Open the keep-alive pool and learn the served model from /v1/models if not set."""
        connector = aiohttp.TCPConnector(limit=self.cfg.max_concurrency, limit_per_host=0,
                                         keepalive_timeout=60, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=self.cfg.total_timeout_s,
                                        sock_connect=self.cfg.connect_timeout_s,
                                        sock_read=self.cfg.first_token_timeout_s)
        # auto_decompress off: we relay bytes; json_serialize unused (bodies are pre-encoded)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                             auto_decompress=False)
        if not self.model:
            await self.discover()

    async def discover(self) -> str:
        """Ask each base URL's /v1/models for the served model; the first answer wins."""
        assert self.session is not None
        errors = []
        for ep in self.endpoints:
            try:
                async with self.session.get(ep.url + "/v1/models",
                                            timeout=aiohttp.ClientTimeout(total=5)) as r:
                    data = await r.json(loads=orjson.loads)
                    self.model = data["data"][0]["id"]
                    log.info("tier %s serves %r (from %s)", self.name, self.model, ep.url)
                    return self.model
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError,
                    ValueError, TypeError) as exc:
                errors.append(f"{ep.url}: {exc!r}")
        raise RuntimeError(f"tier {self.name}: no upstream answered /v1/models "
                           f"({'; '.join(errors)}); set tiers.{self.name}.model to start anyway")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def pick(self) -> Endpoint:
        """The endpoint with the fewest requests in flight (ties: fewest recent failures)."""
        eps = self.endpoints
        if len(eps) == 1:
            return eps[0]
        return min(eps, key=lambda e: (e.in_flight, e.failures))

    async def open(self, path: str, payload: dict[str, Any], stream: bool) -> OpenResponse:
        """Send one request; return the response once its headers arrived with status 200.

        Raises UpstreamFailure (connection refused, timeout, 5xx, a stream without SSE) when
        another tier may be tried, ProxyError for a 4xx the client must see.
        """
        assert self.session is not None
        ep = self.pick()
        data = orjson.dumps({**payload, "model": self.model})
        ep.in_flight += 1
        self._inflight_gauge.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                ep.in_flight -= 1
                self._inflight_gauge.dec()

        try:
            resp = await self.session.post(ep.url + path, data=data,
                                           headers={"Content-Type": "application/json"})
        except asyncio.TimeoutError:
            release()
            ep.failures += 1
            raise UpstreamFailure(upstream_timeout(
                f"tier {self.name}: no response from {ep.url} in time"), "timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            release()
            ep.failures += 1
            raise UpstreamFailure(upstream_unavailable(
                f"tier {self.name}: upstream {ep.url} unreachable ({type(exc).__name__})"),
                "connect") from None
        except BaseException:
            release()
            raise
        if resp.status != 200:
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                raw = b""
            finally:
                resp.release()
                release()
            err = error_from_upstream(resp.status, raw)
            if resp.status >= 500 or resp.status == 429:
                ep.failures += 1
                raise UpstreamFailure(err, f"http_{resp.status}")
            raise err
        ctype = resp.headers.get("Content-Type", "")
        expected = "text/event-stream" if stream else "application/json"
        if not ctype.startswith(expected):
            resp.close()
            release()
            ep.failures += 1
            raise UpstreamFailure(upstream_unavailable(
                f"tier {self.name}: upstream sent content-type {ctype!r}, expected {expected}"),
                "content_type")
        ep.failures = 0
        return OpenResponse(resp, ep, release)


class OpenResponse:
    """A 200 response being read; ``close`` frees its connection and in-flight slot."""

    __slots__ = ("_release", "endpoint", "resp")

    def __init__(self, resp: aiohttp.ClientResponse, endpoint: Endpoint,
                 release: Callable[[], None]) -> None:
        self.resp = resp
        self.endpoint = endpoint
        self._release = release

    def close(self, reuse: bool = False) -> None:
        """Give the connection back to the pool (``reuse``, after a complete read) or drop it
        (a cancelled or broken stream: closing it is what cancels the request in vLLM)."""
        if reuse:
            self.resp.release()
        else:
            self.resp.close()
        self._release()
