"""Operator-facing metrics: build_info, process metrics, no _created series, Redis "disabled"
(no sample) rather than "down" (0) when none is configured."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from tests.conftest import free_port


async def scrape(url: str) -> dict[str, list[Any]]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def test_build_info_process_metrics_and_no_created(make_proxy: Any) -> None:
    p = await make_proxy()
    await p.client().chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hi"}])
    fams = await scrape(p.url)
    (info,) = fams["edge_proxy_build_info"]
    assert info.value == 1 and info.labels["version"] == __version__
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds"):
        assert name in fams and fams[name][0].value > 0, name
    created = [s.name for samples in fams.values() for s in samples
               if s.name.endswith("_created")]
    assert created == []
    assert fams["edge_proxy_requests"], "the request was counted"
    caps = {s.labels["layer"]: s.value for s in fams["edge_proxy_cache_capacity_entries"]}
    assert caps["l1"] == p.config.cache.l1_max_entries
    assert caps["semantic"] == p.config.semantic.capacity


async def test_redis_unconfigured_has_no_sample_configured_down_is_zero(make_proxy: Any) -> None:
    off = await make_proxy()
    fams = await scrape(off.url)
    assert fams["edge_proxy_redis_up"] == []  # disabled: the family, no sample
    assert fams["edge_proxy_shared_stream_up"] == []
    down = await make_proxy(cache={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    fams = await scrape(down.url)
    assert [s.value for s in fams["edge_proxy_redis_up"]] == [0.0]
