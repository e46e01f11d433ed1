"""The semantic layer: embed a query, search its scope for a stored paraphrase, verify the pair.

Modules, bottom up (none imports one further down the list):

* ``slots``: per-entry columns indexed by slot id, with a free list and the FIFO ring;
* ``scope``: one partition's vectors, a brute-force block or a usearch (ANN) index behind one
  interface; a block promotes itself to ANN past ``brute_force_max``, an ANN scope demotes;
* ``snapshot``: the snapshot file format, its writer and readers;
* ``index``: ``SemanticIndex``, the API (add, search, remove, expire, snapshots) over the three;
* ``model``: where the embedding model is (or is built); ``embedder``: sentence vectors in
  worker threads; ``features``: what must match between two texts; ``verifier``: guards and
  the learned model over those; ``cache``: the layer the request path calls (embed, search,
  verify, fetch).

Design notes and measurements: ARCHITECTURE.md and benchmarks/README.md.
"""

from proxy.semantic import _preload  # noqa: F401  (before usearch loads: see _preload)
from proxy.semantic.index import EVICT_BATCH_DIVISOR, SemanticEntry, SemanticIndex
from proxy.semantic.snapshot import SnapshotData, SnapshotError, write_snapshot

__all__ = [
    "EVICT_BATCH_DIVISOR",
    "SemanticEntry",
    "SemanticIndex",
    "SnapshotData",
    "SnapshotError",
    "write_snapshot",
]
