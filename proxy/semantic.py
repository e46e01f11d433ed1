"""Semantic index: stored query vectors, partitioned by scope, searched for the nearest answer.

Layout
------
A *scope* (16-byte digest from proxy.keys) is a hard partition: a search only ever looks inside
one scope's own storage, so an entry of another tenant or conversation cannot come back, whatever
its vector. Each scope is in one of two modes:

* **brute force** (``<= brute_force_max`` entries): the scope's vectors are one contiguous
  ``(capacity, dim)`` float16 block; a search is one call of the native ``topk_dot`` kernel over
  it (a few microseconds for 256 rows). Removal swaps the last row into the hole, so the block
  stays dense.
* **ANN** (grown past ``brute_force_max``): the scope gets its own usearch ``Index`` (cosine,
  same dtype). A search asks usearch for ``ann_candidates`` labels, fetches their stored vectors
  and rescores them with the same native kernel, so scores mean exactly the same thing in both
  modes (the verifier's threshold does not depend on which path answered). A scope that shrinks
  to ``brute_force_max // 2`` goes back to a block (hysteresis avoids flapping at the boundary).

Why one usearch index per large scope rather than one global index with a filter: the Python
binding of usearch 2.26 has no filtered search (``Index.search`` takes no predicate; only the C++
core does), and post-filtering a global top-k' breaks isolation-by-construction and loses recall
when the scope is a small fraction of the index. Per-scope indexes cost ~1 KB per vector in RSS
(measured: 20 indexes of 300 vectors = 0.34 MB each), so many mid-size scopes are affordable.
The vectors of an ANN scope live only inside usearch (no second copy), which is what keeps one
million entries under the memory target.

dtype: ``"f16"`` (default) or ``"f32"``. usearch's ``"i8"`` is refused: for the cosine metric it
quantises each component as ``round(x * 127)`` without a per-vector scale, and the components of a
384-d unit vector are ~0.05, i.e. 2 to 3 significant levels. Top-1 was wrong on random data, and
rescoring cannot repair it since the fp16 originals would have to be kept as well (more memory
than f16 alone).

Lifetime
--------
* Capacity: at most ``capacity`` entries; adding to a full index evicts the **oldest inserted**
  entry first (FIFO; a replace counts as a new insertion). FIFO needs no write on the hit path,
  and with a uniform TTL the oldest entry is also the one closest to expiry.
* TTL: an entry's ``expires`` is capped at ``created + ttl_s``. Search never returns an expired
  entry (checked against ``now``) and drops those it meets; ``expire()`` reclaims the rest through
  a heap of expiry times (lazy deletion: stale heap items are skipped and compacted).
* Memory per entry: see ``memory_bytes()`` and benchmarks/bench_index.py for the measured figures.

Threading: a ``SemanticIndex`` is not thread-safe. It is used from the event-loop thread only;
a search is a few microseconds (brute force) to a few hundred (ANN on a large scope), below the
cost of a hop to a worker thread. ``snapshot()`` / ``load()`` are the exceptions worth moving off
the loop for big indexes; do it with the index quiescent.
"""

from __future__ import annotations

import heapq
import math
import os
import struct
import sys
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson
# onnxruntime must be loaded before usearch: the other order segfaults inside onnxruntime's
# import (usearch 2.26 / onnxruntime 1.32 on x86_64; tests/test_semantic.py checks both load).
import onnxruntime  # noqa: F401, I001
from usearch.compiled import ScalarKind
from usearch.index import Index

from proxy.scoring import topk_dot

__all__ = ["SemanticEntry", "SemanticIndex", "SnapshotError"]

