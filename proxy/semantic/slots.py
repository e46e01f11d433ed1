"""Per-entry columns of the semantic index, indexed by slot id, with a free list and a FIFO ring.

Entries are not Python objects: each live entry has a *slot id* (``sid``, recycled through the
free list) and its fields live in numpy columns indexed by sid (created, expires, insertion
sequence, scope number, block row, max_tokens, tier number: 45 bytes) and two Python lists (key,
query text). ``key -> sid`` is one dict. The FIFO order is a ring of ``(sid, seq)`` pairs in
insertion order; a pair is stale once the sid's sequence number has moved on (freed or reused),
and stale pairs are dropped lazily. Not thread-safe (the event-loop thread owns the index).
"""

from __future__ import annotations

import sys
from typing import Final

import numpy as np

#: ``max_tokens`` column value for "no limit".
NO_MAX_TOKENS: Final = np.iinfo(np.int64).min
#: Bytes of the per-sid numpy columns (created, expires, seq, scope, pos, maxtok, tier).
COLUMN_BYTES: Final = 8 + 8 + 8 + 4 + 8 + 8 + 1


def obj_size(obj: bytes | str) -> int:
    """Bytes a key or text object holds (pymalloc rounds small objects up to 16 bytes)."""
    return (sys.getsizeof(obj) + 15) & ~15


