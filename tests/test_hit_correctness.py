"""Issue 13: hit correctness. The learned pair verifier under an error budget, feedback that
removes a bad answer from every sidecar, audits as evidence, short TTLs for time-sensitive
questions, and the hand-written adversarial pairs (through the proxy, real model and Redis)."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from pathlib import Path

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from proxy.semantic.budget import BudgetController
from tests.conftest import free_port, run_cli
from tests.test_exact import wait_http

ADV = Path(__file__).parent / "data" / "adversarial_pairs.jsonl"
ADMIN = {"Authorization": "Bearer adm"}
Q1 = [{"role": "user", "content": "How do I reset my password?"}]
Q2 = [{"role": "user", "content": "How can I reset my password?"}]


async def admin_stats(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/stats", headers=ADMIN) as r:
        return await r.json()


async def feedback(
    url: str, rid: str, rating: str = "bad", key: str = "sk-x", **headers: str
) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url + "/v1/feedback",
            json={"request_id": rid, "rating": rating},
            headers={"Authorization": f"Bearer {key}", **headers},
        ) as r,
    ):
        return r.status, await r.json()


def test_adversarial_file_is_what_the_issue_asks() -> None:
    rows = [json.loads(line) for line in ADV.read_text().splitlines() if line.strip()]
    kinds = {r["kind"] for r in rows}
    assert len(rows) >= 150
    assert {"swap", "negation", "number", "unit", "entity", "polarity", "paraphrase"} <= kinds
    assert all(r["same_answer"] == (r["kind"] == "paraphrase") for r in rows)
    assert all(r["query"].strip() != r["cached"].strip() for r in rows)


async def _adversarial_run(p) -> tuple[list[tuple[str, str, str]], int, int]:
    """Each pair in its own namespace: store the cached question (a miss), then ask the other.
    Returns (false hits, paraphrases served, paraphrases)."""
    c = p.client(api_key="sk-adv")
    rows = [json.loads(line) for line in ADV.read_text().splitlines() if line.strip()]
    false_hits, para_hits, paras = [], 0, 0
    for i, r in enumerate(rows):
        h = {"x-cache-namespace": f"adv-{i}"}
        await c.chat.completions.create(
            model="auto", extra_headers=h, messages=[{"role": "user", "content": r["cached"]}]
        )
        raw = await c.chat.completions.with_raw_response.create(
            model="auto", extra_headers=h, messages=[{"role": "user", "content": r["query"]}]
        )
        hit = raw.headers["x-cache"] == "hit-semantic"
        if r["same_answer"]:
            paras += 1
            para_hits += hit
        elif hit:
            false_hits.append((r["kind"], r["cached"], r["query"]))
    return false_hits, para_hits, paras


async def test_adversarial_pairs_through_the_proxy(make_proxy) -> None:
    """The shipped decision (pair verifier + guards at the default budget) against the
    hand-written swap / negation / number / unit / entity / polarity pairs and paraphrases,
    compared with the guards alone at threshold 0.85 (the previous default)."""
    shipped = await make_proxy()
    assert shipped.proxy.semantic.pair is not None  # the default verifies with the model
    fh, ph, n_para = await _adversarial_run(shipped)
    old = await make_proxy(semantic={"pair_verifier": "", "threshold": 0.85})
    fh_old, ph_old, _ = await _adversarial_run(old)
    print(
        f"adversarial: shipped {len(fh)} false hits, paraphrases {ph}/{n_para}; guards-only "
        f"{len(fh_old)} false hits, paraphrases {ph_old}/{n_para}; shipped false hits: {fh}"
    )
    assert len(fh) < len(fh_old)  # the verifier catches swaps the guards let through
    # the issue's target: no false hit of any kind (held), and at least 90 % of the
    # paraphrases. The int8 scores differ by CPU (VNNI or not) and several paraphrases sit
    # within 0.01 of the cut: 45/50 on an AVX2-only Zen 3, 43/50 on an AVX-512 VNNI Zen 4
    # with the same model. The floor here is 80 %, a regression guard, not the target (the
    # README's table reports the target as not met)
    assert fh == [], fh
    assert ph >= 0.8 * n_para, f"{ph}/{n_para} paraphrases served"


def test_budget_controller_tightens_on_errors_and_relaxes_on_right_audits() -> None:
    curve = [(c / 100, max(0.0, 0.2 - c / 500)) for c in range(30, 100)]
    ctl = BudgetController(curve, default_budget=0.05, prior_weight=20)
    start = ctl.cut("ns")
    assert ctl.cut("other") == start
    for _ in range(10):
        ctl.observe("ns", start + 0.01, True)
    raised = ctl.cut("ns")
    assert raised > start
    assert ctl.cut("other") == start  # evidence stays in its namespace
    snap = ctl.snapshot()["ns"]
    assert snap["audits"] == 10 and snap["audit_disagreements"] == 10
    for _ in range(400):
        ctl.observe("ns", 0.995, False)
    assert ctl.cut("ns") < raised
    # a bad rating marks the neighbourhood: a near candidate must beat the rated probability
    import numpy as np

    v = np.ones(4, np.float32) / 2
    ctl.bad_feedback("ns", 0.999, v)
    assert not ctl.allow("ns", 0.999, v, 0.05)
    assert ctl.allow("ns", 0.999, np.array([1, 0, 0, 0], np.float32), 0.05)


def test_budget_cut_falls_below_the_calibrated_one_only_on_strong_evidence() -> None:
    """A few right audits do not lower the calibrated cut (the upper bound holds it); many
    do; wrong audits raise it."""
    curve = [(c / 100, max(0.0, 0.2 - c / 500)) for c in range(30, 100)]
    # the calibrated cut of budget 0.05 on this curve: e0(c) = 0.2 - c / 5 <= 0.05 from 0.75
    ctl = BudgetController(curve, base_cut=lambda e: 0.75, default_budget=0.05, prior_weight=20)
    assert ctl.cut("a") == 0.75
    for _ in range(3):
        ctl.observe("a", 0.99, False)
    assert ctl.cut("a") == 0.75
    for _ in range(2000):
        ctl.observe("a", 0.99, False)
    assert ctl.cut("a") < 0.75
    for _ in range(30):
        ctl.observe("b", 0.95, True)
    assert ctl.cut("b") > 0.75


async def test_bad_feedback_removes_the_answer_from_both_sidecars(
    tiers, redis_url, redis_prefix
) -> None:
    """Two proxy processes on one Redis: B serves a semantic hit of A's answer; rating it bad
    at B removes it from L1, Redis and both indexes, so both miss afterwards."""
    ports = [free_port(), free_port()]
    env = {
        "EDGE_PROXY_CACHE__REDIS_PREFIX": redis_prefix,
        "EDGE_PROXY_SERVER__ADMIN_TOKEN": "adm",
        "EDGE_PROXY_ROUTER__ENABLED": "false",
    }
    procs = [
        run_cli(
            "serve",
            "--port",
            str(port),
            "--tier",
            f"small={tiers['small'].url}",
            "--redis",
            redis_url,
            env=env,
        )
        for port in ports
    ]
    a_url, b_url = (f"http://127.0.0.1:{p}" for p in ports)
    try:
        for url, proc in zip((a_url, b_url), procs, strict=True):
            await wait_http(url + "/readyz", proc, timeout=90)
        a, b = (
            openai.AsyncOpenAI(base_url=u + "/v1", api_key="sk-x", max_retries=0)
            for u in (a_url, b_url)
        )
        await a.chat.completions.create(model="auto", messages=Q1)
        t0 = time.perf_counter()
        while (await admin_stats(b_url))["semantic"]["entries"] < 1:
            assert time.perf_counter() - t0 < 10, "entry never reached B"
            await asyncio.sleep(0.01)
        r = await b.chat.completions.with_raw_response.create(model="auto", messages=Q2)
        assert r.headers["x-cache"] == "hit-semantic"
        rid = r.headers["x-request-id"]
        bad = r.parse().choices[0].message.content
        # another tenant cannot rate it (nor learn that it exists), an unknown id is unknown
        assert (await feedback(b_url, rid, key="sk-other"))[0] == 404
        assert (await feedback(b_url, "no-such-request"))[0] == 404
        assert (await feedback(b_url, rid, rating="meh"))[0] == 400
        status, body = await feedback(b_url, rid)
        assert status == 200 and body["removed"] is True and body["outcome"] == "hit-semantic"
        assert (await feedback(b_url, rid))[0] == 404  # rated once
        t0 = time.perf_counter()
        while (await admin_stats(a_url))["semantic"]["entries"] > 0:
            assert time.perf_counter() - t0 < 10, "purge never reached A"
            await asyncio.sleep(0.01)
        # A has nothing for the paraphrase any more: a miss (it stores A's own new answer)
        r = await a.chat.completions.with_raw_response.create(model="auto", messages=Q2)
        assert r.headers["x-cache"] == "miss"
        fresh = r.parse().choices[0].message.content
        # B never serves the bad answer again: its exact entry is gone from L1 and Redis, and
        # a semantic hit now can only be A's new answer
        # (the mock answers a prompt with the same text every time, so a miss at B for Q1
        # returns text equal to `bad`: it comes from upstream, not from the cache)
        before = tiers["small"].mock.requests
        r = await b.chat.completions.with_raw_response.create(model="auto", messages=Q1)
        assert r.headers["x-cache"] in ("miss", "hit-semantic")
        if r.headers["x-cache"] == "hit-semantic":
            assert r.parse().choices[0].message.content == fresh != bad
        else:
            assert tiers["small"].mock.requests == before + 1
        est = (await admin_stats(b_url))["semantic"]["error_budget"]
        ns = next(iter(est))
        assert est[ns]["feedback_bad"] == 1
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


async def test_pair_memo_repeats_skip_the_cross_encoder(make_proxy, tiers) -> None:
    """A wording asked again against the same entry takes its probability from the memo (no
    second cross-encoder run, same decision); another tenant's identical pair does not (the
    scope is in the memo key, so one tenant cannot time another's questions)."""
    p = await make_proxy()
    memo = p.proxy.semantic.metrics.semantic_verify_memo

    def count(result: str) -> float:
        return memo.labels(result)._value.get()

    q = [{"role": "user", "content": "What are good ways to learn to play the guitar?"}]
    para = [{"role": "user", "content": "What is the best way to learn guitar?"}]
    outcomes = []
    for key in ("sk-memo-a", "sk-memo-b"):
        c = p.client(api_key=key)
        await c.chat.completions.create(model="auto", messages=q)
        for _ in range(2):
            r = await c.chat.completions.with_raw_response.create(model="auto", messages=para)
            outcomes.append(r.headers["x-cache"])
    # each tenant: its first ask scores (memo miss), its second takes the memo (a hit)
    assert count("miss") == 2 and count("hit") == 2
    assert outcomes[0] == outcomes[1] and outcomes[2] == outcomes[3]
    assert len(p.proxy.semantic._pair_memo) == 2


