"""Proxied answers against direct answers from a real vLLM (CPU, tiny hand-weighted Llama).

For every case the same request goes to vLLM directly and through the proxy; the two answers
must be equal in the views of ``compare.py``. Repeats check the cache's replays against vLLM
too, in both forms (a streamed request after a JSON one and the other way round).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.vllm.compare import Reply, merge, post, view
from tests.vllm.conftest import ANSWER, MODEL_NAME, VLLMServer

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def request(endpoint: str, **extra: Any) -> dict[str, Any]:
    """A fresh request (its own cache key), with ``extra`` fields."""
    text = f"Say something {uuid.uuid4().hex[:8]}"
    body: dict[str, Any] = {"model": MODEL_NAME}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    body.update(extra)
    return body


def streamed(body: dict[str, Any], stream: bool, usage: bool | None = None) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k != "stream_options"}
    out["stream"] = stream
    if stream and usage is not None:
        out["stream_options"] = {"include_usage": usage}
    return out


async def both(vllm: VLLMServer, proxy_url: str, endpoint: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[Reply, Reply]:
    """(direct, proxied) answers to the same request."""
    direct = await post(vllm.url, PATHS[endpoint], body)
    proxied = await post(proxy_url, PATHS[endpoint], body, headers)
    return direct, proxied


def assert_same(direct: Reply, proxied: Reply) -> None:
    assert proxied.status == direct.status, (proxied.body, direct.body)
    assert view(proxied) == view(direct)
    if direct.chunks is not None:
        assert proxied.chunks is not None and proxied.done == direct.done


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("form", ["json", "stream", "stream+usage"])
async def test_answers_and_repeats(vllm: VLLMServer, make_vproxy: Any, endpoint: str,
                                   form: str) -> None:
    p = await make_vproxy(vllm)
    base = request(endpoint)
    stream, usage = form != "json", (True if form == "stream+usage" else
                                     (False if form == "stream" else None))
    direct, proxied = await both(vllm, p.url, endpoint, streamed(base, stream, usage))
    assert_same(direct, proxied)
    assert proxied.headers["x-cache"] == "miss"
    assert ANSWER in str(view(direct)["choices"][0])  # the tiny model's sentence
    # the same request again: a hit, equal to vLLM's answer
    again = await post(p.url, PATHS[endpoint], streamed(base, stream, usage))
    assert again.headers["x-cache"] == "hit-exact"
    assert_same(direct, again)
    # the other form of the same request: also a hit, equal to vLLM's answer in that form
    other = streamed(base, not stream, True if not stream else None)
    direct_other = await post(vllm.url, PATHS[endpoint], other)
    hit_other = await post(p.url, PATHS[endpoint], other)
    assert hit_other.headers["x-cache"] == "hit-exact"
    assert_same(direct_other, hit_other)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_n_2(vllm: VLLMServer, make_vproxy: Any, endpoint: str, stream: bool) -> None:
    p = await make_vproxy(vllm)
    body = streamed(request(endpoint, n=2), stream, True if stream else None)
    direct, proxied = await both(vllm, p.url, endpoint, body)
    assert_same(direct, proxied)
    assert len(view(direct)["choices"]) == 2
    assert_same(direct, await post(p.url, PATHS[endpoint], body))


@pytest.mark.parametrize(("endpoint", "extra"), [
    ("chat", {"logprobs": True, "top_logprobs": 2}),
    ("completions", {"logprobs": 2}),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs(vllm: VLLMServer, make_vproxy: Any, endpoint: str,
                        extra: dict[str, Any], stream: bool) -> None:
    p = await make_vproxy(vllm)
    body = streamed(request(endpoint, **extra), stream)
    direct, proxied = await both(vllm, p.url, endpoint, body)
    assert_same(direct, proxied)
    lp = view(direct)["choices"]
    assert lp  # the reference carries logprobs
    # logprobs are never replayed from the cache: the repeat is vLLM's answer again
    again = await post(p.url, PATHS[endpoint], body)
    assert again.headers["x-cache"] != "hit-exact"
    assert_same(direct, again)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_seed(vllm: VLLMServer, make_vproxy: Any, endpoint: str) -> None:
    p = await make_vproxy(vllm)
    body = request(endpoint, seed=1234, temperature=1.0, top_p=0.9)
    direct, proxied = await both(vllm, p.url, endpoint, body)
    assert_same(direct, proxied)
    again = await post(p.url, PATHS[endpoint], body)
    assert_same(direct, again)
    # another seed is another request (its own key), answered by vLLM
    other = await post(p.url, PATHS[endpoint], {**body, "seed": 99})
    assert other.headers["x-cache"] == "miss"


@pytest.mark.parametrize(("choice", "stream"), [
    pytest.param(c, s, id=f"{c}-{'stream' if s else 'json'}")
    for c in ("none", "auto", "required", "named") for s in (False, True)])
async def test_tools(vllm: VLLMServer, make_vproxy: Any, choice: str, stream: bool) -> None:
    p = await make_vproxy(vllm)
    tool_choice: Any = ({"type": "function", "function": {"name": "get_weather"}}
                        if choice == "named" else choice)
    body = streamed(request("chat", tools=TOOLS, tool_choice=tool_choice), stream,
                    True if stream else None)
    direct, proxied = await both(vllm, p.url, "chat", body)
    assert_same(direct, proxied)
    ref = view(direct)
    calls = (ref["choices"][0]["tool_calls"] if stream
             else ref["choices"][0]["message"].get("tool_calls"))
    assert bool(calls) == (choice != "none")
    # the repeat (served from the cache or not) is what vLLM answers
    assert_same(direct, await post(p.url, PATHS["chat"], body))
    # and so is the other form
    other = streamed(body, not stream, True if not stream else None)
    assert_same(await post(vllm.url, PATHS["chat"], other),
                await post(p.url, PATHS["chat"], other))


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_cut(vllm: VLLMServer, make_vproxy: Any, endpoint: str,
                              stream: bool) -> None:
    p = await make_vproxy(vllm)
    base = request(endpoint)
    cut = streamed({**base, "max_tokens": 3}, stream)
    direct, proxied = await both(vllm, p.url, endpoint, cut)
    assert_same(direct, proxied)
    assert view(direct)["choices"][0]["finish_reason"] == "length"
    # a cut answer is not stored; once the full answer is, a cut request still gets the cut
    assert (await post(p.url, PATHS[endpoint], cut)).headers["x-cache"] == "miss"
    await post(p.url, PATHS[endpoint], base)
    assert_same(direct, await post(p.url, PATHS[endpoint], cut))


# requests vLLM refuses with a 4xx; the proxy must answer with vLLM's status and message
BAD: list[tuple[str, str, dict[str, Any]]] = [
    ("max_tokens_over_context", "chat", {"max_tokens": 4096}),
    ("negative_temperature", "chat", {"temperature": -1}),
    ("top_logprobs_over_limit", "chat", {"logprobs": True, "top_logprobs": 50}),
    ("unknown_named_tool", "chat", {"tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}),
    ("tool_choice_without_tools", "chat", {"tool_choice": "required"}),
    ("bad_response_format", "chat", {"response_format": {"type": "nope"}}),
    ("prompt_too_long", "completions", {"prompt": "word " * 3000}),
    ("logprobs_over_limit", "completions", {"logprobs": 50}),
    ("n_zero", "completions", {"n": 0}),
    ("bad_stop_type", "completions", {"stop": 5}),
]


@pytest.mark.parametrize(("case", "endpoint", "extra"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_4xx(vllm: VLLMServer, make_vproxy: Any, case: str, endpoint: str,
                            extra: dict[str, Any], stream: bool) -> None:
    """vLLM's refusals reach the client with vLLM's status and message, nothing stored. Where
    vLLM refuses inside a started 200 stream (an error event first), the proxy, which has sent
    nothing yet, answers with that error's 4xx: the SDK raises either way."""
    p = await make_vproxy(vllm)
    body = {**request(endpoint), **extra, "stream": stream}
    direct, proxied = await both(vllm, p.url, endpoint, body)
    if direct.status == 200:  # refused inside the stream
        assert direct.chunks is not None
        ref = merge(direct.chunks)["error"]
        assert proxied.status == ref["code"], (case, proxied.body, ref)
    else:
        assert 400 <= direct.status < 500, direct.body
        assert proxied.status == direct.status, (case, proxied.body, direct.body)
        ref = direct.body["error"] if isinstance(direct.body.get("error"), dict) else direct.body
    assert isinstance(proxied.body, dict) and isinstance(proxied.body.get("error"), dict)
    err = proxied.body["error"]
    assert err["type"] == "invalid_request_error"
    assert err["message"] == ref["message"]  # vLLM's own words (its pydantic list included)
    # nothing was stored: the same request is refused again
    assert (await post(p.url, PATHS[endpoint], body)).status == proxied.status


