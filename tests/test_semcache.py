"""The semantic layer through the proxy: paraphrases hit, near-misses and other scopes do not."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np

from proxy.answer import CachedAnswer
from proxy.config import CacheConfig, SemanticConfig
from proxy.exact import ExactCache
from proxy.keys import request_keys
from proxy.metrics import Metrics
from proxy.semantic.cache import SemanticCache
from tests.test_proxy import mock_requests


def ask(text: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": text}]


async def test_paraphrase_is_a_semantic_hit(make_proxy, tiers) -> None:
    p = await make_proxy(router={"enabled": False})
    client = p.client()
    first = await client.chat.completions.create(model="auto",
                                                 messages=ask("How do I reset my password?"))
    r = await client.chat.completions.with_raw_response.create(
        model="auto", messages=ask("How can I reset my password?"))
    assert r.headers["x-cache"] == "hit-semantic"
    assert 0.85 <= float(r.headers["x-cache-similarity"]) < 1.0
    assert r.parse().choices[0].message.content == first.choices[0].message.content
    # streamed too
    r = await client.chat.completions.with_raw_response.create(
        model="auto", messages=ask("how can i reset my password"), stream=True)
    assert r.headers["x-cache"] == "hit-semantic"
    text = "".join([c.choices[0].delta.content or "" async for c in r.parse() if c.choices])
    assert text == first.choices[0].message.content
    assert await mock_requests(tiers["small"]) == 1


async def test_near_misses_are_refused_by_the_verifier(make_proxy, tiers) -> None:
    p = await make_proxy(router={"enabled": False})
    client = p.client()
    pairs = [("What is 2+3?", "What is 2+4?"),
             ("Is Python faster than Java?", "Is Java faster than Python?"),
             ("I can log in to my account", "I can't log in to my account")]
    for a, b in pairs:
        await client.chat.completions.create(model="auto", messages=ask(a))
        r = await client.chat.completions.with_raw_response.create(model="auto", messages=ask(b))
        assert r.headers["x-cache"] == "miss", (a, b)
    assert await mock_requests(tiers["small"]) == 6


async def test_scopes_namespaces_thresholds_and_bypass(make_proxy, tiers) -> None:
    p = await make_proxy(router={"enabled": False})
    client = p.client()
    q1, q2 = "How do I reset my password?", "How can I reset my password?"
    await client.chat.completions.create(model="auto", messages=ask(q1, "Be brief."))
    for headers, messages in [
        ({}, ask(q2, "Answer in French.")),               # another system prompt
        ({"x-cache-namespace": "other"}, ask(q2, "Be brief.")),   # another tenant
        ({"x-cache-threshold": "0.999"}, ask(q2, "Be brief.")),   # a stricter request
    ]:
        r = await client.chat.completions.with_raw_response.create(
            model="auto", messages=messages, extra_headers=headers)
        assert r.headers["x-cache"] == "miss", headers
    # a lower requested threshold cannot loosen the configured one: still a hit, same answer
    r = await client.chat.completions.with_raw_response.create(
        model="auto", messages=ask("how do I reset my password", "Be brief."),
        extra_headers={"x-cache-threshold": "0.1"})
    assert r.headers["x-cache"] == "hit-semantic"
    await client.chat.completions.create(model="auto",
                                         messages=ask("What is the weather today in Paris?"))
    r = await client.chat.completions.with_raw_response.create(
        model="auto", messages=ask("What's the weather today in Paris?"))
    assert r.headers["x-cache"] == "miss"


async def test_router_sets_tier_and_score_headers(make_proxy, tiers) -> None:
    p = await make_proxy(router={"enabled": True})
    client = p.client()
    easy = await client.chat.completions.with_raw_response.create(
        model="auto", messages=ask("hi, how are you?"))
    hard_q = ("Prove step by step that the sum of the first n odd numbers is n^2, then write a "
              "Python function that verifies it for n up to 10^6 and analyse its complexity. " * 3)
    hard = await client.chat.completions.with_raw_response.create(model="auto",
                                                                  messages=ask(hard_q))
    order = ["small", "medium", "large"]
    s_easy, s_hard = (float(r.headers["x-route-score"]) for r in (easy, hard))
    assert 0 <= s_easy < s_hard <= 1
    assert order.index(easy.headers["x-route-tier"]) <= order.index(hard.headers["x-route-tier"])
    assert hard.headers["x-route-tier"] != "small"
    # the answer comes from the tier the router chose
    tier = hard.headers["x-route-tier"]
    assert hard.parse().choices[0].message.content.startswith(f"[{tier}-")


async def test_smaller_tier_answer_not_served_to_larger_route() -> None:
    exact = ExactCache(CacheConfig(), Metrics())
    sem = SemanticCache(SemanticConfig(), Metrics(), exact, ["small", "medium", "large"])
    await sem.start()
    try:
        body = {"model": "auto", "messages": ask("How do I reset my password?")}
        keys = request_keys("ns", "chat", "auto", body)
        exact.put(keys.exact, CachedAnswer("chat", b'{"choices":[]}', "small", 1, 1), "ns")
        vec = await sem.embed(keys.query_text)
        sem.add(vec, keys, "ns", "small")
        para = request_keys("ns", "chat", "auto",
                            {"model": "auto", "messages": ask("How can I reset my password?")})
        pvec = await sem.embed(para.query_text)
        assert await sem.lookup(pvec, para, "small", None, 0.85) is not None
        assert await sem.lookup(pvec, para, "large", None, 0.85) is None
        # an entry whose answer left the exact cache is dropped when met
        exact.l1.clear()
        assert await sem.lookup(pvec, para, "small", None, 0.85) is None
        assert len(sem.index) == 0
        assert isinstance(vec, np.ndarray)
    finally:
        await sem.close()


async def test_a_growing_scope_gets_its_graph_from_the_build_thread() -> None:
    """Past brute_force_max the scope's usearch graph is built in the index-build thread, not
    in ``add`` on the loop; meanwhile the block serves, then the graph holds every entry."""
    exact = ExactCache(CacheConfig(), Metrics())
    sem = SemanticCache(SemanticConfig(brute_force_max=8), Metrics(), exact, ["small"])
    await sem.start()
    try:
        texts = [f"How do I configure feature number {i} of the {w} service?"
                 for i, w in enumerate(["billing", "search", "mail", "chat", "maps", "drive",
                                        "photos", "music", "video", "news", "books", "shop"])]
        keys = [request_keys("ns", "chat", "m", {"model": "m", "messages": ask(t)})
                for t in texts]
        vecs = [await sem.embed(t) for t in texts]
        for k, v in zip(keys, vecs, strict=True):
            sem.add(v, k, "ns", "small")
        assert sem.index.stats()["promotions"] == 0  # the build has not come back yet
        for _ in range(500):
            if sem.index.stats()["ann_scopes"]:
                break
            await asyncio.sleep(0.01)
        assert sem.index.stats()["promotions"] == 1 and len(sem.index) == 12
        for k, v in zip(keys, vecs, strict=True):
            assert sem.index.search(v, k.scope, k=1)[0][1].key == k.exact
    finally:
        await sem.close()


def test_onnxruntime_and_usearch_load_together() -> None:
    # importing usearch before onnxruntime segfaults; proxy.semantic must fix the order itself
    code = "import proxy.semantic; import proxy.semantic.embedder; import onnxruntime; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-500:]


async def test_embedding_failure_degrades_to_a_miss(make_proxy, tiers) -> None:
    p = await make_proxy()

    async def broken(text: str):
        raise RuntimeError("onnxruntime exploded")

    p.proxy.semantic.embedder.embed = broken  # a fault injected into the real embedder object
    r = await p.client().chat.completions.with_raw_response.create(
        model="auto", messages=ask("How do I reset my password?"))
    assert r.headers["x-cache"] == "miss" and r.parse().choices[0].message.content
    r = await p.client().chat.completions.with_raw_response.create(
        model="auto", messages=ask("How do I reset my password?"))
    assert r.headers["x-cache"] == "hit-exact"  # the exact layer still works


def test_embedder_thread_priorities(tmp_path) -> None:
    # Default "nice": the workers run at nice +5 (the loop keeps 0); "idle": SCHED_IDLE.
    code = (
        "import asyncio, os\n"
        "from proxy.semantic.embedder import Embedder\n"
        "async def main():\n"
        "    e = Embedder(workers=2); await e.start(); await e.embed('hello there')\n"
        "    print(e.priority, *(os.getpriority(os.PRIO_PROCESS, t.native_id)\n"
        "                        for t in e._threads), os.getpriority(os.PRIO_PROCESS, 0))\n"
        "    await e.close()\n"
        "    e = Embedder(priority='idle', workers=1); await e.start()\n"
        "    await e.embed('hello there')\n"
        "    tid = e._threads[0].native_id\n"
        "    print(e.priority, os.sched_getscheduler(tid) == os.SCHED_IDLE,\n"
        "          os.sched_getscheduler(0) == os.SCHED_OTHER)\n"
        "    await e.close()\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-800:]
    # only the worker threads are lowered, never the loop's thread
    assert out.stdout.split() == ["nice+5", "5", "5", "0", "idle", "True", "True"]


async def test_busy_embedder_sheds_the_lookup(make_proxy, tiers) -> None:
    # Over its deadline (estimated queue wait), the semantic lookup is skipped, counted, and the
    # request served as a miss at once; nothing is indexed for it.
    import aiohttp

    p = await make_proxy(semantic={"embed_deadline_s": 0.005, "embed_timeout_s": 5.0,
                                   "embed_threads": 1})
    emb = p.proxy.semantic.embedder
    await emb.embed("measure one embedding first")
    backlog = [emb.embed(f"backlog {i} " + "lorem ipsum dolor sit amet " * 40) for i in range(32)]
    tasks = [asyncio.ensure_future(b) for b in backlog]
    await asyncio.sleep(0)
    r = await p.client().chat.completions.with_raw_response.create(
        model="auto", messages=ask("How do I reset my password?"))
    assert r.headers["x-cache"] == "miss" and r.parse().choices[0].message.content
    async with aiohttp.ClientSession() as s, s.get(p.url + "/metrics") as m:
        text = await m.text()
    assert 'edge_proxy_semantic_skipped_total{reason="deadline"} 1.0' in text
    assert emb.stats.skipped == 1
    await asyncio.gather(*tasks)
    assert len(p.proxy.semantic.index) == 0  # no vector: nothing indexed for this answer


async def test_busy_embedder_times_out_to_a_miss(make_proxy, tiers) -> None:
    import aiohttp

    p = await make_proxy(semantic={"embed_timeout_s": 0.05, "embed_deadline_s": 0,
                                   "embed_threads": 1})
    emb = p.proxy.semantic.embedder
    # Keep the real worker busy: 32 long texts (128 tokens each) take far longer than 50 ms.
    backlog = [emb.embed(f"backlog {i} " + "lorem ipsum dolor sit amet " * 40) for i in range(32)]
    tasks = [asyncio.ensure_future(b) for b in backlog]
    await asyncio.sleep(0)
    r = await p.client().chat.completions.with_raw_response.create(
        model="auto", messages=ask("How do I reset my password?"))
    assert r.headers["x-cache"] == "miss" and r.parse().choices[0].message.content
    assert len(p.proxy.semantic.index) == 0  # no vector: nothing indexed for this answer
    async with aiohttp.ClientSession() as s, s.get(p.url + "/metrics") as m:
        text = await m.text()
    assert 'edge_proxy_semantic_rejects_total{reason="embed_timeout"} 1.0' in text
    await asyncio.gather(*tasks)  # the backlog still completes
    r = await p.client().chat.completions.with_raw_response.create(
        model="auto", messages=ask("How do I reset my password?"))
    assert r.headers["x-cache"] == "hit-exact"


async def test_learned_verifier_gets_both_vectors(make_proxy, tiers) -> None:
    from pathlib import Path

    from proxy.semantic.verifier import Verifier

    weights = Path(__file__).resolve().parents[1] / "models" / "verifier.json"
    # the interaction model alone decides here (the pair verifier off): its vectors are the point
    p = await make_proxy(semantic={"verifier_weights": str(weights), "pair_verifier": ""})
    sem = p.proxy.semantic
    assert sem.verifier.uses_vectors
    client = p.client()
    reference = Verifier(weights_path=weights)
    # QQP pairs where the vector model and its 13-feature fallback disagree by a wide margin
    pairs = [("How do I reset my password?", "How can I reset my password?"),
             ("Which universities for MS in CS should I apply to?",
              "Which universities should I apply for MS in CS?"),
             ("How can I learn how to play the piano?",
              "Is there a way I could learn to play the piano?")]
    differs = []
    for i, (q1, q2) in enumerate(pairs):
        system = f"Scope {i}."  # one scope per pair: the candidate is q1
        await client.chat.completions.create(model="auto", messages=ask(q1, system))
        r = await client.chat.completions.with_raw_response.create(
            model="auto", messages=ask(q2, system))
        # the proxy's decision is the interaction model's, fed the two vectors it holds
        (key,) = [e.key for e in sem.index.entries() if e.query_text == q1]
        cand, query = sem.index.vector(key), await sem.embed(q2)
        sim = float(query @ cand)
        assert sim >= 0.85, (q1, q2)
        want = reference.verify(q2, q1, sim, 0.85, query_vec=query, cand_vec=cand)
        assert (r.headers["x-cache"] == "hit-semantic") == want.ok, (q1, q2, want)
        differs.append(want.ok != reference.verify(q2, q1, sim, 0.85).ok)  # 13-feature fallback
    assert any(differs)  # without the vectors the proxy would have decided otherwise