SCOPE_BYTES: Final = 16
SNAPSHOT_MAGIC: Final = b"EPSEMIX\x00"
SNAPSHOT_VERSION: Final = 1
_DTYPES: Final = {"f16": np.float16, "f32": np.float32}
_USEARCH_KIND: Final = {"f16": ScalarKind.F16, "f32": ScalarKind.F32}
# Python-side bookkeeping of one entry besides its key and query text: the SemanticEntry, its
# _Slot, the OrderedDict node, the expiry heap item, two floats. Measured with tracemalloc in
# tests/test_semantic.py::test_memory_estimate (about 400 bytes on CPython 3.11).
_ENTRY_OVERHEAD: Final = 400
# usearch HNSW node besides the vector: level-0 neighbour list (2 * connectivity u32), the upper
# levels (geometric, ~1/connectivity of that), key, level and lock bytes. Matches RSS to ~10 %.
_ANN_NODE_OVERHEAD: Final = 2 * 16 * 4 + 48
_MIN_BLOCK: Final = 8


class SnapshotError(Exception):
    """A snapshot cannot be loaded: missing, corrupt, truncated or incompatible (dim, dtype)."""


@dataclass(slots=True)
class SemanticEntry:
    """What the index keeps of one stored answer (the answer itself is in the exact cache)."""

    key: bytes  # exact-cache key of the stored answer (the answer reference)
    scope: bytes  # 16-byte scope digest (hard partition)
    namespace: str
    query_text: str
    tier: str  # tier that produced the answer
    max_tokens: int | None
    created: float  # time.time()
    expires: float


class _Slot:
    """Where one entry lives: its scope and its row (block mode) or usearch label (ANN mode)."""

    __slots__ = ("entry", "pos", "scope")

    def __init__(self, entry: SemanticEntry, scope: _Scope, pos: int) -> None:
        self.entry = entry
        self.scope = scope
        self.pos = pos


class _Scope:
    """One partition. Block mode: ``block``/``rows``; ANN mode: ``ann``/``labels``."""

    __slots__ = ("ann", "block", "digest", "labels", "namespace", "rows")

    def __init__(self, digest: bytes, namespace: str) -> None:
        self.digest = digest
        self.namespace = namespace
        self.block: Any = None  # np.ndarray (capacity, dim) in block mode
        self.rows: list[_Slot] = []
        self.ann: Index | None = None
        self.labels: dict[int, _Slot] = {}

    def __len__(self) -> int:
        return len(self.labels) if self.ann is not None else len(self.rows)


