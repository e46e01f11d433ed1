"""/admin/purge takes the namespace as the client gave it and reports what it really removed;
/admin/namespace maps an API key (or x-cache-namespace) to the proxy's namespace label."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

TOKEN = "purge-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MSG = [{"role": "user", "content": "What is the capital of France?"}]


async def admin(url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url + path, headers=AUTH, json=body) as r:
        return r.status, await r.json()


async def until_in_redis(p: Any) -> None:
    l2 = p.proxy.cache.l2
    for _ in range(200):
        if [k async for k in l2.client.scan_iter(match=l2.prefix + b"*")]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the L2 write never landed")


async def test_purge_by_key_reports_what_was_removed(make_proxy: Any, redis_url: str,
                                                     redis_prefix: str) -> None:
    # a gateway sets x-cache-namespace: the header names the tenant (ns:<name>)
    cache = {"redis_url": redis_url, "redis_prefix": redis_prefix,
             "trust_namespace_header": True}
    p = await make_proxy(server={"admin_token": TOKEN}, cache=cache)
    team_a = p.client(default_headers={"x-cache-namespace": "team-a"})
    r = await team_a.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    key = r.headers["x-cache-key"]
    await until_in_redis(p)

    # the right key with the wrong namespace removes nothing, and says so
    status, body = await admin(p.url, "/admin/purge", {"key": key, "namespace": "team-b"})
    assert status == 200 and body["namespace"] == "ns:team-b" and body["total"] == 0
    r = await team_a.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert r.headers["x-cache"] == "hit-exact"

    # with the namespace as the client sends it (no ns: prefix): gone from every layer
    status, body = await admin(p.url, "/admin/purge", {"key": key, "namespace": "team-a"})
    assert body["namespace"] == "ns:team-a"
    assert body["purged"] == {"l1": 1, "l2": 1, "semantic": 1} and body["total"] == 3
    # a second proxy on the same Redis (cold L1) does not find it in Redis either
    q = await make_proxy(server={"admin_token": TOKEN}, cache=cache)
    r = await q.client(default_headers={"x-cache-namespace": "team-a"}) \
        .chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert r.headers["x-cache"] == "miss"


async def test_purge_namespace_as_given_and_lookup_by_api_key(make_proxy: Any) -> None:
    p = await make_proxy(server={"admin_token": TOKEN}, cache={"trust_namespace_header": True})
    await p.client(default_headers={"x-cache-namespace": "team-a"}).chat.completions.create(
        model="auto", messages=MSG)
    await p.client(api_key="sk-tenant-7").chat.completions.create(model="auto", messages=MSG)
    assert len(p.proxy.cache.l1) == 2

    status, body = await admin(p.url, "/admin/namespace", {"api_key": "sk-tenant-7"})
    assert status == 200 and body["namespace"].startswith("key:")
    assert "sk-tenant-7" not in str(body)
    tenant_ns = body["namespace"]
    assert (await admin(p.url, "/admin/namespace", {"x_cache_namespace": "team-a"}))[1] == {
        "namespace": "ns:team-a"}

    # bare header value and label form name the same namespace
    status, body = await admin(p.url, "/admin/purge", {"namespace": "team-a"})
    assert body["namespace"] == "ns:team-a" and body["purged"]["l1"] == 1
    status, body = await admin(p.url, "/admin/purge", {"namespace": "ns:team-a"})
    assert body["total"] == 0  # already gone: reported as such
    status, body = await admin(p.url, "/admin/purge", {"api_key": "sk-tenant-7"})
    assert body["namespace"] == tenant_ns and body["purged"]["l1"] == 1
    assert len(p.proxy.cache.l1) == 0
    assert (await admin(p.url, "/admin/namespace", {}))[0] == 400
    assert (await admin(p.url, "/admin/purge", {"namespace": ""}))[0] == 400


async def test_namespace_lookup_when_the_header_only_partitions_a_tenant(
        make_proxy: Any) -> None:
    p = await make_proxy(server={"admin_token": TOKEN})  # default: the key is the tenant
    await p.client(api_key="sk-t", default_headers={"x-cache-namespace": "team-a"}) \
        .chat.completions.create(model="auto", messages=MSG)
    status, body = await admin(p.url, "/admin/namespace",
                               {"api_key": "sk-t", "x_cache_namespace": "team-a"})
    assert status == 200 and body["namespace"].startswith("key:")
    assert body["namespace"].endswith("/ns:team-a")
    assert (await admin(p.url, "/admin/namespace", {"x_cache_namespace": "team-a"}))[0] == 400
    status, purged = await admin(p.url, "/admin/purge", {"api_key": "sk-t",
                                                        "x_cache_namespace": "team-a"})
    assert purged["namespace"] == body["namespace"] and purged["purged"]["l1"] == 1
