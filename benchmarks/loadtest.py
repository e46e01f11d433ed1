"""The load suite: open-loop load on the whole proxy (three mock tiers behind it), in one run.

    python benchmarks/loadtest.py [--quick] [--redis] [--rounds 3] [--seconds 10]

What it starts (subprocesses, all on 127.0.0.1 and free ports): three mock vLLM tiers
(small 40 ms + 8 ms/token, medium 80 + 15, large 150 + 30; 40-token replies, 2 tokens per SSE
chunk), the proxy (`python -m proxy serve`, admin API on), the bare aiohttp handler of
bare_server.py returning the bytes of a cached answer, and with ``--redis`` a private
redis-server. The proxy and the bare handler are pinned to the server core, the load generator
(this process), the mocks and Redis to the load core (``taskset -c``).

The load generator is open-loop: requests leave on a fixed schedule (Poisson or uniform arrivals
at rate R) whether or not earlier ones have finished, and latency is measured from the
*scheduled* send time, so a server that falls behind shows its queueing (no coordinated
omission). It is one uvloop process with a minimal keep-alive HTTP/1.1 client on asyncio
protocols (about half of aiohttp's client CPU per request) and a connection pool; the
scheduler sleeps until the send time (``LOADTEST_SPIN=1``: sleeps to ~1.5 ms before it, then
spins on the loop; more precise on an idle core, worse on a shared one). Its own lateness
(actual minus scheduled send) is reported as ``lag`` and its CPU share as ``gen_cpu_share``; a
large lag or a share near 1 means the generator, not the server, was the bottleneck. It is
checked against ``hey`` at the same fixed rate on the bare handler.

Phases: generator check (own vs hey on the bare handler); alternating rounds of bare / proxy at
fixed rates (exact hits at 500 req/s, semantic hits at 200 req/s) and max throughput (hey, closed
loop, unthrottled); interference (exact hits at 300 req/s alone, then with 100 req/s of never-seen
paraphrases beside them: exact-hit P99 with / without); a sweep of offered load for exact hits; the
workloads (repeats, paraphrases, misses, mixed; streamed and non-streamed); time to first byte and
per-chunk time of misses through the proxy vs straight to the mock; memory per cached entry (a
second proxy over a zero-latency mock, filled with unique misses). Results:
benchmarks/results/loadtest.json, PNG plots (plots.py) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_exact import (
    RESULTS,
    ROOT,
    free_port,
    hey,
    median_of,
    pinned,
    wait_redis,
    wait_up,
)
from machine import describe, machine

#: ../shared/data of the checkout (CI); from a worktree under ../wt/<name>, two levels up
DATA = Path(os.environ.get("EDGE_PROXY_DATA", "")) if os.environ.get("EDGE_PROXY_DATA") else next(
    (d for d in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data")
     if d.exists()), ROOT.parent / "shared" / "data")
ADMIN_TOKEN = "loadtest-admin"
#: (tier, served model, time to first token ms, time per output token ms)
TIERS = (("small", "small-8b", 40.0, 8.0), ("medium", "medium-32b", 80.0, 15.0),
         ("large", "large-70b", 150.0, 30.0))
SPIN = os.environ.get("LOADTEST_SPIN", "0") == "1"
REPLY_TOKENS = 40
CHUNK_TOKENS = 2
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-loadtest"}
#: semantic.embed_cache_size default, and what one LRU entry holds (384 float32 + key + links)
EMBED_LRU_DEFAULT = 10_000
EMBED_LRU_ENTRY_BYTES = 384 * 4 + 112 + 200
CDF_POINTS = np.concatenate([np.linspace(0, 99, 100), [99.5, 99.9, 100.0]])

Req = tuple[bytes, bool]  # (encoded body, streamed)
#: machine() taken in main(), before the generator pins itself to its core
MACHINE_AT_START: dict[str, Any] = {}


# -------------------------------------------------------------------------------------------
# prompts and workloads


def body_of(text: str, stream: bool, model: str = "auto", usage: bool = False) -> bytes:
    """An encoded chat request for one user turn."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
        if usage:
            body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


class Prompts:
    """Disjoint prompt sets drawn from QQP dev (no text is in two sets)."""

    def __init__(self, seed: int = 7) -> None:
        rng = random.Random(seed)
        dup: list[tuple[str, str]] = []
        other: list[str] = []
        with gzip.open(DATA / "qqp" / "qqp_dev.csv.gz", "rt", newline="") as f:
            for row in csv.DictReader(f):
                a, b = row["text_a"].strip(), row["text_b"].strip()
                if not a or not b or a.lower() == b.lower():
                    continue
                if row["label"] == "1":
                    dup.append((a, b))
                else:
                    other.extend((a, b))
        rng.shuffle(dup)
        rng.shuffle(other)
        seen: set[str] = set()
        self.pairs: list[tuple[str, str]] = []
        for a, b in dup:
            if a not in seen and b not in seen:
                seen.update((a, b))
                self.pairs.append((a, b))
        self.singles = [t for t in dict.fromkeys(other) if t not in seen]
        self._pair_pos = 0
        self._single_pos = 0
        self._synthetic = 0

    def take_pairs(self, n: int) -> list[tuple[str, str]]:
        """``n`` paraphrase pairs never handed out before."""
        out = self.pairs[self._pair_pos:self._pair_pos + n]
        self._pair_pos += len(out)
        if len(out) < n:
            raise RuntimeError(f"QQP has {len(self.pairs)} usable paraphrase pairs; asked for "
                               f"{self._pair_pos - len(out) + n}: lower --seconds or --rounds")
        return out

    def take_singles(self, n: int) -> list[str]:
        """``n`` unique questions (real QQP ones while they last, then numbered synthetic)."""
        out = self.singles[self._single_pos:self._single_pos + n]
        self._single_pos += len(out)
        while len(out) < n:
            self._synthetic += 1
            i = self._synthetic
            out.append(f"Request {i}: {self.singles[i % len(self.singles)]} "
                       f"(variant {i * 7919 % 100003})")
        return out


def stream_flags(n: int, share: float, rng: random.Random) -> list[bool]:
    """Which of ``n`` requests are streamed, ``share`` of them at random."""
    return [rng.random() < share for _ in range(n)]


def zipf_indices(n: int, pool: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws over ``pool`` items with P(rank k) ~ 1 / k^s."""
    w = 1.0 / np.arange(1, pool + 1) ** s
    return rng.choice(pool, size=n, p=w / w.sum())


def arrivals(n: int, rate: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Send offsets (s) of ``n`` requests at ``rate``: Poisson (exponential gaps) or uniform.

    Poisson gaps are rescaled so the run spans exactly (n - 1) / rate: the offered rate is the
    nominal one, not one random realization of it.
    """
    if kind == "uniform" or n < 3:
        return np.arange(n) / rate
    t = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate, n - 1))])
    return t * ((n - 1) / rate / t[-1])


# -------------------------------------------------------------------------------------------
# the open-loop generator


