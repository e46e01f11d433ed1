"""Issue 11's resource targets, measured:

- ``prompts``: 1,000 requests of 390k-character prompts through a real proxy process (mock vLLM
  tier, no Redis): RSS growth of the proxy (target <= 100 MB).
- ``metrics``: 10,000 namespaces (one API key each) accounted by the proxy's Metrics: size of
  the /metrics text and its render time (targets <= 200 KB, <= 10 ms), with the namespace
  label cap (default) and without it (what 133f5ff did).
- ``semantic``: memory per semantic-index entry, 10,000 entries in one scope vs one entry in
  each of 10,000 scopes (target: the same), measured with tracemalloc.
- ``slowloris``: a real proxy process; exact-hit latency (sequential requests on one keep-alive
  connection) alone, then with 1,000 connections that sent half a request head (re-opened as
  the proxy closes them). Target: P99 within 20 %; every slow connection closed within the
  head timeout (server.idle_timeout_s).

    python benchmarks/security_bounds.py                 # everything
    python benchmarks/security_bounds.py --only metrics semantic
    python benchmarks/security_bounds.py --out benchmarks/results/security_bounds.json

Prints the machine (CPU model, int8 features, load) first; figures from a shared box are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from load_exact import free_port  # noqa: E402
from machine import describe, machine  # noqa: E402

PY = sys.executable


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited: {proc.returncode}")
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not up")


class Stack:
    """A mock vLLM tier and a proxy, as child processes."""

    def __init__(self, **env: str) -> None:
        self.mock_port, self.port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mock = subprocess.Popen([PY, "-m", "proxy", "mock-vllm", "--port",
                                      str(self.mock_port), "--model", "small-8b", "--ttft-ms",
                                      "1", "--tpot-ms", "0"], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proxy = subprocess.Popen(
            [PY, "-m", "proxy", "serve", "--port", str(self.port), "--log-level", "warning",
             "--tier", f"small=http://127.0.0.1:{self.mock_port}"], cwd=ROOT,
            env={**os.environ, "EDGE_PROXY_ROUTER__ENABLED": "false", **env},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def __aenter__(self) -> Stack:
        await wait_up(f"http://127.0.0.1:{self.mock_port}/health", self.mock)
        await wait_up(self.url + "/readyz", self.proxy)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in (self.proxy, self.mock):
            p.terminate()
            p.wait(10)


def chat(text: str) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 64}


HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}


# -- prompts -------------------------------------------------------------------------------------


async def bench_prompts(n: int, chars: int) -> dict[str, Any]:
    async with Stack() as st, aiohttp.ClientSession() as s:
        base = "Summarize this document. " + "lorem ipsum dolor sit amet " * (chars // 27 + 1)
        warm = [json.dumps(chat(f"warm {i} " + base[:chars])).encode() for i in range(20)]
        for body in warm:
            async with s.post(st.url + "/v1/chat/completions", data=body, headers=HEADERS) as r:
                assert r.status == 200, await r.text()
        gc.collect()
        before = rss_mib(st.proxy.pid)
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(4)
        peak = before

        async def one(i: int) -> None:
            nonlocal peak
            body = json.dumps(chat(f"document {i}: " + base[:chars - 20])).encode()
            async with sem, s.post(st.url + "/v1/chat/completions", data=body,
                                   headers=HEADERS) as r:
                assert r.status == 200, await r.text()
            if i % 50 == 0:
                peak = max(peak, rss_mib(st.proxy.pid))

        await asyncio.gather(*(one(i) for i in range(n)))
        await asyncio.sleep(1.0)
        after = rss_mib(st.proxy.pid)
        return {"prompts": n, "chars": chars, "rss_before_mib": round(before, 1),
                "rss_after_mib": round(after, 1), "rss_peak_mib": round(peak, 1),
                "rss_growth_mib": round(after - before, 1),
                "seconds": round(time.perf_counter() - t0, 1), "target_mib": 100}


# -- metrics -------------------------------------------------------------------------------------


async def _loop_lag(render: Any, rounds: int = 10) -> float:
    """Longest delay of a 1 ms ticker on the loop while /metrics renders as the proxy does it
    (asyncio.to_thread): how long a scrape holds the event loop."""
    worst = 0.0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal worst
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t0 - 0.001)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    for _ in range(rounds):
        await asyncio.to_thread(render)
    done.set()
    await ticker
    return worst


async def bench_metrics(namespaces: int) -> dict[str, Any]:
    from proxy.config import TierConfig
    from proxy.keys import namespace_of
    from proxy.metrics import Metrics

    tiers = [TierConfig(name, ("http://x",), price_input_per_m=1, price_output_per_m=2)
             for name in ("small", "medium", "large")]
    out: dict[str, Any] = {"namespaces": namespaces}
    for label, cap in (("capped", None), ("uncapped", 10**9)):
        m = Metrics() if cap is None else Metrics(max_namespaces=cap)
        for i in range(namespaces):
            ns = namespace_of(None, f"Bearer sk-tenant-{i}")
            tier = tiers[i % 3]
            m.spend(tier, ns, 100, 20)
            m.save(tier, ns, 100, 20)
            m.observe_request("chat", "miss", tier.name, 0.003)
        text = m.render()
        times = []
        for _ in range(21):
            t0 = time.perf_counter()
            m.render()
            times.append(time.perf_counter() - t0)
        out[label] = {"bytes": len(text), "render_ms_median": round(
            statistics.median(times) * 1000, 3), "render_ms_max": round(max(times) * 1000, 3),
            "max_namespaces": m.max_namespaces,
            "loop_lag_ms_max": round(await _loop_lag(m.render) * 1000, 3)}
    # the same ticker with nothing rendering: this machine's own scheduling noise
    out["loop_lag_ms_max_idle"] = round(await _loop_lag(lambda: None) * 1000, 3)
    out["targets"] = {"bytes": 200_000, "render_ms": 10}
    return out


# -- semantic ------------------------------------------------------------------------------------


_SEMANTIC_CHILD = """
import gc, json, sys, time
import numpy as np
from proxy.semantic import SemanticEntry, SemanticIndex
entries, scopes = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
vecs = rng.standard_normal((entries, 384)).astype(np.float32)
vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
texts = [f"question number {i} about something" for i in range(entries)]
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:"))
gc.collect()
before = rss()
idx = SemanticIndex(capacity=entries * 2)
now = time.time()
for i in range(entries):
    idx.add(vecs[i], SemanticEntry(key=i.to_bytes(16, "big"),
            scope=(i % scopes).to_bytes(16, "big"), namespace=f"key:{i % scopes:016x}",
            query_text=texts[i], tier="small", max_tokens=None, created=now,
            expires=now + 3600))
