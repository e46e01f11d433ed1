"""Soak: the proxy as a real process under a steady mixed load for N minutes; does it stay flat?

    python benchmarks/soak.py --minutes 30
    python benchmarks/soak.py --minutes 0.5          # the short version

Starts two mock vLLM tiers and the proxy as subprocesses (``python -m proxy mock-vllm`` /
``serve``) with small cache capacities (EDGE_PROXY_CACHE__L1_MAX_ENTRIES,
EDGE_PROXY_SEMANTIC__CAPACITY, EDGE_PROXY_SEMANTIC__EMBED_CACHE_SIZE), so the caches fill early
and memory must plateau, then drives a mixed load at a modest rate: repeats (exact hits),
paraphrases from QQP (text_b of a text_a sent before: semantic candidates), fresh questions
(misses), a share streamed, and faults injected into the mocks through POST /faults. Every
few seconds it samples the proxy's RSS (/proc/PID/status VmRSS) and open fds (/proc/PID/fd).

Reports requests, errors (those explained by injected faults, and the rest: must be 0), RSS
start/end/max, fds start/end, hit rates, latency; writes benchmarks/results/soak.json and exits 1
if there was an unexpected error or the proxy died.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from machine import describe, machine

ROOT = Path(__file__).resolve().parent.parent
QQP = Path(os.environ.get("EDGE_PROXY_QQP", "/work/shared/data/qqp/qqp_dev.csv.gz"))
if not QQP.exists():
    QQP = ROOT.parent / "shared/data/qqp/qqp_dev.csv.gz"
#: Faults injected into a mock, one request each; every one may explain at most one error.
FAULTS = ({"status": 500}, {"status": 503}, {"cut_after": 2}, {"malformed": True},
          {"delay_ms": 30})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_pairs(limit: int, seed: int) -> list[tuple[str, str]]:
    """(text_a, text_b) pairs labelled duplicates (paraphrases), shuffled."""
    with gzip.open(QQP, "rt", encoding="utf-8") as f:
        rows = [(r["text_a"], r["text_b"]) for r in csv.DictReader(f) if r["label"] == "1"]
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open fds) of a process."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Load:
    """The workload's state and tallies."""

    def __init__(self, pairs: list[tuple[str, str]], seed: int) -> None:
        self.rng = random.Random(seed)
        self.pairs = pairs
        self.next_pair = 0
        self.sent: list[int] = []       # indices of pairs whose text_a was sent
        self.requests = 0
        self.outcomes: dict[str, int] = {}
        self.kinds: dict[str, int] = {}
        self.errors: list[str] = []     # any failed request
        self.injected = 0
        self.latencies: list[float] = []
        self.attacks: dict[str, int] = {}  # issue 11's attacks sent, by kind

    def pick(self) -> tuple[str, str]:
        """(kind, question): repeat 40%, paraphrase 20%, fresh 40% (fresh first, to seed)."""
        r = self.rng.random()
        if self.sent and r < 0.4:
            # Zipf-like: recent and popular questions come back more often
            i = self.sent[min(int(self.rng.paretovariate(1.2)) - 1, len(self.sent) - 1)]
            return "repeat", self.pairs[i][0]
        if self.sent and r < 0.6:
            return "paraphrase", self.pairs[self.rng.choice(self.sent)][1]
        i = self.next_pair % len(self.pairs)
        self.next_pair += 1
        self.sent.insert(0, i)
        return "fresh", self.pairs[i][0]


async def one(session: aiohttp.ClientSession, url: str, load: Load) -> None:
    kind, question = load.pick()
    stream = load.rng.random() < 0.3
    payload = {"model": "auto", "messages": [{"role": "user", "content": question}],
               "stream": stream}
    load.kinds[kind] = load.kinds.get(kind, 0) + 1
    t0 = time.perf_counter()
    try:
        async with session.post(url + "/v1/chat/completions", json=payload,
                                timeout=aiohttp.ClientTimeout(total=30)) as r:
            raw = await r.read()
            status, outcome = r.status, r.headers.get("x-cache", "none")
    except (aiohttp.ClientError, TimeoutError) as exc:
        load.requests += 1
        load.errors.append(f"client: {type(exc).__name__}: {exc}")
        return
    load.requests += 1
    load.latencies.append(time.perf_counter() - t0)
    failed = status != 200 or (stream and not raw.rstrip().endswith(b"data: [DONE]"))
    if failed:
        load.errors.append(f"HTTP {status} stream={stream}: {raw[-200:]!r}")
    else:
        load.outcomes[outcome] = load.outcomes.get(outcome, 0) + 1


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready in {timeout} s")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "EDGE_PROXY_CACHE__L1_MAX_ENTRIES": str(args.l1_entries),
           "EDGE_PROXY_SERVER__IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
           "EDGE_PROXY_SEMANTIC__CAPACITY": str(args.semantic_capacity),
           "EDGE_PROXY_SEMANTIC__EMBED_CACHE_SIZE": str(args.semantic_capacity)}
    py = [sys.executable, "-m", "proxy"]
    tiers = {"small": ("small-8b", free_port()), "large": ("large-70b", free_port())}
    procs: list[subprocess.Popen[bytes]] = []
    log = open(args.log, "wb") if args.log else subprocess.DEVNULL  # noqa: SIM115
    try:
        for model, port in tiers.values():
            procs.append(subprocess.Popen(
                [*py, "mock-vllm", "--port", str(port), "--model", model, "--ttft-ms", "5",
                 "--tpot-ms", "0.5", "--reply-tokens", "16"], cwd=ROOT, env=env,
                stdout=log, stderr=log))
        port = free_port()
        serve = [*py, "serve", "--port", str(port), "--log-level", "warning"]
        for name, (_, tport) in tiers.items():
            serve += ["--tier", f"{name}=http://127.0.0.1:{tport}"]
        if args.redis:
            serve += ["--redis", args.redis]
        proxy = subprocess.Popen(serve, cwd=ROOT, env=env, stdout=log, stderr=log)
        procs.append(proxy)
        url = f"http://127.0.0.1:{port}"
        for _, tport in tiers.values():
            await wait_ready(f"http://127.0.0.1:{tport}/health", procs[0])
        await wait_ready(url + "/readyz", proxy)
        return await drive(args, url, proxy, [f"http://127.0.0.1:{p}" for _, p in
                                              tiers.values()])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if log is not subprocess.DEVNULL:
            log.close()


