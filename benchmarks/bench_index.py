"""SemanticIndex at scale: one big scope of 384-d f16 vectors (usearch ANN + exact rescoring).

Reports build time (``add_many`` in 50k chunks, multi-threaded usearch insert), process RSS and
RSS per entry, ``memory_bytes()`` per entry, latency P50/P95/P99 of the whole
``SemanticIndex.search`` path (one query at a time, k=4, as the event loop calls it: validation,
usearch, candidate fetch, native rescoring, SemanticEntry construction), recall@1 against exact
brute force over the stored f16 vectors, ``expire()`` scan time and, with ``--snapshot``, the
snapshot figures (``snapshot_data`` on the loop thread, ``write_snapshot``, ``load``).

Data (default ``clustered``): 4 096 random centroids per million entries (at least 64), points =
centroid + Gaussian noise (cosine ~0.7 to the centroid), normalised; so near neighbours exist,
as paraphrases do. Uniform random vectors are the worst case for HNSW and unlike embeddings;
``--data uniform`` runs it anyway. Queries are stored vectors plus noise (cosine ~0.9 to their
source); the right answer is the exact brute-force top-1 (the source in >99 % of cases).
``--data real`` uses the MiniLM vectors cached under benchmarks/results/emb_*.npy (~60k stored,
the intent-dataset query files as queries), for a realism check at small n.

Query texts are padded to ``--text`` characters (64 by default, ASCII); keys are 32 bytes.
Vectors are regenerated per chunk from the seed, so the benchmark process holds no copy of them
while RSS is measured. Search is timed pinned to one core (``--cpu``, default 1) after a
multi-threaded build. Results go to benchmarks/results/bench_index_<data>_<n>.json.

Run::

    python benchmarks/bench_index.py 100000
    python benchmarks/bench_index.py 1000000 --snapshot
    python benchmarks/bench_index.py 0 --data real
    pytest benchmarks/bench_index.py -s            # 10k smoke test (recall >= 0.95)
"""

from __future__ import annotations

import argparse
import gc
import glob
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from proxy.semantic import (
    DEFAULT_EXPANSION_SEARCH,
    SemanticEntry,
    SemanticIndex,
    write_snapshot,
)

