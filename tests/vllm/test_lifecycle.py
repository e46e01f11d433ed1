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


async def test_vllm_killed_and_restarted_with_an_api_key(vllm: VLLMServer, make_vproxy: Any
                                                         ) -> None:
    """vLLM killed: the proxy answers 502/503 at once; vLLM back (now with --api-key, which
    saves a third start-up): a tier with that api_key serves again as soon as its health check
    sees it, answers stored before are still served, and a tier without the key is not ready
    and says why."""
    if vllm.external:
        pytest.skip("EDGE_PROXY_VLLM_URL: the suite does not own that server")
    p = await make_vproxy(vllm, tiers={"t0": {"api_key": "sk-vllm-test"}})
    body = request("chat")
    assert (await post(p.url, PATHS["chat"], body)).status == 200
    await asyncio.to_thread(vllm.stop, True)
    down = await post(p.url, PATHS["chat"], request("chat"))
    assert down.status in (502, 503), down.body
    assert down.body["error"]["type"] in ("upstream_error", "service_unavailable")
    async with aiohttp.ClientSession() as s, s.get(p.url + "/readyz") as r:
        assert r.status == 503 and (await r.json())["down"] == ["t0"]
    await asyncio.to_thread(vllm.start, "sk-vllm-test")
    # vLLM is healthy again: the proxy serves again (bounded wait, no timing assertion; the
    # delay is printed for the record: pytest -s)
    healthy_at = time.monotonic()
    fresh = request("chat")
    deadline = healthy_at + 60
    while True:
        got = await post(p.url, PATHS["chat"], fresh)
        if got.status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    print(f"\nproxy served {time.monotonic() - healthy_at:.2f} s after vLLM's /health was 200")
    assert_same(await post(vllm.url, PATHS["chat"], fresh,
                           {"Authorization": "Bearer sk-vllm-test"}), got)
    # the answer stored before the restart is still served
    again = await post(p.url, PATHS["chat"], body)
    assert again.status == 200 and again.headers["x-cache"] == "hit-exact"
    bare = await make_vproxy(vllm)
    async with aiohttp.ClientSession() as s, s.get(bare.url + "/readyz") as r:
        ready = await r.json()
    assert r.status == 503 and "api_key" in ready["tiers"]["t0"]["error"]
