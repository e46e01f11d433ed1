"""The full bad-input run: >= 10,000 generated cases through a real proxy, one command.

    python benchmarks/fuzz.py                 # 10,000 cases on uvloop
    python benchmarks/fuzz.py --cases 2000 --loop asyncio

Uses the strategies and checks of tests/test_fuzz.py (the CI-sized run): bodies with one broken
field (chat and completions), bytes that are not a JSON object, deep nesting, and odd headers on
valid bodies. Unlike the test, a failing case does not stop the run: every failure is counted and
the first ones are printed. Prints cases tried and failures per property, checks that the proxy
still serves and holds no flight or tier slot at the end, writes benchmarks/results/fuzz.json,
and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from benchmarks.machine import describe, machine  # noqa: E402
from proxy.config import load_config  # noqa: E402
from proxy.mock_vllm import start_mock  # noqa: E402
from tests import test_fuzz as tf  # noqa: E402
from tests.conftest import start_proxy  # noqa: E402

#: Share of the cases per property.
SHARES = {"chat_broken_field": 0.3, "completion_broken_field": 0.2, "raw_bytes": 0.2,
          "deep_nesting": 0.1, "odd_headers": 0.2}


class Run:
    """Counts of one property."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cases = 0
        self.failures: list[str] = []
        self.statuses: dict[int, int] = {}


def _property(loop: asyncio.AbstractEventLoop, run: Run, strategy: st.SearchStrategy[Any],
              check: Callable[..., Coroutine[Any, Any, tf.Outcome]], n: int) -> None:
    """Run ``check`` on ``n`` cases drawn from ``strategy``; failures are recorded, not raised."""

    @settings(max_examples=n, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=["generate"])
    @given(case=strategy)
    def one(case: Any) -> None:
        run.cases += 1
        try:
            o = loop.run_until_complete(check(*case))
            run.statuses[o.status] = run.statuses.get(o.status, 0) + 1
        except tf.FuzzFailure as exc:
            run.failures.append(str(exc)[:500])
        except (aiohttp.ClientError, TimeoutError) as exc:
            run.failures.append(f"{type(exc).__name__}: {exc} for {str(case)[:300]}")

    one()


async def _start(loop_name: str) -> tuple[Any, list[Any], str]:
    mocks = []
    flags = []
    for name, model in (("small", "small-8b"), ("medium", "medium-32b"), ("large", "large-70b")):
        _, runner, port = await start_mock(model, ttft_ms=2, tpot_ms=0.2, reply_tokens=12)
        mocks.append(runner)
        flags.append(f"{name}=http://127.0.0.1:{port}")
    p = await start_proxy(load_config(env={}, overrides={}, tier_flags=flags))
    return p, mocks, p.url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="total generated cases")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fuzz.json"))
    args = ap.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    p, mocks, url = loop.run_until_complete(_start(args.loop))
    session = loop.run_until_complete(_session())
    fd_start = len(os.listdir("/proc/self/fd"))
    t0 = time.perf_counter()

    def bound(fn: Callable[..., Coroutine[Any, Any, tf.Outcome]], *pre: Any
              ) -> Callable[..., Coroutine[Any, Any, tf.Outcome]]:
        return lambda *case: fn(session, url, *pre, *case)

    plan = [
        ("chat_broken_field", tf.broken_bodies(tf.CHAT_FIELDS, tf.chat_bodies()),
         bound(tf.check_broken_body, tf.CHAT_PATH)),
        ("completion_broken_field",
         tf.broken_bodies(tf.COMPLETION_FIELDS, tf.completion_bodies()),
         bound(tf.check_broken_body, tf.COMPLETIONS_PATH)),
        ("raw_bytes", tf.raw_bodies(), bound(tf.check_raw_body)),
        ("deep_nesting", tf.deep_bodies(), bound(tf.check_deep_body)),
        ("odd_headers", st.tuples(tf.chat_bodies().map(tf.encode), tf.odd_headers()),
         bound(tf.check_headers)),
    ]
    runs = []
    for name, strategy, check in plan:
        run = Run(name)
        n = max(1, round(args.cases * SHARES[name]))
        _property(loop, run, strategy, check, n)
        runs.append(run)
        print(f"{name:<26} cases {run.cases:>6}  failures {len(run.failures):>4}  "
              f"statuses {dict(sorted(run.statuses.items()))}", flush=True)
        for f in run.failures[:5]:
            print("   ", f)
    after_ok = True
    try:
        loop.run_until_complete(tf.normal_request_works(url))
        loop.run_until_complete(tf.settled(p.proxy))
    except Exception as exc:  # reported, not raised: the summary must still be written
        after_ok = False
        print(f"after the run the proxy is not healthy: {exc!r}")
    loop.run_until_complete(session.close())
    fd_end = len(os.listdir("/proc/self/fd"))
    loop.run_until_complete(p.runner.cleanup())
    for r in mocks:
        loop.run_until_complete(r.cleanup())
    loop.close()
    total = sum(r.cases for r in runs)
    failures = sum(len(r.failures) for r in runs)
    elapsed = time.perf_counter() - t0
    print(f"total: {total} cases, {failures} failures, {elapsed:.0f} s, loop {args.loop}, "
          f"proxy healthy after: {after_ok}, fds {fd_start} -> {fd_end}")
    print(describe())
    out = {"machine": machine(), "loop": args.loop,
           "cases": total, "failures": failures, "seconds": round(elapsed, 1),
           "healthy_after": after_ok, "fds_start": fd_start, "fds_end": fd_end,
           "properties": {r.name: {"cases": r.cases, "failures": len(r.failures),
                                   "statuses": r.statuses, "first_failures": r.failures[:10]}
                          for r in runs}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if failures == 0 and after_ok else 1


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


if __name__ == "__main__":
    sys.exit(main())
