"""proxy.semantic.slots (columns, free list, FIFO) and proxy.semantic.scope (block <-> ANN)."""

from __future__ import annotations

import numpy as np
import pytest

from proxy.semantic.scope import AnnScope, BlockScope, ScopeParams
from proxy.semantic.slots import NO_MAX_TOKENS, Slots


def _unit(rng: np.random.Generator, n: int, d: int = 32) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_new_release_recycles_sids_and_counts_bytes() -> None:
    s = Slots(capacity=100)
    a = s.new(b"a", "first", 0, None, 1.0, 2.0, 0)
    b = s.new(b"b", "second", 1, 7, 1.0, 3.0, 0)
    assert (a, b) == (0, 1) and len(s) == 2 and s.by_key == {b"a": 0, b"b": 1}
    assert s.maxtok[a] == NO_MAX_TOKENS and s.maxtok[b] == 7
    before = s.obj_bytes
    s.release(a)
    assert not s.live(a) and s.live(b) and len(s) == 1 and s.obj_bytes < before
    assert s.keys[a] is None and s.texts[a] is None
    c = s.new(b"c", "third", 0, None, 1.0, 2.0, 0)
    assert c == a  # the freed sid is reused before a fresh one
    s.release(b)
    s.release(c)
    assert len(s) == 0 and s.obj_bytes == 0


def test_fifo_skips_freed_and_reused_sids() -> None:
    s = Slots(capacity=100)
    sids = [s.new(f"k{i}".encode(), "t", 0, None, 0.0, 1.0, 0) for i in range(5)]
    s.release(sids[0])
    s.release(sids[2])
    reused = s.new(b"again", "t", 0, None, 0.0, 1.0, 0)  # sid 2 again, now the newest
    assert reused == sids[2]
    assert s.live_fifo().tolist() == [1, 3, 4, 2]
    assert s.pop_oldest() == 1
    s.release(1)
    assert s.pop_oldest() == 3


def test_new_many_and_scans() -> None:
    s = Slots(capacity=10_000)
    sids = s.new_many([f"k{i}".encode() for i in range(3000)], ["t"] * 3000)
    s.scope[sids] = np.arange(3000) % 3
    s.expires[sids] = np.arange(3000, dtype=np.float64)
    assert len(s) == 3000 and s.live_fifo().tolist() == sids.tolist()
    assert len(s.live_in_scopes([1, 2])) == 2000
    assert s.expired(9.5).tolist() == list(range(10))
    for sid in sids[:2990].tolist():  # the ring compacts instead of growing without bound
        s.release(sid)
    s.new_many([f"x{i}".encode() for i in range(3000)], ["t"] * 3000)
    assert len(s) == 3010 and len(s._fifo_sid) <= 16384


def test_pop_oldest_on_empty_ring_is_an_error() -> None:
    with pytest.raises(AssertionError):
        Slots(capacity=4).pop_oldest()


@pytest.mark.parametrize("dtype", ["i8", "f16", "f32"])
def test_block_promotes_and_ann_demotes_with_same_vectors(dtype: str) -> None:
    rng = np.random.default_rng(1)
    vecs = _unit(rng, 40)
    s = Slots(capacity=100)
    params = ScopeParams(dim=32, dtype=dtype, build_threads=1)
    block = BlockScope(b"s" * 16, "ns", 0, params, s)
    sids = np.array([s.new(f"k{i}".encode(), "t", 0, None, 0.0, 1.0, 0) for i in range(40)])
    block.add_many(sids, vecs)
    assert block.n == 40 and block.candidates(vecs[7], 1)[0] == [int(sids[7])]
    ann, _ = block.promote()
    assert isinstance(ann, AnnScope) and ann.n == 40 and block.n == 0 and block.block is None
    assert (s.pos[sids] == -1).all()
    top, scores = ann.candidates(vecs[7], 4)
    assert top[0] == int(sids[7]) and scores[0] == pytest.approx(1.0, abs=2e-2)
    for sid in sids[:30].tolist():
        s.release(sid)
        ann.remove(sid)
    back = ann.demote()
    assert isinstance(back, BlockScope) and back.n == 10 and ann.ann is None
    assert sorted(s.pos[sids[30:]].tolist()) == list(range(10))
    got = back.vectors(sids[30:]).astype(np.float32)
    assert np.allclose(np.einsum("ij,ij->i", got, vecs[30:]), 1.0, atol=2e-2)