async def test_a_busy_verifier_sheds_lookups_instead_of_queueing(make_proxy) -> None:
    """The pair verifier is one thread. While it is held, lookups that would wait past the
    deadline behind those queued are shed (a miss, counted), so a flood of candidates cannot
    queue every other lookup behind it; the queued ones are decided once it is free."""
    p = await make_proxy(tier_names=("small",), semantic={"verify_deadline_s": 0.005})
    sem = p.proxy.semantic
    c = p.client(api_key="sk-busy")
    await c.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "How do I reset my password?"}])
    # a wording the cross-encoder decides (the same question form would need no model run),
    # so the verifier knows how long one run takes
    await c.chat.completions.create(model="auto", messages=[
        {"role": "user", "content": "What should I do to reset my password?"}])
    assert sem._pair_service_s > 0.0005
    skipped = p.proxy.metrics.semantic_skipped.labels("verify_deadline")
    before = skipped._value.get()
    gate = threading.Event()
    sem._pair_pool.submit(gate.wait, 30)  # the verifier thread is busy until the gate opens
    words = ["please", "quickly", "today's way", "again", "now", "right away", "exactly",
             "safely"]
    asks = [asyncio.ensure_future(c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user",
                                 "content": f"How can I reset my password {w}?"}]))
        for w in words]
    for _ in range(200):
        if skipped._value.get() > before:
            break
        await asyncio.sleep(0.01)
    shed = skipped._value.get() - before
    assert 0 < shed < len(words)
    assert 0 < sem._pair_pending * sem._pair_service_s <= 0.005 + sem._pair_service_s
    gate.set()
    done = await asyncio.gather(*asks)
    assert all(r.http_response.status_code == 200 for r in done)
    assert sum(r.headers["x-cache"] == "miss" for r in done) >= shed
    assert sem._pair_pending == 0