async def test_single_flight(vllm: VLLMServer, make_vproxy: Any) -> None:
    """Identical concurrent streams share one vLLM request (a long one, never cacheable)."""
    p = await make_vproxy(vllm)
    body = request("completions", stream=True, max_tokens=150, ignore_eos=True)
    success = "vllm:request_success_total"
    # vLLM counts a request in its output loop, which can lag its last byte: wait for the count
    start = await vllm_counter(vllm, success)
    direct = await post(vllm.url, PATHS["completions"], body)
    before = await counter_reaches(vllm, success, start + 1)
    replies = await asyncio.gather(*(post(p.url, PATHS["completions"], body) for _ in range(4)))
    for r in replies:
        assert_same(direct, r)
    assert view(direct)["choices"][0]["finish_reason"] == "length"
    await counter_reaches(vllm, success, before + 1)
    await asyncio.sleep(0.5)  # a second upstream request, if any, would be counted by now
    assert await vllm_counter(vllm, success) - before == 1


async def counter_reaches(vllm: VLLMServer, name: str, at_least: float) -> float:
    """Poll a vLLM counter until it reaches ``at_least`` (10 s at most); its last value."""
    for _ in range(100):
        value = await vllm_counter(vllm, name)
        if value >= at_least:
            return value
        await asyncio.sleep(0.1)
    return value


