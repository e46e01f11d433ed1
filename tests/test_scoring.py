"""The native scoring kernels against their pure-Python specification (same test bodies)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import NO_EXTENSIONS, scoring

try:
    from proxy import _scoring
except ImportError:  # no build: only the twin is tested
    _scoring = None

IMPLS = [pytest.param((scoring._py_topk_dot, scoring._py_rescore_dot), id="py")]
if _scoring is not None:
    IMPLS.append(pytest.param((_scoring.topk_dot, _scoring.rescore_dot), id="native"))


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture(params=[True, False], ids=["simd", "scalar"])
def simd(request):
    """Run native tests on both the SIMD and the scalar loops (no-op for the twin)."""
    if _scoring is not None:
        _scoring.set_simd(request.param)
        yield request.param
        _scoring.set_simd(True)
    else:
        yield False


def reference(q: np.ndarray, m: np.ndarray, k: int, mask=None) -> tuple[list[int], list[float]]:
    """numpy float64 oracle with the documented tie rule (score desc, then row asc)."""
    s = m.astype(np.float64) @ q.astype(np.float64)
    rows = [i for i in range(len(s)) if mask is None or mask[i]]
    rows.sort(key=lambda i: (-s[i], i))
    rows = rows[: max(k, 0)]
    return rows, [float(s[i]) for i in rows]


def unit_rows(rng: np.random.Generator, n: int, d: int, dtype) -> np.ndarray:
    m = rng.standard_normal((n, d)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True) + 1e-12
    return m.astype(dtype)


def check_topk(got, q, m, k, mask=None, tol=1e-5):
    """Scores match the oracle; indices match wherever the oracle's scores are not near-ties."""
    idx, scores = got
    ref_idx, ref_scores = reference(q, m, k, mask)
    assert len(idx) == len(ref_idx) == len(scores)
    assert np.allclose(scores, ref_scores, atol=tol, rtol=0)
    s = m.astype(np.float64) @ q.astype(np.float64)
    assert np.allclose([s[i] for i in idx], ref_scores, atol=tol, rtol=0)
    if mask is not None:
        assert all(mask[i] for i in idx)
    for j, (a, b) in enumerate(zip(idx, ref_idx, strict=True)):
        if a != b:  # only legal between rows whose exact scores are within rounding
            assert abs(s[a] - s[b]) <= tol, (j, a, b)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 33, 300])
@pytest.mark.parametrize("k", [0, 1, 4, 16, 65, 1000])
def test_topk_random(impl, simd, dtype, n, k):
    topk, _ = impl
    rng = np.random.default_rng(n * 1000 + k)
    d = 384
    m = unit_rows(rng, n, d, dtype)
    q = unit_rows(rng, 1, d, np.float32)[0]
    check_topk(topk(q, m, k), q, m, k)


@pytest.mark.parametrize("d", [1, 3, 8, 15, 16, 17, 31, 384])
def test_odd_dimensions(impl, simd, d):
    """Every tail of the 16-wide and 8-wide SIMD loops."""
    topk, rescore = impl
    rng = np.random.default_rng(d)
    for dtype in (np.float16, np.float32):
        m = unit_rows(rng, 20, d, dtype)
        q = unit_rows(rng, 1, d, np.float32)[0]
        check_topk(topk(q, m, 5), q, m, 5)
        exact = m.astype(np.float64) @ q.astype(np.float64)
        assert np.allclose(rescore(q, m, [19, 0, 3]), exact[[19, 0, 3]], atol=1e-5)


# Small integers: every dot product is an exact integer in float32 whatever the summation order,
# so the twin and the kernel must agree bit for bit, including on ties.
int_matrix = st.integers(min_value=0, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.lists(st.integers(-4, 4), min_size=24, max_size=24), min_size=n, max_size=n),
        st.lists(st.integers(-4, 4), min_size=24, max_size=24),
        st.integers(0, 50),
        st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)),
        st.sampled_from([np.float16, np.float32]),
    )
)


