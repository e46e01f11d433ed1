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
* **ANN** (grown past ``brute_force_max``): the scope gets its own usearch ``Index`` (int8
  rows with the cosine metric by default, see *dtype* below; HNSW ``connectivity`` 16,
  ``expansion_add`` 128, ``expansion_search`` 32 by default, tunable at run time with
  ``set_expansion_search``). A search asks usearch for ``ann_candidates`` labels, fetches their
  stored vectors and rescores them exactly (cosine of the query with each stored row) with the
  same native kernel as the blocks, so scores mean the same thing in both modes (the verifier's
  threshold does not depend on which path answered; an int8 row's cosine is within ~5e-4 of its
  float16 one). A scope that shrinks to ``brute_force_max // 2`` goes back to a block (hysteresis
  avoids flapping at the boundary). Bulk inserts (``add_many``: promotion, snapshot load, stream
  replay) use usearch's multi-threaded add.

Why one usearch index per large scope rather than one global index with a filter: the Python
binding of usearch 2.26 has no filtered search (``Index.search`` takes no predicate; only the C++
core does), and post-filtering a global top-k' breaks isolation-by-construction and loses recall
when the scope is a small fraction of the index. The vectors of an ANN scope live only inside
usearch (no second copy), which is what keeps one million entries under the memory target.

Parameters (float16 measurements of an earlier version: benchmarks/bench_index.py, clustered
synthetic 384-d vectors, 50k entries, 2 build threads on the shared 2-core box):
``expansion_add`` 64 instead of 128 builds 3x faster but the true neighbour is among the 16
candidates for only 94-98 % of queries instead of 99-100 %; ``connectivity`` 12 / 8 saves
~100 B per entry and loses more recall still. Inner product and cosine give the same recall;
inner product is the cheaper distance (float rows; i8 rows need cosine, see below). Search depth
at 1M entries (bench_index.py 1000000, whole search path, pinned core, load avg ~2):
``expansion_search`` 32:
p50 0.82 ms, p99 1.7 ms, recall@1 0.75; 64: 1.13 / 2.5 ms, 0.89; 128: 1.57 / 3.3 ms, 0.97. At
100k: 32: 0.46 / 0.82 ms, 0.99; 64: 0.59 / 0.98 ms, 1.00. A missed neighbour costs a cache hit,
never a wrong answer (rescoring and the verifier still apply).

dtype: ``"i8"`` (default), ``"f16"`` or ``"f32"``. i8: each row is quantised *here* with its own
scale (largest component -> +-127, ``_quantize_i8``) and handed to usearch as int8, which stores
it as given; the query is quantised the same way and the metric is cosine, which does not see
the scale. (usearch's own float -> i8 cast is ``round(x * 127)`` of the normalised row: 2 to 3
levels per component of a 384-d unit vector, top-1 often wrong; hence the explicit quantisation.)
A cosine between int8 rows is within ~5e-4 of the float one, so usearch's own ranking is already
nearly exact: recall@1 after rescoring is the same with 4 or 16 candidates. The rescoring reads
the int8 rows back (no second copy of the vectors is kept; a float16 copy for rescoring would
cost 768 B per entry and break the memory target). Brute-force blocks stay float16 (the native
kernel reads float16/float32) and snapshots of an i8 index hold float16 vectors (header
``dtype`` f16, ``index_dtype`` i8; they quantise back to the same int8 bytes on load).
i8 vs f16 at 1M entries (one scope, mixture data of bench_index.py, ``connectivity`` 16, one
query at a time on a pinned core, usearch + fetch + rescoring): usearch holds 622 B per entry
instead of ~1030, and ``expansion_search`` 32 gives p50 0.44-0.48 ms, p99 0.79-0.90 ms,
recall@1 0.89; 48: 0.50-0.56 / 1.0-1.15 ms, 0.93; 64: 0.58 / 1.16-1.22 ms, 0.955 (float16,
clustered data, above: 64 -> p99 2.5 ms). Hence 32 by default: it meets p99 <= 1 ms at 1M;
smaller scopes can afford more (``set_expansion_search``).

Memory: columns, not objects
----------------------------
Entries are not kept as Python objects. Each live entry has a *slot id* (``sid``, recycled); its
fields live in numpy columns indexed by sid (created, expires, insertion sequence, scope number,
block row, max_tokens, tier number: 45 bytes) and two Python lists (key, query text: 16 bytes of
pointers plus the bytes/str objects themselves). ``key -> sid`` is one dict. An ANN scope uses the
sid as its usearch label, so there is no label map. The FIFO order is a ring of sids (12 bytes
per insertion, stale items dropped lazily). ``search`` builds ``SemanticEntry`` objects for the
few results it returns; ``add`` copies the entry's fields (the object is not kept).

Measured (benchmarks/bench_index.py 1000000, CPython 3.11, one ANN scope, 384-d f16, 32-byte
keys, 64-character ASCII query texts, clustered synthetic vectors): 1 413 B of RSS per entry
(1.41 GB of index, 1.50 GB for the whole process with numpy/onnxruntime/usearch loaded);
``memory_bytes()`` says 1 405. Of that, usearch ~1 030 B (the 768-byte vector and the HNSW node;
with i8 rows 622 B, so ~1 000 B per entry and ~1.1 GB per million in all) and Python ~380 B
(key 80, text 128, key -> sid dict entry and sid int ~90, columns and FIFO ring ~70, list
pointers 16). Every extra character of query text adds one byte. Before this layout
(SemanticEntry + _Slot + OrderedDict node + heap tuple per entry) it was 1.83 KB per entry.

Lifetime
--------
* Capacity: at most ``capacity`` entries; adding to a full index evicts the **oldest inserted**
  entries first (FIFO; a replace counts as a new insertion), ``capacity // 128`` at once (see
  ``EVICT_BATCH_DIVISOR``: usearch's unlink pass then runs once per batch). FIFO needs no write
  on the hit path, and with a uniform TTL the oldest entry is also the one closest to expiry.
* TTL: an entry's ``expires`` is capped at ``created + ttl_s``. Search never returns an expired
  entry (checked against ``now``) and drops those it meets; ``expire()`` reclaims the rest with
  one vectorised scan of the expiry column (~ms per million entries; no per-entry heap).

