"""Upstreams as production sees them: not up yet at start, going down and coming back, needing
an API key. Mock vLLM tiers (real ones: tests/vllm/)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import ConfigError, load_config, parse_tier_flag
from proxy.mock_vllm import start_mock
from tests.conftest import free_port, run_cli, start_proxy
from tests.test_proxy import MSG, mock_requests, set_faults


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json(content_type=None)


async def _until(pred: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def _cfg(flags: list[str], **tier_fields: Any) -> Any:
    env = {f"EDGE_PROXY_TIERS__{t.upper()}__{k.upper()}": str(v)
           for t, fields in tier_fields.items() for k, v in fields.items()}
    return load_config(env=env, tier_flags=flags, overrides={
        "router": {"enabled": False}, "semantic": {"enabled": False},
        "cache": {"redis_url": ""}})


def test_tier_flag_with_model_and_env_fields() -> None:
    assert parse_tier_flag("small=http://a:1,http://b:2@org/Model-8B") == (
        "small", {"model": "org/Model-8B", "urls": ["http://a:1", "http://b:2"]})
    assert parse_tier_flag("small=http://a:1") == ("small", {"urls": ["http://a:1"]})
    cfg = load_config(env={"EDGE_PROXY_TIERS": "small=http://a:1@m-small",
                           "EDGE_PROXY_TIERS__SMALL__API_KEY": "sk-up",
                           "EDGE_PROXY_TIERS__SMALL__FORWARD_AUTH": "true"})
    tier = cfg.tier("small")
    assert (tier.model, tier.api_key, tier.forward_auth) == ("m-small", "sk-up", True)
    assert "sk-up" not in repr(cfg)  # never printed with the configuration
    with pytest.raises(ConfigError, match="empty model"):
        parse_tier_flag("small=http://a:1@")
    with pytest.raises(ConfigError, match="EDGE_PROXY_TIERS__<NAME>__<FIELD>"):
        load_config(env={"EDGE_PROXY_TIERS__SMALL": "x"})


async def test_starts_before_upstream_and_becomes_ready() -> None:
    """No upstream listening: the proxy starts, /readyz is 503 naming the tier, requests get a
    503; once vLLM listens, the model is discovered in the background and it serves."""
    port = free_port()
    p = await start_proxy(_cfg([f"small=http://127.0.0.1:{port}"],
                               small={"health_interval_s": 0.1}))
    runner = None
    try:
        status, body = await _get(p.url + "/readyz")
        assert status == 503 and body["down"] == ["small"]
        assert body["tiers"]["small"]["ready"] is False and "error" in body["tiers"]["small"]
        client = p.client()
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(model="auto", messages=MSG)
        assert exc.value.status_code == 502
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(model="small-8b", messages=MSG)
        assert exc.value.status_code == 503  # unknown yet, not "does not exist"
        _, runner, _ = await start_mock("small-8b", port=port, ttft_ms=1, tpot_ms=0)
        await _until(lambda: _ready(p.url))
        r = await client.chat.completions.create(model="small-8b", messages=MSG)
        assert r.choices[0].finish_reason == "stop"
    finally:
        await p.runner.cleanup()
        if runner is not None:
            await runner.cleanup()


async def _ready(url: str) -> bool:
    return (await _get(url + "/readyz"))[0] == 200


async def test_recovered_upstream_serves_after_its_health_check(tiers: Any) -> None:
    """Upstream killed: its endpoint is marked down at once and /readyz names the tier; back on
    the same port, the next health check (not a 10 s breaker cool-down) lets it serve."""
    small = tiers["small"]
    port = int(small.url.rsplit(":", 1)[1])
    p = await start_proxy(_cfg([f"small={small.url}", f"large={tiers['large'].url}"],
                               small={"health_interval_s": 0.1, "breaker_cooldown_s": 300,
                                      "breaker_failures": 1}))
    runner = None
    try:
        client = p.client()
        await client.chat.completions.create(model="small-8b", messages=MSG)
        await small.runner.cleanup()
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model="small-8b", messages=[
                {"role": "user", "content": "while down"}])
        status, body = await _get(p.url + "/readyz")
        assert status == 200 and body["down"] == ["small"] and body["status"] == "degraded"
        _, runner, _ = await start_mock("small-8b", port=port, ttft_ms=1, tpot_ms=0)
        await _until(lambda: _ready_all(p.url))
        r = await client.chat.completions.create(model="small-8b", messages=[
            {"role": "user", "content": "after"}])
        assert r.choices[0].finish_reason == "stop"
    finally:
        await p.runner.cleanup()
        if runner is not None:
            await runner.cleanup()


async def _ready_all(url: str) -> bool:
    status, body = await _get(url + "/readyz")
    return status == 200 and not body["down"]


async def test_routing_avoids_a_down_tier(tiers: Any) -> None:
    """model auto: a tier whose upstreams fail their health check is skipped for the next
    larger one; an explicit model keeps its own (here: no) fallback."""
    p = await start_proxy(_cfg([f"small={tiers['small'].url}", f"medium={tiers['medium'].url}",
                                f"large={tiers['large'].url}"],
                               small={"health_interval_s": 0.05}))
    try:
        await set_faults(tiers["small"], health=503)
        await _until(lambda: _down(p.url, "small"))
        before = await mock_requests(tiers["small"])
        raw = await p.client().chat.completions.with_raw_response.create(
            model="auto", messages=MSG)
        assert raw.headers["x-route-tier"] == "medium"
        assert raw.parse().model == "medium-32b"
        with pytest.raises(openai.APIStatusError) as exc:
            await p.client().chat.completions.create(model="small-8b", messages=MSG)
        assert exc.value.status_code == 502
        assert await mock_requests(tiers["small"]) == before  # never sent to the down tier
    finally:
        await set_faults(tiers["small"])
        await p.runner.cleanup()


async def _down(url: str, tier: str) -> bool:
    return tier in (await _get(url + "/readyz"))[1]["down"]


async def test_upstream_api_key_and_forward_auth(caplog: Any) -> None:
    """A tier's api_key reaches vLLM (and never the logs); without it the 401 is explained;
    forward_auth sends the client's own key instead."""
    caplog.set_level(logging.DEBUG)
    mock, runner, port = await start_mock("keyed-8b", ttft_ms=1, tpot_ms=0,
                                          api_key="sk-upstream-secret")
    url = f"http://127.0.0.1:{port}"
    started = []
    try:
        keyed = await start_proxy(_cfg([f"small={url}"], small={"api_key": "sk-upstream-secret"}))
        started.append(keyed)
        r = await keyed.client().chat.completions.create(model="keyed-8b", messages=MSG)
        assert r.choices[0].finish_reason == "stop"
        status, _ = await _get(keyed.url + "/readyz")
        assert status == 200

        bare = await start_proxy(_cfg([f"small={url}"]))
        started.append(bare)
        status, body = await _get(bare.url + "/readyz")
        assert status == 503 and "api_key" in body["tiers"]["small"]["error"]
        assert mock.unauthorized >= 1

        fwd = await start_proxy(_cfg([f"small={url}@keyed-8b"], small={"forward_auth": "true"}))
        started.append(fwd)
        r = await fwd.client(api_key="sk-upstream-secret").chat.completions.create(
            model="keyed-8b", messages=[{"role": "user", "content": "forwarded"}])
        assert r.choices[0].finish_reason == "stop"
        with pytest.raises(openai.AuthenticationError):
            await fwd.client(api_key="sk-wrong").chat.completions.create(
                model="keyed-8b", messages=[{"role": "user", "content": "wrong key"}])
        assert "sk-upstream-secret" not in caplog.text
    finally:
        for p in started:
            await p.runner.cleanup()
        await runner.cleanup()


