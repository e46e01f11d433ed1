"""Key hashing: native canonical encoding + BLAKE2b vs its pure-Python twin.

Run: pytest benchmarks/bench_hashing.py --benchmark-only \
       --benchmark-json benchmarks/results/hashing.json
"""

from __future__ import annotations

import pytest

from proxy import hashing
from proxy.keys import request_keys

try:
    from proxy import _hashing
except ImportError:  # pragma: no cover
    _hashing = None

SHORT = {"model": "auto", "temperature": 0.0, "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How do I reset my password?"}]}
LONG = {"model": "auto", "temperature": 0.7, "top_p": 0.9, "max_tokens": 512,
        "tools": [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
            "type": "object", "properties": {"q": {"type": "string"}}}}} for i in range(4)],
        "messages": [{"role": "system", "content": "You are a helpful assistant. " * 20}]
        + [{"role": r, "content": f"turn {i}: " + "some earlier conversation text " * 10}
           for i, r in zip(range(10), ["user", "assistant"] * 5, strict=True)]
        + [{"role": "user", "content": "And what about the last question?"}]}

IMPLS = {"py": hashing._py_request_digests}
if _hashing is not None:
    IMPLS["native"] = _hashing.request_digests


@pytest.mark.parametrize("body", [SHORT, LONG], ids=["short", "long"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_request_digests(benchmark, impl, body) -> None:
    fn = IMPLS[impl]
    scope = ("ns", "chat", "auto", {k: v for k, v in body.items() if k != "messages"},
             body["messages"][:-1])
    last = body["messages"][-1]
    result = benchmark(fn, scope, last)
    assert result == hashing._py_request_digests(scope, last)
    benchmark.extra_info["impl"] = impl


def test_request_keys_public(benchmark) -> None:
    """The whole key step of the hot path, as handlers call it."""
    benchmark(request_keys, "ns", "chat", "auto", SHORT)
