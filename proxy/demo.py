"""``edge-proxy demo``: three mock vLLM tiers and the proxy on embedded defaults (no Redis unless
asked), a workload with repeats, then a table of hits, latency per outcome and cost.

Everything runs in this process on one uvloop loop; nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.config import load_config
from proxy.metrics import Metrics, cost_usd
from proxy.mock_vllm import start_mock
from proxy.server import PROXY_KEY, build_app

QUESTIONS = [
    "How do I reset my password?", "What is the capital of France?",
    "Explain the difference between TCP and UDP.", "Write a haiku about the sea.",
    "What is 17 times 23?", "Summarize the plot of Hamlet in two sentences.",
    "How do I reverse a list in Python?", "What causes the seasons on Earth?",
    "Translate 'good morning' into Spanish.", "What is a vector database?",
    "Give me three tips for a job interview.", "How does HTTPS keep data private?",
    "What is the boiling point of water at sea level?", "Explain recursion to a child.",
    "How many continents are there?", "What is the difference between a list and a tuple?",
    "Write a SQL query that counts rows per day.", "Why is the sky blue?",
    "What does an LLM inference server do?", "How do I center a div in CSS?",
    "What is the speed of light?", "Name the planets of the solar system.",
    "What is the GIL in Python?", "How do vaccines work?",
    "Explain big-O notation briefly.", "What is Kubernetes used for?",
    "How do I make a cup of green tea?", "What is the Pythagorean theorem?",
    "Suggest a name for a coffee shop.", "What is the difference between RAM and disk?",
    # paraphrases of the questions above: semantic hits once those are cached
    "How can I reset my password?", "what's the capital of France", "Why is the sky blue in color?",
    "How do I reverse a Python list?", "How many continents are on Earth?",
    "What is the GIL in CPython?",
]
MODELS = ["auto"] * 6 + ["medium-32b"] * 2 + ["large-70b"] * 2


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def _demo(requests: int, concurrency: int, redis: str | None) -> int:
    tiers = []
    for name, model, ttft, tpot in (("small", "small-8b", 40, 8), ("medium", "medium-32b", 80, 15),
                                    ("large", "large-70b", 150, 30)):
        mock, runner, port = await start_mock(model, ttft_ms=ttft, tpot_ms=tpot, reply_tokens=40,
                                              chunk_tokens=2)
        tiers.append((name, mock, runner, port))
    cfg = load_config(env={}, overrides={"cache": {"redis_url": redis or ""}},
                      tier_flags=[f"{n}=http://127.0.0.1:{p}" for n, _, _, p in tiers])
    metrics = Metrics()
    app = build_app(cfg, metrics)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    proxy = app[PROXY_KEY]
    print(f"edge-proxy demo: proxy on {base}, tiers "
          + ", ".join(f"{n}={m.model} (:{p})" for n, m, _, p in tiers), flush=True)

    rng = random.Random(7)
    # Zipf-like popularity: a few questions are asked again and again
    weights = [1 / (i + 1) ** 1.1 for i in range(len(QUESTIONS))]
    work = [(rng.choices(QUESTIONS, weights)[0], rng.choice(MODELS), rng.random() < 0.5)
            for _ in range(requests)]
    lat: dict[str, list[float]] = defaultdict(list)
    without_proxy = 0.0
    errors = 0
    sem = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, q: str, model: str, stream: bool) -> None:
        nonlocal without_proxy, errors
        body = {"model": model, "messages": [{"role": "user", "content": q}], "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with sem:
            t0 = time.perf_counter()
            async with session.post(base + "/v1/chat/completions", data=orjson.dumps(body),
                                    headers={"Content-Type": "application/json"}) as r:
                raw = await r.read()
                elapsed = time.perf_counter() - t0
            if r.status != 200:
                errors += 1
                return
            lat[r.headers["x-cache"]].append(elapsed * 1000)
            usage: dict[str, Any] = {}
            if stream:
                for line in raw.split(b"\n\n"):
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        usage = orjson.loads(line[6:]).get("usage") or usage
            else:
                usage = orjson.loads(raw).get("usage") or {}
            tier = cfg.tier(r.headers["x-route-tier"])
            without_proxy += cost_usd(tier, usage.get("prompt_tokens", 0),
                                      usage.get("completion_tokens", 0))

    t_start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, q, m, s) for q, m, s in work))
    wall = time.perf_counter() - t_start
    upstream_calls = sum(m.requests for _, m, _, _ in tiers)
    led: dict[str, Any] = metrics.ledger.summary()

    print()
    print(f"{'outcome':<12}{'requests':>9}{'p50 ms':>10}{'p99 ms':>10}")
    for outcome in ("hit-exact", "hit-semantic", "miss", "bypass"):
        v = lat.get(outcome, [])
        if v:
            print(f"{outcome:<12}{len(v):>9}{_pct(v, 50):>10.2f}{_pct(v, 99):>10.2f}")
    hits = len(lat.get("hit-exact", [])) + len(lat.get("hit-semantic", []))
    print()
    print(f"requests            {requests} in {wall:.2f} s ({requests / wall:.0f} req/s), "
          f"errors {errors}")
    print(f"cache hits          {hits} ({hits / requests:.0%})")
    print(f"upstream calls      {upstream_calls} (saved {requests - upstream_calls})")
    for name, mock, _, _ in tiers:
        t = led["tiers"].get(name, {})
        print(f"  {name:<7} {mock.model:<11} calls {mock.requests:>4}  hits "
              f"{t.get('cache_hits', 0):>4}  spent ${t.get('spent_usd', 0):.6f}  saved "
              f"${t.get('saved_usd', 0):.6f}")
    spent = float(led["spent_usd"])
    print(f"cost without proxy  ${without_proxy:.6f}")
    print(f"cost with proxy     ${spent:.6f}  (saved ${float(led['saved_usd']):.6f}, "
          f"{1 - spent / without_proxy if without_proxy else 0:.0%})")
    assert proxy is not None
    await runner.cleanup()
    for _, _, r, _ in tiers:
        await r.cleanup()
    return 1 if errors else 0


def run_demo(requests: int = 300, concurrency: int = 16, redis: str | None = None) -> int:
    """Run the demo; returns the process exit code."""
    import uvloop

    return uvloop.run(_demo(requests, concurrency, redis))