D = 384
SCOPE = hashlib.blake2b(b"bench", digest_size=16).digest()
CHUNK = 50_000
RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Data:
    """Deterministic chunks of stored vectors, regenerated on demand."""

    def __init__(self, kind: str, n: int, seed: int = 0) -> None:
        self.kind, self.seed = kind, seed
        self.real: np.ndarray | None = None
        self.real_queries: np.ndarray | None = None
        if kind == "real":
            stored, queries, seen = [], [], set()
            for f in sorted(glob.glob(str(RESULTS / "emb_*.npy"))):
                tag = f.rsplit("_", 1)[-1]  # content hash: the same set cached under two names
                if tag in seen:
                    continue
                seen.add(tag)
                a = np.load(f).astype(np.float32)
                (queries if "-query_" in f else stored).append(a)
            if not stored:
                raise SystemExit("no benchmarks/results/emb_*.npy")
            self.real = _unit(np.concatenate(stored))
            self.real_queries = _unit(np.concatenate(queries))[:2000] if queries else None
            n = len(self.real)
        self.n = n
        rng = np.random.default_rng(seed)
        self.centroids = _unit(rng.standard_normal((max(64, n * 4096 // 1_000_000), D),
                                                   dtype=np.float32))

    def chunk(self, start: int) -> np.ndarray:
        m = min(CHUNK, self.n - start)
        if self.real is not None:
            return self.real[start : start + m]
        rng = np.random.default_rng((self.seed, start))
        if self.kind == "uniform":
            return _unit(rng.standard_normal((m, D), dtype=np.float32))
        c = rng.integers(0, len(self.centroids), m)
        noise = rng.standard_normal((m, D), dtype=np.float32) * np.float32(1.0 / np.sqrt(D))
        return _unit(self.centroids[c] + noise)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def key_of(i: int) -> bytes:
    return i.to_bytes(32, "big")


def run(n: int, *, data: str = "clustered", queries: int = 2000, text: int = 64,
        cpu: int | None = 1, snapshot: bool = False, connectivity: int | None = None,
        expansion_add: int | None = None, expansion_search: int | None = None,
        sweep: tuple[int, ...] = ()) -> dict:
    ds = Data(data, n)
    n = ds.n
    gc.collect()
    rss0 = rss_bytes()
    idx = SemanticIndex(D, capacity=n, connectivity=connectivity, expansion_add=expansion_add,
                        expansion_search=expansion_search)
    now = time.time()
    rng = np.random.default_rng(12345)
    nq = min(n, queries)
    src = np.sort(rng.choice(n, nq, replace=False))
    keep = np.empty((nq, D), dtype=np.float32)
    pad = "x" * max(0, text - 24)
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        vecs = ds.chunk(start)
        sel = src[(src >= start) & (src < start + len(vecs))]
        keep[np.searchsorted(src, sel)] = vecs[sel - start]
        entries = [
            SemanticEntry(key_of(start + i), SCOPE, "bench", f"q{start + i:>10} {pad}"[:text],
                          "small", None, now, now + 86_400)
            for i in range(len(vecs))
        ]
        idx.add_many(vecs, entries)
        del vecs, entries
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_total = rss_bytes()
    rss = rss_total - rss0
    # queries: perturbed stored vectors (or the real query set)
    if ds.real_queries is not None:
        qs = ds.real_queries
    else:
        noise = rng.standard_normal(keep.shape, dtype=np.float32) * np.float32(0.5 / np.sqrt(D))
        qs = _unit(keep + noise)
    # exact brute force over the stored (f16-rounded) vectors, chunk by chunk
    best = np.full(len(qs), -np.inf, dtype=np.float32)
    truth = np.zeros(len(qs), dtype=np.int64)
    t_truth = time.perf_counter()
    for start in range(0, n, CHUNK):
        block = ds.chunk(start).astype(np.float16).astype(np.float32)
        s = qs @ block.T
        j = np.argmax(s, axis=1)
        v = s[np.arange(len(qs)), j]
        better = v > best
        best[better], truth[better] = v[better], j[better] + start
    truth_s = time.perf_counter() - t_truth
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    def measure() -> tuple[np.ndarray, int, int]:
        for q in qs[:100]:  # warm up
            idx.search(q, SCOPE, k=4, now=now)
        lat = np.empty(len(qs))
        hits = hits_src = 0
        for j, q in enumerate(qs):
            t = time.perf_counter()
            res = idx.search(q, SCOPE, k=4, now=now)
            lat[j] = time.perf_counter() - t
            top = res[0][1].key if res else b""
            hits += top == key_of(int(truth[j]))
            if ds.real_queries is None:
                hits_src += top == key_of(int(src[j]))
        return lat, hits, hits_src

    def pct(lat: np.ndarray) -> dict:
        return {p: float(np.percentile(lat, int(p[1:])) * 1e6)
                for p in ("p50", "p95", "p99")} | {"max": float(lat.max() * 1e6)}

    lat, hits, hits_src = measure()
    ef_sweep = []
    for ef in sweep:  # same index, other search depths
        idx.set_expansion_search(ef)
        lat_e, hits_e, src_e = measure()
        ef_sweep.append({"expansion_search": ef, "search_us": pct(lat_e),
                         "recall_at_1": hits_e / len(qs), "source_at_1": src_e / len(qs)})
    if sweep:
        idx.set_expansion_search(expansion_search or DEFAULT_EXPANSION_SEARCH)
    t = time.perf_counter()
    assert idx.expire(now=now) == 0
    expire_ms = (time.perf_counter() - t) * 1e3
    # steady state at capacity: one add (single-threaded usearch insert) evicts the oldest entry
    add_lat = np.empty(min(500, nq))
    for j in range(len(add_lat)):
        e = SemanticEntry(key_of(n + j), SCOPE, "bench", f"new {j}", "small", None, now,
                          now + 86_400)
        t = time.perf_counter()
        idx.add(qs[j], e)
        add_lat[j] = time.perf_counter() - t
    assert len(idx) == n and idx.evictions == len(add_lat)
    out: dict = {
        "n": n,
        "data": data,
        "text_chars": text,
        "params": {"connectivity": idx._connectivity, "expansion_add": idx._expansion_add,
                   "expansion_search": idx._expansion_search,
                   "ann_candidates": idx.ann_candidates, "dtype": idx.dtype, "k": 4},
        "build_s": build_s,
        "search_us": pct(lat),
        "ef_sweep": ef_sweep,
        "queries": len(qs),
        "recall_at_1": hits / len(qs),
        "source_at_1": hits_src / len(qs) if ds.real_queries is None else None,
        "rss_baseline_mb": rss0 / 1e6,
        "rss_total_mb": rss_total / 1e6,
        "rss_index_mb": rss / 1e6,
        "rss_per_entry": rss / n,
        "memory_bytes_per_entry": idx.memory_bytes() / n,
        "expire_scan_ms": expire_ms,
        "add_at_capacity_us": pct(add_lat),
        "truth_s": truth_s,
        "cpu_pinned": cpu,
        "loadavg": os.getloadavg(),
    }
    if snapshot:
        out["snapshot"] = _snapshot_figures(idx, n, load=n <= 300_000)
    out["peak_rss_mb"] = peak_rss_bytes() / 1e6
    return out


def _snapshot_figures(idx: SemanticIndex, n: int, load: bool) -> dict:
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:
        path = Path(tmp) / "index.snap"
        t = time.perf_counter()
        data = idx.snapshot_data()  # the part that runs on the event loop
        t_data = time.perf_counter() - t
        t = time.perf_counter()
        write_snapshot(data, path)  # the part for a worker thread
        t_write = time.perf_counter() - t
        size = path.stat().st_size
        del data
        gc.collect()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        t_load = None
        if load:  # a load rebuilds the HNSW graph: about the build time (skipped above 300k)
            t = time.perf_counter()
            back = SemanticIndex.load(path, capacity=n)
            t_load = time.perf_counter() - t
            assert len(back) == len(idx)
            del back
    return {"snapshot_data_s": t_data, "write_s": t_write, "load_s": t_load,
            "file_mb": size / 1e6}


def report(r: dict) -> str:
    s = r["search_us"]
    line = (
        f"n={r['n']:>9,} {r['data']}: build {r['build_s']:7.1f} s  search p50 {s['p50']:6.0f} us"
        f"  p95 {s['p95']:6.0f} us  p99 {s['p99']:6.0f} us  recall@1 {r['recall_at_1']:.3f}"
        f"  | RSS process {r['rss_total_mb']:7.1f} MB (index {r['rss_index_mb']:7.1f} MB ="
        f" {r['rss_per_entry']:5.0f} B/entry; memory_bytes {r['memory_bytes_per_entry']:5.0f}"
        f" B/entry)  expire scan {r['expire_scan_ms']:.1f} ms  load avg {r['loadavg'][0]:.1f}"
    )
    if "add_at_capacity_us" in r:
        a = r["add_at_capacity_us"]
        line += (f"\n           add at capacity (evicts one): p50 {a['p50']:.0f} us"
                 f"  p99 {a['p99']:.0f} us")

    if "snapshot" in r:
        sn = r["snapshot"]
        line += (f"\n           snapshot_data (loop) {sn['snapshot_data_s']:.2f} s  write (thread)"
                 f" {sn['write_s']:.2f} s  load {sn['load_s'] or float('nan'):.1f} s"
                 f"  file {sn['file_mb']:.0f} MB"
                 f"  peak RSS {r['peak_rss_mb']:.0f} MB")
    for e in r.get("ef_sweep", ()):
        s = e["search_us"]
        line += (f"\n           expansion_search {e['expansion_search']:4d}: p50 {s['p50']:6.0f} us"
                 f"  p95 {s['p95']:6.0f} us  p99 {s['p99']:6.0f} us"
                 f"  recall@1 {e['recall_at_1']:.3f}")
    return line


def test_index_scale_smoke():
    r = run(10_000, queries=500, cpu=None)
    print(report(r))
    assert r["recall_at_1"] >= 0.95


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[100_000])
    ap.add_argument("--data", choices=["clustered", "uniform", "real"], default="clustered")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--text", type=int, default=64, help="query text length (chars)")
    ap.add_argument("--cpu", type=int, default=1, help="core to pin searches to (-1: none)")
    ap.add_argument("--snapshot", action="store_true", help="also time snapshot and load")
    ap.add_argument("--connectivity", type=int)
    ap.add_argument("--expansion-add", type=int)
    ap.add_argument("--expansion-search", type=int)
    ap.add_argument("--sweep", default="", help="more expansion_search values, e.g. 64,128")
    a = ap.parse_args()
    for size in a.sizes:
        r = run(size, data=a.data, queries=a.queries, text=a.text,
                cpu=None if a.cpu < 0 else a.cpu, snapshot=a.snapshot,
                connectivity=a.connectivity, expansion_add=a.expansion_add,
                expansion_search=a.expansion_search,
                sweep=tuple(int(x) for x in a.sweep.split(",") if x))
        print(report(r), flush=True)
        suffix = "" if a.expansion_search is None else f"_ef{a.expansion_search}"
        out = RESULTS / f"bench_index_{a.data}_{r['n']}{suffix}.json"
        out.write_text(json.dumps(r, indent=2) + "\n")
        print(f"           -> {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
