"""One scope's vectors: a brute-force block or a usearch (ANN) index, behind one interface.

A *scope* (16-byte digest from proxy.keys) is a hard partition: a search only ever looks inside
one scope's own storage, so an entry of another tenant or conversation cannot come back, whatever
its vector. A small scope is a ``BlockScope``: one contiguous ``(capacity, dim)`` float16 block
searched by the native ``topk_dot`` kernel, kept dense by moving the last row into a hole. Past
``brute_force_max`` entries it ``promote``s itself to an ``AnnScope``: its own usearch index
(labels are slot ids), whose candidates are rescored exactly by the same kernel so that scores
mean the same in both; shrunk to ``brute_force_max // 2`` an ANN scope ``demote``s back to a block
(the gap avoids flapping at the boundary). Why one usearch index per large scope and no global
one with a filter, and how the parameters were chosen: ARCHITECTURE.md.

Vectors arrive as unit float32 rows. An ``i8`` index quantises each row here with its own scale
(``quantize_i8``) and uses the cosine metric, which does not see the scale; blocks stay float16
(the kernel reads float16/float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np
from usearch.compiled import ScalarKind
from usearch.index import Index

from proxy.scoring import topk_dot
from proxy.semantic.slots import Slots

SCOPE_BYTES: Final = 16  # a scope digest (proxy.keys)
DTYPES: Final = {"f16": np.float16, "f32": np.float32, "i8": np.int8}
_USEARCH_KIND: Final = {"f16": ScalarKind.F16, "f32": ScalarKind.F32, "i8": ScalarKind.I8}
DEFAULT_CONNECTIVITY: Final = 16
DEFAULT_EXPANSION_ADD: Final = 128
DEFAULT_EXPANSION_SEARCH: Final = 32
MIN_BLOCK: Final = 1  # a new scope starts with one row and doubles: small scopes stay small
# usearch HNSW node besides the vector (connectivity 16): level-0 neighbour list
# (2 * connectivity u32), the upper levels, key, level, lock bits and the key-lookup table.
# Calibrated on RSS at 1M entries (benchmarks/README.md).
_ANN_NODE_OVERHEAD: Final = 250
_VEC_CHUNK: Final = 65_536  # vectors fetched from usearch per get_many call
# Bulk ANN inserts up to this many rows run on one thread (see AnnScope.add_many): every
# promotion (brute_force_max + 1 rows) and small snapshot loads; 4096 rows take 0.6 s (real
# query vectors) to 0.8 s (random ones) on one AVX2-only core
SERIAL_BUILD_MAX: Final = 4096


@dataclass(slots=True)
class ScopeParams:
    """What every scope of one index shares."""

    dim: int
    dtype: str  # "i8", "f16" or "f32": ANN storage
    connectivity: int = DEFAULT_CONNECTIVITY
    expansion_add: int = DEFAULT_EXPANSION_ADD
    expansion_search: int = DEFAULT_EXPANSION_SEARCH
    build_threads: int = 0  # bulk ANN adds (promotion, load); 0 = all cores
    ann_candidates: int = 16

    @property
    def np_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def block_dtype(self) -> Any:
        return np.float16 if self.dtype == "i8" else DTYPES[self.dtype]

    def to_ann(self, vecs: np.ndarray) -> np.ndarray:
        """Rows (or one vector) as handed to usearch: i8 quantised here, floats as they are."""
        return quantize_i8(vecs) if self.dtype == "i8" else vecs

    def ann_node_bytes(self) -> int:
        """usearch HNSW bytes per entry besides the vector."""
        return _ANN_NODE_OVERHEAD + 8 * (self.connectivity - DEFAULT_CONNECTIVITY)


def new_graph(p: ScopeParams) -> Index:
    """An empty usearch HNSW index with the scope parameters."""
    return Index(
        ndim=p.dim,
        # unit vectors: inner product = cosine, and cheaper; i8 rows carry a per-row scale
        # (see quantize_i8), which only the cosine metric ignores
        metric="cos" if p.dtype == "i8" else "ip",
        dtype=p.dtype,
        connectivity=p.connectivity,
        expansion_add=p.expansion_add,
        expansion_search=p.expansion_search,
    )


class PendingBuild:
    """A block scope's graph being built off the index's thread (``BlockScope.start_build``).

    ``run`` may run on any thread: it reads only its own copies. usearch gives the GIL back
    between rows, so the event loop keeps running while a build takes its ~10 ms."""

    __slots__ = ("graph", "scope", "seqs", "sids", "vecs")

    def __init__(self, scope: BlockScope, sids: np.ndarray, seqs: np.ndarray,
                 vecs: np.ndarray) -> None:
        self.scope, self.sids, self.seqs, self.vecs = scope, sids, seqs, vecs
        self.graph: Index | None = None

    def run(self) -> PendingBuild:
        graph = new_graph(self.scope.params)
        # serial: a concurrent add can strand nodes (see AnnScope.add_many)
        graph.add(self.sids.astype(np.uint64), self.scope.params.to_ann(self.vecs), threads=1)
        self.graph, self.vecs = graph, self.vecs[:0]
        return self


class Scope:
    """A partition: identity (digest, namespace, number) and its ``n`` vectors' storage."""

    __slots__ = ("digest", "n", "namespace", "num", "params", "slots")
    is_ann: ClassVar[bool] = False

    def __init__(self, digest: bytes, namespace: str, num: int, params: ScopeParams,
                 slots: Slots) -> None:
        self.digest = digest
        self.namespace = namespace
        self.num = num
        self.params = params
        self.slots = slots
        self.n = 0

    def add(self, sid: int, vec: np.ndarray) -> None:
        """Store the unit vector of ``sid``."""
        raise NotImplementedError

    def add_many(self, sids: np.ndarray, vecs: np.ndarray) -> int:
        """Store a batch of unit rows; returns how many had to be inserted a second time."""
        raise NotImplementedError

    def remove(self, sid: int) -> None:
        """Take the sid's vector out (the caller has released or will release the sid)."""
        raise NotImplementedError

    def first_want(self, k: int) -> int:
        """Candidates to ask ``candidates`` for first, for ``k`` results."""
        raise NotImplementedError

    def exhaustive(self, want: int) -> bool:
        """Whether asking for more than ``want`` candidates can find more."""
        raise NotImplementedError

    def candidates(self, q: np.ndarray, want: int) -> tuple[list[int], list[float]]:
        """Up to ``want`` sids nearest to the unit query ``q``, best first, and their cosines."""
        raise NotImplementedError

    def vectors(self, sids: np.ndarray) -> np.ndarray:
        """The stored rows of ``sids`` as unit vectors in the block dtype."""
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def clear(self) -> None:
        """Let go of the storage (the scope is dropped)."""
        self.n = 0


