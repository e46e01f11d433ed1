"""``edge-proxy demo``: three mock vLLM tiers and the proxy on embedded defaults (no Redis unless
asked), a workload of repeats, paraphrases and concurrent duplicates, then tables that explain
where each request was answered and what it cost, against sending the same requests straight to
vLLM.

Everything runs in this process on one uvloop loop; nothing is downloaded. Every figure comes
from what the responses report (x-cache, x-route-tier, usage) and the proxy's own ledger, and the
demo checks that they agree: spent + saved = the cost straight to vLLM, and hits + single-flight
joins + upstream calls = answered requests.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.config import Config, TierConfig, load_config
from proxy.metrics import Metrics, cost_usd
from proxy.mock_vllm import start_mock
from proxy.server import build_app, install_protocol

# (question, paraphrases): the paraphrases are asked once their question may be cached
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("How do I reset my password?", ("How can I reset my password?",
                                     "How do I reset my password")),
    ("What is the capital of France?", ("what's the capital of France",
                                        "What is the capital city of France?")),
    ("Why is the sky blue?", ("Why is the sky blue in color?", "Why is the sky blue?!")),
    ("How do I reverse a list in Python?", ("How do I reverse a Python list?",
                                            "How can I reverse a list in Python?")),
    ("How many continents are there?", ("How many continents are on Earth?",
                                        "How many continents are there on Earth?")),
    ("What is the GIL in Python?", ("What is the GIL in CPython?",
                                    "What is Python's GIL?")),
    ("Explain the difference between TCP and UDP.", (
        "Explain the difference between UDP and TCP.",
        "Explain the differences between TCP and UDP.")),
    ("What is a vector database?", ("What's a vector database?", "What is a vector DB?")),
    ("How does HTTPS keep data private?", ("How does HTTPS keep my data private?",)),
    ("What causes the seasons on Earth?", ("What causes the seasons on the Earth?",)),
    ("Write a haiku about the sea.", ()), ("What is 17 times 23?", ()),
    ("Summarize the plot of Hamlet in two sentences.", ()),
    ("Translate 'good morning' into Spanish.", ()),
    ("Give me three tips for a job interview.", ()),
    ("What is the boiling point of water at sea level?", ()),
    ("Explain recursion to a child.", ()),
    ("What is the difference between a list and a tuple?", ()),
    ("Write a SQL query that counts rows per day.", ()),
    ("What does an LLM inference server do?", ()), ("How do I center a div in CSS?", ()),
    ("What is the speed of light?", ()), ("Name the planets of the solar system.", ()),
    ("How do vaccines work?", ()), ("Explain big-O notation briefly.", ()),
    ("What is Kubernetes used for?", ()), ("How do I make a cup of green tea?", ()),
    ("What is the Pythagorean theorem?", ()), ("Suggest a name for a coffee shop.", ()),
    ("What is the difference between RAM and disk?", ()),
]
MODELS = ["auto"] * 6 + ["medium-32b"] * 2 + ["large-70b"] * 2
PARAPHRASE_SHARE = 0.25
BURST_SHARE = 0.06  # requests sent as a burst of identical copies at the same moment
ORDER = ("hit-exact", "hit-semantic", "miss", "bypass")


@dataclass
class Result:
    question: str
    kind: str  # "question", "paraphrase", "burst"
    model: str
    stream: bool
    status: int = 0
    outcome: str = ""
    tier: str = ""
    ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def workload(n: int, seed: int = 7) -> list[list[tuple[str, str, str, bool]]]:
    """Batches of (text, kind, model, stream); a batch is sent at once (bursts are batches of
    identical requests, the rest are single requests)."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** 1.1 for i in range(len(QUESTIONS))]
    asked: set[int] = set()
    model_of: dict[str, tuple[str, bool]] = {}
    out: list[list[tuple[str, str, str, bool]]] = []
    count = 0
    while count < n:
        i = rng.choices(range(len(QUESTIONS)), weights)[0]
        q, paras = QUESTIONS[i]
        # a question keeps its model and form, as one application would ask it
        model, stream = model_of.setdefault(q, (rng.choice(MODELS), rng.random() < 0.5))
        r = rng.random()
        if i in asked and paras and r < PARAPHRASE_SHARE:
            out.append([(rng.choice(paras), "paraphrase", model, stream)])
            count += 1
        elif r > 1 - BURST_SHARE and i not in asked:
            k = min(4, n - count)
            out.append([(q, "burst", model, stream)] * k)
            count += k
        else:
            out.append([(q, "question", model, stream)])
            count += 1
        asked.add(i)
    return out