class SemanticIndex:
    """Scoped nearest-neighbour index of stored queries (see the module docstring)."""

    def __init__(
        self,
        dim: int = 384,
        *,
        capacity: int = 100_000,
        ttl_s: float = 86_400,
        brute_force_max: int = 256,
        ann_candidates: int = 16,
        dtype: str = "f16",
        connectivity: int | None = None,
        expansion_search: int | None = None,
        build_threads: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (i8: see module docs)")
        if dim <= 0 or capacity <= 0 or ttl_s <= 0 or brute_force_max < 1 or ann_candidates < 1:
            raise ValueError("dim, capacity, ttl_s, brute_force_max, ann_candidates must be > 0")
        self.dim = dim
        self.capacity = capacity
        self.ttl_s = float(ttl_s)
        self.brute_force_max = brute_force_max
        self.ann_candidates = ann_candidates
        self.dtype = dtype
        self._np_dtype = _DTYPES[dtype]
        self._connectivity = connectivity
        self._expansion_search = expansion_search
        self._build_threads = build_threads  # bulk adds (promotion, load); 0 = all cores
        self._slots: OrderedDict[bytes, _Slot] = OrderedDict()  # insertion order = FIFO
        self._scopes: dict[bytes, _Scope] = {}
        self._ns_scopes: dict[str, set[bytes]] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._next_label = 0
        self._meta_bytes = 0  # running sum of _meta_size over entries (memory_bytes is O(scopes))
        # counters for metrics (monotonic)
        self.searches = 0
        self.ann_searches = 0
        self.adds = 0
        self.evictions = 0
        self.expirations = 0
        self.removals = 0
        self.promotions = 0

    # -- public API -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, vector: np.ndarray, entry: SemanticEntry) -> None:
        """Store ``entry`` with its query ``vector``; an entry with the same key is replaced.

        The entry object is kept (not copied): its ``scope`` is replaced by the scope's shared
        bytes object and ``expires`` is capped at ``created + ttl_s``. Evicts the oldest entry
        when the index is full.
        """
        if len(entry.scope) != SCOPE_BYTES:
            raise ValueError(f"scope must be {SCOPE_BYTES} bytes, got {len(entry.scope)}")
        vec = self._prepare(vector)
        sc = self._scopes.get(entry.scope)
        if sc is not None and sc.namespace != entry.namespace:
            # keys.py hashes the namespace into the scope; purge_namespace relies on it
            raise ValueError("scope digest already belongs to another namespace")
        old = self._slots.get(entry.key)
        if old is not None:
            self._remove_slot(old)
        while len(self._slots) >= self.capacity:
            self._remove_slot(next(iter(self._slots.values())))  # the oldest insertion
            self.evictions += 1
        scope = self._scope_for(entry.scope, entry.namespace)
        entry.scope = scope.digest  # one bytes object per scope, not per entry
        entry.namespace = scope.namespace
        entry.tier = sys.intern(entry.tier)
        entry.expires = min(entry.expires, entry.created + self.ttl_s)
        slot = _Slot(entry, scope, -1)
        self._attach(slot, vec)
        self._slots[entry.key] = slot
        self._meta_bytes += _meta_size(entry)
        heapq.heappush(self._heap, (entry.expires, entry.key))
        if len(self._heap) > 2 * len(self._slots) + 1024:
            self._compact_heap()
        self.adds += 1

    def add_many(self, vectors: np.ndarray, entries: Sequence[SemanticEntry]) -> None:
        """Add a batch (snapshot load, stream replay, benchmarks): like ``add`` for each pair in
        order, but with one multi-threaded usearch insert per ANN scope instead of one per entry.
        """
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(entries), -1)
        if vecs.shape[1] != self.dim:
            raise ValueError(f"vectors have {vecs.shape[1]} dims, index has {self.dim}")
        norms = np.linalg.norm(vecs, axis=1)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ValueError("vectors must be finite and non-zero")
        vecs = vecs / norms[:, None]
        last = {e.key: i for i, e in enumerate(entries)}  # a key twice in the batch: last wins
        order = [i for i, e in enumerate(entries) if last[e.key] == i][-self.capacity :]
        for i in order:
            e = entries[i]
            if len(e.scope) != SCOPE_BYTES:
                raise ValueError(f"scope must be {SCOPE_BYTES} bytes, got {len(e.scope)}")
            sc = self._scopes.get(e.scope)
            if sc is not None and sc.namespace != e.namespace:
                raise ValueError("scope digest already belongs to another namespace")
        for i in order:
            old = self._slots.get(entries[i].key)
            if old is not None:
                self._remove_slot(old)
        # the batch is newer than everything stored, so FIFO eviction can be done up front
        while self._slots and len(self._slots) + len(order) > self.capacity:
            self._remove_slot(next(iter(self._slots.values())))
            self.evictions += 1
        groups: dict[bytes, list[_Slot]] = {}
        rows: dict[int, int] = {}
        for i in order:
            e = entries[i]
            sc = self._scope_for(e.scope, e.namespace)
            e.scope, e.namespace, e.tier = sc.digest, sc.namespace, sys.intern(e.tier)
            e.expires = min(e.expires, e.created + self.ttl_s)
            slot = _Slot(e, sc, -1)
            rows[id(slot)] = i
            groups.setdefault(sc.digest, []).append(slot)
            self._slots[e.key] = slot
            self._meta_bytes += _meta_size(e)
        for slots in groups.values():
            sc = slots[0].scope
            if sc.ann is None and len(sc) + len(slots) <= self.brute_force_max:
                for slot in slots:
                    self._attach(slot, vecs[rows[id(slot)]])
                continue
            if sc.ann is None:
                self._promote(sc)
            assert sc.ann is not None
            labels = np.arange(self._next_label, self._next_label + len(slots), dtype=np.uint64)
            self._next_label += len(slots)
            batch = vecs[[rows[id(slot)] for slot in slots]]
            sc.ann.add(labels, batch, threads=self._build_threads)
            for label, slot in zip(labels.tolist(), slots, strict=True):
                slot.pos = label
                sc.labels[label] = slot
        self._compact_heap()
        self.adds += len(order)

    def search(
        self, vector: np.ndarray, scope: bytes, *, k: int = 4, now: float | None = None
    ) -> list[tuple[float, SemanticEntry]]:
        """The ``k`` nearest live entries of ``scope``, best first, as ``(cosine, entry)``.

        Never returns an entry of another scope or one with ``expires <= now``. Equal scores
        keep the kernel's order (lower row / candidate rank first). In an ANN scope the result is
        approximate: the best of ``ann_candidates`` usearch candidates, rescored exactly.
        """
        self.searches += 1
        sc = self._scopes.get(scope)
        if sc is None or k <= 0:
            return []
        q = self._prepare(vector)
        now = time.time() if now is None else now
        if sc.ann is None:
            found, dead = self._search_block(sc, q, k, now)
        else:
            found, dead = self._search_ann(sc, q, k, now)
        for slot in dead:  # expired entries met on the way are reclaimed at once
            self._remove_slot(slot)
            self.expirations += 1
        return found

    def remove(self, key: bytes) -> bool:
        """Remove the entry stored under ``key``; False if there is none."""
        slot = self._slots.get(key)
        if slot is None:
            return False
        self._remove_slot(slot)
        self.removals += 1
        return True

    def purge_namespace(self, namespace: str) -> int:
        """Remove every entry of ``namespace`` (its scopes are dropped whole); returns the count."""
        removed = 0
        for digest in list(self._ns_scopes.get(namespace, ())):
            sc = self._scopes[digest]
            slots = list(sc.labels.values()) if sc.ann is not None else list(sc.rows)
            for slot in slots:
                del self._slots[slot.entry.key]
                self._meta_bytes -= _meta_size(slot.entry)
            removed += len(slots)
            self._drop_scope(sc)
        self.removals += removed
        return removed

    def expire(self, now: float | None = None) -> int:
        """Remove every entry with ``expires <= now``; returns how many were removed."""
        now = time.time() if now is None else now
        heap, removed = self._heap, 0
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            slot = self._slots.get(key)
            # a stale heap item: the key was removed, or replaced by an entry with a new expiry
            if slot is not None and slot.entry.expires <= now:
                self._remove_slot(slot)
                removed += 1
        self.expirations += removed
        return removed

    def memory_bytes(self) -> int:
        """Estimate of the memory held: vectors, ANN graphs and per-entry Python bookkeeping."""
        item = np.dtype(self._np_dtype).itemsize
        total = 0
        for sc in self._scopes.values():
            if sc.ann is None:
                total += sc.block.nbytes if sc.block is not None else 0
            else:
                total += sc.ann.capacity * (self.dim * item + _ANN_NODE_OVERHEAD)
        return total + self._meta_bytes

    def stats(self) -> dict[str, int]:
        """Gauges and counters for /metrics and the admin endpoint."""
        return {
            "entries": len(self._slots),
            "scopes": len(self._scopes),
            "ann_scopes": sum(1 for s in self._scopes.values() if s.ann is not None),
            "searches": self.searches,
            "ann_searches": self.ann_searches,
            "adds": self.adds,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "removals": self.removals,
            "promotions": self.promotions,
        }

    # -- snapshot -------------------------------------------------------------------------------

    def snapshot(self, path: str | Path) -> None:
        """Write every entry and vector to ``path`` atomically (temporary file, fsync, rename).

        Format v1: ``MAGIC | u32 header length | header JSON | entries JSON | vectors``. The
        header holds version, dim, dtype, count and CRC-32s of the two sections; vectors are
        ``count x dim`` little-endian floats in entry order (oldest first). No pickle: a snapshot
        file is data, never code.
        """
        path = Path(path)
        slots = list(self._slots.values())
        vectors = self._gather_vectors(slots)
        scopes: dict[bytes, int] = {}
        records = []
        for slot in slots:
            e = slot.entry
            sid = scopes.setdefault(e.scope, len(scopes))
            records.append(
                [
                    e.key.hex(),
                    sid,
                    e.namespace,
                    e.query_text,
                    e.tier,
                    e.max_tokens,
                    e.created,
                    e.expires,
                ]
            )
        meta = orjson.dumps({"scopes": [s.hex() for s in scopes], "entries": records})
        vec_bytes = np.ascontiguousarray(vectors, dtype=f"<{vectors.dtype.char}").data
        header = orjson.dumps(
            {
                "format": "edge-proxy-semantic-index",
                "version": SNAPSHOT_VERSION,
                "dim": self.dim,
                "dtype": self.dtype,
                "count": len(slots),
                "meta_len": len(meta),
                "vec_len": vec_bytes.nbytes,
                "meta_crc32": zlib.crc32(meta),
                "vec_crc32": zlib.crc32(vec_bytes),
                "written": time.time(),
            }
        )
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(SNAPSHOT_MAGIC)
                f.write(struct.pack("<I", len(header)))
                f.write(header)
                f.write(meta)
                f.write(vec_bytes)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | Path, *, now: float | None = None, **kwargs: Any) -> SemanticIndex:
        """Build an index from a snapshot; ``kwargs`` go to the constructor.

        Raises SnapshotError if the file is unreadable, corrupt or was written with another
        ``dim`` than the one asked for. A different ``dtype`` is converted. Entries expired at
        ``now`` (default: the current time) are skipped; past ``capacity``, the newest are kept.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot {path}: {exc}") from exc
        header, meta, vecs = _parse_snapshot(data, path)
        dim = header["dim"]
        if kwargs.setdefault("dim", dim) != dim:
            raise SnapshotError(f"snapshot {path} has dim {dim}, expected {kwargs['dim']}")
        kwargs.setdefault("dtype", header["dtype"])
        index = cls(**kwargs)
        try:
            scopes = [bytes.fromhex(s) for s in meta["scopes"]]
            entries = [
                SemanticEntry(
                    bytes.fromhex(r[0]),
                    scopes[r[1]],
                    r[2],
                    r[3],
                    r[4],
                    r[5],
                    float(r[6]),
                    float(r[7]),
                )
                for r in meta["entries"]
            ]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot {path}: malformed entry records ({exc})") from exc
        if len(entries) != header["count"]:
            raise SnapshotError(f"snapshot {path}: entry count differs from the header")
        now = time.time() if now is None else now
        index._bulk_load(entries, vecs.reshape(len(entries), dim), now)
        return index

    # -- internals ------------------------------------------------------------------------------

    def _prepare(self, vector: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"vector has {q.shape[0]} dims, index has {self.dim}")
        norm2 = float(q @ q)
        if not math.isfinite(norm2) or norm2 == 0.0:
            raise ValueError("vector must be finite and non-zero")
        if abs(norm2 - 1.0) > 1e-4:  # the embedder normalises; this guards other callers
            q = q / np.float32(math.sqrt(norm2))
        return q

    def _scope_for(self, digest: bytes, namespace: str) -> _Scope:
        sc = self._scopes.get(digest)
        if sc is None:
            digest = bytes(digest)
            sc = self._scopes[digest] = _Scope(digest, sys.intern(namespace))
            self._ns_scopes.setdefault(sc.namespace, set()).add(digest)
        return sc

    def _new_ann(self) -> Index:
        return Index(
            ndim=self.dim,
            metric="cos",
            dtype=self.dtype,
            connectivity=self._connectivity,
            expansion_search=self._expansion_search,
        )

    def _attach(self, slot: _Slot, vec: np.ndarray) -> None:
        sc = slot.scope
        if sc.ann is not None:
            label = self._next_label
            self._next_label += 1
            sc.ann.add(label, vec, threads=1)
            sc.labels[label] = slot
            slot.pos = label
            return
        n = len(sc.rows)
        if sc.block is None or n == sc.block.shape[0]:
            grown = np.empty((max(_MIN_BLOCK, 2 * n), self.dim), dtype=self._np_dtype)
            if n:
                grown[:n] = sc.block[:n]
            sc.block = grown
        sc.block[n] = vec
        sc.rows.append(slot)
        slot.pos = n
        if n + 1 > self.brute_force_max:
            self._promote(sc)

    def _promote(self, sc: _Scope) -> None:
        """Block -> usearch index, when the scope grows past brute_force_max."""
        n = len(sc.rows)
        labels = np.arange(self._next_label, self._next_label + n, dtype=np.uint64)
        self._next_label += n
        ann = self._new_ann()
        if n:
            assert sc.block is not None
            ann.add(labels, sc.block[:n], threads=self._build_threads)
        for label, slot in zip(labels.tolist(), sc.rows, strict=True):
            slot.pos = label
            sc.labels[label] = slot
        sc.ann, sc.block, sc.rows = ann, None, []
        self.promotions += 1

    def _demote(self, sc: _Scope) -> None:
        """usearch index -> block, when an ANN scope has shrunk to brute_force_max // 2."""
        labels = list(sc.labels)
        n = len(labels)
        block = np.empty((max(_MIN_BLOCK, 2 * n), self.dim), dtype=self._np_dtype)
        if n and sc.ann is not None:
            block[:n] = self._ann_vectors(sc.ann, labels)
        sc.rows = [sc.labels[label] for label in labels]
        for row, slot in enumerate(sc.rows):
            slot.pos = row
        sc.ann, sc.block, sc.labels = None, block, {}

    def _ann_vectors(self, ann: Index, labels: list[int]) -> np.ndarray:
        keys = np.asarray(labels, dtype=np.uint64)
        try:
            # Index.get wraps this call with per-key Python casts: 67 us vs 32 us for 16 keys
            raw: Any = ann._compiled.get_many(keys, _USEARCH_KIND[self.dtype])
            return np.stack(raw).view(self._np_dtype)
        except (AttributeError, TypeError):  # another usearch version: the public API
            got: Any = ann.get(keys)
            return np.stack(got).astype(self._np_dtype, copy=False)

    def _detach(self, slot: _Slot) -> None:
        """Take the slot's vector out of its scope (the caller has removed it from _slots)."""
        sc = slot.scope
        if sc.ann is not None:
            sc.ann.remove(slot.pos)
            del sc.labels[slot.pos]
            if len(sc.labels) <= self.brute_force_max // 2:
                self._demote(sc)
        else:
            row, last = slot.pos, len(sc.rows) - 1
            if row != last:  # keep the block dense: move the last row into the hole
                sc.block[row] = sc.block[last]
                moved = sc.rows[last]
                sc.rows[row] = moved
                moved.pos = row
            sc.rows.pop()
            cap = sc.block.shape[0] if sc.block is not None else 0
            if cap > _MIN_BLOCK and cap >= 4 * last:  # give memory back after a large shrink
                sc.block = sc.block[: max(_MIN_BLOCK, 2 * last)].copy()
        if not len(sc):
            self._drop_scope(sc)

    def _remove_slot(self, slot: _Slot) -> None:
        del self._slots[slot.entry.key]
        self._meta_bytes -= _meta_size(slot.entry)
        self._detach(slot)

    def _drop_scope(self, sc: _Scope) -> None:
        self._scopes.pop(sc.digest, None)
        digests = self._ns_scopes.get(sc.namespace)
        if digests is not None:
            digests.discard(sc.digest)
            if not digests:
                del self._ns_scopes[sc.namespace]
        sc.ann, sc.block, sc.rows, sc.labels = None, None, [], {}

    def _search_block(
        self, sc: _Scope, q: np.ndarray, k: int, now: float
    ) -> tuple[list[tuple[float, SemanticEntry]], list[_Slot]]:
        n = len(sc.rows)
        want = min(n, k + 2)  # a little headroom for expired rows, refetched in full if short
        while True:
            idx, scores = topk_dot(q, sc.block[:n], want)
            found: list[tuple[float, SemanticEntry]] = []
            dead: list[_Slot] = []
            for i, s in zip(idx, scores, strict=True):
                slot = sc.rows[i]
                if slot.entry.expires <= now:
                    dead.append(slot)
                elif len(found) < k:
                    found.append((s, slot.entry))
            if len(found) >= k or want >= n:
                return found, dead
            want = n

    def _search_ann(
        self, sc: _Scope, q: np.ndarray, k: int, now: float
    ) -> tuple[list[tuple[float, SemanticEntry]], list[_Slot]]:
        self.ann_searches += 1
        assert sc.ann is not None
        matches = sc.ann.search(q, max(self.ann_candidates, k), threads=1)
        labels = matches.keys.tolist()
        if not labels:
            return [], []
        # exact rescoring of the candidates with the brute-force kernel: same scores, same order
        idx, scores = topk_dot(q, self._ann_vectors(sc.ann, labels), len(labels))
        found: list[tuple[float, SemanticEntry]] = []
        dead: list[_Slot] = []
        for i, s in zip(idx, scores, strict=True):
            slot = sc.labels.get(labels[i])
            if slot is None:  # not expected: usearch does not return removed keys
                continue
            if slot.entry.expires <= now:
                dead.append(slot)
            elif len(found) < k:
                found.append((s, slot.entry))
        return found, dead

    def _compact_heap(self) -> None:
        self._heap = [(s.entry.expires, key) for key, s in self._slots.items()]
        heapq.heapify(self._heap)

    def _gather_vectors(self, slots: list[_Slot]) -> np.ndarray:
        out = np.empty((len(slots), self.dim), dtype=self._np_dtype)
        by_scope: dict[bytes, list[tuple[int, _Slot]]] = {}
        for i, slot in enumerate(slots):
            by_scope.setdefault(slot.scope.digest, []).append((i, slot))
        for items in by_scope.values():
            sc = items[0][1].scope
            where = [i for i, _ in items]
            positions = [s.pos for _, s in items]
            if sc.ann is None:
                out[where] = sc.block[positions]
            else:
                out[where] = self._ann_vectors(sc.ann, positions)
        return out

    def _bulk_load(self, entries: list[SemanticEntry], vecs: np.ndarray, now: float) -> None:
        live = [i for i, e in enumerate(entries) if e.expires > now]
        if live:
            self.add_many(vecs[live].astype(np.float32), [entries[i] for i in live])


