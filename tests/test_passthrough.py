"""The pass-through relay (/tokenize, /detokenize, /v1/embeddings, /version): answers relayed
whole and bounded, bodies checked as on the completion endpoints. vLLM itself is in
tests/vllm/test_conformance.py; the mock tier's /v1/embeddings writes its answer in pieces."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from proxy import passthrough


async def _post(url: str, body: bytes, ctype: str = "application/json") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(url, data=body,
                                                    headers={"Content-Type": ctype}) as r:
        return r.status, await r.read()


async def test_a_large_answer_is_relayed_whole(make_proxy: Any, tiers: Any) -> None:
    """About 2 MB of embeddings, written by the upstream in 16 KiB pieces, arrive byte for byte
    (the relay once returned whatever had arrived by its first read, with status 200)."""
    p = await make_proxy(tier_names=("small",))
    body = json.dumps({"model": "auto", "input": [f"text number {i}" for i in range(500)]}
                      ).encode()
    direct = await _post(tiers["small"].url + "/v1/embeddings", body)
    relayed = await _post(p.url + "/v1/embeddings", body)
    assert direct[0] == relayed[0] == 200 and len(direct[1]) > 1_000_000
    assert relayed[1] == direct[1]


async def test_an_answer_over_the_bound_is_refused(make_proxy: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    p = await make_proxy(tier_names=("small",))
    monkeypatch.setattr(passthrough, "MAX_ANSWER_BYTES", 100_000)
    many = [f"text {i}" for i in range(40)]  # ~150 KB of vectors
    status, raw = await _post(p.url + "/v1/embeddings",
                              json.dumps({"model": "auto", "input": many}).encode())
    assert status == 502 and b"larger than 100000 bytes" in raw
    status, _ = await _post(p.url + "/v1/embeddings", b'{"model": "auto", "input": "one"}')
    assert status == 200  # the proxy goes on serving


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_a_body_not_declared_json_is_refused(make_proxy: Any, tiers: Any,
                                                   ctype: str) -> None:
    """A web page can send these cross-site without a preflight: the relay must not spend the
    tier's key for it (415, as the completion endpoints answer)."""
    p = await make_proxy(tier_names=("small",))
    for path in ("/v1/embeddings", "/tokenize", "/v1/feedback"):
        status, raw = await _post(p.url + path, b'{"model": "auto", "input": "x"}', ctype)
        assert status == 415 and b"unsupported_media_type" in raw, (path, status, raw)


async def test_a_non_object_body_is_a_400(make_proxy: Any) -> None:
    p = await make_proxy(tier_names=("small",))
    status, raw = await _post(p.url + "/v1/embeddings", b'["not", "an", "object"]')
    assert status == 400 and b"invalid_request" in raw