async def _send(session: aiohttp.ClientSession, base: str, res: Result) -> None:
    body: dict[str, Any] = {"model": res.model, "stream": res.stream,
                            "messages": [{"role": "user", "content": res.question}]}
    if res.stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    async with session.post(base + "/v1/chat/completions", data=orjson.dumps(body),
                            headers={"Content-Type": "application/json"}) as r:
        raw = await r.read()
        res.ms = (time.perf_counter() - t0) * 1000
        res.status = r.status
        res.outcome = r.headers.get("x-cache", "")
        res.tier = r.headers.get("x-route-tier", "")
    if r.status != 200:
        return
    usage: dict[str, Any] = {}
    if res.stream:
        for line in raw.split(b"\n\n"):
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = orjson.loads(line[6:]).get("usage") or usage
    else:
        usage = orjson.loads(raw).get("usage") or {}
    res.prompt_tokens = int(usage.get("prompt_tokens", 0))
    res.completion_tokens = int(usage.get("completion_tokens", 0))


Mock = tuple[str, Any, web.AppRunner, int]  # (tier name, MockVLLM, its runner, its port)


async def _start_mocks() -> list[Mock]:
    mocks: list[Mock] = []
    for name, model, ttft, tpot in (("small", "small-8b", 40, 8), ("medium", "medium-32b", 80, 15),
                                    ("large", "large-70b", 150, 30)):
        mock, runner, port = await start_mock(model, ttft_ms=ttft, tpot_ms=tpot, reply_tokens=40,
                                              chunk_tokens=2)
        mocks.append((name, mock, runner, port))
    return mocks


async def _start_proxy(mocks: list[Mock], redis: str | None
                       ) -> tuple[Config, Metrics, web.AppRunner, str]:
    """The proxy in front of the mocks: (cfg, metrics, its runner, its base URL)."""
    # a generous embedding timeout: on a busy machine the demo should still show the semantic
    # layer (a production proxy keeps 1 s and skips the layer instead of waiting)
    cfg = load_config(env={}, overrides={"cache": {"redis_url": redis or ""},
                                         "semantic": {"embed_timeout_s": 10.0}},
                      tier_flags=[f"{n}=http://127.0.0.1:{p}" for n, _, _, p in mocks])
    metrics = Metrics()
    app = build_app(cfg, metrics)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    install_protocol(runner, 1024)  # as `serve` does: the exact-hit fast path included
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    print(f"edge-proxy demo: proxy on {base}, tiers "
          + ", ".join(f"{n}={m.model} (:{p})" for n, m, _, p in mocks), flush=True)
    return cfg, metrics, runner, base


def _describe_workload(results: list[Result], concurrency: int) -> None:
    kinds: defaultdict[str, int] = defaultdict(int)
    for r in results:
        kinds[r.kind] += 1
    print(f"workload: {len(results)} chat requests, {concurrency} at a time, about half "
          f"streamed; {len(QUESTIONS)} questions with Zipf popularity (a few asked again and "
          f"again); {kinds['paraphrase']} paraphrases of questions asked before "
          f"({kinds['paraphrase'] / len(results):.0%}); {kinds['burst']} sent as bursts of "
          "identical copies at the same moment; models: auto (routed) 60 %, medium-32b 20 %, "
          "large-70b 20 %", flush=True)


