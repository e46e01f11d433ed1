"""What a model run costs after the core did something else: the floor of a novel semantic hit.

A semantic hit on a query never seen before runs two models one after the other on the proxy's
core: the embedder (its vector, for the search) and the pair verifier (its candidate). At a
light load each run follows a pause, and after a pause a run is slower than back to back: this
measures by how much, per model, on real QQP questions (evaluation data of ``../shared/data``).

Each mode times ``runs`` calls, one per question, after:

* ``none``: nothing (back to back);
* ``sleep``: ``--pause-ms`` asleep (the proxy idle between requests);
* ``spin``: ``--pause-ms`` of a Python busy loop (the core busy with something small);
* ``sweep``: reading a 64 MiB buffer (the caches evicted, no pause).

    taskset -c 0 python benchmarks/cold_models.py [--runs 150] [--pause-ms 50]

Prints a table and writes ``benchmarks/results/cold_models.json`` with the machine.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gzip
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe, machine  # noqa: E402

QQP = ROOT.parent / "shared" / "data" / "qqp" / "qqp_dev.csv.gz"
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("none", "sleep", "spin", "sweep")


def questions(n: int) -> list[tuple[str, str]]:
    """``n`` QQP duplicate pairs (text_a, text_b) from the dev file."""
    with gzip.open(QQP, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] == "1"]
    return [(r["text_a"], r["text_b"]) for r in rows[:n]]


def timed(run: Callable[[], object], before: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        before()
        t = time.perf_counter()
        run()
        out.append(1000 * (time.perf_counter() - t))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=150)
    ap.add_argument("--pause-ms", type=float, default=50.0)
    ap.add_argument("--out", default=str(RESULTS / "cold_models.json"))
    args = ap.parse_args(argv)

    from proxy.semantic.embedder import Embedder
    from proxy.semantic.pairmodel import PairModel

    emb = Embedder()
    emb.load()
    pair = PairModel()
    pair.load()
    pairs = questions(args.runs)
    pause = args.pause_ms / 1000
    buf = np.ones(64 * 1024 * 1024 // 8)

    def spin() -> None:
        t = time.perf_counter()
        while time.perf_counter() - t < pause:
            pass

    befores: dict[str, Callable[[], object]] = {
        "none": lambda: None, "sleep": lambda: time.sleep(pause), "spin": spin,
        "sweep": buf.sum}
    report: dict[str, Any] = {"machine": machine(), "runs": args.runs,
                              "pause_ms": args.pause_ms, "modes": {}}
    print(describe(report["machine"]))
    print(f"| before each run ({args.pause_ms:g} ms pauses) | embedder p50 / p90 ms"
          " | pair verifier p50 / p90 ms |")
    print("|---|---:|---:|")
    for mode in MODES:
        texts = iter([b for _, b in pairs])
        e = timed(functools.partial(lambda it: emb.embed_batch([next(it)]), texts),
                  befores[mode], args.runs)
        both = iter(pairs)
        v = timed(functools.partial(lambda it: pair.logit(*reversed(next(it))), both),
                  befores[mode], args.runs)
        row = {"embed_p50_ms": statistics.median(e), "embed_p90_ms": float(np.percentile(e, 90)),
               "verify_p50_ms": statistics.median(v),
               "verify_p90_ms": float(np.percentile(v, 90))}
        report["modes"][mode] = row
        print(f"| {mode} | {row['embed_p50_ms']:.2f} / {row['embed_p90_ms']:.2f}"
              f" | {row['verify_p50_ms']:.2f} / {row['verify_p90_ms']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
