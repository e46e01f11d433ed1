"""Tenant isolation and what the cache keeps: entries of namespace A are never served to
namespace B (exact and semantic hits, one proxy or two proxies sharing a Redis), API keys are
never stored or logged in clear, and an upstream error is never stored or replayed as a success.
"""

from __future__ import annotations

import itertools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis as redis_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_faults import _until, post, sse_events
from tests.test_proxy import set_faults

CHAT = "/v1/chat/completions"
UVLOOP_ONLY = pytest.mark.asyncio(loop_factories=["uvloop"])
PROPERTY = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

#: Paraphrase pairs that the semantic layer serves within one namespace.
PARAPHRASES = (
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the capital of France?", "What's the capital of France?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription?"),
)
HITS = {"hit-exact", "hit-semantic"}
_unique = itertools.count()


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


#: Two different tenants, as an (x-cache-namespace or API key) pair.
tenant = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)
    .map(lambda ns: {"x-cache-namespace": ns}),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
    .map(lambda key: {"Authorization": f"Bearer sk-{key}"}))
tenant_pairs = st.tuples(tenant, tenant).filter(lambda ab: ab[0] != ab[1])


@dataclass
class Pair:
    """Two proxies: one alone, or two sharing a Redis (``b`` then is the other process)."""

    a: str
    b: str
    #: the query texts in b's semantic index: a paraphrase asked at b before the entry got there
    #: would be a miss that stores its own answer (and every retry an exact hit). A count would
    #: not do: the previous case's miss, inserted after its answer, can land during this wait
    b_count: Callable[[str], int]


@pytest.fixture
async def one_proxy(make_proxy: Any) -> AsyncIterator[Pair]:
    p = await make_proxy(tier_names=("small",))
    yield Pair(p.url, p.url, lambda q: _count(p, q))


@pytest.fixture
async def two_proxies(make_proxy: Any, redis_url: str, redis_prefix: str) -> AsyncIterator[Pair]:
    cache = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    a = await make_proxy(tier_names=("small",), cache=cache)
    b = await make_proxy(tier_names=("small",), cache=cache)
    yield Pair(a.url, b.url, lambda q: _count(b, q))


def _count(p: Any, text: str) -> int:
    """Entries of ``text`` in p's semantic index (any scope)."""
    return sum(e.query_text == text for e in p.proxy.semantic.index.entries())


async def _same_namespace_hit(url: str, payload: dict[str, Any], headers: dict[str, str],
                              expect: set[str]) -> str:
    """Wait (briefly: L2 and the shared index fill in the background) for a hit."""
    seen = ""

    async def hit() -> bool:
        nonlocal seen
        _, h, _ = await post(url, payload, headers)
        seen = h["x-cache"]
        return seen in expect

    for _ in range(40):
        if await hit():
            return seen
        await _sleep(0.05)
    return seen


async def _sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


async def _isolation_case(pair: Pair, tenants: tuple[dict[str, str], dict[str, str]],
                          stream: bool, where: bool) -> None:
    """A stores; A hits; B's lookup (one only: B's own miss stores an entry of B's) misses,
    on the proxy that stored or the other one (``where``)."""
    a, b = tenants
    text = f"isolation case {next(_unique)}: what is the boiling point of water?"
    got, h, _ = await post(pair.a, chat(text, stream=stream), a)
    assert got == 200 and h["x-cache"] == "miss"
    # A sees its own entry (from L1, or from L2 on the other proxy) ...
    assert await _same_namespace_hit(pair.b, chat(text, stream=stream), a, {"hit-exact"}) \
        == "hit-exact"
    # ... B never does, on either proxy
    got, h, _ = await post(pair.a if where else pair.b, chat(text, stream=stream), b)
    assert got == 200 and h["x-cache"] not in HITS, (a, b, h["x-cache"])


@UVLOOP_ONLY
@PROPERTY
@given(tenants=tenant_pairs, stream=st.booleans())
async def test_exact_entries_never_cross_namespaces(one_proxy: Pair, tenants: Any,
                                                    stream: bool) -> None:
    await _isolation_case(one_proxy, tenants, stream, True)


@UVLOOP_ONLY
@PROPERTY
@given(tenants=tenant_pairs, stream=st.booleans(), where=st.booleans())
async def test_exact_entries_never_cross_namespaces_through_redis(two_proxies: Pair,
                                                                  tenants: Any, stream: bool,
                                                                  where: bool) -> None:
    await _isolation_case(two_proxies, tenants, stream, where)


async def _semantic_case(pair: Pair, tenants: tuple[dict[str, str], dict[str, str]],
                         question: str, paraphrase: str, which: int) -> None:
    """A stores a question; A's paraphrase is a semantic hit; B's one lookup (the question or
    the paraphrase, on either proxy: ``which``) is not a hit of any kind."""
    a, b = tenants
    tag = next(_unique)
    # a distinct system prompt per case: a fresh semantic scope, whatever earlier cases stored
    system = {"role": "system", "content": f"You are support bot number {tag}."}

    def body(q: str) -> dict[str, Any]:
        return {"model": "auto", "messages": [system, {"role": "user", "content": q}]}

    before = pair.b_count(question)
    got, h, _ = await post(pair.a, body(question), a)
    assert got == 200 and h["x-cache"] == "miss"
    await _until_more(pair, question, before)
    seen = await _same_namespace_hit(pair.b, body(paraphrase), a, {"hit-semantic"})
    assert seen == "hit-semantic", f"paraphrase not served within the namespace: {seen}"
    url = pair.a if which & 1 else pair.b
    q = question if which & 2 else paraphrase
    before = pair.b_count(q)
    got, h, _ = await post(url, body(q), b)
    assert got == 200 and h["x-cache"] not in HITS, (a, b, q, h["x-cache"])
    # B's miss stored its own entry, inserted after the answer: let it land before the next case
    await _until_more(pair, q, before)