gc.collect()
print(json.dumps({"rss_bytes": rss() - before, "memory_bytes": idx.memory_bytes()}))
"""


def bench_semantic(entries: int) -> dict[str, Any]:
    """RSS growth of a fresh process while it indexes ``entries`` entries (vectors, usearch
    graphs and Python bookkeeping included), in one scope and in one scope each."""
    out: dict[str, Any] = {"entries": entries}
    for label, scopes in (("one_scope", 1), ("one_per_scope", entries)):
        raw = subprocess.run([PY, "-c", _SEMANTIC_CHILD, str(entries), str(scopes)], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(raw.strip().splitlines()[-1])
        out[label] = {"scopes": scopes, "rss_bytes_per_entry": round(r["rss_bytes"] / entries),
                      "memory_bytes_per_entry": round(r["memory_bytes"] / entries)}
    out["ratio_spread_vs_one"] = round(out["one_per_scope"]["rss_bytes_per_entry"]
                                       / out["one_scope"]["rss_bytes_per_entry"], 2)
    return out


# -- slowloris -----------------------------------------------------------------------------------


async def bench_slowloris(slow: int, requests: int, idle_timeout: float) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * slow:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * slow), hard))
    async with Stack(EDGE_PROXY_SERVER__IDLE_TIMEOUT_S=str(idle_timeout)) as st:
        body = json.dumps(chat("what is an exact hit")).encode()
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn) as s:
            async def latencies() -> list[float]:
                out = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    async with s.post(st.url + "/v1/chat/completions", data=body,
                                      headers=HEADERS) as r:
                        await r.read()
                        assert r.status == 200 and r.headers["x-cache"] == "hit-exact"
                    out.append(time.perf_counter() - t0)
                return out

            async with s.post(st.url + "/v1/chat/completions", data=body, headers=HEADERS) as r:
                await r.read()
            alone = await latencies()
            closed_after: list[float] = []
            stop = asyncio.Event()
            half = b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Ty"

            async def slow_conn() -> None:
                while not stop.is_set():
                    try:
                        reader, writer = await asyncio.open_connection("127.0.0.1", st.port)
                    except OSError:
                        await asyncio.sleep(0.1)
                        continue
                    opened = time.monotonic()
                    writer.write(half)
                    try:
                        while await reader.read(1024):
                            pass
                        closed_after.append(time.monotonic() - opened)
                    except OSError:
                        closed_after.append(time.monotonic() - opened)
                    finally:
                        writer.close()

            tasks = [asyncio.create_task(slow_conn()) for _ in range(slow)]
            await asyncio.sleep(1.0)
            during = await latencies()
            await asyncio.sleep(max(0.0, idle_timeout + 1.5))
            stop.set()
            await asyncio.sleep(idle_timeout + 1.0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def pct(xs: list[float], p: float) -> float:
        return round(sorted(xs)[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000, 3)

    return {"slow_connections": slow, "requests": requests, "idle_timeout_s": idle_timeout,
            "alone_ms": {"p50": pct(alone, 50), "p99": pct(alone, 99)},
            "with_slowloris_ms": {"p50": pct(during, 50), "p99": pct(during, 99)},
            "p99_ratio": round(pct(during, 99) / pct(alone, 99), 2),
            "slow_closed": len(closed_after),
            "slow_closed_after_s_max": round(max(closed_after), 2) if closed_after else None,
            "targets": {"p99_ratio": 1.2, "closed_within_s": idle_timeout}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"machine": machine()}
    only = set(args.only or ("metrics", "semantic", "prompts", "slowloris"))
    if "metrics" in only:
        res["metrics"] = await bench_metrics(args.namespaces)
        print(json.dumps(res["metrics"], indent=1), flush=True)
    if "semantic" in only:
        res["semantic"] = bench_semantic(args.entries)
        print(json.dumps(res["semantic"], indent=1), flush=True)
    if "prompts" in only:
        res["prompts"] = await bench_prompts(args.prompts, args.chars)
        print(json.dumps(res["prompts"], indent=1), flush=True)
    if "slowloris" in only:
        res["slowloris"] = await bench_slowloris(args.slow, args.requests, args.idle_timeout)
        print(json.dumps(res["slowloris"], indent=1), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=["metrics", "semantic", "prompts", "slowloris"])
    ap.add_argument("--namespaces", type=int, default=10_000)
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--prompts", type=int, default=1_000)
    ap.add_argument("--chars", type=int, default=390_000)
    ap.add_argument("--slow", type=int, default=1_000)
    ap.add_argument("--requests", type=int, default=2_000)
    ap.add_argument("--idle-timeout", type=float, default=5.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    print(describe(), flush=True)
    res = asyncio.run(run(args))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