def _meta_size(entry: SemanticEntry) -> int:
    return _ENTRY_OVERHEAD + len(entry.key) + len(entry.query_text)


def _parse_snapshot(data: bytes, path: Any) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    m = len(SNAPSHOT_MAGIC)
    if len(data) < m + 4 or data[:m] != SNAPSHOT_MAGIC:
        raise SnapshotError(f"{path} is not a semantic index snapshot (bad magic)")
    (hlen,) = struct.unpack_from("<I", data, m)
    start = m + 4
    try:
        header = orjson.loads(data[start : start + hlen])
        version, dim, dtype = header["version"], header["dim"], header["dtype"]
        mlen, vlen, count = header["meta_len"], header["vec_len"], header["count"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise SnapshotError(f"snapshot {path}: unreadable header ({exc})") from exc
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(f"snapshot {path}: version {version}, expected {SNAPSHOT_VERSION}")
    if dtype not in _DTYPES:
        raise SnapshotError(f"snapshot {path}: unknown dtype {dtype!r}")
    mstart = start + hlen
    vstart = mstart + mlen
    item = np.dtype(_DTYPES[dtype]).itemsize
    if len(data) != vstart + vlen or vlen != count * dim * item:
        raise SnapshotError(f"snapshot {path}: truncated or wrong size")
    meta_raw = memoryview(data)[mstart:vstart]
    vec_raw = memoryview(data)[vstart:]
    if zlib.crc32(meta_raw) != header["meta_crc32"] or zlib.crc32(vec_raw) != header["vec_crc32"]:
        raise SnapshotError(f"snapshot {path}: checksum mismatch (corrupt file)")
    try:
        meta = orjson.loads(meta_raw)
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"snapshot {path}: unreadable entries ({exc})") from exc
    vecs = np.frombuffer(vec_raw, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
    return header, meta, vecs


def _fsync_dir(directory: Path) -> None:
    # the rename is durable only once the directory entry is on disk (POSIX)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