async def test_a_reused_request_id_cannot_take_over_another_tenants_rating(make_proxy) -> None:
    """x-request-id is the client's to choose: tenant B sending A's id gets its own record, and
    A's bad rating still removes A's answer. Generated ids tell nothing of the request count."""
    p = await make_proxy(tier_names=("small",))
    q = [{"role": "user", "content": "What is the tallest mountain in Africa?"}]
    a, b = p.client(api_key="sk-rid-a"), p.client(api_key="sk-rid-b")
    ra = await a.chat.completions.with_raw_response.create(
        model="auto", messages=q, extra_headers={"x-request-id": "shared-id-1"})
    assert ra.headers["x-cache"] == "miss"
    rb = await b.chat.completions.with_raw_response.create(
        model="auto", messages=q, extra_headers={"x-request-id": "shared-id-1"})
    assert rb.headers["x-cache"] == "miss"  # B's own entry (namespaces never share one)
    status, out = await feedback(p.url, "shared-id-1", key="sk-rid-a")
    assert status == 200 and out["removed"] is True
    again = await a.chat.completions.with_raw_response.create(model="auto", messages=q)
    assert again.headers["x-cache"] == "miss"  # A's answer is gone ...
    kept = await b.chat.completions.with_raw_response.create(model="auto", messages=q)
    assert kept.headers["x-cache"] == "hit-exact"  # ... and B's is not
    ids = []
    for _ in range(3):
        r = await a.chat.completions.with_raw_response.create(model="auto", messages=q)
        ids.append(r.headers["x-request-id"])
    assert len(set(ids)) == 3 and len({i[:12] for i in ids}) == 3  # no shared prefix + counter
    assert all(int(x, 16) - int(y, 16) not in (1, -1) for x, y in itertools.pairwise(ids))