#: issue 11's attacks, sent at a low rate beside the load; each has one expected answer
ATTACKS = ("bad_namespace_byte", "text_plain_post", "cross_tenant_probe", "slowloris_head")
IDLE_TIMEOUT_S = 5.0  # the proxy's server.idle_timeout_s in the soak


async def attack(session: aiohttp.ClientSession, url: str, load: Load, kind: str) -> None:
    """One attack; a wrong answer is an error of the run."""
    load.attacks[kind] = load.attacks.get(kind, 0) + 1
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    try:
        if kind in ("bad_namespace_byte", "slowloris_head"):
            reader, writer = await asyncio.open_connection(host, int(port))
            if kind == "bad_namespace_byte":
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nConnection: "
                             b"close\r\nContent-Type: application/json\r\nx-cache-namespace: "
                             b"t\xff\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\n\r\n" + body.encode())
                async with asyncio.timeout(10):
                    out = await reader.read()
                if b" 400 " not in out.split(b"\r\n", 1)[0] or b"invalid_header" not in out:
                    load.errors.append(f"attack {kind}: {out[:120]!r}")
            else:  # half a head: the proxy must close it within its idle timeout
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Ty")
                async with asyncio.timeout(IDLE_TIMEOUT_S + 10):
                    await reader.read()
            writer.close()
        elif kind == "text_plain_post":
            async with session.post(url + "/v1/chat/completions", data=body,
                                    headers={"Content-Type": "text/plain"}) as r:
                if r.status != 415:
                    load.errors.append(f"attack {kind}: HTTP {r.status}")
        else:  # another tenant naming the soak's namespace must never get its entries
            question = load.pairs[load.rng.choice(load.sent)][0] if load.sent else "hi"
            n = sum(load.attacks.values())
            async with session.post(url + "/v1/chat/completions", json={
                    "model": "auto", "messages": [{"role": "user", "content": question}]},
                    headers={"Authorization": f"Bearer sk-attacker-{n}",
                             "x-cache-namespace": "anon"}) as r:
                await r.read()
                if r.status == 200 and r.headers.get("x-cache", "").startswith("hit"):
                    load.errors.append(f"attack {kind}: {r.headers.get('x-cache')}")
    except (TimeoutError, OSError, aiohttp.ClientError) as exc:
        load.errors.append(f"attack {kind}: {type(exc).__name__}: {exc}")


async def drive(args: argparse.Namespace, url: str, proxy: subprocess.Popen[bytes],
                mocks: list[str]) -> dict[str, Any]:
    load = Load(load_pairs(args.pairs, args.seed), args.seed)
    duration = args.minutes * 60
    samples: list[dict[str, float]] = []
    sem = asyncio.Semaphore(args.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    t_start = time.monotonic()
    next_sample = next_fault = next_attack = 0.0
    async with aiohttp.ClientSession(connector=connector) as session:

        async def guarded() -> None:
            async with sem:
                await one(session, url, load)

        n = 0
        while (elapsed := time.monotonic() - t_start) < duration:
            if proxy.poll() is not None:
                load.errors.append(f"proxy exited with {proxy.returncode}")
                break
            if elapsed >= next_sample:
                rss, fds = proc_stats(proxy.pid)
                samples.append({"t": round(elapsed, 1), "rss_mib": round(rss, 1), "fds": fds,
                                "requests": load.requests})
                next_sample += args.sample_s
            if elapsed >= next_fault and elapsed > 2:
                fault = load.rng.choice(FAULTS)
                async with session.post(load.rng.choice(mocks) + "/faults",
                                        json={**fault, "count": 1}) as r:
                    assert r.status == 200
                if "delay_ms" not in fault:  # a delay is a fault that must not cause an error
                    load.injected += 1
                next_fault += args.fault_every_s
            if args.attack_every_s and elapsed >= next_attack and elapsed > 2:
                a = asyncio.create_task(attack(session, url, load, load.rng.choice(ATTACKS)))
                tasks.add(a)
                a.add_done_callback(tasks.discard)
                next_attack += args.attack_every_s
            task = asyncio.create_task(guarded())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, t_start + n / args.rate - time.monotonic()))
        await asyncio.gather(*tasks)
        for m in mocks:  # nothing armed may linger
            async with session.post(m + "/faults", json={}) as r:
                assert r.status == 200
    await asyncio.sleep(1.0)  # connections close, the proxy settles
    rss, fds = proc_stats(proxy.pid)
    samples.append({"t": round(time.monotonic() - t_start, 1), "rss_mib": round(rss, 1),
                    "fds": fds, "requests": load.requests})
    return summarize(args, load, samples, proxy.poll() is None)