Threading: a ``SemanticIndex`` is not thread-safe. It is used from the event-loop thread only;
a search is a few microseconds (brute force) to a few hundred (ANN on a large scope), below the
cost of a hop to a worker thread. Snapshots: ``snapshot_data()`` copies what a snapshot needs
(columns, keys, texts, vectors) on the loop thread, quickly and without encoding; the returned
object is independent of the index, and ``write_snapshot(data, path)`` (encode, checksum, write,
fsync, rename) can then run in a worker thread while the index keeps serving. ``load()`` builds
from columns with one multi-threaded usearch insert per scope; run it in a worker thread before
the index is published (as proxy/semcache.py does).
"""

from __future__ import annotations

import math
import os
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

# onnxruntime must be loaded before usearch: the other order segfaults inside onnxruntime's
# import (usearch 2.26 / onnxruntime 1.32 on x86_64; tests/test_semantic.py checks both load).
import onnxruntime  # noqa: F401
import orjson
from usearch.compiled import ScalarKind
from usearch.index import Index

from proxy.scoring import topk_dot

__all__ = ["SemanticEntry", "SemanticIndex", "SnapshotData", "SnapshotError", "write_snapshot"]

SCOPE_BYTES: Final = 16
SNAPSHOT_MAGIC: Final = b"EPSEMIX\x00"
SNAPSHOT_VERSION: Final = 2  # 1: JSON entry records (still loaded); 2: binary columns
_DTYPES: Final = {"f16": np.float16, "f32": np.float32, "i8": np.int8}
_USEARCH_KIND: Final = {"f16": ScalarKind.F16, "f32": ScalarKind.F32, "i8": ScalarKind.I8}
DEFAULT_DTYPE: Final = "i8"
DEFAULT_CONNECTIVITY: Final = 16
DEFAULT_EXPANSION_ADD: Final = 128
DEFAULT_EXPANSION_SEARCH: Final = 32
# Python-side bytes of one entry besides its key and query-text objects: the dict entry of
# key -> sid (~60 B averaged over the dict's load factor), the sid int (32 B), the numpy columns
# (45 B), the two list pointers (16 B) and the FIFO ring (12-24 B). Checked against tracemalloc in
# tests/test_semantic.py::test_memory_estimate.
_ENTRY_OVERHEAD: Final = 180
# usearch HNSW node besides the vector (connectivity 16): level-0 neighbour list
# (2 * connectivity u32), the upper levels, key, level, lock bits and the key-lookup table.
# Calibrated on RSS at 1M entries: 1031 B per entry with a 768-byte f16 vector, 622 B with a
# 384-byte i8 one.
_ANN_NODE_OVERHEAD: Final = 250
_MIN_BLOCK: Final = 8
_NO_MAX_TOKENS: Final = np.iinfo(np.int64).min
# A full index evicts capacity // this many of its oldest entries at once (at least one), so it
# runs at 99.2-100 % of capacity. Why not one at a time: usearch 2.26 unlinks removed nodes from
# the graph lazily, in one pass over the whole index on the next add (~40 ms at 1M entries in
# one scope, ~3 ms at 100k; an add is 0.7 ms otherwise). One eviction per add paid that pass on
# every add, on the event loop; a batch pays it once per capacity // 128 adds.
EVICT_BATCH_DIVISOR: Final = 128
_VEC_CHUNK: Final = 65_536  # vectors fetched from usearch per get_many call


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


class _Scope:
    """One partition. Block mode: ``block`` (rows x dim) and ``rows`` (row -> sid, first ``n``
    valid); ANN mode: ``ann`` (usearch labels are sids) and ``n``."""

    __slots__ = ("ann", "block", "digest", "n", "namespace", "num", "rows")

    def __init__(self, digest: bytes, namespace: str, num: int) -> None:
        self.digest = digest
        self.namespace = namespace
        self.num = num
        self.n = 0
        self.block: Any = None  # np.ndarray (capacity, dim) in block mode
        self.rows: Any = None  # np.ndarray int64 (capacity,) in block mode
        self.ann: Index | None = None


@dataclass(slots=True)
class SnapshotData:
    """A point-in-time copy of an index (``SemanticIndex.snapshot_data``), oldest entry first.

    Independent of the index: ``write_snapshot`` may encode and write it in another thread.
    """

    dim: int
    dtype: str
    scopes: list[tuple[bytes, str]]  # scope number in this snapshot -> (digest, namespace)
    tiers: list[str]
    keys: list[bytes]
    texts: list[str]
    scope_idx: np.ndarray  # int32, into ``scopes``
    tier_idx: np.ndarray  # uint8, into ``tiers``
    max_tokens: np.ndarray  # int64, _NO_MAX_TOKENS for None
    created: np.ndarray  # float64
    expires: np.ndarray  # float64
    vectors: np.ndarray  # (count, dim) of dtype
    # dtype of the index that wrote it ("" = dtype); an i8 index snapshots f16 vectors
    index_dtype: str = ""

    def __len__(self) -> int:
        return len(self.keys)


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
        dtype: str = DEFAULT_DTYPE,
        connectivity: int | None = None,
        expansion_add: int | None = None,
        expansion_search: int | None = None,
        build_threads: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
        if dim <= 0 or capacity <= 0 or ttl_s <= 0 or brute_force_max < 1 or ann_candidates < 1:
            raise ValueError("dim, capacity, ttl_s, brute_force_max, ann_candidates must be > 0")
        self.dim = dim
        self.capacity = capacity
        self.ttl_s = float(ttl_s)
        self.brute_force_max = brute_force_max
        self.ann_candidates = ann_candidates
        self.dtype = dtype
        self._np_dtype = _DTYPES[dtype]  # ANN storage and snapshot vectors
        # brute-force blocks: the topk_dot kernel reads float16/float32 only
        self._block_dtype = np.float16 if dtype == "i8" else self._np_dtype
        self._connectivity = connectivity or DEFAULT_CONNECTIVITY
        self._expansion_add = expansion_add or DEFAULT_EXPANSION_ADD
        self._expansion_search = expansion_search or DEFAULT_EXPANSION_SEARCH
        self._build_threads = build_threads  # bulk adds (promotion, load); 0 = all cores
        # per-sid columns (grown by doubling up to capacity)
        self._hi = 0  # sids in [0, _hi) have been handed out at least once
        self._keys: list[bytes | None] = []
        self._texts: list[str | None] = []
        self._created = np.empty(0, np.float64)
        self._expires = np.empty(0, np.float64)
        self._seq = np.empty(0, np.int64)  # insertion sequence; -1 = free sid
        self._scope = np.empty(0, np.int32)  # scope number
        self._pos = np.empty(0, np.int64)  # block row (block mode) or -1 (ANN: label = sid)
        self._maxtok = np.empty(0, np.int64)
        self._tier = np.empty(0, np.uint8)
        self._free: list[int] = []
        self._by_key: dict[bytes, int] = {}
        self._next_seq = 0
        # FIFO ring of (sid, seq) in insertion order; an item is stale if seq[sid] moved on
        self._fifo_sid = np.empty(1024, np.int32)
        self._fifo_seq = np.empty(1024, np.int64)
        self._fifo_head = 0
        self._fifo_tail = 0
        self._scopes: dict[bytes, _Scope] = {}
        self._scope_by_num: dict[int, _Scope] = {}
        self._next_scope = 0
        self._ns_scopes: dict[str, set[bytes]] = {}
        self._tiers: list[str] = []
        self._tier_num: dict[str, int] = {}
        self._obj_bytes = 0  # running sum of key + text object sizes
        # counters for metrics (monotonic)
        self.searches = 0
        self.ann_searches = 0
        self.adds = 0
        self.evictions = 0
        self._evict_batch = max(1, capacity // EVICT_BATCH_DIVISOR)
        self.expirations = 0
        self.removals = 0
        self.promotions = 0

    # -- public API -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, vector: np.ndarray, entry: SemanticEntry) -> None:
        """Store ``entry`` with its query ``vector``; an entry with the same key is replaced.

        The entry's fields are copied (the object is not kept); ``expires`` is capped at
        ``created + ttl_s``. Evicts the oldest entry when the index is full.
        """
        if len(entry.scope) != SCOPE_BYTES:
            raise ValueError(f"scope must be {SCOPE_BYTES} bytes, got {len(entry.scope)}")
        vec = self._prepare(vector)
        sc = self._scopes.get(entry.scope)
        if sc is not None and sc.namespace != entry.namespace:
            # keys.py hashes the namespace into the scope; purge_namespace relies on it
            raise ValueError("scope digest already belongs to another namespace")
        tier = self._tier_id(entry.tier)
        old = self._by_key.get(entry.key)
        if old is not None:
            self._remove_sid(old)
        if len(self._by_key) >= self.capacity:
            # a batch, not one: see EVICT_BATCH_DIVISOR
            for _ in range(min(self._evict_batch, len(self._by_key))):
                self._evict_oldest()
        sc = self._scope_for(entry.scope, entry.namespace)
        sid = self._new_sid(entry.key, entry.query_text, tier, entry.max_tokens,
                            entry.created, min(entry.expires, entry.created + self.ttl_s), sc)
        if sc.ann is not None:
            sc.ann.add(sid, self._to_ann(vec), threads=1)
            self._pos[sid] = -1
            sc.n += 1
        else:
            self._block_append(sc, sid, vec)
            if sc.n > self.brute_force_max:
                self._promote(sc)
        self.adds += 1

    def add_many(self, vectors: np.ndarray, entries: Sequence[SemanticEntry]) -> None:
        """Add a batch (snapshot load, stream replay, benchmarks): like ``add`` for each pair in
        order, but with one multi-threaded usearch insert per ANN scope instead of one per entry.
        """
        for e in entries:
            if len(e.scope) != SCOPE_BYTES:
                raise ValueError(f"scope must be {SCOPE_BYTES} bytes, got {len(e.scope)}")
        scopes: dict[tuple[bytes, str], int] = {}
        scope_idx = np.fromiter(
            (scopes.setdefault((e.scope, e.namespace), len(scopes)) for e in entries),
            np.int32, len(entries))
        tiers: dict[str, int] = {}
        tier_idx = np.fromiter((tiers.setdefault(e.tier, len(tiers)) for e in entries),
                               np.int64, len(entries))
        self._add_columns(
            vectors,
            [e.key for e in entries],
            [e.query_text for e in entries],
            list(scopes),
            list(tiers),
            scope_idx,
            tier_idx,
            np.fromiter((_NO_MAX_TOKENS if e.max_tokens is None else e.max_tokens
                         for e in entries), np.int64, len(entries)),
            np.fromiter((e.created for e in entries), np.float64, len(entries)),
            np.fromiter((e.expires for e in entries), np.float64, len(entries)),
        )

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
        for sid in dead:  # expired entries met on the way are reclaimed at once
            if self._seq[sid] >= 0:
                self._remove_sid(sid)
                self.expirations += 1
        return found

    def remove(self, key: bytes) -> bool:
        """Remove the entry stored under ``key``; False if there is none."""
        sid = self._by_key.get(key)
        if sid is None:
            return False
        self._remove_sid(sid)
        self.removals += 1
        return True

    def purge_namespace(self, namespace: str) -> int:
        """Remove every entry of ``namespace`` (its scopes are dropped whole); returns the count."""
        digests = list(self._ns_scopes.get(namespace, ()))
        if not digests:
            return 0
        nums = [self._scopes[d].num for d in digests]
        hi = self._hi
        sids = np.flatnonzero(np.isin(self._scope[:hi], nums) & (self._seq[:hi] >= 0))
        for sid in sids.tolist():
            self._release_sid(sid)
        for d in digests:
            self._drop_scope(self._scopes[d])
        self.removals += len(sids)
        return len(sids)

    def expire(self, now: float | None = None) -> int:
        """Remove every entry with ``expires <= now``; returns how many were removed."""
        now = time.time() if now is None else now
        hi = self._hi
        sids = np.flatnonzero((self._expires[:hi] <= now) & (self._seq[:hi] >= 0))
        for sid in sids.tolist():
            if self._seq[sid] >= 0:
                self._remove_sid(sid)
        self.expirations += len(sids)
        return len(sids)

    def entries(self) -> Iterator[SemanticEntry]:
        """Every live entry, oldest first (copies; for tools and tests, O(n))."""
        for sid in self._live_sids_fifo().tolist():
            yield self._entry(sid)

    def vector(self, key: bytes) -> np.ndarray | None:
        """The stored vector of an entry (unit length; float16 / int8 rows rescaled), or None."""
        sid = self._by_key.get(key)
        if sid is None:
            return None
        v = self._gather_vectors(np.array([sid], np.int64))[0].astype(np.float32)
        return v / np.float32(np.linalg.norm(v))

    def memory_bytes(self) -> int:
        """Estimate of the memory held: vectors, ANN graphs and per-entry Python bookkeeping."""
        item = np.dtype(self._np_dtype).itemsize
        node = _ann_node_overhead(self._connectivity)
        total = 0
        for sc in self._scopes.values():
            if sc.ann is None:
                total += sc.block.nbytes + sc.rows.nbytes if sc.block is not None else 0
            else:
                total += len(sc.ann) * (self.dim * item + node)
        columns = sum(a.nbytes for a in (self._created, self._expires, self._seq, self._scope,
                                         self._pos, self._maxtok, self._tier,
                                         self._fifo_sid, self._fifo_seq))
        columns += 16 * len(self._keys)
        return total + columns + self._obj_bytes + (_ENTRY_OVERHEAD - 45 - 24 - 16) * len(self)

    def set_expansion_search(self, ef: int) -> None:
        """Change the HNSW search depth of every ANN scope (and of future ones)."""
        if ef < 1:
            raise ValueError("expansion_search must be > 0")
        self._expansion_search = ef
        for sc in self._scopes.values():
            if sc.ann is not None:
                sc.ann.expansion_search = ef  # type: ignore[misc]  # (it has a setter)

    def stats(self) -> dict[str, int]:
        """Gauges and counters for /metrics and the admin endpoint."""
        return {
            "entries": len(self._by_key),
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

    def snapshot_data(self) -> SnapshotData:
        """Copy what a snapshot needs (loop thread; numpy copies and list gathers, no encoding).

        The copy holds every vector: it needs ``count * dim * itemsize`` bytes extra until it is
        written (768 MB for 1M f16 entries of 384 dims).
        """
        sids = self._live_sids_fifo()
        nums, scope_idx = np.unique(self._scope[sids], return_inverse=True)
        scopes = [(self._scope_by_num[n].digest, self._scope_by_num[n].namespace)
                  for n in nums.tolist()]
        sid_list = sids.tolist()
        keys, texts = self._keys, self._texts
        return SnapshotData(
            dim=self.dim,
            dtype="f16" if self.dtype == "i8" else self.dtype,
            scopes=scopes,
            tiers=list(self._tiers),
            keys=[keys[s] for s in sid_list],
            texts=[texts[s] for s in sid_list],
            scope_idx=scope_idx.astype(np.int32).reshape(-1),
            tier_idx=self._tier[sids],
            max_tokens=self._maxtok[sids],
            created=self._created[sids],
            expires=self._expires[sids],
            vectors=self._gather_vectors(sids),
            index_dtype=self.dtype,
        )

    def snapshot(self, path: str | Path) -> None:
        """Write every entry and vector to ``path`` atomically (``write_snapshot`` of
        ``snapshot_data()``, all on the calling thread)."""
        write_snapshot(self.snapshot_data(), path)

    @classmethod
    def load(cls, path: str | Path, *, now: float | None = None, **kwargs: Any) -> SemanticIndex:
        """Build an index from a snapshot; ``kwargs`` go to the constructor.

        Raises SnapshotError if the file is unreadable, corrupt or was written with another
        ``dim`` than the one asked for. A different ``dtype`` is converted. Entries expired at
        ``now`` (default: the current time) are skipped; past ``capacity``, the newest are kept.
        """
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot {path}: {exc}") from exc
        data = _parse_snapshot(raw, path)
        del raw
        if kwargs.setdefault("dim", data.dim) != data.dim:
            raise SnapshotError(f"snapshot {path} has dim {data.dim}, expected {kwargs['dim']}")
        kwargs.setdefault("dtype", data.index_dtype or data.dtype)
        index = cls(**kwargs)
        now = time.time() if now is None else now
        live = np.flatnonzero(data.expires > now)
        if len(live) == len(data):
            sel: Any = slice(None)
            keys, texts = data.keys, data.texts
        else:
            sel = live
            keys = [data.keys[i] for i in live.tolist()]
            texts = [data.texts[i] for i in live.tolist()]
        if len(keys):
            index._add_columns(
                data.vectors[sel], keys, texts, data.scopes, data.tiers,
                data.scope_idx[sel], data.tier_idx[sel].astype(np.int64), data.max_tokens[sel],
                data.created[sel], data.expires[sel])
        return index

    # -- internals: entries ---------------------------------------------------------------------

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

    def _tier_id(self, tier: str) -> int:
        t = self._tier_num.get(tier)
        if t is None:
            if len(self._tiers) >= 255:
                raise ValueError("more than 255 distinct tiers")
            t = self._tier_num[tier] = len(self._tiers)
            self._tiers.append(sys.intern(tier))
        return t

    def _entry(self, sid: int) -> SemanticEntry:
        sc = self._scope_by_num[int(self._scope[sid])]
        mt = int(self._maxtok[sid])
        return SemanticEntry(
            self._keys[sid],  # type: ignore[arg-type]
            sc.digest,
            sc.namespace,
            self._texts[sid],  # type: ignore[arg-type]
            self._tiers[self._tier[sid]],
            None if mt == _NO_MAX_TOKENS else mt,
            float(self._created[sid]),
            float(self._expires[sid]),
        )

    def _grow_columns(self, need: int) -> None:
        size = len(self._seq)
        if need <= size:
            return
        new = min(max(need, 2 * size, 1024), max(need, self.capacity))

        def grown(a: np.ndarray) -> np.ndarray:
            b = np.empty(new, a.dtype)
            b[:size] = a
            return b

        self._created, self._expires = grown(self._created), grown(self._expires)
        self._seq, self._scope, self._pos = grown(self._seq), grown(self._scope), grown(self._pos)
        self._maxtok, self._tier = grown(self._maxtok), grown(self._tier)
        self._seq[size:] = -1

    def _alloc_sids(self, count: int) -> list[int]:
        reuse = self._free[-count:] if count else []
        del self._free[len(self._free) - len(reuse):]
        fresh = count - len(reuse)
        self._grow_columns(self._hi + fresh)
        out = reuse[::-1] + list(range(self._hi, self._hi + fresh))
        self._hi += fresh
        grow = self._hi - len(self._keys)
        if grow > 0:
            self._keys.extend([None] * grow)
            self._texts.extend([None] * grow)
        return out

    def _new_sid(self, key: bytes, text: str, tier: int, max_tokens: int | None,
                 created: float, expires: float, sc: _Scope) -> int:
        sid = self._alloc_sids(1)[0]
        self._keys[sid] = key
        self._texts[sid] = text
        self._by_key[key] = sid
        self._obj_bytes += _obj_size(key) + _obj_size(text)
        self._created[sid] = created
        self._expires[sid] = expires
        self._scope[sid] = sc.num
        self._maxtok[sid] = _NO_MAX_TOKENS if max_tokens is None else max_tokens
        self._tier[sid] = tier
        self._seq[sid] = seq = self._next_seq
        self._next_seq += 1
        if self._fifo_tail >= len(self._fifo_sid):
            self._fifo_compact(1)
        t = self._fifo_tail
        self._fifo_sid[t] = sid
        self._fifo_seq[t] = seq
        self._fifo_tail = t + 1
        return sid

    def _release_sid(self, sid: int) -> None:
        """Forget the entry's fields (its vector is the caller's business)."""
        key, text = self._keys[sid], self._texts[sid]
        del self._by_key[key]  # type: ignore[arg-type]
        self._obj_bytes -= _obj_size(key) + _obj_size(text)  # type: ignore[arg-type]
        self._keys[sid] = self._texts[sid] = None
        self._seq[sid] = -1
        self._free.append(sid)

    def _remove_sid(self, sid: int) -> None:
        sc = self._scope_by_num[int(self._scope[sid])]
        self._release_sid(sid)
        self._detach(sc, sid)

    def _evict_oldest(self) -> None:
        seq, fs, fq = self._seq, self._fifo_sid, self._fifo_seq
        h = self._fifo_head
        while h < self._fifo_tail:
            sid = int(fs[h])
            h += 1
            if seq[sid] == fq[h - 1]:
                self._fifo_head = h
                self._remove_sid(sid)
                self.evictions += 1
                return
        self._fifo_head = h
        raise AssertionError("FIFO ring empty while the index is full")

    def _fifo_push(self, sids: np.ndarray, seqs: np.ndarray) -> None:
        n = len(sids)
        if self._fifo_tail + n > len(self._fifo_sid):
            self._fifo_compact(n)
        t = self._fifo_tail
        self._fifo_sid[t : t + n] = sids
        self._fifo_seq[t : t + n] = seqs
        self._fifo_tail = t + n

    def _fifo_compact(self, extra: int) -> None:
        h, t = self._fifo_head, self._fifo_tail
        fs, fq = self._fifo_sid[h:t], self._fifo_seq[h:t]
        keep = self._seq[fs] == fq
        fs, fq = fs[keep], fq[keep]
        size = len(self._fifo_sid)
        while size < 2 * (len(fs) + extra):  # at most half full after compaction: amortised O(1)
            size *= 2
        if size != len(self._fifo_sid):
            self._fifo_sid, self._fifo_seq = np.empty(size, np.int32), np.empty(size, np.int64)
        self._fifo_sid[: len(fs)] = fs
        self._fifo_seq[: len(fq)] = fq
        self._fifo_head, self._fifo_tail = 0, len(fs)

    def _live_sids_fifo(self) -> np.ndarray:
        h, t = self._fifo_head, self._fifo_tail
        fs = self._fifo_sid[h:t]
        return fs[self._seq[fs] == self._fifo_seq[h:t]]

    # -- internals: batch insert ----------------------------------------------------------------

    def _add_columns(
        self, vectors: np.ndarray, keys: list[bytes], texts: list[str],
        scopes: Sequence[tuple[bytes, str]], tiers: Sequence[str], scope_idx: np.ndarray,
        tier_idx: np.ndarray, max_tokens: np.ndarray, created: np.ndarray, expires: np.ndarray,
    ) -> None:
        n = len(keys)
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(n, -1)
        if vecs.shape[1] != self.dim:
            raise ValueError(f"vectors have {vecs.shape[1]} dims, index has {self.dim}")
        norms = np.linalg.norm(vecs, axis=1)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ValueError("vectors must be finite and non-zero")
        for digest, ns in scopes:
            if len(digest) != SCOPE_BYTES:
                raise ValueError(f"scope must be {SCOPE_BYTES} bytes, got {len(digest)}")
            sc = self._scopes.get(digest)
            if sc is not None and sc.namespace != ns:
                raise ValueError("scope digest already belongs to another namespace")
        if len({d for d, _ in scopes}) != len(scopes):
            raise ValueError("scope digest already belongs to another namespace")
        tier_map = np.array([self._tier_id(t) for t in tiers] or [0], np.uint8)
        # a key twice in the batch: the last wins; past capacity, the newest are kept
        last = {k: i for i, k in enumerate(keys)}
        if len(last) == n:
            order = np.arange(max(0, n - self.capacity), n)
        else:
            order = np.fromiter(sorted(last.values()), np.int64, len(last))[-self.capacity :]
        for i in order.tolist():
            old = self._by_key.get(keys[i])
            if old is not None:
                self._remove_sid(old)
        # the batch is newer than everything stored, so FIFO eviction can be done up front
        while self._by_key and len(self._by_key) + len(order) > self.capacity:
            self._evict_oldest()
        m = len(order)
        # only the scopes that keep an entry are created (no empty scope may linger)
        sc_objs: list[_Scope | None] = [None] * len(scopes)
        sc_nums = np.full(max(1, len(scopes)), -1, np.int32)
        for j in np.unique(scope_idx[order]).tolist():
            sc_objs[j] = self._scope_for(*scopes[j])
            sc_nums[j] = sc_objs[j].num
        sids_l = self._alloc_sids(m)
        sids = np.asarray(sids_l, np.int64)
        order_l = order.tolist()
        key_list, text_list = self._keys, self._texts
        by_key, obj = self._by_key, 0
        for sid, i in zip(sids_l, order_l, strict=True):
            k, t = keys[i], texts[i]
            key_list[sid] = k
            text_list[sid] = t
            by_key[k] = sid
            obj += _obj_size(k) + _obj_size(t)
        self._obj_bytes += obj
        exp = expires[order]
        cre = created[order]
        self._created[sids] = cre
        self._expires[sids] = np.minimum(exp, cre + self.ttl_s)
        self._scope[sids] = sc_nums[scope_idx[order]]
        self._maxtok[sids] = max_tokens[order]
        self._tier[sids] = tier_map[tier_idx[order]]
        seqs = np.arange(self._next_seq, self._next_seq + m, dtype=np.int64)
        self._next_seq += m
        self._seq[sids] = seqs
        self._fifo_push(sids, seqs)
        vecs = vecs[order]
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        groups = np.argsort(scope_idx[order], kind="stable")
        bounds = np.flatnonzero(np.diff(scope_idx[order][groups])) + 1
        for part in np.split(groups, bounds) if m else []:
            sc = sc_objs[int(scope_idx[order[part[0]]])]
            assert sc is not None
            psids = sids[part]
            if sc.ann is None and sc.n + len(part) <= self.brute_force_max:
                for j, sid in zip(part.tolist(), psids.tolist(), strict=True):
                    self._block_append(sc, sid, vecs[j])
                continue
            if sc.ann is None:
                self._promote(sc)
            assert sc.ann is not None
            sc.ann.add(psids.astype(np.uint64), self._to_ann(vecs[part]),
                       threads=self._build_threads)
            self._pos[psids] = -1
            sc.n += len(part)
        self.adds += m

    # -- internals: scopes ----------------------------------------------------------------------

    def _scope_for(self, digest: bytes, namespace: str) -> _Scope:
        sc = self._scopes.get(digest)
        if sc is None:
            digest = bytes(digest)
            num = self._next_scope
            self._next_scope += 1
            sc = self._scopes[digest] = _Scope(digest, sys.intern(namespace), num)
            self._scope_by_num[num] = sc
            self._ns_scopes.setdefault(sc.namespace, set()).add(digest)
        return sc

    def _new_ann(self) -> Index:
        return Index(
            ndim=self.dim,
            # unit vectors: inner product = cosine, and cheaper; i8 rows carry a per-row scale
            # (see _quantize_i8), which only the cosine metric ignores
            metric="cos" if self.dtype == "i8" else "ip",
            dtype=self.dtype,
            connectivity=self._connectivity,
            expansion_add=self._expansion_add,
            expansion_search=self._expansion_search,
        )

    def _block_append(self, sc: _Scope, sid: int, vec: np.ndarray) -> None:
        n = sc.n
        if sc.block is None or n == sc.block.shape[0]:
            cap = max(_MIN_BLOCK, 2 * n)
            block = np.empty((cap, self.dim), dtype=self._block_dtype)
            rows = np.empty(cap, np.int64)
            if n:
                block[:n] = sc.block[:n]
                rows[:n] = sc.rows[:n]
            sc.block, sc.rows = block, rows
        sc.block[n] = vec
        sc.rows[n] = sid
        self._pos[sid] = n
        sc.n = n + 1

    def _promote(self, sc: _Scope) -> None:
        """Block -> usearch index, when the scope grows past brute_force_max."""
        n = sc.n
        ann = self._new_ann()
        if n:
            ann.add(sc.rows[:n].astype(np.uint64), self._to_ann(sc.block[:n]),
                    threads=self._build_threads)
            self._pos[sc.rows[:n]] = -1
        sc.ann, sc.block, sc.rows = ann, None, None
        self.promotions += 1

    def _demote(self, sc: _Scope) -> None:
        """usearch index -> block, when an ANN scope has shrunk to brute_force_max // 2."""
        assert sc.ann is not None
        hi = self._hi
        sids = np.flatnonzero((self._scope[:hi] == sc.num) & (self._seq[:hi] >= 0))
        n = len(sids)
        cap = max(_MIN_BLOCK, 2 * n)
        block = np.empty((cap, self.dim), dtype=self._block_dtype)
        rows = np.empty(cap, np.int64)
        if n:
            block[:n] = self._ann_vectors(sc.ann, sids)
        rows[:n] = sids
        self._pos[sids] = np.arange(n)
        sc.ann, sc.block, sc.rows, sc.n = None, block, rows, n

    def _detach(self, sc: _Scope, sid: int) -> None:
        """Take the sid's vector out of its scope (the caller has released the sid)."""
        if sc.ann is not None:
            sc.ann.remove(sid)
            sc.n -= 1
            if sc.n and sc.n <= self.brute_force_max // 2:
                self._demote(sc)
        else:
            row, last = int(self._pos[sid]), sc.n - 1
            if row != last:  # keep the block dense: move the last row into the hole
                sc.block[row] = sc.block[last]
                moved = int(sc.rows[last])
                sc.rows[row] = moved
                self._pos[moved] = row
            sc.n = last
            cap = sc.block.shape[0]
            if cap > _MIN_BLOCK and cap >= 4 * last:  # give memory back after a large shrink
                keep = max(_MIN_BLOCK, 2 * last)
                sc.block, sc.rows = sc.block[:keep].copy(), sc.rows[:keep].copy()
        if not sc.n:
            self._drop_scope(sc)

    def _drop_scope(self, sc: _Scope) -> None:
        self._scopes.pop(sc.digest, None)
        self._scope_by_num.pop(sc.num, None)
        digests = self._ns_scopes.get(sc.namespace)
        if digests is not None:
            digests.discard(sc.digest)
            if not digests:
                del self._ns_scopes[sc.namespace]
        sc.ann, sc.block, sc.rows, sc.n = None, None, None, 0

    # -- internals: search ----------------------------------------------------------------------

    def _search_block(
        self, sc: _Scope, q: np.ndarray, k: int, now: float
    ) -> tuple[list[tuple[float, SemanticEntry]], list[int]]:
        n = sc.n
        want = min(n, k + 2)  # a little headroom for expired rows, refetched in full if short
        rows, expires = sc.rows, self._expires
        while True:
            idx, scores = topk_dot(q, sc.block[:n], want)
            found: list[tuple[float, SemanticEntry]] = []
            dead: list[int] = []
            for i, s in zip(idx, scores, strict=True):
                sid = int(rows[i])
                if expires[sid] <= now:
                    dead.append(sid)
                elif len(found) < k:
                    found.append((s, self._entry(sid)))
            if len(found) >= k or want >= n:
                return found, dead
            want = n

    def _search_ann(
        self, sc: _Scope, q: np.ndarray, k: int, now: float
    ) -> tuple[list[tuple[float, SemanticEntry]], list[int]]:
        self.ann_searches += 1
        assert sc.ann is not None
        want = max(self.ann_candidates, k)
        labels = sc.ann.search(self._to_ann(q), want, threads=1).keys
        if not len(labels):
            return [], []
        # exact rescoring of the candidates with the brute-force kernel: same scores, same order
        idx, scores = topk_dot(q, self._ann_vectors(sc.ann, labels), len(labels))
        found: list[tuple[float, SemanticEntry]] = []
        dead: list[int] = []
        expires, seq, scope = self._expires, self._seq, self._scope
        for i, s in zip(idx, scores, strict=True):
            sid = int(labels[i])
            if seq[sid] < 0 or scope[sid] != sc.num:  # not expected: removed keys are not found
                continue
            if expires[sid] <= now:
                dead.append(sid)
            elif len(found) < k:
                found.append((s, self._entry(sid)))
        return found, dead

    def _to_ann(self, vecs: np.ndarray) -> np.ndarray:
        """Rows (or one vector) as handed to usearch: i8 quantised here, floats as they are."""
        return _quantize_i8(vecs) if self.dtype == "i8" else vecs

    def _ann_raw(self, ann: Index, labels: Any) -> np.ndarray:
        """The stored rows of ``labels``, in the index dtype (int8 rows are not normalised)."""
        keys = np.ascontiguousarray(labels, dtype=np.uint64)
        try:
            # Index.get wraps this call with per-key Python casts: 67 us vs 32 us for 16 keys;
            # joining the rows' buffers is 2 us where np.stack takes 17 (16 rows)
            raw: Any = ann._compiled.get_many(keys, _USEARCH_KIND[self.dtype])
            rows = np.frombuffer(b"".join(raw), dtype=self._np_dtype)
            return rows.reshape(len(keys), self.dim)
        except (AttributeError, TypeError):  # another usearch version: the public API
            got: Any = ann.get(keys)
            return np.stack(got).astype(self._np_dtype, copy=False)

    def _ann_vectors(self, ann: Index, labels: Any) -> np.ndarray:
        """The stored rows of ``labels`` as unit float vectors (for rescoring and demotion)."""
        raw = self._ann_raw(ann, labels)
        if self.dtype != "i8":
            return raw
        v = raw.astype(np.float32)
        v /= np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
        return v

    def _gather_vectors(self, sids: np.ndarray) -> np.ndarray:
        """Rows of ``sids`` as unit vectors of the snapshot dtype (the block dtype: i8 rows go
        out as float16, which an i8 index quantises back to the same bytes)."""
        out = np.empty((len(sids), self.dim), dtype=self._block_dtype)
        if not len(sids):
            return out
        nums = self._scope[sids]
        order = np.argsort(nums, kind="stable")
        bounds = np.flatnonzero(np.diff(nums[order])) + 1
        for part in np.split(order, bounds):
            sc = self._scope_by_num[int(nums[part[0]])]
            if sc.ann is None:
                out[part] = sc.block[self._pos[sids[part]]]
            else:
                for c in range(0, len(part), _VEC_CHUNK):
                    chunk = part[c : c + _VEC_CHUNK]
                    out[chunk] = self._ann_vectors(sc.ann, sids[chunk])
        return out


def _quantize_i8(vecs: np.ndarray) -> np.ndarray:
    """Float rows (or one vector) -> int8 with a per-row scale: the largest component maps to
    +-127. usearch's own f32 -> i8 cast is ``round(x * 127)`` of the normalised row, which keeps
    only 2 to 3 levels per component of a 384-d unit vector; int8 input is stored as given.
    Cosine does not see the scale, so it need not be kept."""
    v = np.asarray(vecs, dtype=np.float32)
    peak = np.abs(v).max(axis=-1, keepdims=True)
    return np.rint(v * (np.float32(127.0) / peak)).astype(np.int8)


def _ann_node_overhead(connectivity: int) -> int:
    """usearch HNSW bytes per entry besides the vector (see _ANN_NODE_OVERHEAD)."""
    return _ANN_NODE_OVERHEAD + 8 * (connectivity - DEFAULT_CONNECTIVITY)


def _obj_size(obj: bytes | str) -> int:
    # pymalloc rounds small objects up to 16 bytes
    return (sys.getsizeof(obj) + 15) & ~15


# -- snapshot file ------------------------------------------------------------------------------


def write_snapshot(data: SnapshotData, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename). Thread-safe with
    respect to the index it came from (it only reads ``data``).

    Format v2: ``MAGIC | u32 header length | header JSON | meta | vectors``. The header holds
    version, dim, dtype, count, the section lengths and CRC-32s of meta and vectors. Meta: u32
    length and JSON of the names (scopes as [hex digest, namespace], tiers), then little-endian
    binary columns in entry order (oldest first): key lengths u32, text byte lengths u32, scope
    index i32, tier index u8,
    max_tokens i64 (INT64_MIN = none), created f64, expires f64, then the keys concatenated and
    the UTF-8 texts (surrogatepass) concatenated. Vectors: ``count x dim`` little-endian floats.
    No pickle: a snapshot file is data, never code.
    """
    path = Path(path)
    count = len(data)
    enc = [t.encode("utf-8", "surrogatepass") for t in data.texts]
    key_len = np.fromiter(map(len, data.keys), np.uint32, count)
    text_len = np.fromiter(map(len, enc), np.uint32, count)
    cols = [
        key_len.astype("<u4"),
        text_len.astype("<u4"),
        np.asarray(data.scope_idx, "<i4"),
        np.asarray(data.tier_idx, "u1"),
        np.asarray(data.max_tokens, "<i8"),
        np.asarray(data.created, "<f8"),
        np.asarray(data.expires, "<f8"),
    ]
    names = orjson.dumps({"scopes": [[d.hex(), ns] for d, ns in data.scopes],
                          "tiers": data.tiers})
    meta = b"".join([struct.pack("<I", len(names)), names, *(c.tobytes() for c in cols),
                     b"".join(data.keys), b"".join(enc)])
    del enc
    vectors = np.ascontiguousarray(data.vectors, dtype=f"<{np.dtype(data.vectors.dtype).char}")
    vec_bytes = memoryview(vectors.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    header = orjson.dumps(
        {
            "format": "edge-proxy-semantic-index",
            "version": SNAPSHOT_VERSION,
            "dim": data.dim,
            "dtype": data.dtype,
            "index_dtype": data.index_dtype or data.dtype,
            "count": count,
            "meta_len": len(meta),
            "vec_len": vec_bytes.nbytes,
            "meta_crc32": zlib.crc32(meta),
            "vec_crc32": zlib.crc32(vec_bytes),
            "written": time.time(),
        }
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{id(data)}")
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


def _parse_snapshot(data: bytes, path: Any) -> SnapshotData:
    m = len(SNAPSHOT_MAGIC)
    if len(data) < m + 4 or data[:m] != SNAPSHOT_MAGIC:
        raise SnapshotError(f"{path} is not a semantic index snapshot (bad magic)")
    (hlen,) = struct.unpack_from("<I", data, m)
    start = m + 4
    try:
        header = orjson.loads(data[start : start + hlen])
        version, dim, dtype = header["version"], header["dim"], header["dtype"]
        mlen, vlen, count = header["meta_len"], header["vec_len"], header["count"]
        mcrc, vcrc = header["meta_crc32"], header["vec_crc32"]
        index_dtype = header.get("index_dtype", dtype)  # absent before i8 indexes
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise SnapshotError(f"snapshot {path}: unreadable header ({exc})") from exc
    if version not in (1, SNAPSHOT_VERSION):
        raise SnapshotError(f"snapshot {path}: version {version}, expected {SNAPSHOT_VERSION}")
    if dtype not in _DTYPES or index_dtype not in _DTYPES:
        raise SnapshotError(f"snapshot {path}: unknown dtype {dtype!r} / {index_dtype!r}")
    try:
        mstart = start + hlen
        vstart = mstart + mlen
        item = np.dtype(_DTYPES[dtype]).itemsize
        ok = (isinstance(count, int) and isinstance(dim, int) and dim > 0 and count >= 0
              and isinstance(mlen, int) and mlen >= 0 and isinstance(vlen, int)
              and len(data) == vstart + vlen and vlen == count * dim * item)
    except TypeError:
        ok = False
    if not ok:
        raise SnapshotError(f"snapshot {path}: truncated or wrong size")
    meta_raw = memoryview(data)[mstart:vstart]
    vec_raw = memoryview(data)[vstart:]
    if zlib.crc32(meta_raw) != mcrc or zlib.crc32(vec_raw) != vcrc:
        raise SnapshotError(f"snapshot {path}: checksum mismatch (corrupt file)")
    vecs = np.frombuffer(vec_raw, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
    vecs = vecs.reshape(count, dim)
    try:
        if version == 1:
            snap = _parse_v1(orjson.loads(meta_raw), dim, dtype, count, vecs)
        else:
            snap = _parse_v2(meta_raw, dim, dtype, count, vecs)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError,
            struct.error) as exc:
        raise SnapshotError(f"snapshot {path}: malformed entry records ({exc})") from exc
    snap.index_dtype = index_dtype
    return snap


def _parse_v2(meta: memoryview, dim: int, dtype: str, count: int,
              vecs: np.ndarray) -> SnapshotData:
    (nlen,) = struct.unpack_from("<I", meta, 0)
    names = orjson.loads(meta[4 : 4 + nlen])
    scopes = [(bytes.fromhex(d), str(ns)) for d, ns in names["scopes"]]
    tiers = [str(t) for t in names["tiers"]]
    off = 4 + nlen

    def col(dt: str) -> np.ndarray:
        nonlocal off
        a = np.frombuffer(meta, dtype=dt, count=count, offset=off)
        off += a.nbytes
        return a

    key_len, text_len = col("<u4"), col("<u4")
    scope_idx, tier_idx = col("<i4").astype(np.int32), col("u1").copy()
    max_tokens, created, expires = col("<i8").astype(np.int64), col("<f8"), col("<f8")
    klen_total, tlen_total = int(key_len.sum(dtype=np.int64)), int(text_len.sum(dtype=np.int64))
    if off + klen_total + tlen_total != len(meta):
        raise ValueError("meta section length does not match its columns")
    if count and (scope_idx.min() < 0 or scope_idx.max() >= len(scopes)
                  or int(tier_idx.max()) >= len(tiers)):
        raise ValueError("scope or tier index out of range")
    if any(len(d) != SCOPE_BYTES for d, _ in scopes):
        raise ValueError("bad scope digest")
    blob = meta.tobytes()
    kend = np.cumsum(key_len, dtype=np.int64) + off
    kstart = kend - key_len
    keys = [blob[a:b] for a, b in zip(kstart.tolist(), kend.tolist(), strict=True)]
    tbase = off + klen_total
    tend = np.cumsum(text_len, dtype=np.int64) + tbase
    tstart = tend - text_len
    texts = [blob[a:b].decode("utf-8", "surrogatepass")
             for a, b in zip(tstart.tolist(), tend.tolist(), strict=True)]
    return SnapshotData(dim, dtype, scopes, tiers, keys, texts, scope_idx, tier_idx, max_tokens,
                        created.astype(np.float64), expires.astype(np.float64), vecs)


def _parse_v1(meta: dict[str, Any], dim: int, dtype: str, count: int,
              vecs: np.ndarray) -> SnapshotData:
    digests = [bytes.fromhex(s) for s in meta["scopes"]]
    records = meta["entries"]
    if len(records) != count:
        raise ValueError("entry count differs from the header")
    scopes: dict[tuple[bytes, str], int] = {}
    tiers: dict[str, int] = {}
    scope_idx = np.fromiter((scopes.setdefault((digests[r[1]], r[2]), len(scopes))
                             for r in records), np.int32, count)
    tier_idx = np.fromiter((tiers.setdefault(r[4], len(tiers)) for r in records), np.uint8,
                           count)
    return SnapshotData(
        dim, dtype, list(scopes), list(tiers),
        [bytes.fromhex(r[0]) for r in records], [str(r[3]) for r in records],
        scope_idx, tier_idx,
        np.fromiter((_NO_MAX_TOKENS if r[5] is None else int(r[5]) for r in records),
                    np.int64, count),
        np.fromiter((float(r[6]) for r in records), np.float64, count),
        np.fromiter((float(r[7]) for r in records), np.float64, count),
        vecs,
    )


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
