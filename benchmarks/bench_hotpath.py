"""The hot path's small steps: L1 get/set, a Redis GET, SSE replay of a cached answer, and
parse + validate of a request body.

    pytest benchmarks/bench_hotpath.py --benchmark-only --benchmark-columns=min,median,mean,ops

The Redis benchmarks start their own redis-server on a free port (skipped without one on PATH)
and time batches of ``REDIS_BATCH`` sequential GETs in one event-loop turn (one
``run_until_complete`` per batch): per-GET time = the reported time / REDIS_BATCH. On a box shared
with other CPU jobs, read ``min``: it is the cost without interference.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))  # load_exact's helpers

from load_exact import free_port, wait_redis

from proxy.answer import CachedAnswer
from proxy.config import CacheConfig, ServerConfig
from proxy.exact import L1Cache, RedisL2
from proxy.keys import CHAT
from proxy.metrics import Metrics
from proxy.validate import parse_json, validate

N_ENTRIES = 100_000
REDIS_BATCH = 100

WORDS = ("the answer is clear model token cache vector tier proxy stream quick brown fox jumps "
         "over lazy dog edge fast light cost query reply data value result simple more less")
ANSWER_BODY = orjson.dumps({
    "id": "chatcmpl-0123456789abcdef", "object": "chat.completion", "created": 1700000000,
    "model": "small-8b",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(
        WORDS.split()[i % 30] for i in range(40)), "tool_calls": []},
        "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}})

SHORT_REQ = orjson.dumps({"model": "auto", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How do I reset my password?"}]})
LONG_REQ = orjson.dumps({
    "model": "auto", "temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "stream": True,
    "tools": [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}} for i in range(4)],
    "messages": [{"role": "system", "content": "You are a helpful assistant. " * 20}]
    + [{"role": r, "content": f"turn {i}: " + "some earlier conversation text " * 10}
       for i, r in zip(range(10), ["user", "assistant"] * 5, strict=True)]
    + [{"role": "user", "content": "And what about the last question?"}]})


def answer() -> CachedAnswer:
    return CachedAnswer(CHAT, ANSWER_BODY, "small", 12, 40)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


# -- L1 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_l1() -> L1Cache:
    """An L1 at its default entry bound, full."""
    l1 = L1Cache(max_bytes=1 << 40, max_entries=N_ENTRIES, ttl_s=3600)
    a = answer()
    now = time.monotonic()
    for i in range(N_ENTRIES):
        l1.set(key(i), a, now)
    return l1


def test_l1_get_hit(benchmark, full_l1: L1Cache) -> None:
    k, now = key(N_ENTRIES // 2), time.monotonic()
    assert benchmark(full_l1.get, k, now) is not None


def test_l1_get_miss(benchmark, full_l1: L1Cache) -> None:
    k, now = key(N_ENTRIES + 1), time.monotonic()
    assert benchmark(full_l1.get, k, now) is None


def test_l1_set_evicting(benchmark, full_l1: L1Cache) -> None:
    """A new key into the full LRU: insert + evict the oldest."""
    a, now = answer(), time.monotonic()
    counter = iter(range(N_ENTRIES, 1 << 60))
    benchmark(lambda: full_l1.set(key(next(counter)), a, now))
    assert len(full_l1) == N_ENTRIES


# -- Redis ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A private redis-server (no persistence) for this module."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not on PATH")
    port, tmp = free_port(), tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tmp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_redis(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def l2(redis_url: str, loop: asyncio.AbstractEventLoop) -> Iterator[RedisL2]:
    """The proxy's RedisL2 (redis.asyncio + hiredis), with one stored answer."""
    cfg = CacheConfig(redis_url=redis_url, redis_timeout_s=1.0)
    store = RedisL2(cfg, Metrics())
    loop.run_until_complete(store.start())
    assert store.up
    loop.run_until_complete(store.client.set(store.rkey(key(1), "ns"), answer().dumps()))
    yield store
    loop.run_until_complete(store.close())


