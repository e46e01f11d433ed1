"""Shared mode: sidecars on one Redis learn from each other's answers (semantic included),
warm restarts replay the stream, purges reach every sidecar, Redis outages are survived."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import openai

from tests.conftest import RedisServer, free_port, run_cli
from tests.test_exact import wait_http

Q1 = [{"role": "user", "content": "How do I reset my password?"}]
Q2 = [{"role": "user", "content": "How can I reset my password?"}]
Q3 = [{"role": "user", "content": "how do i reset my password"}]
ADMIN = {"Authorization": "Bearer adm"}


async def stats(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/stats", headers=ADMIN) as r:
        return await r.json()


def start(port: int, tier_url: str, redis_url: str, prefix: str):
    return run_cli("serve", "--port", str(port), "--tier", f"small={tier_url}", "--redis",
                   redis_url, env={"EDGE_PROXY_CACHE__REDIS_PREFIX": prefix,
                                   "EDGE_PROXY_SERVER__ADMIN_TOKEN": "adm",
                                   "EDGE_PROXY_ROUTER__ENABLED": "false"})


async def test_miss_through_a_is_semantic_hit_through_b_and_survives_restart(
        tiers, redis_url, redis_prefix) -> None:
    ports = [free_port(), free_port()]
    procs = [start(p, tiers["small"].url, redis_url, redis_prefix) for p in ports]
    a_url, b_url = (f"http://127.0.0.1:{p}" for p in ports)
    try:
        for url, proc in zip((a_url, b_url), procs, strict=True):
            await wait_http(url + "/readyz", proc, timeout=60)
        a, b = (openai.AsyncOpenAI(base_url=u + "/v1", api_key="sk-x", max_retries=0)
                for u in (a_url, b_url))
        first = await a.chat.completions.create(model="auto", messages=Q1)
        t_answered = time.perf_counter()
        while (await stats(b_url))["semantic"]["entries"] < 1:
            assert time.perf_counter() - t_answered < 5, "entry never reached B"
            await asyncio.sleep(0.002)
        seen = time.perf_counter() - t_answered
        r = await b.chat.completions.with_raw_response.create(model="auto", messages=Q2)
        assert r.headers["x-cache"] == "hit-semantic"
        assert r.parse().choices[0].message.content == first.choices[0].message.content
        async with aiohttp.ClientSession() as s, s.get(b_url + "/metrics") as resp:
            text = await resp.text()
        lag_sum = float(re.search(r"edge_proxy_shared_propagation_seconds_sum ([\d.e+-]+)",
                                  text).group(1))  # type: ignore[union-attr]
        print(f"propagation: {lag_sum * 1000:.1f} ms (B's histogram), seen by polling after "
              f"{seen * 1000:.1f} ms")
        assert lag_sum < 0.1  # announced and applied within 100 ms
        assert tiers["small"].mock.requests == 1

        # B restarts: the replay makes it warm before it is ready
        procs[1].terminate()
        procs[1].wait(10)
        procs[1] = start(ports[1], tiers["small"].url, redis_url, redis_prefix)
        await wait_http(b_url + "/readyz", procs[1], timeout=60)
        b = openai.AsyncOpenAI(base_url=b_url + "/v1", api_key="sk-x", max_retries=0)
        r = await b.chat.completions.with_raw_response.create(model="auto", messages=Q3)
        assert r.headers["x-cache"] == "hit-semantic"
        assert tiers["small"].mock.requests == 1
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


async def test_purge_reaches_every_sidecar(make_proxy, tiers, redis_url, redis_prefix) -> None:
    cfg = {"cache": {"redis_url": redis_url, "redis_prefix": redis_prefix},
           "server": {"admin_token": "adm"}}
    a, b = await make_proxy(**cfg), await make_proxy(**cfg)
    await a.client(api_key="sk-t").chat.completions.create(model="auto", messages=Q1)
    for _ in range(200):
        if len(b.proxy.semantic.index):
            break
        await asyncio.sleep(0.01)
    assert len(b.proxy.semantic.index) == 1
    ns = next(a.proxy.semantic.index.entries()).namespace
    async with aiohttp.ClientSession() as s, s.post(a.url + "/admin/purge", headers=ADMIN,
                                                    json={"namespace": ns}) as r:
        assert r.status == 200
    for _ in range(200):
        if not len(b.proxy.semantic.index):
            break
        await asyncio.sleep(0.01)
    assert len(b.proxy.semantic.index) == 0 and len(a.proxy.semantic.index) == 0
    # and a newcomer replaying the stream does not resurrect the purged entry
    c = await make_proxy(**cfg)
    assert len(c.proxy.semantic.index) == 0
    r = await c.client(api_key="sk-t").chat.completions.with_raw_response.create(
        model="auto", messages=Q2)
    assert r.headers["x-cache"] == "miss"


async def test_tailer_survives_redis_restart(make_proxy, tiers, redis_prefix) -> None:
    server = RedisServer()
    server.start()
    try:
        cfg = {"cache": {"redis_url": server.url, "redis_prefix": redis_prefix,
                         "redis_timeout_s": 0.2}}
        a, b = await make_proxy(**cfg), await make_proxy(**cfg)
        server.stop()
        # both keep serving while Redis is gone
        r = await a.client().chat.completions.with_raw_response.create(model="auto",
                                                                       messages=Q1)
        assert r.headers["x-cache"] == "miss"
        server.start()
        for _ in range(300):
            if b.proxy.semantic.shared.up and a.proxy.cache.l2.up:
                break
            await asyncio.sleep(0.02)
        assert b.proxy.semantic.shared.up and a.proxy.cache.l2.up
        await a.client().chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "Where is my parcel?"}])
        for _ in range(200):
            if len(b.proxy.semantic.index):
                break
            await asyncio.sleep(0.01)
        assert len(b.proxy.semantic.index) == 1  # the entry published after the restart
    finally:
        server.stop()


async def test_shared_mode_on_a_redis_cluster(make_proxy, tiers, redis_cluster,
                                              redis_prefix) -> None:
    cfg = {"cache": {"redis_url": redis_cluster.url, "redis_cluster": True,
                     "redis_prefix": redis_prefix, "redis_timeout_s": 0.5},
           "server": {"admin_token": "adm"}}
    a, b = await make_proxy(**cfg), await make_proxy(**cfg)
    assert a.proxy.cache.l2.up and b.proxy.cache.l2.up
    ca, cb = a.client(api_key="sk-c"), b.client(api_key="sk-c")
    first = await ca.chat.completions.create(model="auto", messages=Q1)
    for _ in range(200):
        if len(b.proxy.semantic.index):
            break
        await asyncio.sleep(0.01)
    r = await cb.chat.completions.with_raw_response.create(model="auto", messages=Q1)
    assert r.headers["x-cache"] == "hit-exact"  # L2 through the cluster
    r = await cb.chat.completions.with_raw_response.create(model="auto", messages=Q2)
    assert r.headers["x-cache"] == "hit-semantic"  # the stream through the cluster
    assert r.parse().choices[0].message.content == first.choices[0].message.content
    ns = next(a.proxy.semantic.index.entries()).namespace
    async with aiohttp.ClientSession() as s, s.post(a.url + "/admin/purge", headers=ADMIN,
                                                    json={"namespace": ns}) as resp:
        purged = (await resp.json())["purged"]
    assert purged["l2"] >= 1  # SCAN reached the node holding the key
    for _ in range(200):
        if not len(b.proxy.semantic.index):
            break
        await asyncio.sleep(0.01)
    assert len(b.proxy.semantic.index) == 0