async def _run_workload(base: str, batches: list[Any], results: list[Result],
                        concurrency: int) -> float:
    """Send every batch through the proxy; returns the wall time in seconds."""
    sem = asyncio.Semaphore(concurrency)
    t_start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        async def batch_task(batch: list[Result]) -> None:
            async with sem:
                await asyncio.gather(*(_send(session, base, r) for r in batch))

        it = iter(results)
        grouped = [[next(it) for _ in b] for b in batches]
        await asyncio.gather(*(batch_task(b) for b in grouped))
    return time.perf_counter() - t_start


async def _direct_sample(ok: list[Result], mocks: list[Mock], cfg: Config,
                         concurrency: int) -> list[float]:
    """Straight to vLLM: a sample of the same requests sent to their tiers directly."""
    direct: list[float] = []
    async with aiohttp.ClientSession() as session:
        sample = [r for r in ok][:: max(1, len(ok) // 48)]
        direct_sem = asyncio.Semaphore(concurrency)
        ports = {n: p for n, _, _, p in mocks}

        async def one_direct(r: Result) -> None:
            d = Result(r.question, r.kind, cfg.tier(r.tier).name, r.stream)
            d.model = next(m.model for n, m, _, _ in mocks if n == r.tier)
            async with direct_sem:
                await _send(session, f"http://127.0.0.1:{ports[r.tier]}", d)
            direct.append(d.ms)

        await asyncio.gather(*(one_direct(r) for r in sample))
    return direct


def _print_latency(results: list[Result], by: dict[str, list[Result]], joined: int,
                   direct: list[float]) -> None:
    print()
    print(f"{'answered by':<32}{'requests':>9}{'share':>8}{'p50 ms':>9}{'p99 ms':>9}")
    rows = [("cache, exact (hit-exact)", by["hit-exact"]),
            ("cache, semantic (hit-semantic)", by["hit-semantic"]),
            ("upstream (miss)", by["miss"] + by["bypass"])]
    for label, rs in rows:
        v = [r.ms for r in rs]
        print(f"{label:<32}{len(rs):>9}{len(rs) / len(results):>8.0%}"
              f"{_pct(v, 50):>9.1f}{_pct(v, 99):>9.1f}")
    print(f"{'  of which joined a call':<32}{joined:>9}{joined / len(results):>8.0%}"
          "   (single-flight: an identical request was in flight)")
    print(f"{'straight to vLLM (sample)':<32}{len(direct):>9}{'':>8}"
          f"{_pct(direct, 50):>9.1f}{_pct(direct, 99):>9.1f}")


def _print_costs(ok: list[Result], by: dict[str, list[Result]], tiers: dict[str, TierConfig],
                 spent: float, saved: float) -> float:
    """The cost table; returns the straight-to-vLLM cost (same tiers)."""
    cost_direct = sum(cost_usd(tiers[r.tier], r.prompt_tokens, r.completion_tokens) for r in ok)
    cost_large = sum(cost_usd(tiers["large"], r.prompt_tokens, r.completion_tokens) for r in ok)
    saved_layer = {o: sum(cost_usd(tiers[r.tier], r.prompt_tokens, r.completion_tokens)
                          for r in by[o]) for o in ("hit-exact", "hit-semantic")}
    print()
    print(f"{'cost':<34}{'USD':>11}{'per 1,000 req':>15}")
    per_k = 1000 / max(1, len(ok))
    for label, usd in (("straight to vLLM, same tiers", cost_direct),
                       ("straight to vLLM, all on large", cost_large),
                       ("with edge-proxy (spent)", spent)):
        print(f"{label:<34}{usd:>11.6f}{usd * per_k:>15.6f}")
    print(f"{'saved':<34}{saved:>11.6f}{saved * per_k:>15.6f}   "
          f"{saved / cost_direct if cost_direct else 0:.0%} of the straight-to-vLLM cost")
    joined_saved = saved - saved_layer["hit-exact"] - saved_layer["hit-semantic"]
    for label, usd in (("  by exact hits", saved_layer["hit-exact"]),
                       ("  by semantic hits", saved_layer["hit-semantic"]),
                       ("  by single-flight joins", joined_saved)):
        print(f"{label:<34}{usd:>11.6f}")
    return cost_direct


def _print_tiers(mocks: list[Mock], led: Any) -> None:
    print()
    print(f"{'tier':<8}{'model':<12}{'upstream calls':>15}{'hits':>6}{'joined':>8}"
          f"{'spent $':>11}{'saved $':>11}")
    for name, mock, _, _ in mocks:
        print(f"{name:<8}{mock.model:<12}{led.calls[name]:>15}{led.hits[name]:>6}"
              f"{led.joined[name]:>8}{led.spent[name]:>11.6f}{led.saved[name]:>11.6f}")


def _report(results: list[Result], direct: list[float], wall: float, mocks: list[Mock],
            cfg: Config, metrics: Metrics) -> int:
    """Print the tables; returns the exit code (1 on errors or if the figures disagree)."""
    ok = [r for r in results if r.status == 200]
    errors = len(results) - len(ok)
    led = metrics.ledger
    tiers: dict[str, TierConfig] = {t.name: t for t in cfg.tiers}
    spent, saved = sum(led.spent.values()), sum(led.saved.values())
    by = defaultdict(list)
    for r in ok:
        by[r.outcome].append(r)
    joined = sum(led.joined.values())
    calls = sum(led.calls.values())  # upstream completions billed (not the mocks' health checks)
    hits = len(by["hit-exact"]) + len(by["hit-semantic"])
    paraphrases = [r for r in ok if r.kind == "paraphrase"]
    para_hits = sum(r.outcome == "hit-semantic" for r in paraphrases)

    _print_latency(results, by, joined, direct)
    cost_direct = _print_costs(ok, by, tiers, spent, saved)
    _print_tiers(mocks, led)
    print()
    print(f"{len(results)} requests in {wall:.2f} s ({len(results) / wall:.0f} req/s), "
          f"errors {errors}; paraphrases served from the semantic cache: {para_hits} of "
          f"{len(paraphrases)}")
    balanced = abs(spent + saved - cost_direct) <= 1e-9 + 1e-6 * cost_direct
    counted = hits + joined + calls == len(ok)
    print(f"check: spent + saved = straight-to-vLLM cost: {'yes' if balanced else 'NO'}; "
          f"hits + joined + upstream calls = answered requests: {'yes' if counted else 'NO'}")
    print("""
What the lines mean:
  hit-exact       the same request (namespace, model, messages, parameters) was answered
                  before: served from the cache, no upstream call, cost saved
  hit-semantic    a paraphrase of an answered question (cosine >= 0.85 and the verifier's
                  guards): served that answer, no upstream call, cost saved
  miss            sent upstream; "joined" ones arrived while an identical request was already
                  in flight and got its answer as it streamed (x-cache: miss, no extra call;
                  counted as saved)
  straight to vLLM, same tiers: each request sent to the tier that answered it here, no cache:
                  the tokens each response reports, at that tier's price (= spent + saved)
  straight to vLLM, all on large: the same tokens, every request on the largest tier (no
                  router)
  sample latency  a sample of the same requests sent directly to the mock tiers: what a miss
                  costs in time without the proxy""")
    return 1 if errors or not balanced or not counted else 0


async def _demo(requests: int, concurrency: int, redis: str | None) -> int:
    mocks = await _start_mocks()
    cfg, metrics, runner, base = await _start_proxy(mocks, redis)
    batches = workload(requests)
    results = [Result(t, kind, m, s) for batch in batches for t, kind, m, s in batch]
    _describe_workload(results, concurrency)
    wall = await _run_workload(base, batches, results, concurrency)
    ok = [r for r in results if r.status == 200]
    direct = await _direct_sample(ok, mocks, cfg, concurrency)
    code = _report(results, direct, wall, mocks, cfg, metrics)
    await runner.cleanup()
    for _, _, mock_runner, _ in mocks:
        await mock_runner.cleanup()
    return code


def run_demo(requests: int = 300, concurrency: int = 16, redis: str | None = None) -> int:
    """Run the demo; returns the process exit code."""
    import uvloop

    return uvloop.run(_demo(requests, concurrency, redis))
