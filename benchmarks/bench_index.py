"""SemanticIndex at scale: one big scope of synthetic unit vectors (d = 384, f16, usearch ANN).

Reports build time, search latency P50/P99 (one query at a time, as the event loop does),
recall@1 against exact brute force, and memory per entry (RSS delta and memory_bytes()).

Queries are stored vectors plus noise (cosine ~0.9 to their source, like a paraphrase), so the
right answer is known. Random Gaussian vectors are the hard case for HNSW (no cluster structure,
full intrinsic dimension); real MiniLM embeddings are easier.

Run::

    python benchmarks/bench_index.py                 # 10k and 100k
    python benchmarks/bench_index.py 1000000         # the 1M case (minutes to build)
    EDGE_PROXY_BENCH_1M=1 pytest benchmarks/bench_index.py -s   # pytest entry, 1M opt-in
"""

from __future__ import annotations

import gc
import hashlib
import os
import sys
import time

import numpy as np
import pytest

from proxy.semantic import SemanticEntry, SemanticIndex

D = 384
SCOPE = hashlib.blake2b(b"bench", digest_size=16).digest()
CHUNK = 50_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, D), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def run(n: int, queries: int = 2000, expansion_search: int | None = None) -> dict[str, float]:
    """Build an n-entry single-scope index, then time single searches."""
    rng = np.random.default_rng(n)
    gc.collect()
    rss0 = rss_bytes()
    idx = SemanticIndex(D, capacity=n, expansion_search=expansion_search)
    now = time.time()
    keep = np.empty((min(n, queries), D), dtype=np.float32)  # sources of the queries
    keep_ids = np.sort(rng.choice(n, len(keep), replace=False))
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        vecs = unit_rows(rng, min(CHUNK, n - start))
        sel = keep_ids[(keep_ids >= start) & (keep_ids < start + len(vecs))]
        keep[np.searchsorted(keep_ids, sel)] = vecs[sel - start]
        entries = [
            SemanticEntry(
                (start + i).to_bytes(32, "big"),
                SCOPE,
                "bench",
                f"synthetic query {start + i}",
                "small",
                None,
                now,
                now + 86_400,
            )
            for i in range(len(vecs))
        ]
        idx.add_many(vecs, entries)
        del vecs, entries
    build_s = time.perf_counter() - t0
    gc.collect()
    rss = rss_bytes() - rss0
    noise = rng.standard_normal(keep.shape, dtype=np.float32) * (0.5 / np.sqrt(D))
    qs = keep + noise
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    for q in qs[:50]:  # warm up
        idx.search(q, SCOPE, k=1, now=now)
    lat = np.empty(len(qs))
    hits = 0
    for j, q in enumerate(qs):
        t = time.perf_counter()
        res = idx.search(q, SCOPE, k=1, now=now)
        lat[j] = time.perf_counter() - t
        hits += res[0][1].key == int(keep_ids[j]).to_bytes(32, "big")
    out = {
        "n": n,
        "build_s": build_s,
        "p50_us": float(np.percentile(lat, 50) * 1e6),
        "p99_us": float(np.percentile(lat, 99) * 1e6),
        "recall_at_1": hits / len(qs),
        "rss_per_entry": rss / n,
        "rss_total_mb": rss / 1e6,
        "est_per_entry": idx.memory_bytes() / n,
    }
    del idx
    gc.collect()
    return out


def report(r: dict[str, float]) -> str:
    return (
        f"n={r['n']:>8,}  build {r['build_s']:7.1f} s  search p50 {r['p50_us']:7.1f} us  "
        f"p99 {r['p99_us']:7.1f} us  recall@1 {r['recall_at_1']:.3f}  "
        f"RSS {r['rss_total_mb']:7.1f} MB = {r['rss_per_entry']:6.0f} B/entry  "
        f"memory_bytes {r['est_per_entry']:6.0f} B/entry"
    )


@pytest.mark.parametrize(
    "n",
    [
        10_000,
        100_000,
        pytest.param(
            1_000_000,
            marks=pytest.mark.skipif(
                os.environ.get("EDGE_PROXY_BENCH_1M") != "1", reason="set EDGE_PROXY_BENCH_1M=1"
            ),
        ),
    ],
)
def test_index_scale(n):
    r = run(n)
    print(report(r))
    assert r["recall_at_1"] >= 0.95


if __name__ == "__main__":
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 100_000]
    ef = int(os.environ.get("EDGE_PROXY_BENCH_EF", "0")) or None
    for size in sizes:
        print(report(run(size, expansion_search=ef)), flush=True)
