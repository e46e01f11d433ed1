"""vLLM killed and restarted behind the proxy (after the conformance tests, before test_reasoning,
which replaces the session server)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.vllm.compare import post
from tests.vllm.conftest import VLLMServer
from tests.vllm.test_conformance import PATHS, assert_same, request

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])


async def test_vllm_killed_and_restarted(vllm: VLLMServer, make_vproxy: Any) -> None:
    if vllm.external:
        pytest.skip("EDGE_PROXY_VLLM_URL: the suite does not own that server")
    p = await make_vproxy(vllm)
    body = request("chat")
    assert (await post(p.url, PATHS["chat"], body)).status == 200
    await asyncio.to_thread(vllm.stop, True)
    down = await post(p.url, PATHS["chat"], request("chat"))
    assert down.status in (502, 503), down.body
    assert down.body["error"]["type"] in ("upstream_error", "service_unavailable")
    await asyncio.to_thread(vllm.start)
    # vLLM is healthy again: the proxy serves again (bounded wait; speed is measured elsewhere)
    fresh = request("chat")
    deadline = time.monotonic() + 60
    while True:
        got = await post(p.url, PATHS["chat"], fresh)
        if got.status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert_same(await post(vllm.url, PATHS["chat"], fresh), got)
    # the answer stored before the restart is still served
    again = await post(p.url, PATHS["chat"], body)
    assert again.status == 200 and again.headers["x-cache"] == "hit-exact"


async def test_upstream_api_key(vllm: VLLMServer, make_vproxy: Any) -> None:
    """vLLM restarted with --api-key: a tier with that api_key is served, one without gets
    vLLM's 401 explained at start-up (/readyz names the missing key)."""
    if vllm.external:
        pytest.skip("EDGE_PROXY_VLLM_URL: the suite does not own that server")
    await asyncio.to_thread(vllm.stop, True)
    await asyncio.to_thread(vllm.start, "sk-vllm-test")
    keyed = await make_vproxy(vllm, tiers={"t0": {"api_key": "sk-vllm-test"}})
    body = request("chat")
    assert_same(await post(vllm.url, PATHS["chat"], body,
                           {"Authorization": "Bearer sk-vllm-test"}),
                await post(keyed.url, PATHS["chat"], body))
    bare = await make_vproxy(vllm)
    async with aiohttp.ClientSession() as s, s.get(bare.url + "/readyz") as r:
        ready = await r.json()
    assert r.status == 503 and "api_key" in ready["tiers"]["t0"]["error"]