class BlockScope(Scope):
    """Brute force over one dense float block; ``rows`` maps a block row to its sid."""

    __slots__ = ("block", "building", "rows")

    def __init__(self, digest: bytes, namespace: str, num: int, params: ScopeParams,
                 slots: Slots) -> None:
        super().__init__(digest, namespace, num, params, slots)
        self.block: np.ndarray | None = None
        self.rows: np.ndarray | None = None
        #: its graph is being built elsewhere (``start_build``): it stays a block until then
        self.building = False

    def add(self, sid: int, vec: np.ndarray) -> None:
        n = self.n
        block, rows = self.block, self.rows
        if block is None or rows is None or n == block.shape[0]:
            block, rows = self._resized(max(MIN_BLOCK, 2 * n))
        block[n] = vec
        rows[n] = sid
        self.slots.pos[sid] = n
        self.n = n + 1

    def add_many(self, sids: np.ndarray, vecs: np.ndarray) -> int:
        for sid, vec in zip(sids.tolist(), vecs, strict=True):
            self.add(sid, vec)
        return 0

    def remove(self, sid: int) -> None:
        block, rows, pos = self.block, self.rows, self.slots.pos
        assert block is not None and rows is not None
        row, last = int(pos[sid]), self.n - 1
        if row != last:  # keep the block dense: move the last row into the hole
            block[row] = block[last]
            moved = int(rows[last])
            rows[row] = moved
            pos[moved] = row
        self.n = last
        cap = block.shape[0]
        if cap > MIN_BLOCK and cap >= 4 * last:  # give memory back after a large shrink
            keep = max(MIN_BLOCK, 2 * last)
            self.block, self.rows = block[:keep].copy(), rows[:keep].copy()

    def first_want(self, k: int) -> int:
        return min(self.n, k + 2)  # a little headroom for expired rows

    def exhaustive(self, want: int) -> bool:
        return want >= self.n

    def candidates(self, q: np.ndarray, want: int) -> tuple[list[int], list[float]]:
        assert self.block is not None and self.rows is not None
        idx, scores = topk_dot(q, self.block[: self.n], want)
        return self.rows[idx].tolist(), scores

    def vectors(self, sids: np.ndarray) -> np.ndarray:
        assert self.block is not None
        return self.block[self.slots.pos[sids]]

    def nbytes(self) -> int:
        if self.block is None or self.rows is None:
            return 0
        return int(self.block.nbytes + self.rows.nbytes)

    def promote(self) -> tuple[AnnScope, int]:
        """This scope's entries in a new usearch index (see ``AnnScope.add_many``), and the
        rows that build relinked."""
        ann = AnnScope(self.digest, self.namespace, self.num, self.params, self.slots)
        relinked = 0
        if self.n:
            assert self.block is not None and self.rows is not None
            relinked = ann.add_many(self.rows[: self.n], self.block[: self.n])
        self.clear()
        return ann, relinked

    def start_build(self) -> PendingBuild:
        """A copy of this scope's rows and a function that builds their graph on any thread
        (it touches nothing shared); ``AnnScope.adopt`` turns the result into this scope's
        ANN scope later, on the index's thread, with what changed meanwhile."""
        assert self.block is not None and self.rows is not None
        sids = self.rows[: self.n].copy()
        build = PendingBuild(self, sids, self.slots.seq[sids].copy(), self.block[: self.n].copy())
        self.building = True
        return build

    def clear(self) -> None:
        self.block = self.rows = None
        self.n = 0

    def _resized(self, cap: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.n
        block = np.empty((cap, self.params.dim), dtype=self.params.block_dtype)
        rows = np.empty(cap, np.int64)
        if n:
            assert self.block is not None and self.rows is not None
            block[:n] = self.block[:n]
            rows[:n] = self.rows[:n]
        self.block, self.rows = block, rows
        return block, rows


class AnnScope(Scope):
    """One usearch HNSW index; labels are sids; candidates are rescored exactly."""

    __slots__ = ("ann",)
    is_ann: ClassVar[bool] = True

    def __init__(self, digest: bytes, namespace: str, num: int, params: ScopeParams,
                 slots: Slots) -> None:
        super().__init__(digest, namespace, num, params, slots)
        self.ann: Index | None = new_graph(params)

    @classmethod
    def adopt(cls, built: PendingBuild) -> AnnScope:
        """The ANN scope of ``built.scope`` from the graph built off the index's thread, with
        the changes made meanwhile: rows removed or replaced since the copy leave the graph,
        rows added since go in (serially). The block's live rows are the truth."""
        block, ann = built.scope, built.graph
        assert ann is not None and block.rows is not None and block.block is not None
        live = block.rows[: block.n]
        same = np.isin(live, built.sids)
        # a sid in both may have been freed and reused: its sequence number tells
        seq_of = dict(zip(built.sids.tolist(), built.seqs.tolist(), strict=True))
        seqs = block.slots.seq[live]
        for i in np.flatnonzero(same).tolist():
            same[i] = seq_of[int(live[i])] == int(seqs[i])
        kept = set(live[same].tolist())
        gone = np.fromiter((s for s in built.sids.tolist() if s not in kept), np.uint64)
        if len(gone):
            ann.remove(gone)
        new = np.flatnonzero(~same)
        if len(new):
            ann.add(live[new].astype(np.uint64), block.params.to_ann(block.block[new]),
                    threads=1)
        sc = cls.__new__(cls)
        Scope.__init__(sc, block.digest, block.namespace, block.num, block.params, block.slots)
        sc.ann = ann
        ann.expansion_search = block.params.expansion_search  # type: ignore[misc]
        sc.slots.pos[live] = -1
        sc.n = block.n
        block.clear()
        return sc

    def _index(self) -> Index:
        assert self.ann is not None
        return self.ann

    def add(self, sid: int, vec: np.ndarray) -> None:
        self._index().add(sid, self.params.to_ann(vec), threads=1)
        self.slots.pos[sid] = -1
        self.n += 1

    def add_many(self, sids: np.ndarray, vecs: np.ndarray) -> int:
        """Bulk insert; returns the rows relinked. usearch's concurrent ``add`` can leave a node
        stored but unreachable by any search (unum-cloud/USearch#735): measured here, a 257-row
        promotion stranded 1.3 rows per build on random vectors, a serial build none. So a bulk
        add up to ``SERIAL_BUILD_MAX`` rows (every promotion) is serial; a larger one (a
        snapshot load) is multi-threaded and then relinked: each row must find itself, and any
        that cannot is removed and inserted again, serially."""
        ann, keys, rows = self._index(), sids.astype(np.uint64), self.params.to_ann(vecs)
        threads, relinked = self.params.build_threads, 0
        if len(keys) <= SERIAL_BUILD_MAX or threads == 1:
            ann.add(keys, rows, threads=1)
        else:
            ann.add(keys, rows, threads=threads)
            relinked = self._relink(keys, rows, threads)
        self.slots.pos[sids] = -1
        self.n += len(sids)
        return relinked

    def _relink(self, keys: np.ndarray, rows: np.ndarray, threads: int) -> int:
        """Insert again, one by one, the rows that a search for their own vector misses."""
        found = self._index().search(rows, 1, threads=threads).keys
        lost = found.reshape(len(keys), -1)[:, 0] != keys
        if lost.any():
            self._index().remove(keys[lost])
            self._index().add(keys[lost], rows[lost], threads=1)
        return int(lost.sum())

    def remove(self, sid: int) -> None:
        self._index().remove(sid)
        self.n -= 1

    def first_want(self, k: int) -> int:
        return max(self.params.ann_candidates, k)

    def exhaustive(self, want: int) -> bool:
        return True  # one usearch query; a deeper one is set_expansion_search's business

    def candidates(self, q: np.ndarray, want: int) -> tuple[list[int], list[float]]:
        labels = self._index().search(self.params.to_ann(q), want, threads=1).keys
        if not len(labels):
            return [], []
        # exact rescoring of the candidates with the brute-force kernel: same scores, same order
        idx, scores = topk_dot(q, self._unit_rows(labels), len(labels))
        return labels[idx].tolist(), scores

    def vectors(self, sids: np.ndarray) -> np.ndarray:
        p = self.params
        out = np.empty((len(sids), p.dim), dtype=p.block_dtype)
        for c in range(0, len(sids), _VEC_CHUNK):
            out[c : c + _VEC_CHUNK] = self._unit_rows(sids[c : c + _VEC_CHUNK])
        return out

    def nbytes(self) -> int:
        p = self.params
        return len(self._index()) * (p.dim * np.dtype(p.np_dtype).itemsize + p.ann_node_bytes())

    def set_expansion_search(self, ef: int) -> None:
        self._index().expansion_search = ef  # type: ignore[misc]  # (it has a setter)

    def demote(self) -> BlockScope:
        """This scope's entries as a block (its live sids come from the slot columns)."""
        slots = self.slots
        hi = slots.hi
        sids = np.flatnonzero((slots.scope[:hi] == self.num) & (slots.seq[:hi] >= 0))
        block = BlockScope(self.digest, self.namespace, self.num, self.params, slots)
        n = len(sids)
        blk, rows = block._resized(max(MIN_BLOCK, 2 * n))
        if n:
            blk[:n] = self._unit_rows(sids)
        rows[:n] = sids
        slots.pos[sids] = np.arange(n)
        block.n = n
        self.clear()
        return block

    def clear(self) -> None:
        self.ann = None
        self.n = 0

    def _raw_rows(self, labels: Any) -> np.ndarray:
        """The stored rows of ``labels``, in the index dtype (int8 rows are not normalised)."""
        p, ann = self.params, self._index()
        keys = np.ascontiguousarray(labels, dtype=np.uint64)
        try:
            # Index.get wraps this call with per-key Python casts (2x slower for 16 keys), and
            # joining the rows' buffers is faster than np.stack (benchmarks/README.md)
            raw: Any = ann._compiled.get_many(keys, _USEARCH_KIND[p.dtype])
            rows = np.frombuffer(b"".join(raw), dtype=p.np_dtype)
            return rows.reshape(len(keys), p.dim)
        except (AttributeError, TypeError):  # another usearch version: the public API
            got: Any = ann.get(keys)
            return np.stack(got).astype(p.np_dtype, copy=False)

    def _unit_rows(self, labels: Any) -> np.ndarray:
        """The stored rows of ``labels`` as unit float vectors (for rescoring and demotion)."""
        raw = self._raw_rows(labels)
        if self.params.dtype != "i8":
            return raw
        v = raw.astype(np.float32)
        v /= np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
        return v


def quantize_i8(vecs: np.ndarray) -> np.ndarray:
    """Float rows (or one vector) -> int8 with a per-row scale: the largest component maps to
    +-127. usearch's own f32 -> i8 cast is ``round(x * 127)`` of the normalised row, which keeps
    only 2 to 3 levels per component of a 384-d unit vector; int8 input is stored as given.
    Cosine does not see the scale, so it need not be kept."""
    v = np.asarray(vecs, dtype=np.float32)
    peak = np.abs(v).max(axis=-1, keepdims=True)
    return np.rint(v * (np.float32(127.0) / peak)).astype(np.int8)
