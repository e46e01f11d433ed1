"""Brute-force top-k scoring: native kernel vs numpy vs the pure-Python twin (d = 384, k = 4).

pytest-benchmark::

    pytest benchmarks/bench_scoring.py --benchmark-only --benchmark-group-by=param:n

Stand-alone (prints a ratio table; one process, so ratios are comparable on a noisy machine)::

    python benchmarks/bench_scoring.py [--twin]
"""

from __future__ import annotations

import sys
import timeit

import numpy as np
import pytest

from proxy import scoring

try:
    from proxy import _scoring
except ImportError:
    _scoring = None

D = 384
K = 4
SIZES = (8, 32, 128, 512, 2048)


def numpy_topk(q: np.ndarray, m: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """What the index would do without the kernel: upcast, matvec, argpartition, sort."""
    s = m.astype(np.float32, copy=False) @ q
    part = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
    order = part[np.lexsort((part, -s[part]))]  # the tie rule: score desc, then row asc
    return order.tolist(), s[order].tolist()


def data(n: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    m = rng.standard_normal((n, D)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return m[0] + 0.01, m.astype(dtype)


IMPLS = {"numpy": numpy_topk, "twin": scoring._py_topk_dot}
if _scoring is not None:
    IMPLS = {"native": _scoring.topk_dot, **IMPLS}


@pytest.mark.parametrize("dtype", ["f16", "f32"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_topk(benchmark, impl, n, dtype):
    if impl == "twin" and n > 128:
        pytest.skip("the twin is the specification, not a contender (seconds per call)")
    q, m = data(n, np.float16 if dtype == "f16" else np.float32)
    q = np.ascontiguousarray(q, dtype=np.float32)
    fn = IMPLS[impl]
    benchmark.group = f"n={n} {dtype}"
    idx, _ = benchmark(fn, q, m, K)
    assert idx == IMPLS["numpy"](q, m, K)[0] or impl != "native"


def main() -> None:
    twin = "--twin" in sys.argv
    simd = getattr(_scoring, "SIMD", False)
    print(f"d={D} k={K} native={'yes' if _scoring else 'no'} simd={simd}")
    head = f"{'dtype':5} {'n':>5} {'native us':>10} {'numpy us':>9} {'numpy/native':>12}"
    print(head + (f" {'twin us':>10} {'twin/native':>11}" if twin else ""))
    for dtype in (np.float16, np.float32):
        for n in SIZES:
            q, m = data(n, dtype)
            q = np.ascontiguousarray(q, dtype=np.float32)
            row = {}
            for name, fn in IMPLS.items():
                if name == "twin" and (not twin or n > 512):
                    continue
                t = timeit.Timer(lambda fn=fn, q=q, m=m: fn(q, m, K))
                loops, _ = t.autorange()
                row[name] = min(t.repeat(5, loops)) / loops * 1e6
            nat = row.get("native", float("nan"))
            line = f"{np.dtype(dtype).name[-2:]:>5} {n:5d} {nat:10.2f} {row['numpy']:9.2f}"
            line += f" {row['numpy'] / nat:12.1f}"
            if "twin" in row:
                line += f" {row['twin']:10.0f} {row['twin'] / nat:11.0f}"
            print(line)


if __name__ == "__main__":
    main()
