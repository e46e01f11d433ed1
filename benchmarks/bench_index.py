"""SemanticIndex at scale: one big scope of 384-d vectors (usearch ANN + exact rescoring).

Reports build time (``add_many`` in 50k chunks, multi-threaded usearch insert), process RSS and
RSS per entry, ``memory_bytes()`` per entry, latency P50/P95/P99 of the whole
``SemanticIndex.search`` path (one query at a time, k=4, as the event loop calls it: validation,
usearch, candidate fetch, native rescoring, SemanticEntry construction), recall@1 against exact
brute force over the stored float32 vectors, ``expire()`` scan time and, with ``--snapshot``, the
snapshot figures (``snapshot_data`` on the loop thread, ``write_snapshot``, ``load``).

Data (``--data``, comma-separated; default ``mixture,uniform``, both printed and saved):

* ``mixture`` (the realistic case): an anisotropic Gaussian mixture calibrated on MiniLM
  embeddings of 92k real queries (clinc150, banking77, hwu64, QQP): a common offset of norm 0.3
  (real: mean vector norm 0.22, mean pairwise cosine 0.045), covariance eigenvalues ~ 1/i**0.65
  in a random basis (participation ratio ~120; real: 127), 4 096 centres per million entries,
  points spread around them with the same covariance. Nearest-neighbour cosines come out a bit
  lower than real ones (median 0.68 vs 0.78: real data has more near-duplicates), so it is, if
  anything, harder. Queries are paraphrase-like: a stored vector moved to a cosine uniform in
  [0.85, 0.95] along the data's own covariance: the regime of a semantic cache, where the query
  has one close neighbour.
* ``uniform``: uniform random unit vectors, the worst case for HNSW and unlike embeddings.
* ``clustered`` (the earlier default): 4 096 random centroids per million, isotropic noise
  (cosine ~0.7 to the centroid); queries are stored vectors plus isotropic noise (cosine ~0.9).
* ``real``: the MiniLM vectors cached under benchmarks/results/emb_*.npy (~60k stored, the
  intent-dataset query files as queries), for a realism check at small n.

``--reachability`` also counts the stored rows that a search for their own vector misses, at the
index's expansion_search and at 1024 (a row missed there is one no search reaches), and the rows
the build relinked (``AnnScope.add_many``).

The right answer is the exact brute-force top-1 over the stored float32 vectors (for an i8 index
a quantisation swap between two nearly equal neighbours counts as a miss). Latency is the median
over ``--repeat`` passes (3) of each percentile (the box is shared and noisy).

Query texts are padded to ``--text`` characters (64 by default, ASCII); keys are 32 bytes.
Vectors are regenerated per chunk from the seed, so the benchmark process holds no copy of them
while RSS is measured. Search is timed pinned to one core (``--cpu``, default 1) after a
multi-threaded build. Results go to benchmarks/results/bench_index_<data>_<n>.json.

Run::

    python benchmarks/bench_index.py 100000                  # mixture and uniform
    python benchmarks/bench_index.py 1000000 --data mixture --sweep 48,64 --cpu 0
    python benchmarks/bench_index.py 100000 --dtype f16      # the float16 index
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
from machine import describe, machine

from proxy.semantic.index import SemanticEntry, SemanticIndex
from proxy.semantic.scope import DEFAULT_EXPANSION_SEARCH
from proxy.semantic.snapshot import write_snapshot

D = 384
SCOPE = hashlib.blake2b(b"bench", digest_size=16).digest()
CHUNK = 50_000
# "mixture" data, calibrated on MiniLM embeddings of 92k real queries (see the docstring)
MIX_ALPHA = 0.65  # covariance eigenvalues ~ 1 / i**alpha
MIX_MEAN = 0.3  # norm of the common offset of all vectors (embeddings are not centred)
MIX_CENTRE = 1.0  # spread of the cluster centres
MIX_WITHIN = 0.9  # spread inside a cluster
MIX_QUERY_COS = (0.85, 0.95)
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
        if kind == "mixture":  # anisotropic Gaussian mixture (see MIX_* and the docstring)
            self.basis = np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32)
            lam = (1.0 + np.arange(D)) ** -MIX_ALPHA
            self.sqrt_lam = np.sqrt(lam / lam.sum()).astype(np.float32)
            mean = _unit(rng.standard_normal((1, D), dtype=np.float32))[0] * MIX_MEAN
            z = rng.standard_normal((len(self.centroids), D), dtype=np.float32)
            self.centroids = mean + MIX_CENTRE * self.aniso(z)

    def aniso(self, z: np.ndarray) -> np.ndarray:
        """Isotropic N(0, 1) rows -> the mixture's anisotropic covariance (power-law spectrum)."""
        return (z * self.sqrt_lam) @ self.basis.T

    def chunk(self, start: int) -> np.ndarray:
        m = min(CHUNK, self.n - start)
        if self.real is not None:
            return self.real[start : start + m]
        rng = np.random.default_rng((self.seed, start))
        if self.kind == "uniform":
            return _unit(rng.standard_normal((m, D), dtype=np.float32))
        c = rng.integers(0, len(self.centroids), m)
        if self.kind == "mixture":
            z = rng.standard_normal((m, D), dtype=np.float32)
            return _unit(self.centroids[c] + MIX_WITHIN * self.aniso(z))
        noise = rng.standard_normal((m, D), dtype=np.float32) * np.float32(1.0 / np.sqrt(D))
        return _unit(self.centroids[c] + noise)

    def queries(self, stored: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Queries near the given stored vectors (their sources)."""
        if self.kind != "mixture":  # isotropic noise, cosine ~0.9 to the source
            noise = rng.standard_normal(stored.shape, dtype=np.float32)
            return _unit(stored + noise * np.float32(0.5 / np.sqrt(D)))
        # paraphrase-like: cosine to the source uniform in [0.85, 0.95], the perturbation drawn
        # from the data's own covariance (along the directions real embeddings vary in)
        cos = rng.uniform(MIX_QUERY_COS[0], MIX_QUERY_COS[1], len(stored)).astype(np.float32)
        u = self.aniso(rng.standard_normal(stored.shape, dtype=np.float32))
        u -= np.einsum("ij,ij->i", u, stored)[:, None] * stored
        u = _unit(u)
        return _unit(cos[:, None] * stored + np.sqrt(1 - cos * cos)[:, None] * u)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def make_queries(ds: Data, nq: int, seed: int = 12345) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries, source row of each query, exact top-1 row over the stored float32 vectors)."""
    rng = np.random.default_rng(seed)
    nq = min(ds.n, nq)
    src = np.sort(rng.choice(ds.n, nq, replace=False))
    keep = np.empty((nq, D), dtype=np.float32)
    for start in range(0, ds.n, CHUNK):
        sel = src[(src >= start) & (src < start + CHUNK)]
        if len(sel):
            keep[np.searchsorted(src, sel)] = ds.chunk(start)[sel - start]
    qs = ds.real_queries if ds.real_queries is not None else ds.queries(keep, rng)
    best = np.full(len(qs), -np.inf, dtype=np.float32)
    truth = np.zeros(len(qs), dtype=np.int64)
    for start in range(0, ds.n, CHUNK):
        s = qs @ ds.chunk(start).T
        j = np.argmax(s, axis=1)
        v = s[np.arange(len(qs)), j]
        better = v > best
        best[better], truth[better] = v[better], j[better] + start
    return qs, src, truth


def key_of(i: int) -> bytes:
    return i.to_bytes(32, "big")


def run(n: int, *, data: str = "mixture", queries: int = 2000, text: int = 64,
        cpu: int | None = 1, snapshot: bool = False, dtype: str | None = None,
        connectivity: int | None = None, expansion_add: int | None = None,
        expansion_search: int | None = None, sweep: tuple[int, ...] = (),
        repeat: int = 3, reachability: bool = False) -> dict:
    ds = Data(data, n)
    n = ds.n
    t_truth = time.perf_counter()
    qs, src, truth = make_queries(ds, queries)  # truth: exact top-1 over the float32 vectors
    truth_s = time.perf_counter() - t_truth
    gc.collect()
    rss0 = rss_bytes()
    idx = SemanticIndex(D, capacity=n, connectivity=connectivity, expansion_add=expansion_add,
                        expansion_search=expansion_search,
                        **({"dtype": dtype} if dtype else {}))
    now = time.time()
    pad = "x" * max(0, text - 24)
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        vecs = ds.chunk(start)
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
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    def measure_once() -> tuple[np.ndarray, int, int]:
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

    def measure() -> tuple[dict, int, int, list[dict]]:
        """``repeat`` passes over the queries (the box is shared and noisy): the median of each
        percentile, and every pass."""
        runs = [measure_once() for _ in range(repeat)]
        each = [pct(r[0]) for r in runs]
        med = {p: float(np.median([e[p] for e in each])) for p in each[0]}
        return med, runs[0][1], runs[0][2], each

    def pct(lat: np.ndarray) -> dict:
        return {p: float(np.percentile(lat, int(p[1:])) * 1e6)
                for p in ("p50", "p95", "p99")} | {"max": float(lat.max() * 1e6)}

    search_us, hits, hits_src, search_runs = measure()
    ef_sweep = []
    for ef in sweep:  # same index, other search depths
        idx.set_expansion_search(ef)
        lat_e, hits_e, src_e, runs_e = measure()
        ef_sweep.append({"expansion_search": ef, "search_us": lat_e, "search_runs_us": runs_e,
                         "recall_at_1": hits_e / len(qs), "source_at_1": src_e / len(qs)})
    if sweep:
        idx.set_expansion_search(expansion_search or DEFAULT_EXPANSION_SEARCH)
    t = time.perf_counter()
    assert idx.expire(now=now) == 0
    expire_ms = (time.perf_counter() - t) * 1e3
    # steady state at capacity: single-threaded usearch inserts into a full index
    add_lat = np.empty(min(500, len(qs)))
    for j in range(len(add_lat)):
        e = SemanticEntry(key_of(n + j), SCOPE, "bench", f"new {j}", "small", None, now,
                          now + 86_400)
        t = time.perf_counter()
        idx.add(qs[j], e)
        add_lat[j] = time.perf_counter() - t
    # a full index evicts a batch (capacity // EVICT_BATCH_DIVISOR) at once: the first add pays
    # usearch's unlink pass over the graph, the others fill the freed room
    assert idx.evictions >= 1
    out: dict = {
        "n": n,
        "data": data,
        "text_chars": text,
        "params": {"connectivity": idx.params.connectivity,
                   "expansion_add": idx.params.expansion_add,
                   "expansion_search": idx.params.expansion_search,
                   "ann_candidates": idx.ann_candidates, "dtype": idx.dtype, "k": 4},
        "build_s": build_s,
        "search_us": search_us,
        "search_runs_us": search_runs,
        "repeat": repeat,
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
    if reachability:
        out["reachability"] = _reachability(idx, n, now)
    out["peak_rss_mb"] = peak_rss_bytes() / 1e6
    return out


def _reachability(idx: SemanticIndex, n: int, now: float, deep: int = 1024) -> dict:
    """Live rows that a search for their own stored vector does not find (neither the row in
    its top 8 nor an identical vector first): at the index's expansion_search, and at ``deep``
    (a row missed even there is one no search reaches: what usearch's concurrent add can leave,
    USearch#735), plus the rows the build relinked. Rows evicted by the capacity test are
    skipped."""
    ef = idx.params.expansion_search
    missed = {ef: 0, deep: 0}
    live = 0
    for e in (ef, deep):
        idx.set_expansion_search(e)
        live = 0
        for i in range(n):
            v = idx.vector(key_of(i))
            if v is None:
                continue
            live += 1
            res = idx.search(v, SCOPE, k=8, now=now)
            found = any(en.key == key_of(i) for _, en in res) or (res and res[0][0] >= 0.9999)
            missed[e] += not found
    idx.set_expansion_search(ef)
    return {"rows": live, "own_vector_missed": missed[ef], "own_vector_missed_deep": missed[deep],
            "deep_expansion_search": deep, "relinked": idx.stats()["ann_relinked"]}


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
    s, p = r["search_us"], r["params"]
    runs = " ".join(f"{x['p99']:.0f}" for x in r.get("search_runs_us", ()))
    line = (
        f"n={r['n']:>9,} {r['data']} ({p['dtype']}, connectivity {p['connectivity']},"
        f" expansion_search {p['expansion_search']}, median of {r.get('repeat', 1)} passes;"
        f" p99 per pass: {runs} us)\n"
        f"           build {r['build_s']:7.1f} s  search p50 {s['p50']:6.0f} us"
        f"  p95 {s['p95']:6.0f} us  p99 {s['p99']:6.0f} us  recall@1 {r['recall_at_1']:.3f}"
        f"  | RSS process {r['rss_total_mb']:7.1f} MB (index {r['rss_index_mb']:7.1f} MB ="
        f" {r['rss_per_entry']:5.0f} B/entry; memory_bytes {r['memory_bytes_per_entry']:5.0f}"
        f" B/entry)  expire scan {r['expire_scan_ms']:.1f} ms  load avg {r['loadavg'][0]:.1f}"
    )
    if "add_at_capacity_us" in r:
        a = r["add_at_capacity_us"]
        line += (f"\n           add at capacity (batch eviction): p50 {a['p50']:.0f} us"
                 f"  p99 {a['p99']:.0f} us  max {a['max']:.0f} us")

    if "snapshot" in r:
        sn = r["snapshot"]
        line += (f"\n           snapshot_data (loop) {sn['snapshot_data_s']:.2f} s  write (thread)"
                 f" {sn['write_s']:.2f} s  load {sn['load_s'] or float('nan'):.1f} s"
                 f"  file {sn['file_mb']:.0f} MB"
                 f"  peak RSS {r['peak_rss_mb']:.0f} MB")
    if "reachability" in r:
        rc = r["reachability"]
        line += (f"\n           of {rc['rows']} rows, not found by their own vector:"
                 f" {rc['own_vector_missed']} at"
                 f" expansion_search {p['expansion_search']}, {rc['own_vector_missed_deep']} at"
                 f" {rc['deep_expansion_search']} (unreachable); relinked by the build"
                 f" {rc['relinked']}")
    for e in r.get("ef_sweep", ()):
        s = e["search_us"]
        line += (f"\n           expansion_search {e['expansion_search']:4d}: p50 {s['p50']:6.0f} us"
                 f"  p95 {s['p95']:6.0f} us  p99 {s['p99']:6.0f} us"
                 f"  recall@1 {e['recall_at_1']:.3f}")
    return line


def test_index_scale_smoke():
    r = run(10_000, queries=500, cpu=None, repeat=1)
    print(report(r))
    assert r["recall_at_1"] >= 0.95


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[100_000])
    ap.add_argument("--data", default="mixture,uniform",
                    help="comma-separated: mixture, uniform, clustered, real")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--text", type=int, default=64, help="query text length (chars)")
    ap.add_argument("--cpu", type=int, default=1, help="core to pin searches to (-1: none)")
    ap.add_argument("--snapshot", action="store_true", help="also time snapshot and load")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes (median reported)")
    ap.add_argument("--dtype", choices=["i8", "f16", "f32"], help="default: the index default")
    ap.add_argument("--connectivity", type=int)
    ap.add_argument("--expansion-add", type=int)
    ap.add_argument("--expansion-search", type=int)
    ap.add_argument("--sweep", default="", help="more expansion_search values, e.g. 64,128")
    ap.add_argument("--reachability", action="store_true",
                    help="count stored rows a search for their own vector misses (slow)")
    a = ap.parse_args()
    kinds = [k for k in a.data.split(",") if k]
    for k in kinds:
        if k not in ("mixture", "uniform", "clustered", "real"):
            ap.error(f"unknown data set {k!r}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(describe(), flush=True)
    for size in a.sizes:
        for kind in kinds:
            r = run(size, data=kind, queries=a.queries, text=a.text,
                    cpu=None if a.cpu < 0 else a.cpu, snapshot=a.snapshot, dtype=a.dtype,
                    connectivity=a.connectivity, expansion_add=a.expansion_add,
                    expansion_search=a.expansion_search,
                    sweep=tuple(int(x) for x in a.sweep.split(",") if x), repeat=a.repeat,
                    reachability=a.reachability)
            print(report(r), flush=True)
            p = r["params"]
            suffix = "".join(f"_{tag}{v}" for tag, v in (
                ("", a.dtype), ("m", a.connectivity), ("ef", a.expansion_search)) if v)
            out = RESULTS / f"bench_index_{kind}_{r['n']}{suffix}.json"
            out.write_text(json.dumps({**r, "machine": machine()}, indent=2) + "\n")
            print(f"           -> {out} ({p['dtype']}, connectivity {p['connectivity']})",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