@dataclass(slots=True)
class Sample:
    """One finished request: times in seconds, from its scheduled send."""

    outcome: str
    status: int
    latency: float
    ttfb: float
    stream_s: float
    streamed: bool
    lag: float
    tier: str
    sched: float


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, mean, P50 / P95 / P99 / max in ms."""
    if not values:
        return {"n": 0}
    a = np.asarray(values) * 1000
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": len(a), "mean_ms": float(a.mean()), "p50_ms": float(p50), "p95_ms": float(p95),
            "p99_ms": float(p99), "max_ms": float(a.max())}


class Progress:
    """One status line, rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        elif force or now - self.last >= 5.0:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self.last = now

    def done(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight.

    A minimal client (Content-Length and chunked bodies, the few headers the suite reads): about
    about half of aiohttp's client CPU per request, so the generator's own queueing stays out of the
    latencies. Times are taken in ``data_received``, when the loop reads the bytes.
    """

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.fut: asyncio.Future[tuple[int, dict[str, str], float, float, bool]] | None = None
        self.buf = bytearray()
        self.head = True
        self.chunked = False
        self.length = 0
        self.pos = 0
        self.first = 0.0
        self.status = 0
        self.headers: dict[str, str] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.drop(self)
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionResetError("connection closed by the server"))

    def send(self, data: bytes) -> asyncio.Future[tuple[int, dict[str, str], float, float, bool]]:
        assert self.transport is not None
        self.fut = self.pool.loop.create_future()
        self.buf.clear()
        self.head, self.pos, self.first = True, 0, 0.0
        self.transport.write(data)
        return self.fut

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.fut is None:
            return
        buf = self.buf
        buf += data
        if self.head:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            lines = bytes(buf[:i]).decode("latin-1").split("\r\n")
            del buf[:i + 4]
            self.status = int(lines[0].split(" ", 2)[1])
            h = self.headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                h[k.strip().lower()] = v.strip()
            self.head = False
            self.chunked = h.get("transfer-encoding", "").lower() == "chunked"
            self.length = int(h.get("content-length", "0") or 0)
        if buf and not self.first:
            self.first = now
        if not self.chunked:
            if len(buf) >= self.length:
                self._finish(now, bytes(buf[-32:]))
            return
        pos = self.pos
        while True:
            j = buf.find(b"\r\n", pos)
            if j < 0:
                break
            size = int(bytes(buf[pos:j]).split(b";")[0], 16)
            if size == 0:
                if len(buf) >= j + 4:
                    self._finish(now, bytes(buf[max(0, pos - 48):pos]))
                    return
                break
            if len(buf) < j + 4 + size:
                break
            pos = j + 4 + size
        self.pos = pos

    def _finish(self, now: float, tail: bytes) -> None:
        fut, self.fut = self.fut, None
        assert fut is not None
        # an SSE body must end with [DONE]: a cut stream is an error, not a fast answer
        complete = b"[DONE]" in tail or "event-stream" not in self.headers.get("content-type", "")
        fut.set_result((self.status, self.headers, self.first or now, now, complete))
        if self.headers.get("connection", "").lower() == "close":
            if self.transport is not None:
                self.transport.close()
        else:
            self.pool.release(self)


class _Pool:
    """Keep-alive connections to one host:port; opens more on demand up to ``limit``."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.loop = asyncio.get_running_loop()
        self.idle: list[_Conn] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[_Conn]] = deque()

    async def acquire(self) -> _Conn:
        while self.idle:
            c = self.idle.pop()
            if c.transport is not None and not c.transport.is_closing():
                return c
        if self.open < self.limit:
            self.open += 1
            try:
                _, c = await self.loop.create_connection(lambda: _Conn(self), self.host,
                                                         self.port)
            except OSError:
                self.open -= 1
                raise
            return c
        fut: asyncio.Future[_Conn] = self.loop.create_future()
        self.waiters.append(fut)
        return await fut

    def release(self, c: _Conn) -> None:
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(c)
                return
        self.idle.append(c)

    def drop(self, c: _Conn) -> None:
        self.open -= 1
        if c in self.idle:
            self.idle.remove(c)

    def close(self) -> None:
        for c in self.idle:
            if c.transport is not None:
                c.transport.close()


def _throughput(ok: list[Sample], samples: list[Sample]) -> float:
    """Successful completions per second inside the send window (first to last scheduled send):
    equals the offered rate while the server keeps up, falls below it when it does not."""
    if len(samples) < 2:
        return 0.0
    lo = min(s.sched for s in samples)
    hi = max(s.sched for s in samples)
    done = sum(1 for s in ok if lo <= s.sched + s.latency <= hi)
    return done / max(hi - lo, 1e-9)


class LoadGen:
    """Open-loop HTTP load from one process: fixed schedule, latency from the scheduled time."""

    def __init__(self, conns: int, timeout_s: float, progress: Progress) -> None:
        self.conns = conns
        self.timeout_s = timeout_s
        self.progress = progress
        self.pools: dict[tuple[str, int], _Pool] = {}
        self.prefixes: dict[str, tuple[_Pool, bytes]] = {}
        self.errors: dict[str, int] = {}

    async def __aenter__(self) -> LoadGen:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in self.pools.values():
            p.close()

    def target(self, url: str) -> tuple[_Pool, bytes]:
        """The pool and the request head (up to Content-Length) for ``url``."""
        t = self.prefixes.get(url)
        if t is None:
            u = urlsplit(url)
            host, port = u.hostname or "127.0.0.1", u.port or 80
            pool = self.pools.get((host, port))
            if pool is None:
                pool = self.pools[(host, port)] = _Pool(host, port, self.conns)
            head = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
            t = self.prefixes[url] = (pool, (f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                                             f"{head}Content-Length: ").encode())
        return t

    async def one(self, url: str, body: bytes, streamed: bool, t_sched: float,
                  out: list[Sample]) -> None:
        """Send one request; append its Sample (errors have status 0 or the HTTP status)."""
        pool, head = self.target(url)
        t_send = time.perf_counter()
        conn: _Conn | None = None
        try:
            conn = await pool.acquire()
            status, h, first, end, complete = await conn.send(
                b"".join((head, str(len(body)).encode(), b"\r\n\r\n", body)))
            outcome = h.get("x-cache") or "direct"
            if status != 200 or not complete:
                outcome = "error"
                key = f"http {status}" if status != 200 else "cut stream"
                self.errors[key] = self.errors.get(key, 0) + 1
            out.append(Sample(outcome, status if complete else 0, end - t_sched, first - t_sched,
                              end - first, streamed, t_send - t_sched, h.get("x-route-tier", ""),
                              t_sched))
        except (OSError, asyncio.CancelledError, ValueError, IndexError) as exc:
            name = type(exc).__name__
            self.errors[name] = self.errors.get(name, 0) + 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()  # its state is unknown: never reuse it
            end = time.perf_counter()
            out.append(Sample("error", 0, end - t_sched, end - t_sched, 0.0, streamed,
                              t_send - t_sched, "", t_sched))
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def connect(self, url: str, n: int) -> None:
        """Open ``n`` connections to ``url``'s host ahead of a run (no connects while timed)."""
        pool, _ = self.target(url)
        conns = await asyncio.gather(*(pool.acquire() for _ in range(min(n, self.conns))))
        for c in conns:
            pool.release(c)

    async def run(self, label: str, url: str, reqs: Sequence[Req], rate: float, *,
                  kind: str = "poisson", seed: int = 0, skip_s: float = 0.0) -> dict[str, Any]:
        """Send ``reqs`` at ``rate`` on an open-loop schedule; summary per x-cache outcome.

        Samples scheduled in the first ``skip_s`` seconds are sent but not counted (warm-up).
        """
        n = len(reqs)
        offsets = arrivals(n, rate, kind, np.random.default_rng(seed))
        out: list[Sample] = []
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        clock = time.perf_counter
        sleep = asyncio.sleep
        cpu0 = time.process_time()
        t0 = clock() + 0.05
        schedule = (t0 + offsets).tolist()
        seconds = n / rate
        next_show = t0
        for i, ts in enumerate(schedule):
            while True:
                d = ts - clock()
                if d <= 0:
                    break
                await sleep(d - 0.0015 if d > 0.002 else (0 if SPIN else d))
            body, streamed = reqs[i]
            t = loop.create_task(self.one(url, body, streamed, ts, out))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            if ts >= next_show:
                next_show = ts + 0.25
                self.progress.show(
                    f"[{label}] {rate:>5.0f}/s  {ts - t0:5.1f}/{seconds:.1f}s  sent {i + 1}  "
                    f"done {len(out)}  in flight {len(tasks)}  "
                    f"errors {sum(1 for s in out if s.status != 200)}")
        if tasks:
            _, late = await asyncio.wait(list(tasks), timeout=self.timeout_s)
            for t in late:  # counted as errors by one()
                t.cancel()
            if late:
                await asyncio.wait(late)
        t_end = clock()
        cpu = time.process_time() - cpu0
        kept = [s for s in out if s.sched >= t0 + skip_s] if skip_s > 0 else out
        res = self._result(label, rate, n, kept, t0, t_end, seconds - skip_s)
        # the generator's own CPU per request, spinning included: near 1 s per wall s means its
        # core was the limit and the latencies say more about the generator than the server
        res["gen_cpu_s"] = cpu
        res["gen_cpu_share"] = cpu / max(t_end - t0, 1e-9)
        self.progress.done(
            f"[{label}] {rate:.0f}/s offered, {res['achieved_rps']:.0f}/s done, "
            + ", ".join(f"{o} {d['latency']['n']} p50 {d['latency']['p50_ms']:.2f} "
                        f"p99 {d['latency']['p99_ms']:.2f} ms"
                        for o, d in res["outcomes"].items())
            + (f", errors {res['errors']}" if res["errors"] else ""))
        return res

    @staticmethod
    def _result(label: str, rate: float, n: int, samples: list[Sample], t0: float, t_end: float,
                seconds: float) -> dict[str, Any]:
        by: dict[str, list[Sample]] = {}
        for s in samples:
            by.setdefault(s.outcome, []).append(s)
        outcomes: dict[str, Any] = {}
        for o, ss in sorted(by.items()):
            st = [s for s in ss if s.streamed]
            lat = np.asarray([s.latency for s in ss]) * 1000
            outcomes[o] = {
                "latency": summarize([s.latency for s in ss]),
                "ttfb": summarize([s.ttfb for s in ss]),
                "ttfb_streamed": summarize([s.ttfb for s in st]),
                "stream_time": summarize([s.stream_s for s in st]),
                "tiers": {t: sum(1 for s in ss if s.tier == t) for t in {s.tier for s in ss}},
                "cdf_ms": np.percentile(lat, CDF_POINTS).round(4).tolist(),
            }
        ok = [s for s in samples if s.status == 200]
        served = sum(len(v) for k, v in by.items() if k != "error")
        return {
            "label": label, "offered_rps": rate, "requests": n, "seconds": seconds,
            "counted": len(samples), "ok": len(ok),
            "errors": len(samples) - len(ok),
            "achieved_rps": _throughput(ok, samples),
            "wall_s": t_end - t0,
            "lag": summarize([s.lag for s in samples]),
            "hit_rate": {o: len(v) / served for o, v in by.items() if o != "error"}
            if served else {},
            "all": summarize([s.latency for s in ok]),
            "outcomes": outcomes,
        }

    async def closed_run(self, label: str, url: str, reqs: Sequence[Req], conc: int
                         ) -> dict[str, Any]:
        """``reqs`` with ``conc`` in flight (closed loop), summarised like ``run``: latency from
        each request's own send (the right measure for a fixed number of concurrent clients)."""
        self.progress.show(f"[{label}] {len(reqs)} requests, {conc} at a time", force=True)
        t0 = time.perf_counter()
        out = await self.closed(url, reqs, conc)
        t_end = time.perf_counter()
        res = self._result(label, 0.0, len(reqs), out, t0, t_end, t_end - t0)
        res["concurrency"] = conc
        self.progress.done(
            f"[{label}] {conc} at a time, {res['achieved_rps']:.1f}/s, "
            + ", ".join(f"{o} {d['latency']['n']} p50 {d['latency']['p50_ms']:.2f} "
                        f"p99 {d['latency']['p99_ms']:.2f} ms (TTFB p50 "
                        f"{d['ttfb']['p50_ms']:.2f})" for o, d in res["outcomes"].items())
            + (f", errors {res['errors']}" if res["errors"] else ""))
        return res

    async def closed(self, url: str, reqs: Sequence[Req], conc: int,
                     on_progress: Callable[[int], None] | None = None) -> list[Sample]:
        """Send ``reqs`` with ``conc`` in flight (warm-up and cache fill, not measurement)."""
        out: list[Sample] = []
        it = iter(enumerate(reqs))

        async def worker() -> None:
            for i, (body, streamed) in it:
                await self.one(url, body, streamed, time.perf_counter(), out)
                if on_progress is not None and i % 200 == 0:
                    on_progress(len(out))

        await asyncio.gather(*(worker() for _ in range(conc)))
        return out


