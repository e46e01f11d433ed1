"""Native canonical hashing against its Python twin (the specification)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import NO_EXTENSIONS, hashing

try:
    from proxy import _hashing
except ImportError:  # pragma: no cover - only without the build
    _hashing = None

IMPLS = [pytest.param(("py", hashing._py_canonical, hashing._py_request_digests), id="py")]
if _hashing is not None:
    IMPLS.append(pytest.param(("c", _hashing.canonical, _hashing.request_digests), id="c"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)

EDGE = [None, True, False, 0, -1, 1, 2**63 - 1, -(2**63), 2**64, -(2**100), 0.0, -0.0, 1.0, 1.5,
        1e300, -1e-300, math.inf, -math.inf, "", "a", "é", "\ud800", "\U0001F600", [], {}, [[]],
        {"b": 1, "a": 2}, {"é": 1, "e": 2, "\uffff": 3, "\U0001F600": 4}, ("x", 1)]


def test_native_is_the_public_implementation() -> None:
    if _hashing is None:
        pytest.skip("extension not built")
    assert hashing.NATIVE is (not NO_EXTENSIONS)
    if not NO_EXTENSIONS:
        assert hashing.canonical is _hashing.canonical


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", EDGE, ids=repr)
def test_edge_cases_match_spec(impl, value) -> None:
    _, canonical, _ = impl
    assert canonical(value) == hashing._py_canonical(value)


@pytest.mark.skipif(_hashing is None, reason="extension not built")
@settings(max_examples=500, deadline=None)
@given(json_values, json_values)
def test_native_equals_twin_on_random_json(a, b) -> None:
    assert _hashing.canonical(a) == hashing._py_canonical(a)
    assert _hashing.request_digests(a, b) == hashing._py_request_digests(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_encoding_is_unambiguous(impl) -> None:
    _, canonical, _ = impl
    # values that naive concatenation or str() would confuse
    distinct = [["ab", "c"], ["a", "bc"], "1", 1, 1.5, "1.5", None, "None", [], {}, "", [""],
                {"a": "b"}, ["a", "b"], True, "t", False, 0, "f"]
    encs = [canonical(v) for v in distinct]
    assert len(set(encs)) == len(distinct)


@pytest.mark.parametrize("impl", IMPLS)
def test_dict_order_and_int_float_equivalence(impl) -> None:
    _, canonical, digests = impl
    assert canonical({"a": 1, "b": [1.0, 2]}) == canonical({"b": [1, 2.0], "a": 1.0})
    assert canonical({"t": 0.7}) != canonical({"t": 0.70001})
    scope, exact = digests(["scope"], "last")
    scope2, exact2 = digests(["scope"], "other")
    assert scope == scope2 and exact != exact2 and len(exact) == 16


@pytest.mark.parametrize("impl", IMPLS)
def test_rejects_unsupported_types(impl) -> None:
    _, canonical, _ = impl
    with pytest.raises(TypeError):
        canonical({1: "int key"})
    with pytest.raises(TypeError):
        canonical(object())
