"""One request on its way through the proxy: everything the request path learns about it.

The per-request object of the request path, as uvicorn's ``RequestResponseCycle`` is for a
connection: ``Proxy`` (handlers.py) holds what lives as long as the process, a ``Call`` what
lives as long as one request. The stages of ``Proxy._complete`` fill it in order (body, model
and tier, cache directives, keys, embedding, route), and the response headers are built from it
once, when the answer goes out.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from proxy.validate import header_ok

if TYPE_CHECKING:
    import numpy as np

    from proxy.keys import RequestKeys

_RID_KEY: Final = os.urandom(16)
_rid_counter = itertools.count(1)


def request_id(request: web.Request) -> str:
    """The client's x-request-id, else a keyed hash of this process's counter: unique (96 bits
    per process, under a random key per process), and it tells a caller nothing about how many
    requests others made (a plain counter in the x-request-id header did)."""
    rid = request.headers.get("x-request-id")
    if rid and header_ok(rid, 128):
        return rid  # (a bad one also gets a 400: check_headers)
    return new_request_id()


def new_request_id() -> str:
    """A fresh id: a keyed hash of this process's counter."""
    n = next(_rid_counter).to_bytes(8, "little")
    return hashlib.blake2b(n, digest_size=12, key=_RID_KEY).hexdigest()


def cache_directives(cache_control: str | None) -> tuple[bool, bool]:
    """(lookup, store) from Cache-Control: no-cache skips the lookup, no-store skips both."""
    if not cache_control:
        return True, True
    cc = cache_control.lower()
    if "no-store" in cc:
        return False, False
    if "no-cache" in cc:
        return False, True
    return True, True


class Call:
    """The state of one /v1 completion request, filled in by the stages of the request path."""

    __slots__ = ("body", "cost_usd", "endpoint", "flight_key", "include_usage", "indexed",
                 "joined", "keys", "lookup", "max_tokens", "model", "namespace", "outcome",
                 "raw", "request", "request_id", "route_score", "routed", "sampled", "saved_usd",
                 "similarity", "store", "stored_tier", "stream", "t0", "tier", "ttfb", "usage",
                 "vec")

    def __init__(self, request: web.Request, endpoint: str, t0: float) -> None:
        self.request = request
        self.request_id = request_id(request)
        self._start(endpoint, t0)

    @classmethod
    def replayed(cls, endpoint: str, t0: float, rid: str) -> Call:
        """A call answered by the exact-hit fast path (proxy/fastpath.py): no aiohttp request
        object exists for it."""
        call = cls.__new__(cls)
        call.request = None  # type: ignore[assignment]
        call.request_id = rid
        call._start(endpoint, t0)
        return call

    def _start(self, endpoint: str, t0: float) -> None:
        self.endpoint = endpoint            # the API route: keys.CHAT or keys.COMPLETIONS
        self.t0 = t0                        # perf_counter at arrival
        self.body: dict[str, Any] = {}      # the validated JSON body
        self.raw = b""                      # the body's bytes (the fast path learns them)
        self.model = ""
        self.tier = ""                      # the tier that serves it (x-route-tier)
        self.routed = False                 # model "auto" or an alias: the router chooses
        self.stream = False
        self.include_usage = False          # the client asked for the usage frame
        self.max_tokens: int | None = None
        self.lookup = False                 # may a cache answer it (Cache-Control, config)
        self.store = False                  # may its answer be stored
        self.namespace = ""
        self.keys: RequestKeys | None = None
        # identical requests (same key, form and token limit) share a flight
        self.flight_key: tuple[bytes, bool, int | None] | None = None
        self.vec: np.ndarray | None = None  # the query's embedding (semantic layer, router)
        self.outcome = ""                   # x-cache: hit-exact, hit-semantic, miss, bypass
        self.route_score: str | None = None
        self.similarity: str | None = None
        self.stored_tier: str | None = None  # its answer was stored, made by this tier
        self.indexed = False                # its vector went into the semantic index
        self.sampled: str | None = None     # cache.sampled, for a sampled request
        # what it cost, for the event log (proxy/events.py), filled where the answer goes out
        self.joined = False                 # served by an identical request's upstream call
        self.usage: tuple[int, int] = (0, 0)  # prompt, completion tokens of the answer
        self.cost_usd = 0.0                 # spent on the upstream for it
        self.saved_usd = 0.0                # a hit's (or a join's) saving
        self.ttfb: float | None = None      # perf_counter when the first byte went out

    def headers(self) -> dict[str, str]:
        """The proxy's response headers for this request, as far as it got."""
        h = {"x-request-id": self.request_id}
        if self.tier:
            h["x-route-tier"] = self.tier
        if self.keys is not None:
            h["x-cache-key"] = self.keys.exact.hex()  # what /admin/purge takes
        if self.outcome:
            h["x-cache"] = self.outcome
        if self.route_score is not None:
            h["x-route-score"] = self.route_score
        if self.similarity is not None:
            h["x-cache-similarity"] = self.similarity
        if self.sampled is not None:
            h["x-cache-sampled"] = self.sampled
        return h
