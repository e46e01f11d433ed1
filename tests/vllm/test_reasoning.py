"""Reasoning through the proxy against vLLM's deepseek_r1 reasoning parser.

The tiny model writes ``<think> Thinking about it</think>`` and then its sentence when the
request sets ``chat_template_kwargs: {"enable_thinking": true}``. The server for this module
replaces the session's (this module runs last).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.vllm.compare import post, view
from tests.vllm.conftest import VLLMServer
from tests.vllm.test_conformance import PATHS, assert_same, streamed

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])


@pytest.fixture(scope="module")
def vllm_reasoning(vllm_python: str, vllm: VLLMServer) -> Iterator[VLLMServer]:
    """Runs last (file order): it takes over the session server's slot, so a session never
    holds two slots (two sessions each holding one and waiting for a second would deadlock)."""
    server = VLLMServer(vllm_python, "--reasoning-parser", "deepseek_r1",
                        name="tiny-llama-think")
    if not vllm.external:
        vllm.stop(keep_slot=True)
        server.slot = vllm.slot
    try:
        server.start()
        yield server
    finally:
        server.stop(keep_slot=not vllm.external)  # the session server's fixture releases it


def think_request() -> dict[str, Any]:
    return {"model": "tiny-llama-think", "chat_template_kwargs": {"enable_thinking": True},
            "messages": [{"role": "user", "content": f"Think {uuid.uuid4().hex[:8]}"}]}


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning(vllm_reasoning: VLLMServer, make_vproxy: Any, stream: bool) -> None:
    p = await make_vproxy(vllm_reasoning)
    body = streamed(think_request(), stream, True if stream else None)
    direct = await post(vllm_reasoning.url, PATHS["chat"], body)
    proxied = await post(p.url, PATHS["chat"], body)
    assert_same(direct, proxied)
    ref = view(direct)["choices"][0]
    reasoning = ref["reasoning"] if stream else ref["message"]["reasoning"]
    assert reasoning == " Thinking about it"
    # repeats, in both forms, are what vLLM answers
    assert_same(direct, await post(p.url, PATHS["chat"], body))
    other = streamed(body, not stream, True if not stream else None)
    assert_same(await post(vllm_reasoning.url, PATHS["chat"], other),
                await post(p.url, PATHS["chat"], other))
