"""What was served under which request id, for ``POST /v1/feedback`` and for audits (issue 13).

``ServedLedger`` remembers, for a bounded time and number of requests, which cached answer a
request id was served (or stored) with: its exact key, the namespace, and for a semantic hit the
verifier's probability and the candidate's vector (the evidence a bad rating adds). Nothing in
it is a secret: the namespace is already derived from the caller's credentials, and the feedback
handler only accepts ids whose namespace is the caller's own.

``answers_agree`` compares a served answer with a fresh upstream answer for audits: the same
text after whitespace and case folding, or sentence vectors at cosine >= ``min_cosine``.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np

__all__ = ["ServedLedger", "ServedRecord", "answer_text", "texts_agree"]


class ServedRecord(NamedTuple):
    """One answered request: what a rating of it refers to (a tuple: one is made per request,
    and a frozen dataclass costs several times as much to build)."""

    namespace: str
    key: bytes  # exact key of the answer that was served (or stored by this miss)
    outcome: str  # "hit-exact", "hit-semantic", "miss"
    p: float  # verifier probability (semantic hits; 1.0 otherwise)
    vec: np.ndarray | None  # the cached entry's vector (semantic hits), float16
    at: float


class ServedLedger:
    """Bounded (namespace, request id) -> ServedRecord, oldest first out, entries older than
    max_age_s dead.

    Keyed by the namespace as well as the id: ids may be the client's own ``x-request-id``, so
    two tenants can use the same one, and neither may overwrite or rate the other's record."""

    def __init__(self, max_entries: int = 50_000, max_age_s: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        # plain tuples in ServedRecord's field order: the cyclic GC stops tracking a tuple of
        # atomic values after the first pass it survives, and it never stops tracking a
        # NamedTuple's instance; up to max_entries of them, every full pass walked them all
        self._d: OrderedDict[tuple[str, str], tuple[Any, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def record(
        self,
        rid: str,
        namespace: str,
        key: bytes,
        outcome: str,
        p: float = 1.0,
        vec: np.ndarray | None = None,
    ) -> None:
        v = None if vec is None else np.asarray(vec, np.float16).reshape(-1).copy()
        d = self._d
        k = (namespace, rid)
        if k in d:  # a client's own x-request-id, again: it moves to the newest end
            del d[k]
        d[k] = (namespace, key, outcome, p, v, time.monotonic())
        while len(d) > self.max_entries:
            d.popitem(last=False)

    def get(self, rid: str, namespace: str) -> ServedRecord | None:
        """The record of ``rid`` answered in ``namespace`` (None: unknown, another
        namespace's, or older than max_age_s)."""
        k = (namespace, rid)
        rec = self._d.get(k)
        if rec is None:
            return None
        if time.monotonic() - rec[5] > self.max_age_s:
            del self._d[k]
            return None
        return ServedRecord._make(rec)

    def pop(self, rid: str, namespace: str) -> ServedRecord | None:
        rec = self.get(rid, namespace)
        if rec is not None:
            del self._d[(namespace, rid)]
        return rec

    def memory_bytes(self) -> int:
        """Rough bytes held (record + namespace + id + vector)."""
        return sum(
            200 + len(ns) + len(rid) + (0 if r[4] is None else r[4].nbytes)
            for (ns, rid), r in self._d.items()
        )


def answer_text(body: bytes) -> str:
    """The generated text of a chat or completions JSON body ('' when there is none)."""
    try:
        obj: Any = json.loads(body)
        ch = obj["choices"][0]
        msg = ch.get("message")
        text = msg.get("content") if isinstance(msg, dict) else ch.get("text")
        return text if isinstance(text, str) else ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""


def texts_agree(a: str, b: str) -> bool | None:
    """True when two answers are the same text up to whitespace and case; None when the text
    alone cannot tell (the caller compares their vectors)."""
    na, nb = " ".join(a.lower().split()), " ".join(b.lower().split())
    if na == nb:
        return True
    if not na or not nb:
        return False
    return None