async def _until_more(pair: Pair, text: str, before: int) -> None:
    for _ in range(250):  # the shared stream delivers within tens of ms
        if pair.b_count(text) > before:
            return
        await _sleep(0.02)


@UVLOOP_ONLY
@settings(PROPERTY, max_examples=12)
@given(tenants=tenant_pairs, pair=st.sampled_from(PARAPHRASES), which=st.integers(0, 3))
async def test_semantic_hits_stay_within_a_namespace(one_proxy: Pair, tenants: Any,
                                                     pair: tuple[str, str], which: int) -> None:
    await _semantic_case(one_proxy, tenants, *pair, which)


@UVLOOP_ONLY
@settings(PROPERTY, max_examples=12)
@given(tenants=tenant_pairs, pair=st.sampled_from(PARAPHRASES), which=st.integers(0, 3))
async def test_semantic_hits_stay_within_a_namespace_through_redis(
        two_proxies: Pair, tenants: Any, pair: tuple[str, str], which: int) -> None:
    await _semantic_case(two_proxies, tenants, *pair, which)


@UVLOOP_ONLY
async def test_embedding_cache_is_per_tenant(make_proxy: Any) -> None:
    """B asking the text A just asked gets its own embedding, not A's from the embedder's LRU:
    an LRU hit skips the model and answers measurably faster, which would tell B that someone
    asked that text. A asking again is an LRU hit (its own vector)."""
    p = await make_proxy(tier_names=("small",))
    stats = p.proxy.semantic.embedder.stats
    text = f"per-tenant embedding {next(_unique)}: how far is the moon from the earth?"
    a, b = {"Authorization": "Bearer sk-tenant-a"}, {"Authorization": "Bearer sk-tenant-b"}
    got, h, _ = await post(p.url, chat(text), a)
    assert got == 200 and h["x-cache"] == "miss"
    texts, hits = stats.texts, stats.cache_hits
    got, h, _ = await post(p.url, chat(text), b)
    assert got == 200 and h["x-cache"] == "miss"
    assert stats.texts == texts + 1 and stats.cache_hits == hits  # B's own run, not A's vector
    # A again, past its stored answer (no-cache: no lookup; the router still wants the vector)
    got, h, _ = await post(p.url, chat(text), {**a, "Cache-Control": "no-cache"})
    assert got == 200 and stats.texts == texts + 1 and stats.cache_hits == hits + 1


# -- secrets ----------------------------------------------------------------------------------


def _redis_dump(url: str, prefix: str) -> bytes:
    """Every key and value under ``prefix`` (strings, hashes, streams) as one blob."""
    client = redis_sync.Redis.from_url(url)
    out = []
    try:
        for key in client.scan_iter(match=prefix + "*"):
            out.append(key)
            kind = client.type(key)
            if kind == b"string":
                out.append(client.get(key) or b"")
            elif kind == b"hash":
                for k, v in client.hgetall(key).items():
                    out += [k, v]
            elif kind == b"stream":
                for _, fields in client.xrange(key):
                    for k, v in fields.items():
                        out += [k, v]
            else:
                out.append(repr(client.dump(key)).encode())
    finally:
        client.close()
    return b"\n".join(out)


async def test_api_keys_are_never_stored_or_logged_in_clear(
        make_proxy: Any, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"sk-live-{uuid.uuid4().hex}"
    cache = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    a = await make_proxy(tier_names=("small",), cache=cache)
    b = await make_proxy(tier_names=("small",), cache=cache)
    headers = {"Authorization": f"Bearer {secret}"}
    for url in (a.url, b.url):
        for i, (q, para) in enumerate(PARAPHRASES):
            for text in (q, para):
                for stream in (False, True):
                    got, _, _ = await post(url, chat(text, stream=stream), headers)
                    assert got == 200
            await post(url, chat(f"unknown model {i}", model="nope"), headers)
    async with aiohttp.ClientSession() as s, s.get(a.url + "/metrics") as r:
        metrics = await r.text()
    assert await _until(lambda: len(_redis_dump(redis_url, redis_prefix)) > 0)
    await _sleep(0.3)  # background writes
    dump = _redis_dump(redis_url, redis_prefix)
    assert dump, "nothing reached Redis: the scan would prove nothing"
    for form in (secret, secret[8:], f"Bearer {secret}"):
        assert form.encode() not in dump
        assert form not in caplog.text
        assert form not in metrics


# -- errors are never cached ------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 422, 429, 500, 503])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_errors_are_never_stored_or_replayed(make_proxy: Any, tiers: Any,
                                                            redis_url: str, redis_prefix: str,
                                                            status: int, stream: bool) -> None:
    p = await make_proxy(tier_names=("small",),
                         cache={"redis_url": redis_url, "redis_prefix": redis_prefix})
    await set_faults(tiers["small"], status=status, count=1)
    got, h, raw = await post(p.url, chat(f"error {status}", stream=stream))
    assert got == status if status < 500 and status != 429 else got in (429, 502)
    assert "error" in json.loads(raw)
    assert len(p.proxy.cache.l1) == 0
    await _sleep(0.1)
    client = redis_sync.Redis.from_url(redis_url)
    assert list(client.scan_iter(match=redis_prefix + "*")) == []  # nothing in L2 either
    client.close()
    got, h, raw = await post(p.url, chat(f"error {status}", stream=stream))
    assert got == 200 and h["x-cache"] == "miss"
    if stream:
        assert sse_events(raw)[-1] == "[DONE]"
    else:
        assert json.loads(raw)["choices"][0]["finish_reason"] == "stop"