def summarize(args: argparse.Namespace, load: Load, samples: list[dict[str, float]],
              alive: bool) -> dict[str, Any]:
    # Skip the warm-up sample(s): RSS "start" is after the first 10% of the run (caches filling).
    warm = samples[max(1, len(samples) // 10)] if len(samples) > 2 else samples[0]
    served = sum(load.outcomes.values())
    hits = load.outcomes.get("hit-exact", 0) + load.outcomes.get("hit-semantic", 0)
    lat = sorted(load.latencies) or [0.0]
    # an error whose body names the mock's injected fault is explained however many requests
    # got it (identical requests waiting on one upstream call all share its failure); the others
    # must not outnumber the faults injected
    tagged = sum(1 for e in load.errors if "injected fault" in e)
    unexpected = max(0, len(load.errors) - tagged - load.injected) + (0 if alive else 1)
    half = [s["rss_mib"] for s in samples[len(samples) // 2:]]
    return {
        "minutes": args.minutes, "rate_per_s": args.rate, "requests": load.requests,
        "kinds": load.kinds, "outcomes": load.outcomes,
        "hit_rate": round(hits / served, 4) if served else 0.0,
        "exact_hit_rate": round(load.outcomes.get("hit-exact", 0) / served, 4) if served else 0,
        "semantic_hit_rate": round(load.outcomes.get("hit-semantic", 0) / served, 4)
        if served else 0,
        "injected_faults": load.injected, "attacks": load.attacks, "errors": len(load.errors),
        "unexpected_errors": unexpected, "error_samples": load.errors[:10],
        "proxy_alive": alive,
        "rss_mib": {"first": samples[0]["rss_mib"], "start": warm["rss_mib"],
                    "end": samples[-1]["rss_mib"], "max": max(s["rss_mib"] for s in samples),
                    "second_half_min": min(half), "second_half_max": max(half)},
        "fds": {"first": samples[0]["fds"], "start": warm["fds"], "end": samples[-1]["fds"],
                "max": max(s["fds"] for s in samples)},
        "latency_ms": {"p50": round(lat[len(lat) // 2] * 1000, 1),
                       "p99": round(lat[int(len(lat) * 0.99)] * 1000, 1)},
        "config": {"l1_max_entries": args.l1_entries,
                   "semantic_capacity": args.semantic_capacity,
                   "embed_cache_size": args.semantic_capacity, "redis": args.redis or None},
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=25.0, help="requests per second")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=20_000, help="QQP paraphrase pairs to use")
    ap.add_argument("--l1-entries", type=int, default=400)
    ap.add_argument("--semantic-capacity", type=int, default=400)
    ap.add_argument("--sample-s", type=float, default=3.0, help="RSS/fd sampling period")
    ap.add_argument("--fault-every-s", type=float, default=5.0)
    ap.add_argument("--attack-every-s", type=float, default=2.0,
                    help="issue 11's attacks (bad header byte, text/plain POST, cross-tenant "
                    "probe, slowloris head), one every this many seconds; 0 = none")
    ap.add_argument("--redis", default="", help="Redis URL for L2 (default: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default="", help="file for the children's output")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/soak.json"))
    args = ap.parse_args(argv)
    print(describe(), flush=True)
    res = asyncio.run(run(args))
    res["machine"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    r, f = res["rss_mib"], res["fds"]
    print(f"{res['requests']} requests in {args.minutes} min; outcomes {res['outcomes']}; "
          f"hit rate {res['hit_rate']:.1%} (exact {res['exact_hit_rate']:.1%}, semantic "
          f"{res['semantic_hit_rate']:.1%})")
    print(f"errors {res['errors']} (injected faults {res['injected_faults']}, unexpected "
          f"{res['unexpected_errors']}); latency p50 {res['latency_ms']['p50']} ms "
          f"p99 {res['latency_ms']['p99']} ms")
    print(f"RSS MiB first {r['first']} start {r['start']} end {r['end']} max {r['max']}; "
          f"fds first {f['first']} start {f['start']} end {f['end']} max {f['max']}")
    for e in res["error_samples"]:
        print("  ", e)
    return 0 if res["unexpected_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