@settings(max_examples=150, deadline=None)
@given(int_matrix)
def test_exact_ties_property(case):
    rows, qv, k, mask, dtype = case
    m = np.array(rows, dtype=dtype).reshape(len(rows), 24)
    q = np.array(qv, dtype=np.float32)
    mask_bytes = None if mask is None else bytes(mask)
    expected = reference(q, m, k, mask)
    for param in IMPLS:
        topk, rescore = param.values[0]
        got = topk(q, m, k, mask_bytes)
        assert got == expected
        if len(rows):
            want = list(range(len(rows)))[::-1]
            assert rescore(q, m, want) == [float(x) for x in m.astype(np.float64)[want] @ q]


def test_ties_lower_row_first(impl, simd):
    topk, _ = impl
    m = np.zeros((6, 16), dtype=np.float16)
    m[[1, 3, 4], 0] = 1.0  # three equal best rows
    m[5, 0] = 0.5
    q = np.zeros(16, dtype=np.float32)
    q[0] = 1.0
    assert topk(q, m, 2) == ([1, 3], [1.0, 1.0])
    assert topk(q, m, 5) == ([1, 3, 4, 5, 0], [1.0, 1.0, 1.0, 0.5, 0.0])
    assert topk(q, m, 100)[0] == [1, 3, 4, 5, 0, 2]  # the sort path keeps the same rule


def test_mask(impl, simd):
    topk, _ = impl
    rng = np.random.default_rng(7)
    m = unit_rows(rng, 50, 384, np.float16)
    q = m[10].astype(np.float32)
    mask = np.ones(50, dtype=np.uint8)
    mask[10] = 0
    idx, _ = topk(q, m, 3, mask)
    assert 10 not in idx
    check_topk(topk(q, m, 3, mask), q, m, 3, mask)
    assert topk(q, m, 3, np.zeros(50, dtype=np.uint8)) == ([], [])
    with pytest.raises(ValueError):
        topk(q, m, 3, np.ones(49, dtype=np.uint8))


def test_f16_rounding(impl, simd):
    """The kernel reads the stored float16 values, not the float32 ones they came from."""
    topk, rescore = impl
    q = np.full(8, 1.0, dtype=np.float32)
    src = np.array([[0.1, 0.2, 0.3, 1e-5, 6.0e-8, -0.0, 65504.0, -2.5]], dtype=np.float32)
    m16 = src.astype(np.float16)
    want = float(m16.astype(np.float64).sum())
    assert want != float(src.astype(np.float64).sum())
    assert rescore(q, m16, [0])[0] == pytest.approx(want, rel=1e-6)
    assert topk(q, m16, 1)[1][0] == pytest.approx(want, rel=1e-6)


@pytest.mark.skipif(_scoring is None, reason="extension not built")
def test_half_conversion_exhaustive():
    """Scalar f16 decoding equals numpy's for all 65536 bit patterns (NaNs compared as NaN)."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = np.array([_scoring.half_to_float(int(b)) for b in bits], dtype=np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan], want[~nan])


def test_input_validation(impl):
    topk, rescore = impl
    q = np.ones(4, dtype=np.float32)
    with pytest.raises(TypeError):
        topk(q, np.ones((2, 4), dtype=np.float64), 1)
    with pytest.raises(TypeError):
        topk(q.astype(np.float64), np.ones((2, 4), dtype=np.float32), 1)
    with pytest.raises(ValueError):
        topk(q, np.ones((2, 5), dtype=np.float32), 1)
    with pytest.raises(ValueError):
        topk(q, np.ones(8, dtype=np.float32), 1)
    with pytest.raises(IndexError):
        rescore(q, np.ones((2, 4), dtype=np.float32), [2])
    with pytest.raises(IndexError):
        rescore(q, np.ones((2, 4), dtype=np.float32), [-1])
    assert rescore(q, np.ones((2, 4), dtype=np.float32), []) == []
    assert topk(q, np.ones((0, 4), dtype=np.float16), 3) == ([], [])


def test_public_name_is_native():
    if _scoring is None or NO_EXTENSIONS:
        pytest.skip("extension not built or disabled")
    assert scoring.topk_dot is _scoring.topk_dot
    assert scoring.rescore_dot is _scoring.rescore_dot
    assert scoring.NATIVE


def test_no_extensions_env_uses_twin():
    import subprocess
    import sys

    code = "from proxy import scoring; print(scoring.topk_dot is scoring._py_topk_dot)"
    env = {"EDGE_PROXY_NO_EXTENSIONS": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr
