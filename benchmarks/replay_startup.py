"""Start-up time of a sidecar that replays N shared semantic entries from the Redis Stream.

    python benchmarks/replay_startup.py [--entries 100000] [--scopes 1000]

Starts a private redis-server, publishes N entries the way a sidecar does (HSET + XADD with the
f16 vector, in pipelines), then times what a new sidecar does before it reports ready: XRANGE in
batches and bulk-add into its index. Prints entries/s, seconds and the index's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.load_exact import wait_redis  # noqa: E402
from benchmarks.machine import describe, machine  # noqa: E402
from proxy.config import CacheConfig, SemanticConfig  # noqa: E402
from proxy.exact import ExactCache  # noqa: E402
from proxy.metrics import Metrics  # noqa: E402
from proxy.semantic.index import SemanticEntry, SemanticIndex  # noqa: E402
from proxy.shared import SharedIndex  # noqa: E402


class _Holder:
    """The StreamTarget a SharedIndex applies the stream to (a SemanticCache, reduced to its
    index and exact cache)."""

    def __init__(self, index: SemanticIndex, exact: ExactCache) -> None:
        self.index = index
        self.exact = exact

    @property
    def dim(self) -> int:
        return self.index.dim

    def apply_entries(self, vecs: np.ndarray, entries: list[SemanticEntry]) -> None:
        self.index.add_many(vecs, entries)

    def apply_entry(self, vec: np.ndarray, entry: SemanticEntry) -> None:
        self.index.add(vec, entry)

    def apply_purge(self, namespace: str, key: bytes | None) -> None:
        if key is None:
            self.index.purge_namespace(namespace)
        else:
            self.index.remove(key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main_async(n: int, scopes: int) -> dict[str, float]:
    port = free_port()
    tmp = tempfile.mkdtemp()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly",
                             "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    try:
        wait_redis(port)
        url = f"redis://127.0.0.1:{port}/0"
        cache_cfg = CacheConfig(redis_url=url, redis_prefix="bench:")
        sem_cfg = SemanticConfig(capacity=max(n, 1000))
        metrics = Metrics()
        pub = SharedIndex(cache_cfg, sem_cfg, _Holder(SemanticIndex(capacity=n),
                                                      ExactCache(cache_cfg, metrics)), metrics)
        rng = np.random.default_rng(0)
        scope_ids = [os.urandom(16) for _ in range(scopes)]
        t0 = time.perf_counter()
        now = time.time()
        for start in range(0, n, 2000):
            vecs = rng.standard_normal((min(2000, n - start), 384)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            for i, v in enumerate(vecs):
                j = start + i
                entry = SemanticEntry(key=j.to_bytes(16, "big"), scope=scope_ids[j % scopes],
                                      namespace=f"ns{j % scopes}",
                                      query_text=f"synthetic question number {j}?", tier="small",
                                      max_tokens=None, created=now, expires=now + 86_400)
                pub.publish(v, entry)
            await pub.writer.flush(timeout=60)
        fill = time.perf_counter() - t0
        await pub.close()

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        holder = _Holder(SemanticIndex(capacity=n), ExactCache(cache_cfg, metrics))
        sub = SharedIndex(cache_cfg, sem_cfg, holder, metrics)
        t0 = time.perf_counter()
        await sub.start()
        replay = time.perf_counter() - t0
        size = len(holder.index)
        mem = holder.index.memory_bytes()
        await sub.close()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"entries": n, "scopes": scopes, "indexed": size, "fill_s": round(fill, 2),
                "replay_s": round(replay, 2), "replay_entries_per_s": round(size / replay),
                "index_memory_bytes": mem, "max_rss_growth_mb": round((rss1 - rss0) / 1024, 1)}
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--scopes", type=int, default=1000)
    args = ap.parse_args()
    print(describe(), flush=True)
    result: dict[str, Any] = {**asyncio.run(main_async(args.entries, args.scopes)),
                              "machine": machine()}
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay_startup.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