# -------------------------------------------------------------------------------------------
# processes


class Stack:
    """The subprocesses of one run; ``stop`` ends every one of them (and only them)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = tempfile.mkdtemp(prefix="edge-loadtest-")
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        self.py = sys.executable

    def spawn(self, core: str, *cmd: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.tmp, f"p{len(self.procs)}.log"), "wb")  # noqa: SIM115
        p = subprocess.Popen(pinned(core, *cmd), env=env or self.env, stdout=log,
                             stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def mock(self, model: str, ttft_ms: float, tpot_ms: float, core: str | None = None) -> str:
        """A mock vLLM tier on the load core (or ``core``)."""
        port = free_port()
        self.spawn(core or self.args.load_core, self.py, "-m", "proxy", "mock-vllm", "--port",
                   str(port),
                   "--model", model, "--ttft-ms", str(ttft_ms), "--tpot-ms", str(tpot_ms),
                   "--reply-tokens", str(REPLY_TOKENS), "--chunk-tokens", str(CHUNK_TOKENS))
        url = f"http://127.0.0.1:{port}"
        wait_up(url + "/health")
        return url

    def redis(self) -> str:
        port = free_port()
        self.spawn(self.args.load_core, "redis-server", "--port", str(port), "--bind",
                   "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.tmp)
        wait_redis(port)
        return f"redis://127.0.0.1:{port}/0"

    def proxy(self, tiers: Sequence[tuple[str, str]], redis: str | None = None,
              extra_env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        cmd = [self.py, "-m", "proxy", "serve", "--port", str(port), "--log-level", "warning"]
        for name, url in tiers:
            cmd += ["--tier", f"{name}={url}"]
        if redis:
            cmd += ["--redis", redis]
        env = {**self.env, "EDGE_PROXY_SERVER__ADMIN_TOKEN": ADMIN_TOKEN, **(extra_env or {})}
        p = self.spawn(self.args.server_core, *cmd, env=env)
        base = f"http://127.0.0.1:{port}"
        wait_up(base + "/readyz", timeout=60)
        return base, p

    def bare(self, body: bytes) -> str:
        path = os.path.join(self.tmp, "answer.json")
        Path(path).write_bytes(body)
        port = free_port()
        self.spawn(self.args.server_core, self.py, str(ROOT / "benchmarks" / "bare_server.py"),
                   "--port", str(port), "--body", path)
        base = f"http://127.0.0.1:{port}"
        wait_up(base + "/healthz")
        return base

    def kill(self, p: subprocess.Popen[bytes]) -> None:
        """End one process started here."""
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def http_json(url: str, token: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token
                                 else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def admin_stats(base: str) -> dict[str, Any]:
    """/admin/stats of a proxy started by Stack.proxy."""
    return http_json(base + "/admin/stats", ADMIN_TOKEN)


_METRIC = re.compile(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", re.M)


def metric_sums(base: str) -> dict[str, float]:
    """Every /metrics sample summed over its labels (cost, embed time, ...)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name, _, value in _METRIC.findall(text):
        out[name] = out.get(name, 0.0) + float(value)
    return out