def test_port_taken_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), "--tier", "small=http://127.0.0.1:9@m",
                       env={"EDGE_PROXY_SEMANTIC__ENABLED": "false"})
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("edge-proxy:")]
    assert [ln.lower() for ln in lines] == [
        f"edge-proxy: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert "Traceback" not in out.decode()


async def test_auto_hit_names_the_tier_that_answered(tiers: Any) -> None:
    """An exact hit of model auto says which tier made the answer, not the default tier; the
    replay has its own id and created."""
    p = await start_proxy(_cfg([f"small={tiers['small'].url}", f"large={tiers['large'].url}"],
                               small={"health_interval_s": 0.05}))
    try:
        await set_faults(tiers["small"], health=503)
        await _until(lambda: _down(p.url, "small"))
        client = p.client()
        first = await client.chat.completions.with_raw_response.create(model="auto",
                                                                       messages=MSG)
        assert first.headers["x-route-tier"] == "large"
        await set_faults(tiers["small"])
        await _until(lambda: _ready_all(p.url))
        hit = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
        assert hit.headers["x-cache"] == "hit-exact"
        assert hit.headers["x-route-tier"] == "large"
        assert hit.parse().id != first.parse().id
        assert hit.parse().choices[0].message.content == first.parse().choices[0].message.content
    finally:
        await set_faults(tiers["small"])
        await p.runner.cleanup()


async def test_client_disconnect_mid_stream_logs_no_error(caplog: Any) -> None:
    """A client leaving mid-stream is normal: no ERROR record, no traceback."""
    caplog.set_level(logging.INFO)
    mock, runner, port = await start_mock("slow-8b", ttft_ms=1, tpot_ms=30, reply_tokens=60)
    p = await start_proxy(_cfg([f"small=http://127.0.0.1:{port}"]))
    try:
        for _ in range(3):
            async with aiohttp.ClientSession() as s:
                resp = await s.post(p.url + "/v1/chat/completions", json={
                    "model": "auto", "stream": True,
                    "messages": [{"role": "user", "content": f"leave early {_}"}]})
                await resp.content.readline()
                resp.close()
        await _until(lambda: _no_inflight(mock))
        await asyncio.sleep(0.2)
        mine = [r for r in caplog.records  # the proxy's and its HTTP server's records
                if r.name.startswith(("proxy", "aiohttp")) and r.levelno >= logging.ERROR]
        assert not mine, [r.getMessage() for r in mine]
    finally:
        await p.runner.cleanup()
        await runner.cleanup()


async def _no_inflight(mock: Any) -> bool:
    return bool(mock.in_flight == 0)


async def test_swapped_checkpoint_misses(tiers: Any) -> None:
    """A new checkpoint served under the same name (another /v1/models root) is part of the
    key: the next identical request misses instead of replaying the old model's answer."""
    small = tiers["small"]
    p = await start_proxy(_cfg([f"small={small.url}"], small={"model_check_interval_s": 0.05,
                                                             "health_interval_s": 0.05}))
    try:
        client = p.client()
        await client.chat.completions.create(model="small-8b", messages=MSG)
        hit = await client.chat.completions.with_raw_response.create(model="small-8b",
                                                                     messages=MSG)
        assert hit.headers["x-cache"] == "hit-exact"
        small.mock.root = "/models/small-8b-v2"
        await _until(lambda: _identity_has(p, "small-8b-v2"))
        after = await client.chat.completions.with_raw_response.create(model="small-8b",
                                                                       messages=MSG)
        assert after.headers["x-cache"] == "miss"
    finally:
        small.mock.root = small.mock.model
        await p.runner.cleanup()


async def _identity_has(p: Any, text: str) -> bool:
    return text in p.proxy.tiers["small"].identity


async def test_error_event_mid_stream_is_forwarded_without_repr(tiers: Any) -> None:
    """vLLM's error event after content: the client's stream ends with an error event carrying
    vLLM's message as text (no Python dict repr), and the SDK raises."""
    from tests.vllm.compare import no_repr

    p = await start_proxy(_cfg([f"small={tiers['small'].url}"]))
    try:
        await set_faults(tiers["small"], error_event="engine exploded: {oops}", count=1)
        stream = await p.client().chat.completions.create(
            model="auto", stream=True, messages=[{"role": "user", "content": "mid-stream"}])
        with pytest.raises(openai.APIError) as exc:
            async for _ in stream:
                pass
        assert "engine exploded: {oops}" in exc.value.message and no_repr(exc.value.message)
    finally:
        await set_faults(tiers["small"])
        await p.runner.cleanup()
