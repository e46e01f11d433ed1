"""Scoring kernels: dot products of one query against a small matrix, with top-k selection.

The functions named ``_py_*`` are the specification (pure Python, slow on purpose: plain loops
over memoryviews); the Cython kernels of ``native/scoring.pyx`` replace them when the extension
is built and ``EDGE_PROXY_NO_EXTENSIONS`` is not set. Both take the same arguments and return the
same values (scores may differ by float rounding: the twin sums in double, the kernel in float32).

Kernel contract, shared by both implementations:

* ``query``: a C-contiguous float32 buffer of length ``d``.
* ``matrix``: a C-contiguous 2-D buffer of shape ``(n, d)`` of float16 (numpy ``'e'``) or
  float32 (``'f'``). Rows are expected L2-normalised, so a dot product is the cosine similarity,
  but the kernels do not care. Inputs must be NaN-free (NaN scores have no defined order).
* ``mask``: optional bytes-like of length ``n``; row ``i`` is a candidate only if ``mask[i] != 0``
  (used for expired or deleted rows that are still in a block).
* Order: higher score first; equal scores are broken by the **lower row index first**. That rule
  makes results deterministic and equal between the twin and the kernel whenever the scores are
  exactly equal (e.g. duplicated rows).
* ``topk_dot`` returns ``(indices, scores)``, two lists of length ``min(k, number of candidates)``.
* ``rescore_dot`` returns the exact dot product of each requested row, in request order; a row
  outside ``[0, n)`` raises ``IndexError``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

from proxy import NO_EXTENSIONS

__all__ = ["NATIVE", "rescore_dot", "topk_dot"]

# memoryview cannot index float16 ("e") buffers, but struct can unpack them.
_FORMATS: Final = {"e": (2, "e"), "f": (4, "f")}


def _matrix_rows(matrix: Any, d: int) -> tuple[int, str, memoryview]:
    """Validate a (n, d) float16/float32 buffer; return (n, format code, raw byte view)."""
    mv = memoryview(matrix)
    fmt = mv.format.lstrip("@=<")
    if fmt not in _FORMATS:
        raise TypeError(f"matrix must be float16 or float32, got format {mv.format!r}")
    if mv.ndim != 2 or not mv.c_contiguous:
        raise ValueError("matrix must be a C-contiguous 2-D buffer")
    n, cols = mv.shape  # type: ignore[misc]
    if n and cols != d:
        raise ValueError(f"matrix has {cols} columns, query has {d}")
    # cast() refuses a view with a zero in its shape; an empty matrix has no rows to read anyway
    return n, fmt, mv.cast("B") if n else memoryview(b"")


def _query_values(query: Any) -> tuple[float, ...]:
    mv = memoryview(query)
    if mv.format.lstrip("@=<") != "f" or mv.ndim != 1:
        raise TypeError("query must be a 1-D float32 buffer")
    return tuple(mv.tolist())


def _row(raw: memoryview, fmt: str, i: int, d: int) -> tuple[float, ...]:
    size, code = _FORMATS[fmt]
    return struct.unpack_from(f"<{d}{code}", raw, i * d * size)


def _py_topk_dot(
    query: Any, matrix: Any, k: int, mask: Any = None
) -> tuple[list[int], list[float]]:
    """Top-k rows of ``matrix`` by dot product with ``query`` (see the module contract)."""
    q = _query_values(query)
    d = len(q)
    n, fmt, raw = _matrix_rows(matrix, d)
    if mask is not None and len(memoryview(mask).cast("B")) != n:
        raise ValueError("mask length must equal the number of rows")
    valid = memoryview(mask).cast("B") if mask is not None else None
    scored: list[tuple[float, int]] = []
    for i in range(n):
        if valid is not None and not valid[i]:
            continue
        row = _row(raw, fmt, i, d)
        s = 0.0
        for a, b in zip(q, row, strict=True):
            s += a * b
        scored.append((s, i))
    # Sort key (-score, index): higher score first, then the lower row index.
    scored.sort(key=lambda t: (-t[0], t[1]))
    top = scored[: max(k, 0)]
    return [i for _, i in top], [s for s, _ in top]


def _py_rescore_dot(query: Any, matrix: Any, rows: Sequence[int]) -> list[float]:
    """Exact dot products of ``query`` with the given rows of ``matrix``, in request order."""
    q = _query_values(query)
    d = len(q)
    n, fmt, raw = _matrix_rows(matrix, d)
    out: list[float] = []
    for r in rows:
        r = int(r)
        if not 0 <= r < n:
            raise IndexError(f"row {r} out of range for {n} rows")
        s = 0.0
        for a, b in zip(q, _row(raw, fmt, r, d), strict=True):
            s += a * b
        out.append(s)
    return out


topk_dot = _py_topk_dot
rescore_dot = _py_rescore_dot
NATIVE: bool = False

try:
    from proxy._scoring import rescore_dot as _c_rescore_dot
    from proxy._scoring import topk_dot as _c_topk_dot

    if not NO_EXTENSIONS:
        topk_dot = _c_topk_dot
        rescore_dot = _c_rescore_dot
        NATIVE = True
except ImportError:  # no build: the twin is the implementation
    pass
