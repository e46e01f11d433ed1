"""The one home for Redis: backoff policy, the link's up-flag and reconnect loop, SCAN + UNLINK."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Gauge

from proxy.config import CacheConfig
from proxy.redisconn import Backoff, RedisLink, redis_client, unlink_matching
from tests.conftest import RedisServer


def test_backoff_doubles_up_to_its_cap() -> None:
    b = Backoff(0.1, 2.0)
    assert [b.compute(n) for n in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert b.compute(10_000) == 2.0  # no overflow after a long outage




async def test_unlink_matching_removes_only_the_pattern(redis_url: str, redis_prefix: str
                                                        ) -> None:
    client = redis_client(CacheConfig(redis_url=redis_url), 1.0, 1.0)
    try:
        pre = redis_prefix.encode()
        for i in range(1203):  # more than two UNLINK batches
            await client.set(pre + b"a:%d" % i, b"x")
        await client.set(pre + b"b:1", b"y")
        assert await unlink_matching(client, pre + b"a:*") == 1203
        assert [k async for k in client.scan_iter(match=pre + b"*")] == [pre + b"b:1"]
    finally:
        await client.aclose()


async def test_link_goes_down_on_failure_and_comes_back() -> None:
    server = RedisServer()
    server.start()
    errors: list[str] = []
    registry = CollectorRegistry()
    gauge = Gauge("up", "test", registry=registry)

    def up_value() -> float | None:
        return registry.get_sample_value("up")

    client = redis_client(CacheConfig(redis_url=server.url), 0.2, 0.2)
    link = RedisLink(client, "test redis", gauge, Backoff(0.02, 0.1), errors.append)
    try:
        assert await link.connect() and link.up
        assert up_value() == 1
        server.stop()
        link.mark_down("get")
        assert not link.up and errors == ["get"] and up_value() == 0
        link.mark_down(None)  # not counted; still one probe
        assert errors == ["get"]
        server.start()
        await asyncio.wait_for(link.wait_up(), 10)
        assert link.up and up_value() == 1
        assert await client.ping()
    finally:
        await link.close()
        await client.aclose()
        server.stop()
