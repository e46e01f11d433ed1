"""Upstream resilience: endpoint balancing and retry, circuit breakers, overload (429)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import free_port
from tests.test_proxy import MSG, collect, mock_requests, set_faults


async def test_refused_endpoint_is_skipped_within_the_tier(make_proxy, tiers) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    p = await make_proxy(tier_names=("small",), tier_urls={"small": f"{dead},{tiers['small'].url}"},
                         tier_options={"small": {"model": "small-8b"}})
    client = p.client()
    for i in range(4):
        r = await client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": f"q{i}"}])
        assert r.choices[0].message.content.startswith("[small-8b]")
    assert await mock_requests(tiers["small"]) == 4


async def test_breaker_opens_then_recovers(make_proxy, tiers) -> None:
    p = await make_proxy(tier_names=("small", "large"),
                         tier_options={"small": {"fallback": ("large",), "breaker_failures": 2,
                                                 "breaker_cooldown_s": 0.3}})
    client = p.client()
    await set_faults(tiers["small"], status=500, count=-1)
    for i in range(2):  # two failures open the breaker; fallback serves
        r = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": f"a{i}"}])
        assert r.headers["x-route-tier"] == "large"
    assert p.proxy.tiers["small"].breaker_open
    before = await mock_requests(tiers["small"])
    r = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "while open"}])
    assert r.headers["x-route-tier"] == "large"
    assert await mock_requests(tiers["small"]) == before  # not even tried
    await set_faults(tiers["small"])  # healthy again
    await asyncio.sleep(0.35)
    r = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "probe"}])
    assert r.headers["x-route-tier"] == "small"  # the half-open probe succeeded
    assert not p.proxy.tiers["small"].breaker_open
    text = "breaker_open" in (await _metrics(p))
    assert text


async def _metrics(p) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(p.url + "/metrics") as r:
        return await r.text()


async def test_overload_gets_429_with_retry_after(make_proxy, tiers) -> None:
    await set_faults(tiers["small"], tpot_ms=30, count=-1)
    p = await make_proxy(tier_names=("small",),
                         tier_options={"small": {"max_concurrency": 2, "max_queue": 1}})
    client = p.client()

    async def one(i: int):
        try:
            return await client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": f"distinct {i}"}])
        except openai.RateLimitError as exc:
            return exc

    results = await asyncio.gather(*(one(i) for i in range(6)))
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) == 3 and len(limited) == 3
    assert limited[0].response.headers["retry-after"] == "1"
    assert limited[0].body["code"] == "tier_overloaded"
    assert p.proxy.tiers["small"].active == 0  # every slot given back
    r = await client.chat.completions.create(model="auto", messages=MSG)
    assert r.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
async def test_slots_return_after_errors_and_cancels(make_proxy, tiers, stream) -> None:
    p = await make_proxy(tier_names=("small",), tier_options={"small": {"max_concurrency": 1,
                                                                         "max_queue": 0}})
    client = p.client()
    await set_faults(tiers["small"], status=500, count=1)
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(model="auto", messages=MSG, stream=stream)
    await set_faults(tiers["small"], cut_after=2, count=1)
    if stream:
        with pytest.raises(openai.APIError):
            await collect(await client.chat.completions.create(model="auto", messages=MSG,
                                                               stream=True))
    r = await client.chat.completions.create(model="auto", messages=MSG)
    assert r.choices[0].message.content
    assert p.proxy.tiers["small"].active == 0


async def test_shadow_pairs_are_logged_never_served(make_proxy, tiers, tmp_path) -> None:
    import orjson

    log = tmp_path / "shadow.jsonl"
    p = await make_proxy(router={"enabled": False, "shadow": ("small:large=1.0",),
                                 "shadow_log": str(log)})
    client = p.client()
    r = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG,
                                                               stream=True)
    text, _ = await collect(r.parse())
    assert text.startswith("[small-8b]")  # the primary is served
    for _ in range(100):
        if log.exists() and log.read_bytes().count(b"\n") >= 1:
            break
        await asyncio.sleep(0.02)
    rec = orjson.loads(log.read_bytes().splitlines()[0])
    assert rec["primary_tier"] == "small" and rec["shadow_tier"] == "large"
    assert rec["primary"]["text"] == text
    assert rec["shadow"]["text"].startswith("[large-70b]")
    assert rec["shadow"]["completion_tokens"] == 12 and rec["shadow"]["latency_ms"] > 0
    assert tiers["large"].mock.requests == 1
    assert p.metrics.ledger.summary()["tiers"]["large"]["upstream_calls"] == 1
    # hits are not shadowed (nothing new was answered)
    await client.chat.completions.create(model="auto", messages=MSG)
    await asyncio.sleep(0.1)
    assert tiers["large"].mock.requests == 1


async def test_ab_split_diverts_a_fraction(make_proxy, tiers) -> None:
    p = await make_proxy(router={"enabled": False, "split": ("small:medium=0.5",)})
    client = p.client()
    served = []
    for i in range(40):
        r = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": f"split {i}"}])
        served.append(r.headers["x-route-tier"])
        assert r.parse().choices[0].message.content.startswith(
            "[small-8b]" if served[-1] == "small" else "[medium-32b]")
    assert 8 <= served.count("medium") <= 32  # 50% +- generous noise (binomial, n=40)
    # explicit model requests are never diverted
    r = await client.chat.completions.with_raw_response.create(model="small-8b", messages=MSG)
    assert r.headers["x-route-tier"] == "small"


def test_split_and_shadow_config_errors() -> None:
    from proxy.config import ConfigError, load_config

    flags = ["small=http://a:1", "large=http://b:2"]
    for field, value in (("split", "small:huge=0.1"), ("split", "small:large=2"),
                         ("shadow", "small-large=0.1"), ("split", "small:large=x")):
        with pytest.raises(ConfigError, match=f"router.{field}"):
            load_config(env={}, overrides={"router": {field: (value,)}}, tier_flags=flags)
