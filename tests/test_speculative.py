"""Speculative misses (semantic.speculative, the default): the upstream call starts beside the
embedding and the semantic lookup; a semantic hit cancels it, a miss uses it, and the miss's
vector is indexed after its answer."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.test_semcache import ask


async def _stats(tier: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(tier.url + "/stats") as r:
        return dict(await r.json())


async def _metrics(p: Any) -> str:
    async with aiohttp.ClientSession() as s, s.get(p.url + "/metrics") as r:
        return await r.text()


async def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_miss_uses_its_speculative_call_and_is_indexed_after(make_proxy, tiers) -> None:
    p = await make_proxy(semantic={"speculative": True})
    r = await p.client().chat.completions.with_raw_response.create(
        model="auto", messages=ask("How do I reset my password?"))
    assert r.headers["x-cache"] == "miss" and r.parse().choices[0].message.content
    await _until(lambda: len(p.proxy.semantic.index) == 1)  # indexed after the answer
    assert 'edge_proxy_speculative_upstream_total{result="used"} 1.0' in await _metrics(p)
    assert (await _stats(tiers["small"]))["requests"] == 1


async def test_semantic_hit_cancels_the_speculative_call(make_proxy, tiers) -> None:
    # a slow tier (its first token after 2 s): the hit is found long before, the call cancelled
    tiers["small"].mock.ttft_ms = 2000
    p = await make_proxy(semantic={"speculative": True})
    client = p.client()
    first = await client.chat.completions.create(model="auto",
                                                 messages=ask("How do I reset my password?"))
    await _until(lambda: len(p.proxy.semantic.index) == 1)
    for stream in (False, True):
        r = await client.chat.completions.with_raw_response.create(
            model="auto", messages=ask("How can I reset my password?" if not stream
                                       else "how can i reset my password"), stream=stream)
        assert r.headers["x-cache"] == "hit-semantic"
        if stream:
            text = "".join([c.choices[0].delta.content or "" async for c in r.parse()
                            if c.choices])
        else:
            text = r.parse().choices[0].message.content
        assert text == first.choices[0].message.content
    text = await _metrics(p)
    assert 'edge_proxy_speculative_upstream_total{result="cancelled"} 2.0' in text
    assert "edge_proxy_speculative_cancel_seconds_count 2.0" in text
    # the upstream saw the two calls start; the proxy dropped them: no flight left, and once
    # their answers would have come (2 s), nothing was stored for them
    await _until(lambda: not p.proxy.flights)
    assert (await _stats(tiers["small"]))["requests"] == 3
    await asyncio.sleep(2.3)
    assert len(p.proxy.cache.l1) == 1 and len(p.proxy.semantic.index) == 1


async def test_identical_request_keeps_a_joined_speculative_call(make_proxy, tiers) -> None:
    # B (a paraphrase of a stored question) starts a speculative call; C, identical to B, joins
    # it before B's lookup finds the hit: B is served from the cache, the call goes on for C.
    tiers["small"].mock.ttft_ms = 300
    p = await make_proxy(semantic={"speculative": True, "speculative_delay_s": 0.0})
    client = p.client()
    await client.chat.completions.create(model="auto", messages=ask("How do I reset my password?"))
    await _until(lambda: len(p.proxy.semantic.index) == 1)
    # hold the embedder so that C joins B's flight before B's vector is ready
    emb = p.proxy.semantic.embedder
    backlog = [asyncio.ensure_future(emb.embed(f"backlog {i} " + "lorem ipsum " * 40))
               for i in range(8)]
    b = asyncio.ensure_future(client.chat.completions.with_raw_response.create(
        model="auto", messages=ask("How can I reset my password?")))
    await asyncio.sleep(0.05)  # B's flight starts first (the outcomes below cover either order)
    c = asyncio.ensure_future(client.chat.completions.with_raw_response.create(
        model="auto", messages=ask("How can I reset my password?")))
    rb, rc = await asyncio.gather(b, c)
    await asyncio.gather(*backlog)
    outcomes = sorted([rb.headers["x-cache"], rc.headers["x-cache"]])
    assert rc.parse().choices[0].message.content
    text = await _metrics(p)
    if outcomes == ["hit-semantic", "miss"]:  # C joined B's flight before B's hit: kept for
        # C (or, on a slow box, already finished when B's vector came)
        assert ('edge_proxy_speculative_upstream_total{result="joined"} 1.0' in text
                or 'edge_proxy_speculative_upstream_total{result="finished"} 1.0' in text)
        assert 'result="cancelled"' not in text
    else:  # C arrived after B's lookup had cancelled it: C's own lookup hit too
        assert outcomes == ["hit-semantic", "hit-semantic"], outcomes


async def test_routed_requests_over_several_tiers_wait_for_the_vector(make_proxy, tiers) -> None:
    # the router reads the embedding: no speculative call for model "auto" with a router
    p = await make_proxy(semantic={"speculative": True}, router={"enabled": True})
    r = await p.client().chat.completions.with_raw_response.create(
        model="auto", messages=ask("How do I reset my password?"))
    assert r.headers["x-cache"] == "miss"
    assert "edge_proxy_speculative_upstream_total{" not in await _metrics(p)
    await _until(lambda: len(p.proxy.semantic.index) == 1)  # indexed all the same


async def test_client_gone_before_the_lookup_cancels_the_speculative_call(make_proxy,
                                                                          tiers) -> None:
    # the client disconnects while its vector is still queued: its speculative upstream call
    # must not run on for nobody
    import openai
    import pytest

    tiers["small"].mock.ttft_ms = 2000
    p = await make_proxy(semantic={"speculative": True, "embed_threads": 1})
    emb = p.proxy.semantic.embedder
    backlog = [asyncio.ensure_future(emb.embed(f"backlog {i} " + "lorem ipsum " * 60))
               for i in range(16)]
    await asyncio.sleep(0)
    with pytest.raises(openai.APITimeoutError):
        await p.client().with_options(timeout=0.3).chat.completions.create(
            model="auto", messages=ask("How do I reset my password?"))
    await _until(lambda: not p.proxy.flights)
    await asyncio.gather(*backlog)
    await asyncio.sleep(2.3)  # when its answer would have come: nothing stored
    assert len(p.proxy.cache.l1) == 0