class Slots:
    """Columns, free list, ``key -> sid`` and the FIFO ring (see the module docstring)."""

    __slots__ = ("_fifo_head", "_fifo_seq", "_fifo_sid", "_fifo_tail", "_free", "_next_seq",
                 "by_key", "capacity", "created", "expires", "hi", "keys", "maxtok",
                 "obj_bytes", "pos", "scope", "seq", "texts", "tier")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # columns grow by doubling up to this many sids
        self.hi = 0  # sids in [0, hi) have been handed out at least once
        self.keys: list[bytes | None] = []
        self.texts: list[str | None] = []
        self.created = np.empty(0, np.float64)
        self.expires = np.empty(0, np.float64)
        self.seq = np.empty(0, np.int64)  # insertion sequence; -1 = free sid
        self.scope = np.empty(0, np.int32)  # scope number
        self.pos = np.empty(0, np.int64)  # block row (block scope) or -1 (ANN: label = sid)
        self.maxtok = np.empty(0, np.int64)
        self.tier = np.empty(0, np.uint8)
        self.by_key: dict[bytes, int] = {}
        self.obj_bytes = 0  # running sum of key + text object sizes
        self._free: list[int] = []
        self._next_seq = 0
        self._fifo_sid = np.empty(1024, np.int32)
        self._fifo_seq = np.empty(1024, np.int64)
        self._fifo_head = 0
        self._fifo_tail = 0

    def __len__(self) -> int:
        return len(self.by_key)

    # -- allocation -----------------------------------------------------------------------------

    def alloc(self, count: int) -> list[int]:
        """``count`` free sids, recycled ones first (most recently freed last out)."""
        reuse = self._free[-count:] if count else []
        del self._free[len(self._free) - len(reuse):]
        fresh = count - len(reuse)
        self._grow(self.hi + fresh)
        out = reuse[::-1] + list(range(self.hi, self.hi + fresh))
        self.hi += fresh
        grow = self.hi - len(self.keys)
        if grow > 0:
            self.keys.extend([None] * grow)
            self.texts.extend([None] * grow)
        return out

    def new(self, key: bytes, text: str, tier: int, max_tokens: int | None,
            created: float, expires: float, scope_num: int) -> int:
        """Store one entry's fields in a fresh sid, newest in the FIFO; returns the sid."""
        sid = self.alloc(1)[0]
        self.keys[sid] = key
        self.texts[sid] = text
        self.by_key[key] = sid
        self.obj_bytes += obj_size(key) + obj_size(text)
        self.created[sid] = created
        self.expires[sid] = expires
        self.scope[sid] = scope_num
        self.maxtok[sid] = NO_MAX_TOKENS if max_tokens is None else max_tokens
        self.tier[sid] = tier
        self.seq[sid] = seq = self._next_seq
        self._next_seq += 1
        if self._fifo_tail >= len(self._fifo_sid):
            self._fifo_compact(1)
        t = self._fifo_tail
        self._fifo_sid[t] = sid
        self._fifo_seq[t] = seq
        self._fifo_tail = t + 1
        return sid

    def new_many(self, keys: list[bytes], texts: list[str]) -> np.ndarray:
        """Fresh sids for a batch of keys and texts, newest in the FIFO in batch order; the
        caller fills the numeric columns (``created``, ``expires``, ``scope``...) at the sids."""
        m = len(keys)
        sids_l = self.alloc(m)
        key_list, text_list, by_key, obj = self.keys, self.texts, self.by_key, 0
        for sid, k, t in zip(sids_l, keys, texts, strict=True):
            key_list[sid] = k
            text_list[sid] = t
            by_key[k] = sid
            obj += obj_size(k) + obj_size(t)
        self.obj_bytes += obj
        sids = np.asarray(sids_l, np.int64)
        seqs = np.arange(self._next_seq, self._next_seq + m, dtype=np.int64)
        self._next_seq += m
        self.seq[sids] = seqs
        self._fifo_push(sids, seqs)
        return sids

    def release(self, sid: int) -> None:
        """Forget the entry's fields and free the sid (its vector is the caller's business)."""
        key, text = self.keys[sid], self.texts[sid]
        assert key is not None and text is not None
        del self.by_key[key]
        self.obj_bytes -= obj_size(key) + obj_size(text)
        self.keys[sid] = self.texts[sid] = None
        self.seq[sid] = -1
        self._free.append(sid)

    # -- queries --------------------------------------------------------------------------------

    def live(self, sid: int) -> bool:
        return bool(self.seq[sid] >= 0)

    def pop_oldest(self) -> int:
        """The oldest live sid, taken off the FIFO (the caller removes the entry)."""
        seq, fs, fq = self.seq, self._fifo_sid, self._fifo_seq
        h = self._fifo_head
        while h < self._fifo_tail:
            sid = int(fs[h])
            h += 1
            if seq[sid] == fq[h - 1]:
                self._fifo_head = h
                return sid
        self._fifo_head = h
        raise AssertionError("FIFO ring empty while entries are live")

    def live_fifo(self) -> np.ndarray:
        """Every live sid, oldest first."""
        h, t = self._fifo_head, self._fifo_tail
        fs = self._fifo_sid[h:t]
        return fs[self.seq[fs] == self._fifo_seq[h:t]]

    def live_in_scopes(self, nums: list[int]) -> np.ndarray:
        """Live sids whose scope number is in ``nums`` (one vectorised scan)."""
        hi = self.hi
        return np.flatnonzero(np.isin(self.scope[:hi], nums) & (self.seq[:hi] >= 0))

    def expired(self, now: float) -> np.ndarray:
        """Live sids with ``expires <= now`` (one vectorised scan)."""
        hi = self.hi
        return np.flatnonzero((self.expires[:hi] <= now) & (self.seq[:hi] >= 0))

    def nbytes(self) -> int:
        """Bytes of the numpy columns, the FIFO ring and the two lists' pointers."""
        arrays = (self.created, self.expires, self.seq, self.scope, self.pos, self.maxtok,
                  self.tier, self._fifo_sid, self._fifo_seq)
        return sum(a.nbytes for a in arrays) + 16 * len(self.keys)

    # -- internals ------------------------------------------------------------------------------

    def _grow(self, need: int) -> None:
        size = len(self.seq)
        if need <= size:
            return
        new = min(max(need, 2 * size, 1024), max(need, self.capacity))

        def grown(a: np.ndarray) -> np.ndarray:
            b = np.empty(new, a.dtype)
            b[:size] = a
            return b

        self.created, self.expires = grown(self.created), grown(self.expires)
        self.seq, self.scope, self.pos = grown(self.seq), grown(self.scope), grown(self.pos)
        self.maxtok, self.tier = grown(self.maxtok), grown(self.tier)
        self.seq[size:] = -1

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
        keep = self.seq[fs] == fq
        fs, fq = fs[keep], fq[keep]
        size = len(self._fifo_sid)
        while size < 2 * (len(fs) + extra):  # at most half full after compaction: amortised O(1)
            size *= 2
        if size != len(self._fifo_sid):
            self._fifo_sid, self._fifo_seq = np.empty(size, np.int32), np.empty(size, np.int64)
        self._fifo_sid[: len(fs)] = fs
        self._fifo_seq[: len(fq)] = fq
        self._fifo_head, self._fifo_tail = 0, len(fs)