async def test_disconnect_aborts_generation(vllm: VLLMServer, make_vproxy: Any) -> None:
    """A client that leaves mid-stream makes vLLM abort the generation."""
    import aiohttp

    p = await make_vproxy(vllm)
    success = await vllm_counter(vllm, "vllm:request_success_total")
    tokens = await vllm_counter(vllm, "vllm:generation_tokens_total")
    body = request("completions", stream=True, max_tokens=1900, ignore_eos=True)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(p.url + PATHS["completions"], json=body)
        assert resp.status == 200
        seen = 0
        async for line in resp.content:
            seen += line.startswith(b"data:")
            if seen >= 3:
                break
        resp.close()  # the client goes away
    for _ in range(300):
        if await vllm_counter(vllm, "vllm:num_requests_running") == 0:
            break
        await asyncio.sleep(0.1)
    assert await vllm_counter(vllm, "vllm:num_requests_running") == 0
    # stopped long before its 1900 tokens, and not as a finished request: aborted
    assert await vllm_counter(vllm, "vllm:generation_tokens_total") - tokens < 1900
    assert await vllm_counter(vllm, "vllm:request_success_total") == success


async def vllm_counter(vllm: VLLMServer, name: str, label: str = "") -> float:
    """Sum of a vLLM Prometheus metric's samples (those whose labels contain ``label``)."""
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(vllm.url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_replays_are_fresh_and_keep_vllm_fields(vllm: VLLMServer, make_vproxy: Any
                                                      ) -> None:
    """Every hit has its own id and created; system_fingerprint is kept in every form (live
    stream without usage, JSON replay, SSE replay); x-route-tier names the tier on a hit."""
    p = await make_vproxy(vllm)
    body = request("chat")
    direct = await post(vllm.url, PATHS["chat"], {**body, "stream": True})
    fp = merge_fp(direct)
    assert fp  # vLLM sends one
    live = await post(p.url, PATHS["chat"], {**body, "stream": True})
    assert merge_fp(live) == fp
    hits = [await post(p.url, PATHS["chat"], b) for b in (body, body, {**body, "stream": True})]
    ids = {h.body["id"] for h in hits[:2]} | {hits[2].chunks[0]["id"]}
    ids.add(live.chunks[0]["id"])
    assert len(ids) == 4  # no two responses share an id
    for h in hits:
        assert h.headers["x-cache"] == "hit-exact" and h.headers["x-route-tier"] == "t0"
        assert merge_fp(h) == fp
        obj = h.body if h.body is not None else h.chunks[0]
        assert obj["id"].startswith("chatcmpl-") and obj["created"] >= live.chunks[0]["created"]
    auto = await post(p.url, PATHS["chat"], {**body, "model": "auto"})
    assert auto.headers["x-route-tier"] == "t0"


def merge_fp(reply: Reply) -> str | None:
    if reply.chunks is not None:
        fps = {c.get("system_fingerprint") for c in reply.chunks} - {None}
        return fps.pop() if len(fps) == 1 else None
    return reply.body.get("system_fingerprint")


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/tokenize", {"model": MODEL_NAME, "prompt": "Hello! This is"}),
    ("POST", "/detokenize", {"model": MODEL_NAME, "tokens": [400, 401, 402]}),
    ("GET", "/version", None),
    ("POST", "/v1/embeddings", {"model": MODEL_NAME, "input": "Hello"}),
])
async def test_passthrough_endpoints(vllm: VLLMServer, make_vproxy: Any, method: str, path: str,
                                     body: dict[str, Any] | None) -> None:
    import aiohttp

    p = await make_vproxy(vllm)
    out = []
    for base in (vllm.url, p.url):
        async with aiohttp.ClientSession() as s, s.request(method, base + path, json=body) as r:
            out.append((r.status, await r.json(content_type=None)))
    assert out[1] == out[0]
    async with aiohttp.ClientSession() as s, s.get(p.url + "/health") as r:
        assert r.status == 200 and (await r.json())["tiers_up"] == ["t0"]


async def test_custom_role_and_large_n_reach_vllm(vllm: VLLMServer, make_vproxy: Any) -> None:
    """The proxy leaves to vLLM what vLLM judges: a custom role, n above 128."""
    p = await make_vproxy(vllm)
    body = request("chat")
    body["messages"].insert(0, {"role": "critic", "content": "be brief"})
    assert_same(*(await both(vllm, p.url, "chat", body)))
    big_n = request("completions", n=130, max_tokens=2)
    assert_same(*(await both(vllm, p.url, "completions", big_n)))