async def test_audit_disagreement_is_evidence(make_proxy, tiers) -> None:
    """audit_rate 1: every semantic hit is asked upstream too. The mock's answer depends on the
    prompt, so the paraphrase's fresh answer differs from the served one: a disagreement."""
    p = await make_proxy(semantic={"audit_rate": 1.0}, server={"admin_token": "adm"})
    c = p.client(api_key="sk-audit")
    await c.chat.completions.create(model="auto", messages=Q1)
    before = p.proxy.semantic.budget_stats()
    r = await c.chat.completions.with_raw_response.create(model="auto", messages=Q2)
    assert r.headers["x-cache"] == "hit-semantic"
    t0 = time.perf_counter()
    while True:
        st = p.proxy.semantic.budget_stats()
        ns = next(iter(st))
        if st[ns]["audits"] >= 1:
            break
        assert time.perf_counter() - t0 < 10, "audit never judged"
        await asyncio.sleep(0.01)
    assert tiers["small"].mock.requests == 2  # the miss and the audit
    assert st[ns]["audit_disagreements"] == 1
    assert st[ns]["estimated_error_rate"] > before.get(ns, {}).get("estimated_error_rate", 0.0)
    stats = await admin_stats(p.url)
    assert stats["semantic"]["error_budget"][ns]["audits"] == 1
    async with aiohttp.ClientSession() as s, s.get(p.url + "/metrics") as resp:
        text = await resp.text()
    assert 'edge_proxy_semantic_audits_total{verdict="disagree"} 1.0' in text


@pytest.mark.parametrize(
    "text, moment",
    [
        ("What's the weather in Paris today?", True),
        ("you want to know about current time now", True),
        ("What time is it in Tokyo?", True),
        ("can you tell me the current date", True),
        ("What is the EUR exchange rate?", True),
        ("What is the time complexity of quicksort?", False),
        ("What is the current ratio in accounting?", False),
        ("What is the capital of France?", False),
    ],
)
def test_time_sensitive_patterns(text: str, moment: bool) -> None:
    """The default bypass patterns: one regex (config.time_sensitive) shared by the semantic
    layer, the short TTL and the evaluation."""
    from proxy.config import SemanticConfig, time_sensitive

    ts = time_sensitive(SemanticConfig())
    assert ts is not None
    assert bool(ts.search(text)) is moment
    assert time_sensitive(SemanticConfig(bypass_patterns=())) is None