def metric_by_label(base: str, name: str, label: str) -> dict[str, float]:
    """One /metrics counter per value of one of its labels, e.g. skips by ``reason``."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    pat = re.compile(rf'^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+-]+)$', re.M)
    lab = re.compile(rf'{re.escape(label)}="([^"]*)"')
    for labels, value in pat.findall(text):
        m = lab.search(labels)
        key = m.group(1) if m else ""
        out[key] = out.get(key, 0.0) + float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cost_delta(before: dict[str, Any], after: dict[str, Any], n: int) -> dict[str, float]:
    """USD per query spent, and what it would have been without the cache (spent + saved)."""
    spent = after["cost"]["spent_usd"] - before["cost"]["spent_usd"]
    saved = after["cost"]["saved_usd"] - before["cost"]["saved_usd"]
    return {"queries": n, "spent_usd": spent, "saved_usd": saved,
            "usd_per_query": spent / n if n else 0.0,
            "usd_per_query_without_cache": (spent + saved) / n if n else 0.0,
            "saving": saved / (spent + saved) if spent + saved else 0.0}


# -------------------------------------------------------------------------------------------
# the suite


@dataclass
class Plan:
    """Durations and rates of one suite run."""

    seconds: float
    rounds: int
    exact_rate: float
    semantic_rate: float
    sweep: tuple[float, ...]
    sweep_seconds: float
    miss_rate: float
    mixed_rate: float
    ttft_rate: float
    fill: int
    repeats_pool: int = 200
    mixed_pool: int = 1000
    #: interference phase: exact hits at this rate, alone and with unique paraphrases beside them
    interference_exact_rate: float = 300
    interference_semantic_rate: float = 100
    #: miss overhead: closed-loop seconds per side, concurrency, one-at-a-time requests per side
    miss_seconds: float = 8
    miss_conc: int = 8
    miss_serial: int = 40
    #: capacity: novel (never-seen) paraphrases per second, ascending, beside exact hits
    capacity_rates: tuple[float, ...] = (25, 50, 100, 150, 200, 300, 400)
    capacity_seconds: float = 4
    capacity_exact_rate: float = 100
    #: the P99 every cached answer must stay under, ms
    cached_p99_budget_ms: float = 15.0


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(seconds=args.seconds or 3, rounds=args.rounds or 1, exact_rate=500,
                    semantic_rate=200, sweep=(100, 500, 1000), sweep_seconds=2, miss_rate=40,
                    mixed_rate=200, ttft_rate=20, fill=args.fill or 2000, miss_seconds=3,
                    miss_serial=15, capacity_seconds=2)
    return Plan(seconds=args.seconds or 10, rounds=args.rounds or 3, exact_rate=500,
                semantic_rate=200, sweep=(100, 200, 500, 1000, 1500, 2000), sweep_seconds=8,
                miss_rate=50, mixed_rate=200, ttft_rate=20, fill=args.fill or 20000)


class Suite:
    """Runs the phases against one Stack and collects the results."""

    def __init__(self, args: argparse.Namespace, stack: Stack, gen: LoadGen, prompts: Prompts
                 ) -> None:
        self.args = args
        self.plan = make_plan(args)
        self.stack = stack
        self.gen = gen
        self.prompts = prompts
        self.rng = random.Random(args.seed)
        self.res: dict[str, Any] = {}
        self.tier_urls: list[tuple[str, str]] = []
        self.base = ""
        self.bare_base = ""
        self.redis: str | None = None

    def n(self, rate: float, seconds: float | None = None) -> int:
        return max(1, int(rate * (seconds or self.plan.seconds)))

    async def warm(self, label: str, texts: Sequence[str], conc: int = 96,
                   base: str | None = None) -> list[Sample]:
        """Send each text once, non-streamed (fills the caches; not measured)."""
        url = (base or self.base) + "/v1/chat/completions"
        reqs = [(body_of(t, False), False) for t in texts]
        t0 = time.monotonic()
        out = await self.gen.closed(url, reqs, conc, lambda k: self.gen.progress.show(
            f"[{label}] {k}/{len(reqs)}  {time.monotonic() - t0:.0f}s"))
        bad = sum(1 for s in out if s.status != 200)
        self.gen.progress.done(f"[{label}] {len(out)} sent in {time.monotonic() - t0:.1f}s"
                               + (f", {bad} failed" if bad else ""))
        return out

    async def setup(self) -> None:
        a, st = self.args, self.stack
        self.tier_urls = [(name, st.mock(model, ttft, tpot)) for name, model, ttft, tpot in TIERS]
        self.redis = st.redis() if a.redis else None
        self.base, self.proxy_proc = st.proxy(self.tier_urls, self.redis)
        self.chat = self.base + "/v1/chat/completions"
        self.repeats = self.prompts.take_singles(self.plan.repeats_pool)
        await self.warm("warm repeats", self.repeats)
        req = urllib.request.Request(self.chat, data=body_of(self.repeats[0], False),
                                     headers=HEADERS)
        with urllib.request.urlopen(req, timeout=30) as r:
            answer, cache = r.read(), r.headers.get("x-cache")
        assert cache == "hit-exact", cache
        self.bare_base = st.bare(answer)
        self.bare_url = self.bare_base + "/v1/chat/completions"
        for url in (self.chat, self.bare_url):
            await self.gen.connect(url, 64)
        self.answer_bytes = len(answer)
        # paraphrase pairs: one slice per round for the ratio runs, one for the workload run
        phases = set(a.phases.split(","))
        self.pairs = [self.prompts.take_pairs(self.n(self.plan.semantic_rate))
                      for _ in range(self.plan.rounds + 1)] if phases & {"rounds",
                                                                        "workloads"} else [[]]
        if self.pairs[0]:
            await self.warm("warm paraphrases (text_a)", [a for p in self.pairs for a, _ in p])

    def repeat_reqs(self, n: int, share: float) -> list[Req]:
        flags = stream_flags(n, share, self.rng)
        return [(body_of(self.rng.choice(self.repeats), f), f) for f in flags]

    async def check_generator(self) -> None:
        """Own open-loop generator vs hey (rate-limited) on the bare handler, same rate."""
        p, a = self.plan, self.args
        rate = p.exact_rate
        body_file = os.path.join(self.stack.tmp, "bare_body.json")
        Path(body_file).write_bytes(body_of(self.repeats[0], False))
        reqs = [(body_of(self.repeats[0], False), False)] * self.n(rate)
        await self.gen.run("warm bare", self.bare_url, reqs[: self.n(rate, 1)], rate)
        own = await self.gen.run("gen check: own", self.bare_url, reqs, rate, seed=1)
        self.gen.progress.show("[gen check: hey] running", force=True)
        h = hey(self.bare_url, body_file, a.load_core, rate=rate, seconds=p.seconds, conns=10)
        self.gen.progress.done(f"[gen check: hey] {h['rps']:.0f}/s p50 {h['p50_ms']:.2f} "
                               f"p99 {h['p99_ms']:.2f} ms")
        self.res["generator_check"] = {"rate": rate, "own": own, "hey": h}

    async def rounds(self) -> None:
        """Alternating bare / proxy runs at fixed rates, and max throughput with hey."""
        p, a = self.plan, self.args
        body_file = os.path.join(self.stack.tmp, "hit_body.json")
        Path(body_file).write_bytes(body_of(self.repeats[0], False))
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in (
            "bare_exact_rate", "proxy_exact", "bare_semantic_rate", "proxy_semantic")}
        peak: dict[str, list[dict[str, float]]] = {"bare": [], "proxy": []}
        for r in range(p.rounds):
            tag = f"round {r + 1}/{p.rounds}"
            n = self.n(p.exact_rate)
            bare = [(body_of(self.repeats[0], False), False)] * n
            runs["bare_exact_rate"].append(await self.gen.run(
                f"{tag} bare", self.bare_url, bare, p.exact_rate, seed=r))
            runs["proxy_exact"].append(await self.gen.run(
                f"{tag} proxy exact", self.chat, self.repeat_reqs(n, 0.0), p.exact_rate, seed=r))
            n = self.n(p.semantic_rate)
            bare = [(body_of(self.repeats[0], False), False)] * n
            runs["bare_semantic_rate"].append(await self.gen.run(
                f"{tag} bare", self.bare_url, bare, p.semantic_rate, seed=r))
            para = [(body_of(b, False), False) for _, b in self.pairs[r]]
            runs["proxy_semantic"].append(await self.gen.run(
                f"{tag} proxy paraphrase", self.chat, para, p.semantic_rate, seed=r))
            for name, url in (("bare", self.bare_url), ("proxy", self.chat)):
                self.gen.progress.show(f"[{tag} max {name}] hey unthrottled", force=True)
                peak[name].append(hey(url, body_file, a.load_core, rate=None,
                                      seconds=max(3.0, p.seconds / 2), conns=a.hey_conns))
                self.gen.progress.done(f"[{tag} max {name}] {peak[name][-1]['rps']:.0f} req/s")

        def med(key: str, outcome: str, field: str = "p99_ms") -> float:
            vals = [x["outcomes"].get(outcome, {}).get("latency", {}).get(field)
                    for x in runs[key]]
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else float("nan")

        fig = {
            "exact_p50_ms": med("proxy_exact", "hit-exact", "p50_ms"),
            "exact_p99_ms": med("proxy_exact", "hit-exact"),
            "bare_p50_ms_at_exact_rate": med("bare_exact_rate", "bare", "p50_ms"),
            "bare_p99_ms_at_exact_rate": med("bare_exact_rate", "bare"),
            "semantic_p50_ms": med("proxy_semantic", "hit-semantic", "p50_ms"),
            "semantic_p99_ms": med("proxy_semantic", "hit-semantic"),
            "bare_p99_ms_at_semantic_rate": med("bare_semantic_rate", "bare"),
            "semantic_hit_rate": statistics.median(
                x["hit_rate"].get("hit-semantic", 0.0) for x in runs["proxy_semantic"]),
            "bare_max_rps": median_of(peak["bare"])["rps"],
            "proxy_max_rps": median_of(peak["proxy"])["rps"],
        }
        self.res["rounds"] = {"runs": runs, "peak": peak, "medians": fig}

    async def interference(self) -> None:
        """Exact-hit latency alone vs with semantic traffic (unique paraphrases) beside it.

        Each round runs exact hits at ``interference_exact_rate`` alone, then the same exact-hit
        stream merged with never-seen paraphrases at ``interference_semantic_rate`` (each one an
        embedding, an index search and a verified hit). Exact-hit P99 with / without, median of
        rounds: how much a cached answer waits behind someone else's embedding.
        """
        p = self.plan
        re_, rs = p.interference_exact_rate, p.interference_semantic_rate
        pairs = [self.prompts.take_pairs(self.n(rs)) for _ in range(p.rounds)]
        await self.warm("interference: warm paraphrases", [a for ps in pairs for a, _ in ps])
        runs: dict[str, list[dict[str, Any]]] = {"alone": [], "with_semantic": []}
        for r in range(p.rounds):
            tag = f"interference {r + 1}/{p.rounds}"
            runs["alone"].append(await self.gen.run(
                f"{tag} exact alone", self.chat, self.repeat_reqs(self.n(re_), 0.0), re_, seed=r))
            exact = self.repeat_reqs(self.n(re_), 0.0)
            para: list[Req] = [(body_of(b, False), False) for _, b in pairs[r]]
            merged = exact + para
            self.rng.shuffle(merged)  # one Poisson stream at re_ + rs: the shares are the rates
            runs["with_semantic"].append(await self.gen.run(
                f"{tag} exact + semantic", self.chat, merged, re_ + rs, seed=100 + r))

        def med(key: str, outcome: str, field: str = "p99_ms") -> float:
            vals = [x["outcomes"].get(outcome, {}).get("latency", {}).get(field)
                    for x in runs[key]]
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else float("nan")

        self.res["interference"] = {"runs": runs, "medians": {
            "exact_rate": re_, "semantic_rate": rs,
            "exact_p50_ms_alone": med("alone", "hit-exact", "p50_ms"),
            "exact_p99_ms_alone": med("alone", "hit-exact"),
            "exact_p50_ms_with_semantic": med("with_semantic", "hit-exact", "p50_ms"),
            "exact_p99_ms_with_semantic": med("with_semantic", "hit-exact"),
            "semantic_p50_ms": med("with_semantic", "hit-semantic", "p50_ms"),
            "semantic_p99_ms": med("with_semantic", "hit-semantic"),
        }}

    async def sweep(self) -> None:
        """Latency vs offered load: exact hits (half streamed) and the bare handler."""
        p = self.plan
        out: dict[str, list[dict[str, Any]]] = {"proxy_repeats": [], "bare": []}
        for rate in p.sweep:
            n = self.n(rate, p.sweep_seconds)
            out["bare"].append(await self.gen.run(
                "sweep bare", self.bare_url, [(body_of(self.repeats[0], False), False)] * n, rate))
            out["proxy_repeats"].append(await self.gen.run(
                "sweep proxy repeats", self.chat, self.repeat_reqs(n, self.args.stream_share),
                rate))
        self.res["sweep"] = out

    async def workloads(self) -> None:
        """repeats, paraphrases, misses, mixed: each at its rate with the stream share."""
        p, share = self.plan, self.args.stream_share
        out: dict[str, Any] = {}

        async def measured(name: str, reqs: list[Req], rate: float, skip: float = 0.0) -> None:
            before = admin_stats(self.base)
            r = await self.gen.run(f"workload {name}", self.chat, reqs, rate, skip_s=skip)
            await asyncio.sleep(0.2)
            r["cost"] = cost_delta(before, admin_stats(self.base), len(reqs))
            out[name] = r

        await measured("repeats", self.repeat_reqs(self.n(p.exact_rate), share), p.exact_rate)
        flags = stream_flags(len(self.pairs[-1]), share, self.rng)
        await measured("paraphrases", [(body_of(b, f), f) for (_, b), f
                                       in zip(self.pairs[-1], flags, strict=True)],
                       p.semantic_rate)
        texts = self.prompts.take_singles(self.n(p.miss_rate))
        await measured("misses", [(body_of(t, f), f) for t, f
                                  in zip(texts, stream_flags(len(texts), share, self.rng),
                                         strict=True)], p.miss_rate)
        # mixed: Zipf over a pool of paraphrase pairs (either wording) and unique one-offs
        pool = self.prompts.take_pairs(p.mixed_pool)
        n = self.n(p.mixed_rate, p.seconds * 1.5)
        idx = zipf_indices(n, len(pool), self.args.zipf_s, np.random.default_rng(self.args.seed))
        singles = iter(self.prompts.take_singles(n))
        reqs: list[Req] = []
        for k in idx.tolist():
            f = self.rng.random() < share
            if self.rng.random() < self.args.unique_share:
                text = next(singles)
            else:
                text = pool[k][self.rng.random() < 0.5]
            reqs.append((body_of(text, f), f))
        # the first third of the run fills the cache from cold: sent, not counted (cost: counted)
        await measured("mixed", reqs, p.mixed_rate, skip=p.seconds * 0.5)
        self.res["workloads"] = out

    async def ttft(self) -> None:
        """Time to first byte and per-chunk time of streamed misses on the small tier.

        Three ways, alternating each round: straight to the mock; through a plain proxy (semantic
        cache and router off, so no embedding: what the proxy itself adds); through the full
        proxy (embedding included). Same rate, fresh prompts each time.
        """
        p, st = self.plan, self.stack
        model = TIERS[0][1]
        plain_base, plain_proc = st.proxy(self.tier_urls[:1], self.redis, {
            "EDGE_PROXY_SEMANTIC__ENABLED": "false", "EDGE_PROXY_ROUTER__ENABLED": "false"})
        urls = {"direct": self.tier_urls[0][1] + "/v1/chat/completions",
                "plain": plain_base + "/v1/chat/completions", "proxy": self.chat}
        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in urls}
        embed: list[float] = []
        n = self.n(p.ttft_rate)
        for url in urls.values():
            await self.gen.connect(url, 32)
        for r in range(p.rounds):
            for side, url in urls.items():
                texts = self.prompts.take_singles(n)
                reqs = [(body_of(t, True, model, usage=side == "direct"), True) for t in texts]
                m0 = metric_sums(self.base) if side == "proxy" else {}
                rows[side].append(await self.gen.run(f"ttft {r + 1}/{p.rounds} {side}", url,
                                                     reqs, p.ttft_rate, seed=r))
                if side == "proxy":
                    m1 = metric_sums(self.base)
                    cnt = (m1.get("edge_proxy_embed_seconds_count", 0)
                           - m0.get("edge_proxy_embed_seconds_count", 0))
                    s = (m1.get("edge_proxy_embed_seconds_sum", 0)
                         - m0.get("edge_proxy_embed_seconds_sum", 0))
                    embed.append(1000 * s / cnt if cnt else 0.0)
        st.kill(plain_proc)

        def med(side: str, part: str, field: str) -> float:
            vals = [x["outcomes"][o][part][field] for x in rows[side]
                    for o in ("direct", "miss") if o in x["outcomes"]]
            return statistics.median(vals) if vals else float("nan")

        chunks = REPLY_TOKENS // CHUNK_TOKENS
        fig: dict[str, float] = {}
        for side in urls:
            for f in ("p50_ms", "p99_ms"):
                fig[f"{side}_ttfb_{f}"] = med(side, "ttfb", f)
                fig[f"{side}_stream_{f}"] = med(side, "stream_time", f)
        fig["embed_mean_ms"] = statistics.median(embed) if embed else float("nan")
        fig["plain_ttfb_added_ms"] = fig["plain_ttfb_p50_ms"] - fig["direct_ttfb_p50_ms"]
        fig["proxy_ttfb_added_ms"] = fig["proxy_ttfb_p50_ms"] - fig["direct_ttfb_p50_ms"]
        # the target's "beyond the embedding": the plain proxy's TTFB over the mock's
        fig["ttfb_added_beyond_embed_ms"] = fig["plain_ttfb_added_ms"]
        fig["plain_per_chunk_added_ms"] = (fig["plain_stream_p50_ms"]
                                           - fig["direct_stream_p50_ms"]) / chunks
        fig["per_chunk_added_ms"] = (fig["proxy_stream_p50_ms"]
                                     - fig["direct_stream_p50_ms"]) / chunks
        self.res["ttft"] = {"rate": p.ttft_rate, "chunks": chunks, "runs": rows, "medians": fig}

    async def miss_overhead(self) -> None:
        """What the proxy adds to a miss (issue 14's measurement): direct vs proxy, same run.

        A mock tier with 200 ms to the first token, pinned to the *server* core (it competes with
        the proxy for the CPU), behind a full proxy (semantic cache and router on) with that one
        tier; requests name the tier's model. Per round, alternating sides: ``miss_conc``
        closed-loop clients of unique non-streamed prompts (latency), then one request at a
        time, non-streamed (latency) and streamed (time to first byte). Added = proxy minus
        direct in the same round; the figures are medians over rounds. A third side, a plain
        proxy (semantic cache and router off) on the same core, tells the hop (HTTP in, HTTP
        out, exact lookup, store) from what the semantic layer adds on top of it.
        """
        p, st, a = self.plan, self.stack, self.args
        model = TIERS[0][1]
        mock = st.mock(model, 200.0, 1.0, core=a.server_core)
        base, proc = st.proxy([("small", mock)], self.redis)
        plain, plain_proc = st.proxy([("small", mock)], self.redis, {
            "EDGE_PROXY_SEMANTIC__ENABLED": "false", "EDGE_PROXY_ROUTER__ENABLED": "false"})
        urls = {"direct": mock + "/v1/chat/completions", "plain": plain + "/v1/chat/completions",
                "proxy": base + "/v1/chat/completions"}
        for url in urls.values():
            await self.gen.connect(url, p.miss_conc)
        await self.warm("miss overhead: warm", self.prompts.take_singles(16), conc=8, base=base)
        per_req = 0.2 + REPLY_TOKENS * 0.001
        n_conc = max(p.miss_conc, int(p.miss_conc * p.miss_seconds / per_req))
        kinds = ("conc", "json", "stream")
        rows: dict[str, list[dict[str, Any]]] = {f"{s}_{k}": [] for s in urls for k in kinds}
        m0 = metric_sums(base)
        for r in range(p.rounds):
            for kind in kinds:
                for side, url in urls.items():
                    texts = self.prompts.take_singles(n_conc if kind == "conc" else p.miss_serial)
                    streamed = kind == "stream"
                    reqs = [(body_of(t, streamed, model, usage=side == "direct" and streamed),
                             streamed) for t in texts]
                    rows[f"{side}_{kind}"].append(await self.gen.closed_run(
                        f"miss overhead {r + 1}/{p.rounds} {kind} {side}", url, reqs,
                        p.miss_conc if kind == "conc" else 1))
        m1 = metric_sums(base)
        st.kill(proc)
        st.kill(plain_proc)

        def pick(row: dict[str, Any], part: str, field: str) -> float:
            for o in ("direct", "miss"):
                if o in row["outcomes"]:
                    return float(row["outcomes"][o][part][field])
            return float("nan")

        fig: dict[str, Any] = {"concurrency": p.miss_conc, "mock_ttft_ms": 200.0,
                               "requests_per_run": {"conc": n_conc, "serial": p.miss_serial}}
        for kind, part in (("conc", "latency"), ("json", "latency"), ("stream", "ttfb")):
            for f in ("p50_ms", "p99_ms"):
                d = [pick(x, part, f) for x in rows[f"direct_{kind}"]]
                fig[f"direct_{kind}_{f}"] = statistics.median(d)
                for side, pre in (("proxy", ""), ("plain", "plain_")):
                    q = [pick(x, part, f) for x in rows[f"{side}_{kind}"]]
                    fig[f"{side}_{kind}_{f}"] = statistics.median(q)
                    fig[f"{pre}added_{kind}_{f}"] = statistics.median(
                        b - a_ for a_, b in zip(d, q, strict=True))
        fig["proxy_outcomes"] = {k: sum(x["outcomes"].get(k, {}).get("latency", {}).get("n", 0)
                                        for kk in kinds for x in rows[f"proxy_{kk}"])
                                 for k in ("miss", "hit-semantic", "hit-exact", "error")}
        cnt = (m1.get("edge_proxy_embed_seconds_count", 0)
               - m0.get("edge_proxy_embed_seconds_count", 0))
        tot = (m1.get("edge_proxy_embed_seconds_sum", 0)
               - m0.get("edge_proxy_embed_seconds_sum", 0))
        fig["embed_mean_ms"] = 1000 * tot / cnt if cnt else float("nan")
        self.res["miss_overhead"] = {"runs": rows, "medians": fig}

    async def _novel_run(self, rate: float, label: str) -> dict[str, Any]:
        """Exact hits at ``capacity_exact_rate`` + never-seen paraphrases at ``rate`` (their
        text_a stored first): per outcome latency, semantic hit share, skips and errors."""
        p, share = self.plan, self.args.stream_share
        pairs = self.prompts.take_pairs(self.n(rate, p.capacity_seconds))
        await self.warm(f"{label}: warm text_a", [a for a, _ in pairs])
        await asyncio.sleep(0.3)
        exact = self.repeat_reqs(self.n(p.capacity_exact_rate, p.capacity_seconds), share)
        flags = stream_flags(len(pairs), share, self.rng)
        novel: list[Req] = [(body_of(b, f), f) for (_, b), f in zip(pairs, flags, strict=True)]
        merged = exact + novel
        self.rng.shuffle(merged)
        skip0 = metric_by_label(self.base, "edge_proxy_semantic_skipped_total", "reason")
        rej0 = metric_by_label(self.base, "edge_proxy_semantic_rejects_total", "reason")
        res = await self.gen.run(label, self.chat, merged, p.capacity_exact_rate + rate,
                                 seed=int(rate))
        await asyncio.sleep(0.2)
        out = res["outcomes"]

        def p99(o: str) -> float:
            return float(out.get(o, {}).get("latency", {}).get("p99_ms", float("nan")))

        sem_n = out.get("hit-semantic", {}).get("latency", {}).get("n", 0)
        cached = [v for v in (p99("hit-exact"), p99("hit-semantic")) if v == v]
        return {
            "novel_rps": rate, "exact_rps": p.capacity_exact_rate, "novel": len(novel),
            "exact_p99_ms": p99("hit-exact"), "semantic_p99_ms": p99("hit-semantic"),
            "semantic_p50_ms": float(out.get("hit-semantic", {}).get("latency", {})
                                     .get("p50_ms", float("nan"))),
            "miss_p99_ms": p99("miss"),
            "cached_p99_ms": max(cached) if cached else float("nan"),
            "semantic_hit_share": sem_n / max(len(novel), 1),
            "errors": res["errors"], "achieved_rps": res["achieved_rps"],
            "skipped": delta(metric_by_label(self.base, "edge_proxy_semantic_skipped_total",
                                             "reason"), skip0),
            "rejects": delta(metric_by_label(self.base, "edge_proxy_semantic_rejects_total",
                                             "reason"), rej0),
            "run": res,
        }

    async def capacity(self) -> None:
        """Rated capacity and the curve past it, then overload at 3x the rated rate.

        Never-seen paraphrases (each needs an embedding: a semantic hit or a miss) at rising
        rates beside exact hits at ``capacity_exact_rate``. The rated capacity is the highest
        rate (per core: the proxy has one) at which the semantic hits' P99 and the exact hits'
        P99 both stay under ``cached_p99_budget_ms`` without errors and at least half the lowest
        rate's share of them are still semantic hits (not shed); the sweep goes on past it
        until two rates fail. Then one run at 3x the rated rate (the issue's overload): cached
        P99, errors, semantic skips (sheds) and the semantic hit share against the lowest rate's.
        """
        p = self.plan
        budget = p.cached_p99_budget_ms
        curve: list[dict[str, Any]] = []
        rated = 0.0
        failed = 0
        for rate in p.capacity_rates:
            row = await self._novel_run(rate, f"capacity {rate:g} novel/s")
            # a rate "passes" only while it still serves semantic hits: shedding every lookup
            # keeps the cached P99 low but is no capacity (at least half the lowest rate's share)
            first = curve[0]["semantic_hit_share"] if curve else row["semantic_hit_share"]
            row["ok"] = bool(row["cached_p99_ms"] < budget and row["errors"] == 0
                             and row["semantic_hit_share"] > 0
                             and row["semantic_hit_share"] >= 0.5 * first)
            curve.append(row)
            if row["ok"] and not failed:
                rated = rate
            elif not row["ok"]:
                failed += 1
                if failed >= 2:
                    break
        base_rate = rated or p.capacity_rates[0]
        over = await self._novel_run(3 * base_rate, f"overload {3 * base_rate:g} novel/s")
        unloaded = curve[0]["semantic_hit_share"] if curve else float("nan")
        self.res["capacity"] = {
            "budget_ms": budget, "cores": 1, "rated_novel_rps_per_core": rated,
            "curve": curve, "overload": over,
            "overload_vs_unloaded_semantic_hits": over["semantic_hit_share"] / unloaded
            if unloaded else float("nan"),
        }

    async def memory(self) -> None:
        """RSS growth of a fresh proxy over a zero-latency mock while filling unique misses."""
        p, st = self.plan, self.stack
        url = st.mock(TIERS[0][1], 0, 0)
        # The embedder's LRU (text -> vector, 10k entries by default) grows with the first
        # entries, then stops: capped at half the fill here so that the second half's slope is
        # the cost of cache entries alone; the LRU at its default cap is added as an estimate.
        lru = min(EMBED_LRU_DEFAULT, p.fill // 2)
        base, proc = st.proxy([("small", url)], None, {
            "EDGE_PROXY_ROUTER__ENABLED": "false",
            "EDGE_PROXY_SEMANTIC__EMBED_CACHE_SIZE": str(lru)})
        texts = self.prompts.take_singles(p.fill + 200)
        await self.warm("memory warm", texts[:200], conc=32, base=base)
        await asyncio.sleep(0.5)
        points = [{"filled": 0, "rss": rss_bytes(proc.pid), **_mem_stats(admin_stats(base))}]
        step = max(1, p.fill // 6)
        for i in range(0, p.fill, step):
            await self.warm(f"memory fill {i + step}/{p.fill}", texts[200 + i:200 + i + step],
                            conc=32, base=base)
            await asyncio.sleep(0.3)
            points.append({"filled": i + step, "rss": rss_bytes(proc.pid),
                           **_mem_stats(admin_stats(base))})
        st.kill(proc)
        first, last = points[0], points[-1]
        mid = next(pt for pt in points if pt["filled"] >= p.fill // 2)
        entries = last["l1_entries"] - first["l1_entries"]
        avg = (last["rss"] - first["rss"]) / max(entries, 1)
        marginal = (last["rss"] - mid["rss"]) / max(last["l1_entries"] - mid["l1_entries"], 1)
        lru_rest = max(0, EMBED_LRU_DEFAULT - lru) * EMBED_LRU_ENTRY_BYTES
        proj = (last["rss"] - first["rss"]) + (100_000 - entries) * marginal + lru_rest
        self.res["memory"] = {
            "points": points, "entries": entries, "bytes_per_entry_avg": avg,
            "bytes_per_entry_marginal": marginal, "projected_100k_mb": proj / 2**20,
            "embed_lru_during_fill": lru, "embed_lru_rest_mb_estimate": lru_rest / 2**20,
            "baseline_rss_mb": first["rss"] / 2**20,
            "l1_bytes_per_entry": (last["l1_bytes"] - first["l1_bytes"]) / max(entries, 1),
            "semantic_bytes_per_entry": (last["sem_bytes"] - first["sem_bytes"])
            / max(last["sem_entries"] - first["sem_entries"], 1),
        }


def _mem_stats(s: dict[str, Any]) -> dict[str, int]:
    sem = s.get("semantic") or {}
    return {"l1_entries": s["cache"]["l1_entries"], "l1_bytes": s["cache"]["l1_bytes"],
            "sem_entries": sem.get("entries", 0), "sem_bytes": sem.get("memory_bytes", 0)}


# -------------------------------------------------------------------------------------------
# report


TARGETS = (
    ("exact-hit P99 / bare P99 @500/s", "exact_p99_ratio", "<=", 1.3),
    ("semantic-hit P99 @200/s / bare P99", "semantic_p99_ratio", "<=", 2.5),
    ("max exact-hit req/s / bare max", "max_rps_ratio", ">=", 0.8),
    ("exact-hit P99 with novel paraphrases beside / without", "interference_p99_ratio", "<=",
     1.3),
    ("miss: added P50, 8 concurrent, ms", "miss_added_conc_p50_ms", "<=", 2.0),
    ("miss: added P99, 8 concurrent, ms", "miss_added_conc_p99_ms", "<=", 5.0),
    ("miss: added P50, one at a time, JSON, ms", "miss_added_json_p50_ms", "<=", 1.0),
    ("miss: added P50 stream TTFT, one at a time, ms", "miss_added_stream_ttfb_p50_ms", "<=",
     1.0),
    ("mixed Zipf @200/s: semantic-hit P99, ms", "mixed_semantic_p99_ms", "<", 15.0),
    ("rated capacity: novel queries/s per core (cached P99 < 15 ms)",
     "rated_novel_rps_per_core", "info", 0.0),
    ("overload (3x rated): cached P99, ms", "overload_cached_p99_ms", "<", 15.0),
    ("overload: errors", "overload_errors", "<=", 0.0),
    ("overload: semantic hits / unloaded", "overload_semantic_hits_vs_unloaded", ">=", 0.5),
    ("overload: semantic lookups shed", "overload_sheds", "info", 0.0),
    ("miss TTFB added beyond embedding (plain proxy), ms", "ttfb_added_beyond_embed_ms", "<=",
     1.0),
    ("per-chunk time added (full proxy), ms", "per_chunk_added_ms", "<=", 0.1),
    ("memory for 100k entries, MB", "projected_100k_mb", "<=", 300.0),
)


def ratios(res: dict[str, Any]) -> dict[str, float]:
    """The headline figures the targets are stated in."""
    out: dict[str, float] = {}
    if "rounds" in res:
        m = res["rounds"]["medians"]
        out["exact_p99_ratio"] = m["exact_p99_ms"] / m["bare_p99_ms_at_exact_rate"]
        out["semantic_p99_ratio"] = m["semantic_p99_ms"] / m["bare_p99_ms_at_semantic_rate"]
        out["max_rps_ratio"] = m["proxy_max_rps"] / m["bare_max_rps"]
    if "interference" in res:
        m = res["interference"]["medians"]
        out["interference_p99_ratio"] = m["exact_p99_ms_with_semantic"] / m["exact_p99_ms_alone"]
    if "ttft" in res:
        out["ttfb_added_beyond_embed_ms"] = res["ttft"]["medians"]["ttfb_added_beyond_embed_ms"]
        out["per_chunk_added_ms"] = res["ttft"]["medians"]["per_chunk_added_ms"]
    if "memory" in res:
        out["projected_100k_mb"] = res["memory"]["projected_100k_mb"]
    if "miss_overhead" in res:
        m = res["miss_overhead"]["medians"]
        out["miss_added_conc_p50_ms"] = m["added_conc_p50_ms"]
        out["miss_added_conc_p99_ms"] = m["added_conc_p99_ms"]
        out["miss_added_json_p50_ms"] = m["added_json_p50_ms"]
        out["miss_added_stream_ttfb_p50_ms"] = m["added_stream_p50_ms"]
    if "workloads" in res and "mixed" in res["workloads"]:
        sem = res["workloads"]["mixed"]["outcomes"].get("hit-semantic")
        if sem:
            out["mixed_semantic_p99_ms"] = sem["latency"]["p99_ms"]
    if "capacity" in res:
        c = res["capacity"]
        out["rated_novel_rps_per_core"] = c["rated_novel_rps_per_core"]
        out["overload_cached_p99_ms"] = c["overload"]["cached_p99_ms"]
        out["overload_errors"] = float(c["overload"]["errors"])
        out["overload_semantic_hits_vs_unloaded"] = c["overload_vs_unloaded_semantic_hits"]
        out["overload_sheds"] = float(sum(c["overload"]["skipped"].values()))
    return out


def _f(v: Any, nd: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.{nd}f}"


def markdown(res: dict[str, Any]) -> str:
    """The tables the README can paste."""
    lines: list[str] = []
    r = res.get("ratios", {})
    if r:
        lines += ["| figure | measured | target | |", "|---|---:|---:|---|"]
        for title, key, op, target in TARGETS:
            if key in r:
                v = r[key]
                if op == "info":
                    lines.append(f"| {title} | {_f(v)} | | |")
                    continue
                ok = {"<=": v <= target, "<": v < target, ">=": v >= target}[op]
                lines.append(f"| {title} | {_f(v)} | {op} {target:g} | "
                             f"{'ok' if ok else 'MISSED'} |")
        lines.append("")
    if "rounds" in res:
        m = res["rounds"]["medians"]
        lines += ["| at fixed rate (median of rounds) | P50 ms | P99 ms | max req/s |",
                  "|---|---:|---:|---:|",
                  f"| bare handler @{res['plan']['exact_rate']:g}/s | "
                  f"{_f(m['bare_p50_ms_at_exact_rate'])} | {_f(m['bare_p99_ms_at_exact_rate'])} "
                  f"| {m['bare_max_rps']:.0f} |",
                  f"| proxy exact hit @{res['plan']['exact_rate']:g}/s | {_f(m['exact_p50_ms'])} "
                  f"| {_f(m['exact_p99_ms'])} | {m['proxy_max_rps']:.0f} |",
                  f"| bare handler @{res['plan']['semantic_rate']:g}/s | - | "
                  f"{_f(m['bare_p99_ms_at_semantic_rate'])} | |",
                  f"| proxy semantic hit @{res['plan']['semantic_rate']:g}/s "
                  f"({100 * m['semantic_hit_rate']:.0f}% of paraphrases) | "
                  f"{_f(m['semantic_p50_ms'])} | {_f(m['semantic_p99_ms'])} | |", ""]
    if "interference" in res:
        m = res["interference"]["medians"]
        lines += ["| interference (median of rounds) | P50 ms | P99 ms |", "|---|---:|---:|",
                  f"| exact hits @{m['exact_rate']:g}/s alone | {_f(m['exact_p50_ms_alone'])} | "
                  f"{_f(m['exact_p99_ms_alone'])} |",
                  f"| exact hits @{m['exact_rate']:g}/s + {m['semantic_rate']:g}/s unique "
                  f"paraphrases | {_f(m['exact_p50_ms_with_semantic'])} | "
                  f"{_f(m['exact_p99_ms_with_semantic'])} |",
                  f"| the semantic hits of that run | {_f(m['semantic_p50_ms'])} | "
                  f"{_f(m['semantic_p99_ms'])} |", ""]
    if "workloads" in res:
        lines += ["| workload | offered/s | done/s | outcome | share | P50 ms | P95 ms | P99 ms "
                  "| TTFB P50 (stream) | TTFB P99 (stream) | USD/query | without cache |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, w in res["workloads"].items():
            first = True
            for o, d in w["outcomes"].items():
                lat, tt = d["latency"], d["ttfb_streamed"]
                c = w["cost"]
                lines.append(
                    f"| {name if first else ''} | {w['offered_rps']:g} | "
                    f"{w['achieved_rps']:.0f} | {o} | "
                    f"{100 * w['hit_rate'].get(o, 0):.0f}% | {_f(lat.get('p50_ms'))} | "
                    f"{_f(lat.get('p95_ms'))} | {_f(lat.get('p99_ms'))} | "
                    f"{_f(tt.get('p50_ms'))} | {_f(tt.get('p99_ms'))} | "
                    + (f"{c['usd_per_query']:.2e} | {c['usd_per_query_without_cache']:.2e} |"
                       if first else " | |"))
                first = False
        lines.append("")
    if "sweep" in res:
        lines += ["| offered req/s | bare done/s | bare P50 | bare P99 | proxy (repeats) done/s "
                  "| proxy P50 | proxy P99 |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for b, pr in zip(res["sweep"]["bare"], res["sweep"]["proxy_repeats"], strict=True):
            lines.append(f"| {b['offered_rps']:g} | {b['achieved_rps']:.0f} | "
                         f"{_f(b['all'].get('p50_ms'))} | {_f(b['all'].get('p99_ms'))} | "
                         f"{pr['achieved_rps']:.0f} | {_f(pr['all'].get('p50_ms'))} | "
                         f"{_f(pr['all'].get('p99_ms'))} |")
        lines.append("")
    if "ttft" in res:
        t, c = res["ttft"]["medians"], res["ttft"]["chunks"]
        lines += [f"| streamed miss, small tier, {res['ttft']['rate']:g}/s | straight to mock | "
                  "plain proxy (no embedding) | full proxy |", "|---|---:|---:|---:|",
                  f"| TTFB P50 ms | {_f(t['direct_ttfb_p50_ms'])} | {_f(t['plain_ttfb_p50_ms'])} "
                  f"(+{_f(t['plain_ttfb_added_ms'])}) | {_f(t['proxy_ttfb_p50_ms'])} "
                  f"(+{_f(t['proxy_ttfb_added_ms'])}; embedding mean {_f(t['embed_mean_ms'])}) |",
                  f"| TTFB P99 ms | {_f(t['direct_ttfb_p99_ms'])} | {_f(t['plain_ttfb_p99_ms'])} "
                  f"| {_f(t['proxy_ttfb_p99_ms'])} |",
                  f"| first to last byte P50 ms ({c} chunks) | {_f(t['direct_stream_p50_ms'])} | "
                  f"{_f(t['plain_stream_p50_ms'])} ({_f(t['plain_per_chunk_added_ms'], 3)}/chunk) "
                  f"| {_f(t['proxy_stream_p50_ms'])} ({_f(t['per_chunk_added_ms'], 3)}/chunk) |",
                  ""]
    if "miss_overhead" in res:
        m = res["miss_overhead"]["medians"]
        lines += ["| miss overhead (mock TTFT 200 ms on the proxy's core, median of rounds) "
                  "| direct P50 | proxy P50 | added P50 (plain proxy) | direct P99 | proxy P99 "
                  "| added P99 (plain proxy) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for kind, title in (("conc", f"{m['concurrency']} concurrent, JSON latency"),
                            ("json", "one at a time, JSON latency"),
                            ("stream", "one at a time, stream TTFB")):
            lines.append(f"| {title} | {_f(m[f'direct_{kind}_p50_ms'])} | "
                         f"{_f(m[f'proxy_{kind}_p50_ms'])} | {_f(m[f'added_{kind}_p50_ms'])} "
                         f"({_f(m.get(f'plain_added_{kind}_p50_ms', float('nan')))}) | "
                         f"{_f(m[f'direct_{kind}_p99_ms'])} | {_f(m[f'proxy_{kind}_p99_ms'])} | "
                         f"{_f(m[f'added_{kind}_p99_ms'])} "
                         f"({_f(m.get(f'plain_added_{kind}_p99_ms', float('nan')))}) |")
        lines.append("")
    if "capacity" in res:
        c = res["capacity"]
        lines += [f"Rated capacity: **{c['rated_novel_rps_per_core']:g} novel queries/s per core"
                  f"** (every cached answer's P99 < {c['budget_ms']:g} ms).", "",
                  "| novel/s (+ exact/s) | done/s | semantic-hit P50 | semantic-hit P99 | "
                  "exact-hit P99 | miss P99 | semantic hits of novel | skipped | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in [*c["curve"], {**c["overload"], "overload": True}]:
            lines.append(
                f"| {'overload ' if row.get('overload') else ''}{row['novel_rps']:g} "
                f"(+{row['exact_rps']:g}) | {row['achieved_rps']:.0f} | "
                f"{_f(row['semantic_p50_ms'])} | {_f(row['semantic_p99_ms'])} | "
                f"{_f(row['exact_p99_ms'])} | {_f(row['miss_p99_ms'])} | "
                f"{100 * row['semantic_hit_share']:.0f}% | {sum(row['skipped'].values()):.0f} | "
                f"{row['errors']} |")
        lines.append("")
    if "memory" in res:
        mm = res["memory"]
        lines += [f"Memory: {mm['entries']} entries filled, RSS {mm['baseline_rss_mb']:.0f} MB "
                  f"at start, {mm['bytes_per_entry_avg']:.0f} B/entry on average, "
                  f"{mm['bytes_per_entry_marginal']:.0f} B/entry marginal (L1 accounts "
                  f"{mm['l1_bytes_per_entry']:.0f}, semantic index "
                  f"{mm['semantic_bytes_per_entry']:.0f}); projected growth for 100k entries "
                  f"{mm['projected_100k_mb']:.0f} MB (of which the embedder LRU filling to its "
                  f"cap, estimated: {mm['embed_lru_rest_mb_estimate']:.0f} MB).", ""]
    if res.get("gc"):
        last = list(res["gc"])[-1]
        g = res["gc"][last]
        lines += ["GC pauses on the proxy's loop (whole run, to the end of " + last + "): "
                  + "; ".join(f"{k} {v['collections']} collections, {v['total_ms']:.0f} ms in "
                              f"all, max {v['max_ms']:.2f} ms" for k, v in g.items()) + ".", ""]
    if "generator_check" in res:
        g = res["generator_check"]
        own = g["own"]["all"]
        lines += [f"Generator check (bare handler @{g['rate']:g}/s): own open-loop P50 "
                  f"{_f(own['p50_ms'])} / P99 {_f(own['p99_ms'])} ms (send lag P99 "
                  f"{_f(g['own']['lag']['p99_ms'], 3)} ms); hey (closed loop, -q) P50 "
                  f"{_f(g['hey']['p50_ms'])} / P99 {_f(g['hey']['p99_ms'])} ms.", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> int:
    progress = Progress()
    machine_start = MACHINE_AT_START or machine()
    print(describe(machine_start), file=sys.stderr)
    stack = Stack(args)
    prompts = Prompts(args.seed)
    phases = set(args.phases.split(","))
    t_start = time.monotonic()
    try:
        async with LoadGen(args.conns, args.timeout, progress) as gen:
            suite = Suite(args, stack, gen, prompts)
            suite.res["plan"] = vars(suite.plan)
            await suite.setup()
            def gc_mark(phase: str) -> None:
                # the main proxy's GC pauses so far (count, total, max per generation)
                gc_stats = admin_stats(suite.base).get("gc")
                if gc_stats is not None:
                    suite.res.setdefault("gc", {})[phase] = gc_stats

            gc_mark("setup")
            if "check" in phases:
                await suite.check_generator()
            if "rounds" in phases:
                await suite.rounds()
                gc_mark("rounds")
            if "interference" in phases:
                await suite.interference()
                gc_mark("interference")
            if "sweep" in phases:
                await suite.sweep()
                gc_mark("sweep")
            if "workloads" in phases:
                await suite.workloads()
                gc_mark("workloads")
            if "ttft" in phases:
                await suite.ttft()
            if "misses" in phases:
                await suite.miss_overhead()
            if "capacity" in phases:
                await suite.capacity()
                gc_mark("capacity")
            if "memory" in phases:
                await suite.memory()
            res = suite.res
    finally:
        stack.stop()
    res["ratios"] = ratios(res)
    # the machine as at the start (the affinity before pinning), the load average at the end
    res["machine"] = {**machine_start, "loadavg_end": list(os.getloadavg())}
    res["meta"] = {
        "args": vars(args), "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "loadavg_end": os.getloadavg(), "wall_s":
        time.monotonic() - t_start, "answer_bytes": suite.answer_bytes,
        "generator_errors": gen.errors, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if not args.no_plots:
        from plots import plot_all

        for p in plot_all(res, out.parent, out.stem):
            print(f"plot: {p}", file=sys.stderr)
    print(describe(res["machine"]) + f", at the end {os.getloadavg()[0]:.2f}")
    print(markdown(res))
    print(f"(results in {out}; wall {res['meta']['wall_s']:.0f}s; load average at end "
          f"{res['meta']['loadavg_end'][0]:.2f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 1-2 minute version")
    ap.add_argument("--redis", action="store_true", help="start a private redis-server as L2")
    ap.add_argument("--seconds", type=float, help="seconds per fixed-rate run (10; quick 3)")
    ap.add_argument("--rounds", type=int, help="alternating bare/proxy rounds (3; quick 1)")
    ap.add_argument("--fill", type=int, help="entries for the memory phase (20000; quick 2000)")
    ap.add_argument("--phases",
                    default="check,rounds,interference,sweep,workloads,ttft,misses,capacity,memory")
    ap.add_argument("--stream-share", type=float, default=0.5,
                    help="share of streamed requests in the workloads")
    ap.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of 'mixed'")
    ap.add_argument("--unique-share", type=float, default=0.1,
                    help="share of one-off prompts in 'mixed'")
    ap.add_argument("--conns", type=int, default=512, help="generator connection pool")
    ap.add_argument("--hey-conns", type=int, default=32, help="hey workers for max throughput")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    ap.add_argument("--server-core", default="0")
    ap.add_argument("--load-core", default="1")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "loadtest.json"))
    args = ap.parse_args(argv)
    if not shutil.which("hey") and set(args.phases.split(",")) & {"check", "rounds"}:
        print("hey not found (Debian: apt-get install hey)", file=sys.stderr)
        return 2
    if args.redis and not shutil.which("redis-server"):
        print("redis-server not found", file=sys.stderr)
        return 2
    MACHINE_AT_START.update(machine())  # before this process pins itself to the load core
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.load_core.split(",")})
    uvloop.install()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
