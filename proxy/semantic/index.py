"""SemanticIndex: stored query vectors, partitioned by scope, searched for the nearest answer.

The API (add, search, remove, purge, expire, snapshots) over three parts: ``slots`` (per-entry
columns, free list, FIFO), ``scope`` (one partition's vectors, block or ANN) and ``snapshot``
(the file format). Design and measurements: ARCHITECTURE.md ("Semantic index").

Lifetime: at most ``capacity`` entries; adding to a full index evicts the **oldest inserted**
entries first (FIFO; a replace counts as a new insertion), ``capacity // EVICT_BATCH_DIVISOR`` at
once. An entry's ``expires`` is capped at ``created + ttl_s``; search never returns an expired
entry and drops those it meets; ``expire()`` reclaims the rest with one vectorised scan.

Threading: not thread-safe; used from the event-loop thread only (a search costs microseconds
to a few hundred, below the cost of a hop to a worker thread). ``snapshot_data()`` copies what
a snapshot needs on the loop thread; ``write_snapshot`` can then run in a worker. ``load()``
runs in a worker thread before the index is published (proxy/semantic/cache.py).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from proxy.semantic.scope import (
    DEFAULT_CONNECTIVITY,
    DEFAULT_EXPANSION_ADD,
    DEFAULT_EXPANSION_SEARCH,
    DTYPES,
    SCOPE_BYTES,
    AnnScope,
    BlockScope,
    PendingBuild,
    Scope,
    ScopeParams,
)
from proxy.semantic.slots import COLUMN_BYTES, NO_MAX_TOKENS, Slots, obj_size
from proxy.semantic.snapshot import SnapshotData, SnapshotError, read_snapshot, write_snapshot

__all__ = ["EVICT_BATCH_DIVISOR", "SemanticEntry", "SemanticIndex"]

DEFAULT_DTYPE: Final = "i8"
# Python-side bytes of one entry besides its key and query-text objects: the dict entry of
# key -> sid (~60 B averaged over the dict's load factor), the sid int (32 B), the numpy columns
# (45 B), the two list pointers (16 B) and the FIFO ring (12-24 B). Checked against tracemalloc in
# tests/test_semantic.py::test_memory_estimate.
_ENTRY_OVERHEAD: Final = 180
# A full index evicts capacity // this many of its oldest entries at once (at least one): usearch
# unlinks removed nodes lazily, in one pass over the whole graph on the next add, so one eviction
# per add would pay that pass on every add (ARCHITECTURE.md).
EVICT_BATCH_DIVISOR: Final = 128
_NAMESPACE_CLASH: Final = "scope digest already belongs to another namespace"


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
        max_text_bytes: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        if dim <= 0 or capacity <= 0 or ttl_s <= 0 or brute_force_max < 1 or ann_candidates < 1:
            raise ValueError("dim, capacity, ttl_s, brute_force_max, ann_candidates must be > 0")
        self.dim = dim
        self.capacity = capacity
        #: bound on the key + text objects' bytes (Slots.obj_bytes); None = entries only
        self.max_text_bytes = max_text_bytes
        self.ttl_s = float(ttl_s)
        self.brute_force_max = brute_force_max
        self.ann_candidates = ann_candidates
        self.dtype = dtype
        self.params = ScopeParams(
            dim, dtype, connectivity or DEFAULT_CONNECTIVITY,
            expansion_add or DEFAULT_EXPANSION_ADD, expansion_search or DEFAULT_EXPANSION_SEARCH,
            build_threads, ann_candidates)
        self._slots = Slots(capacity)
        self._scopes: dict[bytes, Scope] = {}
        self._scope_by_num: dict[int, Scope] = {}
        self._next_scope = 0
        self._ns_scopes: dict[str, set[bytes]] = {}
        self._tiers: list[str] = []
        self._tier_num: dict[str, int] = {}
        self._evict_batch = max(1, capacity // EVICT_BATCH_DIVISOR)
        # counters for metrics (monotonic)
        self.searches = 0
        self.ann_searches = 0
        self.adds = 0
        self.evictions = 0
        self.expirations = 0
        self.removals = 0
        self.promotions = 0
        self.relinked = 0  # rows a bulk add stranded and inserted again (AnnScope.add_many)
        #: Where a growing scope's graph is built. None: in ``add``, on the caller's thread
        #: (~10 ms for 257 rows). Set (SemanticCache does, on the event loop): called with a
        #: ``PendingBuild``, it must run ``build.run()`` on another thread and then hand the
        #: result to ``finish_promotion`` on this index's thread; the scope stays a block, and
        #: is searched by brute force, until then.
        self.offload: Callable[[PendingBuild], None] | None = None

    # -- public API -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, vector: np.ndarray, entry: SemanticEntry) -> None:
        """Store ``entry`` with its query ``vector``; an entry with the same key is replaced.

        The entry's fields are copied (the object is not kept); ``expires`` is capped at
        ``created + ttl_s``. Evicts the oldest entries when the index is full.
        """
        self._check_scope(entry.scope, entry.namespace)
        vec = self._prepare(vector)
        tier = self._tier_id(entry.tier)
        old = self._slots.by_key.get(entry.key)
        if old is not None:
            self._remove_sid(old)
        if len(self._slots) >= self.capacity:
            # a batch, not one: see EVICT_BATCH_DIVISOR
            for _ in range(min(self._evict_batch, len(self._slots))):
                self._evict_oldest()
        if self.max_text_bytes is not None:
            need = obj_size(entry.key) + obj_size(entry.query_text)
            while len(self._slots) and self._slots.obj_bytes + need > self.max_text_bytes:
                self._evict_oldest()
        sc = self._scope_for(entry.scope, entry.namespace)
        sid = self._slots.new(entry.key, entry.query_text, tier, entry.max_tokens, entry.created,
                              min(entry.expires, entry.created + self.ttl_s), sc.num)
        sc.add(sid, vec)
        if isinstance(sc, BlockScope) and sc.n > self.brute_force_max:
            if self.offload is None:
                self._promote(sc)
            elif not sc.building:
                self.offload(sc.start_build())
        self.adds += 1

    def finish_promotion(self, built: PendingBuild) -> bool:
        """Make a scope whose graph was built off this thread (``offload``) an ANN scope, with
        the rows added and removed since; False (the graph is dropped) when the scope is gone
        or has shrunk back to ``brute_force_max`` meanwhile."""
        sc = built.scope
        sc.building = False
        gone = self._scope_by_num.get(sc.num) is not sc
        if gone or built.graph is None or sc.n <= self.brute_force_max:
            return False
        self._replace(AnnScope.adopt(built))
        self.promotions += 1
        return True

    def add_many(self, vectors: np.ndarray, entries: Sequence[SemanticEntry]) -> None:
        """Add a batch (snapshot load, stream replay, benchmarks): like ``add`` for each pair in
        order, but with one multi-threaded usearch insert per ANN scope instead of one per entry.
        """
        n = len(entries)
        scopes: dict[tuple[bytes, str], int] = {}
        tiers: dict[str, int] = {}
        self._add_columns(SnapshotData(
            self.dim, self.dtype, [], [],
            keys=[e.key for e in entries],
            texts=[e.query_text for e in entries],
            scope_idx=np.fromiter((scopes.setdefault((e.scope, e.namespace), len(scopes))
                                   for e in entries), np.int32, n),
            tier_idx=np.fromiter((tiers.setdefault(e.tier, len(tiers)) for e in entries),
                                 np.int64, n),
            max_tokens=np.fromiter((NO_MAX_TOKENS if e.max_tokens is None else e.max_tokens
                                    for e in entries), np.int64, n),
            created=np.fromiter((e.created for e in entries), np.float64, n),
            expires=np.fromiter((e.expires for e in entries), np.float64, n),
            vectors=vectors,
        ), list(scopes), list(tiers))

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
        if sc.is_ann:
            self.ann_searches += 1
        want = sc.first_want(k)
        while True:
            found, dead = self._collect(sc, *sc.candidates(q, want), k, now)
            if len(found) >= k or sc.exhaustive(want):
                break
            want = sc.n  # expired rows took places: refetch in full
        for sid in dead:  # expired entries met on the way are reclaimed at once
            if self._slots.live(sid):
                self._remove_sid(sid)
                self.expirations += 1
        return found

    def remove(self, key: bytes) -> bool:
        """Remove the entry stored under ``key``; False if there is none."""
        sid = self._slots.by_key.get(key)
        if sid is None:
            return False
        self._remove_sid(sid)
        self.removals += 1
        return True

    def namespace_of(self, key: bytes) -> str | None:
        """The namespace of the entry stored under ``key``, or None."""
        sid = self._slots.by_key.get(key)
        return None if sid is None else self._scope_by_num[int(self._slots.scope[sid])].namespace

    def purge_namespace(self, namespace: str) -> int:
        """Remove every entry of ``namespace`` (its scopes are dropped whole); returns the count."""
        digests = list(self._ns_scopes.get(namespace, ()))
        if not digests:
            return 0
        sids = self._slots.live_in_scopes([self._scopes[d].num for d in digests])
        for sid in sids.tolist():
            self._slots.release(sid)
        for d in digests:
            self._drop_scope(self._scopes[d])
        self.removals += len(sids)
        return len(sids)

    def expire(self, now: float | None = None) -> int:
        """Remove every entry with ``expires <= now``; returns how many were removed."""
        sids = self._slots.expired(time.time() if now is None else now)
        for sid in sids.tolist():
            if self._slots.live(sid):
                self._remove_sid(sid)
        self.expirations += len(sids)
        return len(sids)

    def entries(self) -> Iterator[SemanticEntry]:
        """Every live entry, oldest first (copies; for tools and tests, O(n))."""
        for sid in self._slots.live_fifo().tolist():
            yield self._entry(sid)

    def vector(self, key: bytes) -> np.ndarray | None:
        """The stored vector of an entry (unit length; float16 / int8 rows rescaled), or None."""
        sid = self._slots.by_key.get(key)
        if sid is None:
            return None
        v = self._gather_vectors(np.array([sid], np.int64))[0].astype(np.float32)
        return v / np.float32(np.linalg.norm(v))

    def memory_bytes(self) -> int:
        """Estimate of the memory held: vectors, ANN graphs and per-entry Python bookkeeping."""
        vectors = sum(sc.nbytes() for sc in self._scopes.values())
        per_entry = _ENTRY_OVERHEAD - COLUMN_BYTES - 24 - 16  # columns and pointers counted below
        return (vectors + self._slots.nbytes() + self._slots.obj_bytes
                + per_entry * len(self))

    def set_expansion_search(self, ef: int) -> None:
        """Change the HNSW search depth of every ANN scope (and of future ones)."""
        if ef < 1:
            raise ValueError("expansion_search must be > 0")
        self.params.expansion_search = ef
        for sc in self._scopes.values():
            if isinstance(sc, AnnScope):
                sc.set_expansion_search(ef)

    def stats(self) -> dict[str, int]:
        """Gauges and counters for /metrics and the admin endpoint."""
        return {
            "entries": len(self),
            "scopes": len(self._scopes),
            "ann_scopes": sum(1 for s in self._scopes.values() if s.is_ann),
            "ann_relinked": self.relinked,
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
        s = self._slots
        sids = s.live_fifo()
        nums, scope_idx = np.unique(s.scope[sids], return_inverse=True)
        scopes = [(self._scope_by_num[n].digest, self._scope_by_num[n].namespace)
                  for n in nums.tolist()]
        sid_list = sids.tolist()
        keys, texts = s.keys, s.texts
        return SnapshotData(
            dim=self.dim,
            dtype="f16" if self.dtype == "i8" else self.dtype,
            scopes=scopes,
            tiers=list(self._tiers),
            keys=[keys[i] for i in sid_list],
            texts=[texts[i] for i in sid_list],
            scope_idx=scope_idx.astype(np.int32).reshape(-1),
            tier_idx=s.tier[sids],
            max_tokens=s.maxtok[sids],
            created=s.created[sids],
            expires=s.expires[sids],
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
        data = read_snapshot(path)
        if kwargs.setdefault("dim", data.dim) != data.dim:
            raise SnapshotError(f"snapshot {path} has dim {data.dim}, expected {kwargs['dim']}")
        kwargs.setdefault("dtype", data.index_dtype or data.dtype)
        index = cls(**kwargs)
        now = time.time() if now is None else now
        live = data.select(np.flatnonzero(data.expires > now))
        if len(live):
            index._add_columns(live, live.scopes, live.tiers)
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

    def _check_scope(self, digest: bytes, namespace: str) -> None:
        if len(digest) != SCOPE_BYTES:
            raise ValueError(f"scope must be {SCOPE_BYTES} bytes, got {len(digest)}")
        sc = self._scopes.get(digest)
        if sc is not None and sc.namespace != namespace:
            # keys.py hashes the namespace into the scope; purge_namespace relies on it
            raise ValueError(_NAMESPACE_CLASH)

    def _tier_id(self, tier: str) -> int:
        t = self._tier_num.get(tier)
        if t is None:
            if len(self._tiers) >= 255:
                raise ValueError("more than 255 distinct tiers")
            t = self._tier_num[tier] = len(self._tiers)
            self._tiers.append(sys.intern(tier))
        return t

    def _entry(self, sid: int) -> SemanticEntry:
        s = self._slots
        sc = self._scope_by_num[int(s.scope[sid])]
        mt = int(s.maxtok[sid])
        key, text = s.keys[sid], s.texts[sid]
        assert key is not None and text is not None
        return SemanticEntry(
            key, sc.digest, sc.namespace, text, self._tiers[s.tier[sid]],
            None if mt == NO_MAX_TOKENS else mt, float(s.created[sid]), float(s.expires[sid]))

    def _collect(self, sc: Scope, sids: list[int], scores: list[float], k: int,
                 now: float) -> tuple[list[tuple[float, SemanticEntry]], list[int]]:
        """Up to ``k`` live entries of the candidates, and the expired ones met."""
        found: list[tuple[float, SemanticEntry]] = []
        dead: list[int] = []
        s = self._slots
        expires, seq, scope = s.expires, s.seq, s.scope
        for sid, score in zip(sids, scores, strict=True):
            if seq[sid] < 0 or scope[sid] != sc.num:  # not expected: removed keys are not found
                continue
            if expires[sid] <= now:
                dead.append(sid)
            elif len(found) < k:
                found.append((score, self._entry(sid)))
        return found, dead

    def _remove_sid(self, sid: int) -> None:
        sc = self._scope_by_num[int(self._slots.scope[sid])]
        self._slots.release(sid)
        sc.remove(sid)
        if not sc.n:
            self._drop_scope(sc)
        elif isinstance(sc, AnnScope) and sc.n <= self.brute_force_max // 2:
            self._replace(sc.demote())

    def _evict_oldest(self) -> None:
        self._remove_sid(self._slots.pop_oldest())
        self.evictions += 1

    # -- internals: batch insert ----------------------------------------------------------------

    def _add_columns(self, data: SnapshotData, scopes: Sequence[tuple[bytes, str]],
                     tiers: Sequence[str]) -> None:
        """Insert ``data``'s entries (names of its scope and tier indexes: ``scopes``, ``tiers``)
        in order, as ``add`` would one by one, with one usearch insert per ANN scope."""
        vecs = self._prepare_rows(data.vectors, len(data))
        for digest, ns in scopes:
            self._check_scope(digest, ns)
        if len({d for d, _ in scopes}) != len(scopes):
            raise ValueError(_NAMESPACE_CLASH)
        tier_map = np.array([self._tier_id(t) for t in tiers] or [0], np.uint8)
        order = self._newest_per_key(data.keys)
        for i in order.tolist():
            old = self._slots.by_key.get(data.keys[i])
            if old is not None:
                self._remove_sid(old)
        # the batch is newer than everything stored, so FIFO eviction can be done up front
        while len(self._slots) and len(self._slots) + len(order) > self.capacity:
            self._evict_oldest()
        scope_idx = data.scope_idx[order]
        # only the scopes that keep an entry are created (no empty scope may linger)
        sc_nums = np.full(max(1, len(scopes)), -1, np.int32)
        for j in np.unique(scope_idx).tolist():
            sc_nums[j] = self._scope_for(*scopes[j]).num
        picked = order.tolist()
        s = self._slots
        sids = s.new_many([data.keys[i] for i in picked], [data.texts[i] for i in picked])
        s.created[sids] = cre = data.created[order]
        s.expires[sids] = np.minimum(data.expires[order], cre + self.ttl_s)
        s.scope[sids] = sc_nums[scope_idx]
        s.maxtok[sids] = data.max_tokens[order]
        s.tier[sids] = tier_map[data.tier_idx[order]]
        self._insert_vectors(sids, sc_nums[scope_idx], vecs[order])
        self.adds += len(order)
        if self.max_text_bytes is not None:  # the batch is the newest: the oldest go first
            while len(self._slots) > 1 and self._slots.obj_bytes > self.max_text_bytes:
                self._evict_oldest()

    def _prepare_rows(self, vectors: np.ndarray, n: int) -> np.ndarray:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(n, -1)
        if vecs.shape[1] != self.dim:
            raise ValueError(f"vectors have {vecs.shape[1]} dims, index has {self.dim}")
        norms = np.linalg.norm(vecs, axis=1)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ValueError("vectors must be finite and non-zero")
        return vecs

    def _newest_per_key(self, keys: list[bytes]) -> np.ndarray:
        """Rows to keep, ascending: a key twice keeps its last row; past capacity, the newest."""
        n = len(keys)
        last = {k: i for i, k in enumerate(keys)}
        if len(last) == n:
            return np.arange(max(0, n - self.capacity), n)
        return np.fromiter(sorted(last.values()), np.int64, len(last))[-self.capacity :]

    def _insert_vectors(self, sids: np.ndarray, nums: np.ndarray, vecs: np.ndarray) -> None:
        """Unit-normalise ``vecs`` and add each scope's share in one call (promoting a block
        that would grow past ``brute_force_max``)."""
        if not len(sids):
            return
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        groups = np.argsort(nums, kind="stable")
        bounds = np.flatnonzero(np.diff(nums[groups])) + 1
        for part in np.split(groups, bounds):
            sc = self._scope_by_num[int(nums[part[0]])]
            if isinstance(sc, BlockScope) and sc.n + len(part) > self.brute_force_max:
                sc = self._promote(sc)
            self.relinked += sc.add_many(sids[part], vecs[part])

    # -- internals: scopes ----------------------------------------------------------------------

    def _scope_for(self, digest: bytes, namespace: str) -> Scope:
        sc = self._scopes.get(digest)
        if sc is None:
            digest = bytes(digest)
            num = self._next_scope
            self._next_scope += 1
            sc = BlockScope(digest, sys.intern(namespace), num, self.params, self._slots)
            self._scopes[digest] = self._scope_by_num[num] = sc
            self._ns_scopes.setdefault(sc.namespace, set()).add(digest)
        return sc

    def _promote(self, sc: BlockScope) -> AnnScope:
        ann, relinked = sc.promote()
        self.relinked += relinked
        self._replace(ann)
        self.promotions += 1
        return ann

    def _replace(self, sc: Scope) -> None:
        self._scopes[sc.digest] = self._scope_by_num[sc.num] = sc

    def _drop_scope(self, sc: Scope) -> None:
        self._scopes.pop(sc.digest, None)
        self._scope_by_num.pop(sc.num, None)
        digests = self._ns_scopes.get(sc.namespace)
        if digests is not None:
            digests.discard(sc.digest)
            if not digests:
                del self._ns_scopes[sc.namespace]
        sc.clear()

    def _gather_vectors(self, sids: np.ndarray) -> np.ndarray:
        """Rows of ``sids`` as unit vectors of the snapshot dtype (the block dtype: i8 rows go
        out as float16, which an i8 index quantises back to the same bytes)."""
        out = np.empty((len(sids), self.dim), dtype=self.params.block_dtype)
        if not len(sids):
            return out
        nums = self._slots.scope[sids]
        order = np.argsort(nums, kind="stable")
        bounds = np.flatnonzero(np.diff(nums[order])) + 1
        for part in np.split(order, bounds):
            out[part] = self._scope_by_num[int(nums[part[0]])].vectors(sids[part])
        return out
