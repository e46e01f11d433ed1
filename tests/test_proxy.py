"""The request path through the proxy, driven by the official openai client."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

MSG = [{"role": "user", "content": "What is the capital of France?"}]


async def mock_requests(tier) -> int:
    async with aiohttp.ClientSession() as s, s.get(tier.url + "/stats") as r:
        return int((await r.json())["requests"])


async def set_faults(tier, **faults) -> None:
    async with aiohttp.ClientSession() as s, s.post(tier.url + "/faults", json=faults) as r:
        assert r.status == 200


async def collect(stream) -> tuple[str, list]:
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


async def test_repeat_is_a_hit_and_never_reaches_upstream(make_proxy, tiers) -> None:
    p = await make_proxy()
    client = p.client()
    first = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    second = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit-exact"
    assert first.headers["x-route-tier"] == "small" and second.headers["x-request-id"]
    a, b = first.parse(), second.parse()
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content.startswith("[small-8b]")
    assert await mock_requests(tiers["small"]) == 1


async def test_streamed_repeat_replays_sse_with_usage(make_proxy, tiers) -> None:
    p = await make_proxy()
    client = p.client()
    live_text, live = await collect(await client.chat.completions.create(
        model="auto", messages=MSG, stream=True, stream_options={"include_usage": True}))
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=MSG, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-cache"] == "hit-exact"
    hit_text, hit = await collect(raw.parse())
    assert hit_text == live_text and live_text.startswith("[small-8b]")
    assert hit[-1].usage is not None and hit[-1].usage.completion_tokens == 12
    assert live[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in hit if c.choices][-1] == "stop"
    # the same answer serves the non-streamed form, and no usage chunk when not asked for
    plain = await client.chat.completions.create(model="auto", messages=MSG)
    assert plain.choices[0].message.content == live_text
    _, no_usage = await collect(await client.chat.completions.create(
        model="auto", messages=MSG, stream=True))
    assert all(c.usage is None for c in no_usage)
    assert await mock_requests(tiers["small"]) == 1


async def test_live_stream_without_usage_request_gets_no_usage_chunk(make_proxy, tiers) -> None:
    p = await make_proxy()
    text, chunks = await collect(await p.client().chat.completions.create(
        model="large-70b", messages=MSG, stream=True))
    assert text.startswith("[large-70b]") and all(c.usage is None for c in chunks)
    # but the proxy asked the upstream for usage, so the ledger knows the cost
    assert p.metrics.ledger.tokens_out["large"] == 12
    assert tiers["large"].mock.last_body["stream_options"] == {"include_usage": True}


async def test_completions_endpoint(make_proxy, tiers) -> None:
    p = await make_proxy()
    client = p.client()
    a = await client.completions.create(model="medium-32b", prompt="Once upon a time")
    b = await client.completions.with_raw_response.create(model="medium-32b",
                                                          prompt="Once upon a time")
    assert b.headers["x-cache"] == "hit-exact"
    assert b.parse().choices[0].text == a.choices[0].text
    stream = await client.completions.create(model="medium-32b", prompt="Once upon a time",
                                             stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == a.choices[0].text
    assert await mock_requests(tiers["medium"]) == 1


async def test_cache_control_and_namespaces(make_proxy, tiers) -> None:
    p = await make_proxy()
    client = p.client()
    await client.chat.completions.create(model="auto", messages=MSG)
    r = await client.chat.completions.with_raw_response.create(
        model="auto", messages=MSG, extra_headers={"Cache-Control": "no-cache"})
    assert r.headers["x-cache"] == "bypass"
    r = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "no store please"}],
        extra_headers={"Cache-Control": "no-store"})
    r = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "no store please"}])
    assert r.headers["x-cache"] == "miss"
    # another API key is another tenant; the namespace header partitions within a key, it
    # never joins two keys (see test_security.py for the gateway mode that trusts it)
    other = p.client(api_key="sk-other")
    r = await other.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert r.headers["x-cache"] == "miss"
    outcomes = []
    for key, ns in (("sk-a", "team"), ("sk-b", "team"), ("sk-a", "team"), ("sk-a", "other")):
        r = await p.client(api_key=key).chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "shared team"}],
            extra_headers={"x-cache-namespace": ns})
        outcomes.append(r.headers["x-cache"])
    assert outcomes == ["miss", "miss", "hit-exact", "miss"]
    assert await mock_requests(tiers["small"]) == 8


async def test_max_tokens_smaller_than_cached_answer_goes_upstream(make_proxy, tiers) -> None:
    p = await make_proxy()
    client = p.client()
    await client.chat.completions.create(model="auto", messages=MSG)
    r = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG,
                                                               max_tokens=5)
    assert r.headers["x-cache"] == "miss"
    assert r.parse().choices[0].finish_reason == "length"
    r = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG,
                                                               max_tokens=100)
    assert r.headers["x-cache"] == "hit-exact"
    # the truncated answer was not stored
    r = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG,
                                                               max_tokens=5)
    assert r.headers["x-cache"] == "miss"


JSON_CT = {"Content-Type": "application/json"}


async def test_unknown_model_and_bad_input(make_proxy) -> None:
    p = await make_proxy()
    client = p.client()
    with pytest.raises(openai.NotFoundError) as exc:
        await client.chat.completions.create(model="gpt-nope", messages=MSG)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(model="auto", messages=[])
    assert exc.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(model="auto", messages=MSG, temperature="hot")
    assert exc.value.body["param"] == "temperature"
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/v1/chat/completions", data=b"{not json", headers=JSON_CT) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["code"] == "invalid_json"
        async with s.post(p.url + "/v1/chat/completions", json=[1, 2]) as r:
            assert r.status == 400
        big = b'{"model":"auto","messages":[{"role":"user","content":"' + b"x" * (5 << 20) + b'"}]}'
        async with s.post(p.url + "/v1/chat/completions", data=big, headers=JSON_CT) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"
        async with s.get(p.url + "/v1/nothing") as r:
            assert r.status == 404 and "error" in await r.json()
    # still serving
    ok = await client.chat.completions.create(model="auto", messages=MSG)
    assert ok.choices[0].message.content


async def test_upstream_500_is_502_and_not_cached(make_proxy, tiers) -> None:
    p = await make_proxy()
    client = p.client()
    await set_faults(tiers["small"], status=500, count=1)
    with pytest.raises(openai.APIStatusError) as exc:
        await client.chat.completions.create(model="auto", messages=MSG)
    assert exc.value.status_code == 502 and exc.value.body["code"] == "upstream_unavailable"
    r = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert r.headers["x-cache"] == "miss"
    assert await mock_requests(tiers["small"]) == 2


async def test_stream_cut_mid_way_is_an_error_and_not_cached(make_proxy, tiers) -> None:
    p = await make_proxy()
    client = p.client()
    await set_faults(tiers["small"], cut_after=3, count=1)
    with pytest.raises(openai.APIError):
        await collect(await client.chat.completions.create(model="auto", messages=MSG,
                                                           stream=True))
    r = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG,
                                                               stream=True)
    assert r.headers["x-cache"] == "miss"
    text, _ = await collect(r.parse())
    assert text.startswith("[small-8b]")
    assert await mock_requests(tiers["small"]) == 2


async def test_malformed_sse_is_an_error_and_not_cached(make_proxy, tiers) -> None:
    p = await make_proxy()
    client = p.client()
    await set_faults(tiers["small"], malformed=True, count=1)
    with pytest.raises(openai.APIError):
        await collect(await client.chat.completions.create(model="auto", messages=MSG,
                                                           stream=True))
    r = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert r.headers["x-cache"] == "miss"


async def test_dead_upstream_is_502_and_timeout_504(make_proxy, tiers) -> None:
    from tests.conftest import free_port

    p = await make_proxy(tier_names=("small",), tier_urls={"small": f"http://127.0.0.1:{free_port()}"},
                         tier_options={"small": {"model": "small-8b"}})
    with pytest.raises(openai.APIStatusError) as exc:
        await p.client().chat.completions.create(model="auto", messages=MSG)
    assert exc.value.status_code == 502
    p2 = await make_proxy(tier_names=("small",),
                          tier_options={"small": {"first_token_timeout_s": 0.3}})
    await set_faults(tiers["small"], delay_ms=2000, count=1)
    with pytest.raises(openai.APIStatusError) as exc:
        await p2.client().chat.completions.create(model="auto", messages=MSG, stream=True)
    assert exc.value.status_code == 504 and exc.value.body["code"] == "upstream_timeout"


async def test_fallback_before_first_byte(make_proxy, tiers) -> None:
    p = await make_proxy(tier_options={"small": {"fallback": ("large",)}})
    await set_faults(tiers["small"], status=503, count=-1)
    r = await p.client().chat.completions.with_raw_response.create(model="auto", messages=MSG,
                                                                   stream=True)
    assert r.headers["x-route-tier"] == "large"
    text, _ = await collect(r.parse())
    assert text.startswith("[large-70b]")


async def test_identical_requests_in_flight_share_one_upstream_call(make_proxy, tiers) -> None:
    await set_faults(tiers["small"], tpot_ms=20, count=-1)
    p = await make_proxy()
    client = p.client()

    async def one(i: int) -> str:
        if i % 2:
            return (await client.chat.completions.create(model="auto", messages=MSG)
                    ).choices[0].message.content
        text, _ = await collect(await client.chat.completions.create(model="auto", messages=MSG,
                                                                     stream=True))
        return text

    texts = await asyncio.gather(*(one(i) for i in range(20)))
    assert len(set(texts)) == 1 and texts[0].startswith("[small-8b]")
    # one streamed flight and one JSON flight
    assert await mock_requests(tiers["small"]) == 2


async def test_client_disconnect_cancels_upstream(make_proxy, tiers) -> None:
    await set_faults(tiers["small"], tpot_ms=100, count=-1)
    p = await make_proxy()
    stream = await p.client().chat.completions.create(model="auto", messages=MSG, stream=True)
    async for _ in stream:
        break
    await stream.close()
    for _ in range(100):
        if tiers["small"].mock.cancelled:
            break
        await asyncio.sleep(0.02)
    assert tiers["small"].mock.cancelled == 1 and tiers["small"].mock.completed == 0
    assert not p.proxy.flights


async def test_models_health_ready_metrics(make_proxy) -> None:
    p = await make_proxy()
    models = await p.client().models.list()
    assert {m.id for m in models.data} == {"auto", "small-8b", "medium-32b", "large-70b"}
    await p.client().chat.completions.create(model="auto", messages=MSG)
    await p.client().chat.completions.create(model="auto", messages=MSG)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(p.url + "/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["redis"] == "disabled"
        async with s.get(p.url + "/metrics") as r:
            text = await r.text()
    assert 'edge_proxy_requests_total{endpoint="chat",outcome="hit-exact",tier="small"} 1.0' in text
    assert 'edge_proxy_cache_entries{layer="l1"} 1.0' in text
    assert "edge_proxy_cost_saved_usd_total" in text
    led = p.metrics.ledger.summary()
    assert led["tiers"]["small"]["upstream_calls"] == 1 and led["tiers"]["small"]["cache_hits"] == 1
    assert led["saved_usd"] > 0 and led["spent_usd"] > 0


async def test_admin_api(make_proxy, tiers) -> None:
    p = await make_proxy(server={"admin_token": "s3cret-admin"})
    client = p.client()
    r = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    key = r.headers["x-cache-key"]
    await client.chat.completions.create(model="auto", messages=MSG)
    auth = {"Authorization": "Bearer s3cret-admin"}
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-admin"}):
            async with s.get(p.url + "/admin/stats", headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "invalid_admin_token"
        async with s.get(p.url + "/admin/stats", headers=auth) as resp:
            stats = await resp.json()
        assert stats["requests"]["hit-exact"] == 1 and stats["hit_rate"] == 0.5
        assert stats["cost"]["tiers"]["small"]["cache_hits"] == 1
        assert stats["cache"]["l1_entries"] == 1
        ns = p.proxy.cache.l1._data[bytes.fromhex(key)][2]
        async with s.post(p.url + "/admin/purge", headers=auth, json={"key": key,
                                                                      "namespace": ns}) as resp:
            assert (await resp.json())["purged"] == {"l1": 1, "l2": 0, "semantic": 1}
        r = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
        assert r.headers["x-cache"] == "miss"
        async with s.post(p.url + "/admin/purge", headers=auth, json={"namespace": ns}) as resp:
            assert (await resp.json())["purged"]["l1"] == 1
        assert len(p.proxy.cache.l1) == 0
        async with s.post(p.url + "/admin/purge", headers=auth, json={"nope": 1}) as resp:
            assert resp.status == 400
    q = await make_proxy()
    async with aiohttp.ClientSession() as s, s.get(q.url + "/admin/stats", headers=auth) as resp:
        assert resp.status == 404  # no token configured: no admin API


async def test_unknown_route_and_wrong_method(make_proxy) -> None:
    p = await make_proxy()
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/v1/chat/completions") as r:
            body = await r.json()
            assert r.status == 405 and body["error"]["code"] == "method_not_allowed"
            assert "POST" in r.headers["Allow"]
        async with s.post(p.url + "/v2/whatever", json={}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        # the admin sub-application answers the same way (its own catch-all, no middleware)
        async with s.get(p.url + "/admin/purge") as r:
            body = await r.json()
            assert r.status == 405 and body["error"]["code"] == "method_not_allowed"
            assert r.headers["Allow"] == "POST"
        async with s.get(p.url + "/admin/whatever") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize("stream", [False, True])
async def test_missing_usage_is_counted_with_the_tokenizer(make_proxy, tiers, stream) -> None:
    p = await make_proxy()
    await set_faults(tiers["small"], no_usage=True, count=1)
    if stream:
        text, _ = await collect(await p.client().chat.completions.create(
            model="auto", messages=MSG, stream=True))
    else:
        text = (await p.client().chat.completions.create(model="auto", messages=MSG)
                ).choices[0].message.content
    led = p.metrics.ledger
    # the WordPiece count of the 12-word reply, e.g. "[small-8b]" is several tokens
    assert led.tokens_out["small"] >= 12 and led.tokens_in["small"] >= 7
    assert led.spent["small"] > 0
    r = await p.client().chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert r.headers["x-cache"] == "hit-exact" and text


async def test_twenty_identical_streams_one_upstream_call(make_proxy, tiers) -> None:
    await set_faults(tiers["small"], tpot_ms=10, count=-1)
    p = await make_proxy()
    client = p.client()
    async def one():
        return await collect(await client.chat.completions.create(
            model="auto", messages=MSG, stream=True, stream_options={"include_usage": True}))

    results = await asyncio.gather(*(one() for _ in range(20)))
    texts = {t for t, _ in results}
    assert len(texts) == 1 and next(iter(texts)).startswith("[small-8b]")
    assert all(chunks[-1].usage.completion_tokens == 12 for _, chunks in results)
    assert await mock_requests(tiers["small"]) == 1


async def test_every_follower_gets_the_upstream_error(make_proxy, tiers) -> None:
    await set_faults(tiers["small"], cut_after=4, tpot_ms=10, count=1)
    p = await make_proxy()
    client = p.client()

    async def one():
        try:
            await collect(await client.chat.completions.create(model="auto", messages=MSG,
                                                               stream=True))
        except openai.APIError as exc:
            return exc
        return None

    errors = await asyncio.gather(*(one() for _ in range(5)))
    assert all(isinstance(e, openai.APIError) for e in errors)
    assert await mock_requests(tiers["small"]) == 1
    r = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert r.headers["x-cache"] == "miss"  # nothing of the cut stream was stored


def test_startup_heap_is_frozen_out_of_the_cyclic_gc() -> None:
    # Server.serve calls it once the proxy is ready; checked in a fresh interpreter (freezing
    # this test process's heap would outlive the test)
    import subprocess
    import sys

    code = ("import gc, numpy, proxy.server as s; before = gc.get_freeze_count(); "
            "s.freeze_startup_heap(); print(before, gc.get_freeze_count() > 10_000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split() == ["0", "True"]