def test_redis_raw_get_x100(benchmark, l2: RedisL2,
                            loop: asyncio.AbstractEventLoop) -> None:
    """100 sequential redis.asyncio GETs of a stored answer (bytes only)."""
    rkey = l2.rkey(key(1), "ns")

    async def batch() -> bytes | None:
        raw = None
        for _ in range(REDIS_BATCH):
            raw = await l2.client.get(rkey)
        return raw

    raw = benchmark(lambda: loop.run_until_complete(batch()))
    assert raw is not None
    benchmark.extra_info["ops_per_round"] = REDIS_BATCH


def test_l2_get_x100(benchmark, l2: RedisL2,
                     loop: asyncio.AbstractEventLoop) -> None:
    """100 sequential RedisL2.get: GET + parse into a CachedAnswer, as a request does."""

    async def batch() -> CachedAnswer | None:
        a = None
        for _ in range(REDIS_BATCH):
            a = await l2.get(key(1), "ns")
        return a

    got = benchmark(lambda: loop.run_until_complete(batch()))
    assert got is not None and got.body == ANSWER_BODY
    benchmark.extra_info["ops_per_round"] = REDIS_BATCH


# -- SSE replay -------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "usage"])
def test_sse_build(benchmark, include_usage: bool) -> None:
    """First replay of an entry: decode the stored JSON, build the SSE frames."""
    out = benchmark.pedantic(lambda a: a.sse(include_usage), setup=lambda: ((answer(),), {}),
                             rounds=3000, warmup_rounds=50)
    assert out.endswith(b"data: [DONE]\n\n")


def test_sse_cached(benchmark) -> None:
    """Every later replay of the same entry: the bytes built the first time."""
    a = answer()
    a.sse(False)
    assert benchmark(a.sse, False).endswith(b"data: [DONE]\n\n")


# -- parse + validate -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [SHORT_REQ, LONG_REQ], ids=["short", "long"])
def test_parse_validate(benchmark, raw: bytes) -> None:
    cfg = ServerConfig()

    def step() -> dict[str, object]:
        body = parse_json(raw)
        validate(body, CHAT, cfg)
        return body

    assert benchmark(step)["model"] == "auto"


# -- the whole L1 hit in the handler ----------------------------------------------------------


@pytest.fixture(scope="module")
def hit_proxy(loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    """A Proxy (no Redis, no semantic layer) whose L1 holds the answer to SHORT_REQ."""
    from proxy.config import load_config
    from proxy.handlers import Proxy
    from proxy.keys import namespace_of, request_keys

    cfg = load_config(env={}, overrides={"semantic": {"enabled": False}},
                      tier_flags=["small=http://127.0.0.1:9"])

    async def make() -> Proxy:
        return Proxy(cfg, Metrics())

    proxy = loop.run_until_complete(make())
    keys = request_keys(namespace_of(None, "Bearer k"), CHAT, "auto", parse_json(SHORT_REQ))
    proxy.cache.put(keys.exact, answer(), namespace_of(None, "Bearer k"))
    yield proxy


def test_handler_l1_hit_x100(benchmark, hit_proxy: Any,  # type: ignore[no-untyped-def]
                             loop: asyncio.AbstractEventLoop) -> None:
    """100 chat requests answered from L1 by Proxy.chat: read, parse, validate, keys, L1 get,
    response (no socket; aiohttp's mocked request carries the body)."""
    from aiohttp import streams
    from aiohttp.test_utils import make_mocked_request

    headers = {"Authorization": "Bearer k", "Content-Type": "application/json",
               "Content-Length": str(len(SHORT_REQ))}

    def requests() -> tuple[tuple[list[Any]], dict[str, Any]]:
        reqs = []
        for _ in range(REDIS_BATCH):
            payload = streams.StreamReader(mock.Mock(), 2 ** 16, loop=loop)
            payload.feed_data(SHORT_REQ)
            payload.feed_eof()
            reqs.append(make_mocked_request("POST", "/v1/chat/completions", headers=headers,
                                            payload=payload, loop=loop))
        return (reqs,), {}

    async def batch(reqs: list[Any]) -> Any:
        resp = None
        for r in reqs:
            resp = await hit_proxy.chat(r)
        return resp

    resp = benchmark.pedantic(lambda reqs: loop.run_until_complete(batch(reqs)), setup=requests,
                              rounds=200, warmup_rounds=5)
    assert resp.headers["x-cache"] == "hit-exact"
    benchmark.extra_info["ops_per_round"] = REDIS_BATCH