@pytest.mark.parametrize(
    "question, short",
    [
        ("What's the weather in Paris today?", True),
        ("What is the capital of France?", False),
        # a long prompt is judged by its head and tail (TTL_SCAN_CHARS), where its question is
        ("Some context. " * 1000 + "What's the weather in Paris today?", True),
        ("What's the weather in Paris today? Context: " + "some context. " * 1000, True),
        ("Some context. " * 1000 + "What is the capital of France?", False),
    ],
)
async def test_time_sensitive_questions_get_the_short_ttl(
    make_proxy, redis_url, redis_prefix, question, short
) -> None:
    p = await make_proxy(
        cache={"redis_url": redis_url, "redis_prefix": redis_prefix},
        semantic={"time_sensitive_ttl_s": 30.0},
    )
    c = p.client(api_key="sk-ttl")
    r = await c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": question}]
    )
    key = bytes.fromhex(r.headers["x-cache-key"])
    l1 = p.proxy.cache.l1._data[key]
    left_l1 = l1[1] - time.monotonic()
    rkey = p.proxy.cache.l2.rkey(key, l1[2])
    client = aioredis.from_url(redis_url)
    try:
        ttl = -2
        for _ in range(200):
            ttl = await client.ttl(rkey)
            if ttl > 0:
                break
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()
    if short:
        assert 0 < ttl <= 30 and left_l1 <= 30
    else:
        assert ttl > 30 and left_l1 > 30


def test_budget_evidence_of_an_active_namespace_survives_a_flood() -> None:
    """Past max_namespaces the least recently used evidence goes: a caller making up
    namespaces cannot push out an active namespace's raised cut."""
    curve = [(c / 100, max(0.0, 0.05 - c / 2000)) for c in range(50, 100)]
    ctl = BudgetController(curve, base_cut=lambda e: 0.9, max_namespaces=100)
    for _ in range(20):
        ctl.observe("key:victim", 0.95, True)
    raised = ctl.cut("key:victim")
    assert raised > 0.9
    for i in range(500):
        ctl.cut(f"key:attacker/{i}")
        if i % 50 == 0:
            ctl.cut("key:victim")  # the victim keeps serving now and then
    assert ctl.cut("key:victim") == raised and len(ctl._ns) == 100
    snap = ctl.snapshot(10)
    assert len(snap) == 10 and next(iter(snap)) == "key:victim"  # newest first


def test_served_ledger_records_leave_the_cyclic_gcs_sight() -> None:
    """Up to 50,000 records live an hour: stored as plain tuples of atomic values, the GC stops
    tracking each after the first pass it survives (a NamedTuple it tracks for ever), so full
    passes do not walk them. What ``get`` returns is still a ServedRecord."""
    import gc
    import time

    import numpy as np

    from proxy.feedback import ServedLedger, ServedRecord

    led = ServedLedger(max_entries=3, max_age_s=60)
    for i in range(4):
        led.record(f"r{i}", "ns", b"k%d" % i, "miss")
    led.record("s", "ns", b"ks", "hit-semantic", 0.97, np.ones(4, np.float32))
    gc.collect()
    assert len(led) == 3 and not any(gc.is_tracked(r) for r in led._d.values())
    assert led.get("r0", "ns") is None and led.get("r3", "other") is None  # evicted; not theirs
    rec = led.get("s", "ns")
    assert isinstance(rec, ServedRecord) and rec.outcome == "hit-semantic" and rec.p == 0.97
    assert rec.vec is not None and rec.vec.dtype == np.float16 and rec.at <= time.monotonic()
    popped = led.pop("r3", "ns")
    assert popped is not None and popped[:5] == ("ns", b"k3", "miss", 1.0, None)
    assert led.get("r3", "ns") is None and len(led) == 2
