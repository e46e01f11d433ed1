"""The exact cache: L1 bounds and TTL, the Redis L2, Redis going away and coming back, and two
proxy processes sharing one Redis."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest

from proxy.answer import CachedAnswer
from proxy.config import CacheConfig
from proxy.exact import ExactCache, L1Cache
from proxy.metrics import Metrics
from tests.conftest import RedisServer, free_port, run_cli

MSG = [{"role": "user", "content": "Shared across sidecars?"}]


def answer(n: int = 100) -> CachedAnswer:
    return CachedAnswer("chat", b"x" * n, "small", 1, 2)


def test_l1_lru_byte_bound_and_ttl() -> None:
    size = answer().size
    l1 = L1Cache(max_bytes=size * 3, max_entries=100, ttl_s=10)
    for i in range(4):
        l1.set(bytes([i]), answer(), now=0)
    assert len(l1) == 3 and l1.get(b"\x00", 0) is None and l1.evictions == 1
    assert l1.get(b"\x01", now=1) is not None  # refreshes 1: 2 is now the oldest
    l1.set(b"\x09", answer(), now=1)
    assert l1.get(b"\x02", 1) is None and l1.get(b"\x01", 1) is not None
    assert l1.get(b"\x01", now=11.5) is None  # expired
    assert l1.bytes == sum(answer().size for _ in range(len(l1)))
    small = L1Cache(max_bytes=10, max_entries=100, ttl_s=10)
    small.set(b"big", answer(), now=0)
    assert len(small) == 0


def test_l1_entry_bound() -> None:
    l1 = L1Cache(max_bytes=1 << 30, max_entries=2, ttl_s=10)
    for i in range(5):
        l1.set(bytes([i]), answer(), now=0)
    assert len(l1) == 2


def test_answer_serialization_roundtrip() -> None:
    a = CachedAnswer("chat", b'{"choices":[]}', "large", 10, 20, created=123.5)
    b = CachedAnswer.loads(a.dumps())
    assert b is not None
    assert (b.endpoint, b.body, b.tier, b.prompt_tokens, b.completion_tokens, b.created) == \
        ("chat", b'{"choices":[]}', "large", 10, 20, 123.5)
    assert CachedAnswer.loads(b"garbage") is None
    assert CachedAnswer.loads(b"EPA1\n{bad json\nbody") is None


async def test_redis_l2_shared_and_survives_outage(redis_prefix) -> None:
    server = RedisServer()
    server.start()
    try:
        cfg = CacheConfig(redis_url=server.url, redis_prefix=redis_prefix, redis_timeout_s=0.2)
        a, b = ExactCache(cfg, Metrics()), ExactCache(cfg, Metrics())
        await a.start()
        await b.start()
        a.put(b"k" * 16, answer(), "ns")
        for _ in range(50):
            got = await b.get_l2(b"k" * 16, "ns")
            if got is not None:
                break
            await asyncio.sleep(0.01)
        assert got is not None and got.body == answer().body
        assert b.get_l1(b"k" * 16) is not None  # L2 hit filled L1

        server.stop()
        t0 = time.perf_counter()
        assert await b.get_l2(b"z" * 16, "ns") is None
        assert not b.l2.up
        # while down, L2 is skipped without waiting on connects
        t1 = time.perf_counter()
        for _ in range(20):
            assert await b.get_l2(b"z" * 16, "ns") is None
        assert time.perf_counter() - t1 < 0.05
        assert time.perf_counter() - t0 < 2
        assert b.get_l1(b"k" * 16) is not None  # L1 still serves

        server.start()
        for _ in range(100):
            if b.l2.up:
                break
            await asyncio.sleep(0.05)
        assert b.l2.up
        b.put(b"n" * 16, answer(7), "ns")
        await asyncio.sleep(0.1)
        assert (await a.get_l2(b"n" * 16, "ns")) is not None or not a.l2.up
        await a.close()
        await b.close()
    finally:
        server.stop()


async def test_proxy_keeps_serving_without_redis(make_proxy, tiers) -> None:
    p = await make_proxy(cache={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    client = p.client()
    r1 = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    r2 = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert r1.headers["x-cache"] == "miss" and r2.headers["x-cache"] == "hit-exact"
    async with aiohttp.ClientSession() as s, s.get(p.url + "/readyz") as r:
        body = await r.json()
    assert r.status == 200 and body["redis"] == "down" and body["status"] == "degraded"
    async with aiohttp.ClientSession() as s, s.get(p.url + "/metrics") as r:
        assert "edge_proxy_redis_up 0.0" in await r.text()


async def wait_http(url: str, proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode())
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@pytest.mark.parametrize("stream", [False, True])
async def test_two_proxy_processes_share_one_redis(tiers, redis_url, redis_prefix,
                                                   stream) -> None:
    ports = [free_port(), free_port()]
    env = {"EDGE_PROXY_CACHE__REDIS_PREFIX": redis_prefix}
    procs = [run_cli("serve", "--port", str(port), "--tier", f"small={tiers['small'].url}",
                     "--redis", redis_url, env=env) for port in ports]
    try:
        for port, proc in zip(ports, procs, strict=True):
            await wait_http(f"http://127.0.0.1:{port}/readyz", proc)
        a, b = (openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-x",
                                   max_retries=0) for port in ports)
        first = await a.chat.completions.create(model="auto", messages=MSG)
        # the L2 write is in the background: wait for it rather than ask B early (an early miss
        # at B would call the upstream and store B's own copy)
        import redis as redis_sync

        rc = redis_sync.Redis.from_url(redis_url)
        try:
            for _ in range(100):
                if any(True for _ in rc.scan_iter(match=redis_prefix + "x:*")):
                    break
                await asyncio.sleep(0.02)
        finally:
            rc.close()
        r = await b.chat.completions.with_raw_response.create(model="auto", messages=MSG,
                                                              stream=stream)
        assert r.headers["x-cache"] == "hit-exact"
        if stream:
            text = "".join([c.choices[0].delta.content or "" async for c in r.parse()
                            if c.choices])
        else:
            text = r.parse().choices[0].message.content
        assert text == first.choices[0].message.content
        assert tiers["small"].mock.requests == 1
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


async def test_json_access_log_never_shows_the_api_key(tiers) -> None:
    import json

    port = free_port()
    proc = run_cli("serve", "--port", str(port), "--tier", f"small={tiers['small'].url}",
                   env={"EDGE_PROXY_SERVER__ACCESS_LOG": "true"})
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                    api_key="sk-very-secret-key", max_retries=0)
        await client.chat.completions.create(model="auto", messages=MSG)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode()
    # JSON lines: the whole line is the object (other logs go to stderr, with a prefix)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    chat = [e for e in lines if e["path"] == "/v1/chat/completions"]
    assert chat and chat[0]["status"] == 200 and chat[0]["cache"] == "miss"
    assert chat[0]["tier"] == "small" and chat[0]["ms"] > 0
    assert "sk-very-secret-key" not in out
