"""The request event log (proxy/events.py) and ``edge-proxy report`` (proxy/report.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.config import ConfigError, load_config
from proxy.events import FIELDS, EventLog, event
from proxy.report import aggregate, read_files
from tests.conftest import ROOT

HOUR = 1_796_000_400.0  # a fixed time (2026-11-30 01:00 UTC); the second group is an hour later


def known_events() -> list[dict[str, Any]]:
    """team-a: 4 requests on small (1 miss, 2 exact hits, 1 semantic hit); team-b: 2 on large
    (1 miss, 1 hit) an hour later; one error."""
    def ev(ns: str, tier: str, outcome: str, cost: float, saved: float, ts: float,
           status: int = 200) -> dict[str, Any]:
        e = event(request_id=f"r{len(out)}", namespace=ns, endpoint="chat", model="auto",
                  tier=tier, outcome=outcome, status=status, latency_s=0.01,
                  prompt_tokens=10, completion_tokens=20, cost_usd=cost, saved_usd=saved)
        e["ts"] = ts
        return e

    out: list[dict[str, Any]] = []
    for outcome, cost, saved in (("miss", 0.005, 0.0), ("hit-exact", 0.0, 0.005),
                                 ("hit-exact", 0.0, 0.005), ("hit-semantic", 0.0, 0.005)):
        out.append(ev("ns:team-a", "small", outcome, cost, saved, HOUR + len(out)))
    for outcome, cost, saved in (("miss", 0.3, 0.0), ("hit-exact", 0.0, 0.3)):
        out.append(ev("ns:team-b", "large", outcome, cost, saved, HOUR + 3600 + len(out)))
    out.append(ev("ns:team-b", "large", "error", 0.0, 0.0, HOUR + 3600 + 9, status=502))
    return out


def events_config(tmp_path: Path, **events: Any) -> Any:
    return load_config(env={}, overrides={"events": events}, tier_flags=["small=http://h:1"])


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"events\.sink"):
        load_config(env={}, overrides={"events": {"sink": "kafka"}})
    with pytest.raises(ConfigError, match=r"events\.path"):
        load_config(env={}, overrides={"events": {"sink": "file"}})
    with pytest.raises(ConfigError, match=r"events\.path: directory"):
        load_config(env={}, overrides={"events": {"sink": "file", "path": "/no/such/dir/x"}})
    with pytest.raises(ConfigError, match=r"events\.redis_url"):
        load_config(env={}, overrides={"events": {"sink": "redis"}})


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_file_sink_writes_json_lines(tmp_path: Path, log_prompts: bool) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(events_config(tmp_path, sink="file", path=str(path),
                                 log_prompts=log_prompts, flush_interval_s=0.01))
    await log.start()
    evs = known_events()
    for e in evs:
        log.emit({**e, "prompt": "What is the secret plan?"})
    await log.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(evs) + 1  # one object per line, no more
    got = [json.loads(line) for line in lines[:-1]]
    assert [g["request_id"] for g in got] == [e["request_id"] for e in evs]
    for g in got:
        assert list(g)[:len(FIELDS)] == list(FIELDS)
        assert ("prompt" in g) is log_prompts
    assert log.written == len(evs) and log.dropped == 0


async def test_pending_events_are_bounded(tmp_path: Path) -> None:
    log = EventLog(events_config(tmp_path, sink="file", path=str(tmp_path / "e.jsonl"),
                                 max_pending=3))
    for e in known_events():  # not started: nothing is written, the buffer fills
        log.emit(e)
    assert len(log.pending) == 3 and log.dropped == len(known_events()) - 3


async def test_redis_stream_sink_is_bounded_and_consumer_group_friendly(
        tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    cfg = load_config(env={}, overrides={
        "cache": {"redis_url": redis_url, "redis_prefix": redis_prefix},
        "events": {"sink": "redis", "stream_maxlen": 100, "flush_interval_s": 0.01}},
        tier_flags=["small=http://h:1"])
    log = EventLog(cfg)
    await log.start()
    client = aioredis.Redis.from_url(redis_url)
    stream = redis_prefix + "events"
    try:
        await client.xgroup_create(stream, "billing", id="$", mkstream=True)
        evs = known_events()
        for e in evs:
            log.emit(e)
        await log.flush()
        got = await client.xreadgroup("billing", "worker-1", {stream: ">"}, count=100)
        records = got[0][1]
        assert [json.loads(f[b"event"])["request_id"] for _, f in records] == \
            [e["request_id"] for e in evs]
        await client.xack(stream, "billing", *[rid for rid, _ in records])
        for i in range(3000):  # bounded: MAXLEN ~ 100 (Redis trims whole nodes)
            log.emit({**evs[0], "request_id": f"bulk{i}"})
        await log.flush()
        assert 100 <= await client.xlen(stream) < 1000
    finally:
        await log.close()
        await client.delete(stream)
        await client.aclose()


def test_aggregate_known_events() -> None:
    evs = known_events()
    by_ns = {r.key: r for r in aggregate(evs, ("namespace",))}
    a, b = by_ns[("ns:team-a",)], by_ns[("ns:team-b",)]
    assert (a.requests, a.hits, a.semantic_hits, a.errors) == (4, 3, 1, 0)
    assert a.spent_usd == pytest.approx(0.005) and a.saved_usd == pytest.approx(0.015)
    assert a.hit_rate == 0.75 and a.saving == pytest.approx(0.75)
    assert (b.requests, b.hits, b.errors) == (3, 1, 1)
    assert b.hit_rate == 0.5  # of the answered ones
    assert [r.key for r in aggregate(evs, ("namespace",))] == [("ns:team-b",), ("ns:team-a",)]
    hours = aggregate(evs, ("hour",))
    assert [r.requests for r in hours] == [4, 3] and hours[0].key < hours[1].key
    by_tier = {r.key[0]: r for r in aggregate(evs, ("tier",))}
    assert by_tier["large"].spent_usd == pytest.approx(0.3)


def report_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "report", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_report_cli_tables_json_and_plots(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in known_events()) + "\nnot json\n")
    res = report_cli(str(path))
    assert res.returncode == 0, res.stderr
    assert "7 events (1 lines skipped)" in res.stdout
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.strip()}
    # namespace table: requests, hit rate, semantic, errors, spent, saved, saving
    assert rows["ns:team-a"][1:] == ["4", "75.0%", "1", "0", "0.005000", "0.015000", "75.0%"]
    assert rows["ns:team-b"][1:] == ["3", "50.0%", "0", "1", "0.300000", "0.300000", "50.0%"]
    assert rows["large"][1:3] == ["3", "50.0%"]

    res = report_cli(str(path), "--by", "namespace,tier", "--json")
    assert res.returncode == 0, res.stderr
    table = json.loads(res.stdout)["tables"]["namespace,tier"]
    assert {(r["namespace"], r["tier"]): r["requests"] for r in table} == {
        ("ns:team-a", "small"): 4, ("ns:team-b", "large"): 3}
    assert read_files([path])[1] == 1

    assert report_cli(str(path), "--by", "colour").returncode == 2
    pytest.importorskip("matplotlib")
    res = report_cli(str(path), "--plot", str(tmp_path / "plots"))
    assert res.returncode == 0, res.stderr
    for name in ("cost_by_namespace.png", "cost_by_tier.png", "cost_by_hour.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name


async def test_proxy_writes_one_event_per_request(make_proxy: Any, tmp_path: Path,
                                                  tiers: Any) -> None:
    """A known workload through a real proxy: one event per request, the same totals as
    /admin/stats, joins counted as saved, no prompt and no API key in the log; then
    ``edge-proxy report`` over the file agrees."""
    import asyncio

    import aiohttp

    path = tmp_path / "events.jsonl"
    p = await make_proxy(server={"admin_token": "t"}, cache={"trust_namespace_header": True},
                         events={"sink": "file", "path": str(path), "flush_interval_s": 0.01})
    a = p.client(api_key="sk-secret-a", default_headers={"x-cache-namespace": "team-a"})
    b = p.client(api_key="sk-secret-b")
    msg = [{"role": "user", "content": "What is the capital of France?"}]
    for _ in range(3):  # miss, hit, hit
        await a.chat.completions.create(model="auto", messages=msg)
    stream = await a.chat.completions.create(  # a streamed miss of another question
        model="large-70b", stream=True,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}])
    async for _ in stream:
        pass
    # four identical requests at once: one upstream call, three joins
    tiers["small"].mock.ttft_ms = 500
    burst = [{"role": "user", "content": "Name the planets of the solar system."}]
    await asyncio.gather(*(b.chat.completions.create(model="small-8b", messages=burst)
                           for _ in range(4)))
    with pytest.raises(Exception, match="model"):
        await b.chat.completions.create(model="nope", messages=msg)
    async with aiohttp.ClientSession() as s, s.get(
            p.url + "/admin/stats", headers={"Authorization": "Bearer t"}) as r:
        stats = await r.json()
    await p.proxy.events.flush()

    evs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(evs) == 3 + 1 + 4 + 1
    outcomes = [e["outcome"] for e in evs[:3]]
    assert outcomes == ["miss", "hit-exact", "hit-exact"]
    assert [e["outcome"] for e in evs].count("error") == 1
    assert sum(e["cost_usd"] > 0 for e in evs) == 3  # three upstream calls
    # the burst: one upstream call; the other three joined it (or, on a very slow machine,
    # arrived after it ended and hit the cache): saved either way, never spent
    burst_evs = [e for e in evs if e["model"] == "small-8b" and e["status"] == 200]
    assert len(burst_evs) == 4 and sum(e["cost_usd"] > 0 for e in burst_evs) == 1
    others = [e for e in burst_evs if e["cost_usd"] == 0]
    assert all((e["joined"] or e["outcome"] == "hit-exact") and e["saved_usd"] > 0
               for e in others)
    assert sum(e["joined"] for e in evs) >= 1
    assert sum(e["cost_usd"] for e in evs) == pytest.approx(stats["cost"]["spent_usd"])
    assert sum(e["saved_usd"] for e in evs) == pytest.approx(stats["cost"]["saved_usd"])
    streamed = next(e for e in evs if e["stream"])
    assert streamed["tier"] == "large" and streamed["ttfb_ms"] <= streamed["latency_ms"]
    assert {e["namespace"] for e in evs if e["model"] == "auto"} == {"ns:team-a"}
    err = next(e for e in evs if e["outcome"] == "error")
    assert err["status"] == 404  # refused before its namespace was known: "-"
    text = path.read_text()
    assert "sk-secret" not in text and "capital of France" not in text  # no key, no prompt
    for e in evs:
        assert set(FIELDS) <= set(e)

    res = report_cli(str(path), "--by", "namespace", "--json")
    rows = json.loads(res.stdout)["tables"]["namespace"]
    assert sum(r["spent_usd"] for r in rows) == pytest.approx(stats["cost"]["spent_usd"])
    assert sum(r["requests"] for r in rows) == len(evs)
