"""Load test of exact-cache hits against the floor of this machine, in one run.

Starts a mock vLLM tier, the proxy and a bare aiohttp handler returning the same bytes; pins the
servers to one core and the load generator (hey) to the other; alternates bare and proxy runs
(rounds) and reports medians of P50 / P95 / P99 at a fixed rate, max throughput, and the ratios.

    python benchmarks/load_exact.py [--rate 500] [--seconds 10] [--rounds 3]

Writes benchmarks/results/load_exact.json. Needs `hey` (Debian: apt-get install hey) and
taskset (util-linux).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from machine import describe, machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BODY = {"model": "auto",
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wait_redis(port: int, timeout: float = 10) -> None:
    """Until a redis-server on 127.0.0.1:port answers PING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not come up")


def post(url: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read(), dict(r.headers)


def pinned(core: str, *cmd: str) -> list[str]:
    return ["taskset", "-c", core, *cmd] if shutil.which("taskset") else list(cmd)


HEY_PCT = re.compile(r"\s+(\d+)% in ([\d.]+) secs")
HEY_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
HEY_STATUS = re.compile(r"\[(\d+)\]\s+(\d+) responses")


def hey(url: str, body_file: str, core: str, *, rate: float | None, seconds: float,
        conns: int) -> dict[str, float]:
    """One hey run: fixed total rate (split over conns) or unthrottled."""
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(conns), "-m", "POST", "-T", "application/json",
           "-D", body_file, "-disable-compression"]
    if rate:
        cmd += ["-q", str(rate / conns)]
    out = subprocess.run(pinned(core, *cmd, url), capture_output=True, text=True,
                         check=True).stdout
    pct = {int(p): float(s) * 1000 for p, s in HEY_PCT.findall(out)}
    status = {int(c): int(n) for c, n in HEY_STATUS.findall(out)}
    return {"p50_ms": pct[50], "p95_ms": pct[95], "p99_ms": pct[99],
            "rps": float(HEY_RPS.search(out).group(1)),  # type: ignore[union-attr]
            "ok": status.get(200, 0), "not_ok": sum(n for c, n in status.items() if c != 200)}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=500, help="fixed request rate, req/s")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=10, help="hey workers at the fixed rate")
    ap.add_argument("--max-conns", type=int, default=32, help="hey workers for max throughput")
    ap.add_argument("--server-core", default="0")
    ap.add_argument("--load-core", default="1")
    ap.add_argument("--out", default=str(RESULTS / "load_exact.json"))
    args = ap.parse_args()
    if not shutil.which("hey"):
        print("hey not found (Debian: apt-get install hey)", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(describe(), flush=True)
    py = sys.executable
    mport, pport, bport = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.mkdtemp(prefix="edge-load-")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        procs.append(subprocess.Popen(pinned(args.load_core, py, "-m", "proxy", "mock-vllm",
                                             "--port", str(mport), "--model", "small-8b"),
                                      env=env, stdout=subprocess.DEVNULL))
        wait_up(f"http://127.0.0.1:{mport}/health")
        procs.append(subprocess.Popen(pinned(args.server_core, py, "-m", "proxy", "serve",
                                             "--port", str(pport), "--log-level", "warning",
                                             "--tier", f"small=http://127.0.0.1:{mport}"),
                                      env=env, stdout=subprocess.DEVNULL))
        wait_up(f"http://127.0.0.1:{pport}/readyz")
        body = json.dumps(BODY).encode()
        purl = f"http://127.0.0.1:{pport}/v1/chat/completions"
        post(purl, body)
        answer, headers = post(purl, body)
        assert headers.get("x-cache") == "hit-exact", headers
        body_file, answer_file = os.path.join(tmp, "body.json"), os.path.join(tmp, "answer.json")
        Path(body_file).write_bytes(body)
        Path(answer_file).write_bytes(answer)
        procs.append(subprocess.Popen(pinned(args.server_core, py,
                                             str(ROOT / "benchmarks" / "bare_server.py"),
                                             "--port", str(bport), "--body", answer_file),
                                      env=env, stdout=subprocess.DEVNULL))
        wait_up(f"http://127.0.0.1:{bport}/healthz")
        burl = f"http://127.0.0.1:{bport}/v1/chat/completions"
        # warm both (connection setup, first-call costs)
        for url in (burl, purl):
            hey(url, body_file, args.load_core, rate=None, seconds=1, conns=4)
        fixed: dict[str, list[dict[str, float]]] = {"bare": [], "proxy": []}
        peak: dict[str, list[dict[str, float]]] = {"bare": [], "proxy": []}
        for r in range(args.rounds):
            for name, url in (("bare", burl), ("proxy", purl)):
                fixed[name].append(hey(url, body_file, args.load_core, rate=args.rate,
                                       seconds=args.seconds, conns=args.conns))
                peak[name].append(hey(url, body_file, args.load_core, rate=None,
                                      seconds=max(3.0, args.seconds / 2), conns=args.max_conns))
                f, m = fixed[name][-1], peak[name][-1]
                print(f"round {r + 1}/{args.rounds} {name:<5} @{args.rate:.0f}/s p50 "
                      f"{f['p50_ms']:.2f} p99 {f['p99_ms']:.2f} ms | max {m['rps']:.0f} req/s",
                      flush=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{pport}/metrics") as resp:
            metrics = resp.read().decode()
        misses = re.search(r'edge_proxy_requests_total\{endpoint="chat",outcome="miss",'
                           r'tier="small"\} ([\d.e+]+)', metrics)
        result = {
            "machine": machine(),
            "rate": args.rate, "seconds": args.seconds, "rounds": args.rounds,
            "bare": {"fixed": median_of(fixed["bare"]), "max_rps": median_of(peak["bare"])["rps"]},
            "proxy_exact_hit": {"fixed": median_of(fixed["proxy"]),
                                "max_rps": median_of(peak["proxy"])["rps"]},
            "proxy_misses_during_run": float(misses.group(1)) if misses else 0.0,
            "raw": {"fixed": fixed, "peak": peak},
        }
        b, p = result["bare"], result["proxy_exact_hit"]
        result["ratios"] = {
            "p50": p["fixed"]["p50_ms"] / b["fixed"]["p50_ms"],
            "p99": p["fixed"]["p99_ms"] / b["fixed"]["p99_ms"],
            "max_rps": p["max_rps"] / b["max_rps"],
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print()
        print(f"{'':<16}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max req/s':>11}")
        for name, d in (("bare aiohttp", b), ("proxy exact hit", p)):
            f = d["fixed"]
            print(f"{name:<16}{f['p50_ms']:>9.2f}{f['p95_ms']:>9.2f}{f['p99_ms']:>9.2f}"
                  f"{d['max_rps']:>11.0f}")
        rt = result["ratios"]
        print(f"{'ratio':<16}{rt['p50']:>9.2f}{'':>9}{rt['p99']:>9.2f}{rt['max_rps']:>11.2f}")
        print(describe(result["machine"]))
        print(f"(at {args.rate:.0f} req/s, medians of {args.rounds} alternating rounds; "
              f"results in {args.out})")
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
