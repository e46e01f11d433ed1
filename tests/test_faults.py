"""Fault matrix: every mock fault mode (and a real redis-server stopped and restarted) against a
real proxy, asserting what the client gets, what is cached (nothing after a failure: the next
identical request is a miss), that the proxy keeps serving, and that no task, connection or file
descriptor leaks (fds of this process, asyncio tasks, the proxy's flights, tier slots).

tests/test_proxy.py and tests/test_resilience.py cover the single cases (500 -> 502, a cut or
malformed stream, a dead upstream, one disconnect); this file repeats each fault to expose
per-request leaks, covers both the streamed and the JSON form, and adds the faults they do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis as redis_sync

from tests.conftest import RedisServer, free_port
from tests.test_proxy import set_faults

CHAT = "/v1/chat/completions"
REPEATS = 6  # faulty requests per case: a leak per request shows up as growth


def body(text: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], "stream": stream,
            **extra}


async def post(url: str, payload: dict[str, Any], headers: dict[str, str] | None = None,
               timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection; (status, headers, whole body)."""
    async with aiohttp.ClientSession() as s, s.post(
            url + CHAT, json=payload, headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return r.status, dict(r.headers), await r.read()


def sse_events(raw: bytes) -> list[Any]:
    """The data payloads of an SSE body ("[DONE]" kept as a string)."""
    out: list[Any] = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: "):
            data = line[6:]
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def text_of(raw: bytes, stream: bool) -> str:
    if stream:
        return "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in sse_events(raw) if isinstance(e, dict) and e.get("choices"))
    return str(json.loads(raw)["choices"][0]["message"]["content"])


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Leaks:
    """Baseline of fds and tasks; ``check`` waits for the proxy to settle, then compares.

    Settled: no flight, every tier slot back, no client connection left open on the proxy's
    server, fds and tasks back to the baseline (with a little slack for the upstream keep-alive
    pool, which may hold one or two more connections, each a socket and a handler task in the
    in-process mock).
    """

    def __init__(self, running: Any) -> None:
        self.running = running
        self.proxy = running.proxy
        self.fds = fd_count()
        self.tasks = len(asyncio.all_tasks())

    def _server_connections(self) -> int:
        server = self.running.runner.server
        return len(server.connections) if server is not None else 0

    async def check(self, fd_slack: int = 4, task_slack: int = 2) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            settled = (not self.proxy.flights
                       and all(t.active == 0 for t in self.proxy.tiers.values())
                       and self._server_connections() == 0
                       and len(asyncio.all_tasks()) <= self.tasks + task_slack
                       and fd_count() <= self.fds + fd_slack)
            if settled:
                return
            await asyncio.sleep(0.05)
        tasks = [t.get_coro() for t in asyncio.all_tasks()]
        raise AssertionError(
            f"not settled: flights={list(self.proxy.flights)} "
            f"active={ {n: t.active for n, t in self.proxy.tiers.items()} } "
            f"server connections {self._server_connections()} "
            f"fds {self.fds} -> {fd_count()} tasks {self.tasks} -> {len(tasks)}: {tasks}")


async def warm(url: str) -> None:
    """A few requests, streamed and not, so pools and lazy state exist before the baseline."""
    for i in range(3):
        for stream in (False, True):
            status, _, _ = await post(url, body(f"warm-up {i}", stream))
            assert status == 200


# -- upstream faults ------------------------------------------------------------------------

#: fault -> (mock faults, tier options, applies to stream / JSON, expected status, code)
FAULTS: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[bool, ...], int, str]] = {
    "http_500": ({"status": 500}, {}, (False, True), 502, "upstream_unavailable"),
    "http_503": ({"status": 503}, {}, (False, True), 502, "upstream_unavailable"),
    # a stream must start within first_token_timeout_s; a JSON answer (silent until complete)
    # must be complete within total_timeout_s
    "first_token_timeout": ({"delay_ms": 800}, {"first_token_timeout_s": 0.2}, (True,),
                            504, "upstream_timeout"),
    "total_timeout": ({"delay_ms": 800}, {"total_timeout_s": 0.3}, (False,),
                      504, "upstream_timeout"),
    "wrong_content_type": ({"content_type": "text/plain"}, {}, (False,), 502,
                           "upstream_unavailable"),
    # after the first byte: HTTP 200, then an SSE error event instead of [DONE]
    "cut_after_3": ({"cut_after": 3}, {}, (True,), 200, "upstream_unavailable"),
    "malformed_sse": ({"malformed": True}, {}, (True,), 200, "upstream_unavailable"),
}
MATRIX = [(f, s) for f, spec in FAULTS.items() for s in spec[2]]


@pytest.mark.parametrize(("fault", "stream"), MATRIX,
                         ids=[f"{f}-{'stream' if s else 'json'}" for f, s in MATRIX])
async def test_upstream_fault(make_proxy: Any, tiers: Any, fault: str, stream: bool) -> None:
    faults, options, _, status, code = FAULTS[fault]
    p = await make_proxy(tier_names=("small",), tier_options={"small": options})
    await warm(p.url)
    leaks = Leaks(p)
    mock = tiers["small"].mock
    for i in range(REPEATS):
        prompt = f"{fault} {stream} {i}"
        await set_faults(tiers["small"], **faults, count=1)
        got, headers, raw = await post(p.url, body(prompt, stream))
        assert got == status, raw[:300]
        if status == 200:  # a stream that broke after it started
            events = sse_events(raw)
            assert "[DONE]" not in events
            assert events[-1]["error"]["code"] == code, events[-1]
        else:
            err = json.loads(raw)["error"]
            assert err["code"] == code and err["message"], err
            assert set(err) == {"message", "type", "param", "code"}
        # nothing was cached: the identical request goes upstream and succeeds
        before = mock.requests
        got, headers, raw = await post(p.url, body(prompt, stream))
        assert got == 200 and headers["x-cache"] == "miss", (got, headers, raw[:200])
        assert mock.requests == before + 1
        assert text_of(raw, stream).startswith("[small-8b]")
        # and now it is
        got, headers, _ = await post(p.url, body(prompt, stream))
        assert headers["x-cache"] == "hit-exact"
    await leaks.check()


async def test_connection_refused_streamed_and_not(make_proxy: Any) -> None:
    p = await make_proxy(tier_names=("small",),
                         tier_urls={"small": f"http://127.0.0.1:{free_port()}"},
                         tier_options={"small": {"model": "small-8b", "breaker_failures": 1000}})
    leaks = Leaks(p)
    for i in range(REPEATS):
        for stream in (False, True):
            got, _, raw = await post(p.url, body(f"refused {i}", stream))
            assert got == 502 and json.loads(raw)["error"]["code"] == "upstream_unavailable"
    assert len(p.proxy.cache.l1) == 0
    await leaks.check()


async def test_slow_tokens_keep_streaming(make_proxy: Any, tiers: Any) -> None:
    """Tokens slower than nothing in particular but each within first_token_timeout_s: the
    stream goes on to the end (the first-token timeout is not a per-request deadline)."""
    p = await make_proxy(tier_names=("small",),
                         tier_options={"small": {"first_token_timeout_s": 0.3}})
    await set_faults(tiers["small"], tpot_ms=60, count=1)  # 12 tokens: ~0.7 s in all
    t0 = time.perf_counter()
    got, headers, raw = await post(p.url, body("slow tokens", True))
    assert got == 200 and time.perf_counter() - t0 > 0.6
    assert sse_events(raw)[-1] == "[DONE]"
    assert text_of(raw, True).startswith("[small-8b]")
    got, headers, _ = await post(p.url, body("slow tokens", True))
    assert headers["x-cache"] == "hit-exact"


async def test_total_timeout_ends_a_slow_stream_with_an_error(make_proxy: Any, tiers: Any
                                                              ) -> None:
    p = await make_proxy(tier_names=("small",),
                         tier_options={"small": {"total_timeout_s": 0.4}})
    leaks = Leaks(p)
    await set_faults(tiers["small"], tpot_ms=100, count=1)  # 12 tokens: 1.2 s > 0.4 s
    got, _, raw = await post(p.url, body("too slow", True))
    events = sse_events(raw)
    assert got == 200 and "[DONE]" not in events
    assert events[-1]["error"]["code"] == "upstream_timeout"
    got, headers, _ = await post(p.url, body("too slow", True))
    assert got == 200 and headers["x-cache"] == "miss"
    await leaks.check()


async def test_slow_json_generation_is_bounded_by_total_timeout(make_proxy: Any, tiers: Any
                                                                ) -> None:
    p = await make_proxy(tier_names=("small",),
                         tier_options={"small": {"first_token_timeout_s": 0.3,
                                                 "total_timeout_s": 10}})
    await set_faults(tiers["small"], tpot_ms=60, count=1)  # 12 tokens: ~0.7 s
    got, _, raw = await post(p.url, body("slow json", False))
    assert got == 200, raw[:300]


# -- clients that go away, send slowly, or sit idle ------------------------------------------


async def _read_first_chunk_then_close(url: str, payload: dict[str, Any],
                                       when: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.post(url + CHAT, json=payload)
        assert r.status == 200
        await r.content.readany()
        await when.wait()
        r.close()  # drop the connection mid-stream


async def _subscribers(proxy: Any, n: int) -> None:
    for _ in range(200):
        if any(f.subscribers == n for f in proxy.flights.values()):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"no flight with {n} subscribers")


@pytest.mark.parametrize("who", ["leader", "follower"])
async def test_disconnect_of_one_of_two_identical_streams(make_proxy: Any, tiers: Any,
                                                          who: str) -> None:
    """Single-flight: one client leaves mid-stream, the other still gets the whole answer and
    the upstream request is not cancelled; the answer is then cached."""
    await set_faults(tiers["small"], tpot_ms=40, count=-1)
    p = await make_proxy(tier_names=("small",))
    mock = tiers["small"].mock
    payload = body("one of two leaves", True)
    both_in = asyncio.Event()
    if who == "leader":
        leaver = asyncio.create_task(_read_first_chunk_then_close(p.url, payload, both_in))
        await _subscribers(p.proxy, 1)
        stayer = asyncio.create_task(post(p.url, payload))
    else:
        stayer = asyncio.create_task(post(p.url, payload))
        await _subscribers(p.proxy, 1)
        leaver = asyncio.create_task(_read_first_chunk_then_close(p.url, payload, both_in))
    await _subscribers(p.proxy, 2)
    both_in.set()
    await leaver
    got, _, raw = await stayer
    assert got == 200 and sse_events(raw)[-1] == "[DONE]"
    assert text_of(raw, True).startswith("[small-8b]") and len(text_of(raw, True).split()) == 12
    assert mock.requests == 1 and mock.cancelled == 0 and mock.completed == 1
    await set_faults(tiers["small"])
    got, headers, _ = await post(p.url, payload)
    assert headers["x-cache"] == "hit-exact"


async def test_json_client_disconnect_cancels_upstream(make_proxy: Any, tiers: Any) -> None:
    """A JSON client that gives up: the proxy drops its upstream request at once (flight gone,
    slot back, long before the 1.2 s generation would end). The mock, unlike vLLM, finishes
    generating anyway (its server does not cancel handlers), so the proxy side is what is
    observed; tests/test_proxy.py checks the upstream abort for streams."""
    await set_faults(tiers["small"], tpot_ms=100, count=-1)
    p = await make_proxy(tier_names=("small",))
    await warm(p.url)
    leaks = Leaks(p)
    for i in range(3):
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            await post(p.url, body(f"impatient {i}"), timeout=0.3)
        for _ in range(50):
            if not p.proxy.flights and p.proxy.tiers["small"].active == 0:
                break
            await asyncio.sleep(0.01)
        assert not p.proxy.flights and p.proxy.tiers["small"].active == 0
        assert time.perf_counter() - t0 < 1.0
    await leaks.check()
    await set_faults(tiers["small"])
    got, headers, _ = await post(p.url, body("impatient 0"))
    assert got == 200 and headers["x-cache"] == "miss"


async def _trickle(data: bytes, delay: float, stop_after: int | None = None
                   ) -> AsyncIterator[bytes]:
    for n, i in enumerate(range(0, len(data), 16)):
        if stop_after is not None and n >= stop_after:
            raise ConnectionAbortedError("client gave up")
        yield data[i:i + 16]
        await asyncio.sleep(delay)


async def test_slow_body_is_read_and_an_abandoned_body_leaks_nothing(make_proxy: Any) -> None:
    p = await make_proxy(tier_names=("small",))
    await warm(p.url)
    leaks = Leaks(p)
    raw = json.dumps(body("a body sent slowly")).encode()
    async with aiohttp.ClientSession() as s, s.post(p.url + CHAT, data=_trickle(raw, 0.02),
                                                   headers={"Content-Type": "application/json"}
                                                   ) as r:
        assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"]
    for _ in range(5):  # the body stops half-way and the client leaves
        with contextlib.suppress(aiohttp.ClientError, ConnectionAbortedError):
            async with aiohttp.ClientSession() as s:
                await s.post(p.url + CHAT, data=_trickle(raw, 0.01, stop_after=3),
                             headers={"Content-Type": "application/json"})
    got, _, _ = await post(p.url, body("after abandoned bodies"))
    assert got == 200
    await leaks.check()


async def test_many_idle_connections(make_proxy: Any) -> None:
    """300 idle TCP connections (no request, or one request then keep-alive) do not stop the
    proxy from serving, and closing them gives every descriptor back."""
    p = await make_proxy(tier_names=("small",))
    await warm(p.url)
    host, port = p.url.removeprefix("http://").split(":")

    async def burst(s: aiohttp.ClientSession, tag: str) -> set[int]:
        async def one(i: int) -> int:
            async with s.post(p.url + CHAT, json=body(f"{tag} {i % 5}")) as r:
                await r.read()
                return r.status

        return set(await asyncio.gather(*(one(i) for i in range(50))))

    async with aiohttp.ClientSession() as s:  # the upstream pool grows to 5 here, not later
        assert await burst(s, "pool") == {200}
    leaks = Leaks(p)
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(250)]
    keep = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=keep) as s:
        assert await burst(s, "keep-alive") == {200}
        assert fd_count() > leaks.fds + 250
        t0 = time.perf_counter()
        got, _, _ = await post(p.url, body("while many sit idle"))
        assert got == 200 and time.perf_counter() - t0 < 2
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    await leaks.check()


# -- Redis ------------------------------------------------------------------------------------


def _redis_keys(server: RedisServer, prefix: str) -> list[bytes]:
    client = redis_sync.Redis(port=server.port)
    try:
        return list(client.scan_iter(match=prefix + "*"))
    finally:
        client.close()


async def _until(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return bool(pred())


@pytest.fixture
def private_redis() -> Any:
    server = RedisServer()
    yield server
    server.stop()


async def test_redis_absent_at_start_then_appears(make_proxy: Any, tiers: Any,
                                                  private_redis: RedisServer,
                                                  redis_prefix: str) -> None:
    cache = {"redis_url": private_redis.url, "redis_prefix": redis_prefix,
             "redis_timeout_s": 0.2}
    p = await make_proxy(tier_names=("small",), cache=cache)
    l2 = p.proxy.cache.l2
    assert l2 is not None and not l2.up
    got, headers, _ = await post(p.url, body("before redis"))
    assert got == 200 and headers["x-cache"] == "miss"
    got, headers, _ = await post(p.url, body("before redis"))
    assert headers["x-cache"] == "hit-exact"  # L1 serves
    private_redis.start()
    assert await _until(lambda: l2.up, 10), "the proxy did not reconnect to Redis"
    got, headers, _ = await post(p.url, body("after redis"))
    assert got == 200 and headers["x-cache"] == "miss"
    assert await _until(lambda: len(_redis_keys(private_redis, redis_prefix)) == 1)
    # a second proxy on the same Redis: an L2 hit, without its upstream
    q = await make_proxy(tier_names=("small",), cache=cache)
    before = tiers["small"].mock.requests
    got, headers, _ = await post(q.url, body("after redis"))
    assert headers["x-cache"] == "hit-exact" and tiers["small"].mock.requests == before


async def test_redis_killed_under_load_then_restarted(make_proxy: Any, tiers: Any,
                                                      private_redis: RedisServer,
                                                      redis_prefix: str) -> None:
    private_redis.start()
    cache = {"redis_url": private_redis.url, "redis_prefix": redis_prefix,
             "redis_timeout_s": 0.1}
    p = await make_proxy(tier_names=("small",), cache=cache)
    l2 = p.proxy.cache.l2
    assert l2 is not None and l2.up
    statuses: list[int] = []
    slowest = 0.0
    stop = asyncio.Event()

    async def load(worker: int) -> None:
        nonlocal slowest
        i = 0
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                t0 = time.perf_counter()
                # every other request new: it looks in Redis (repeats alone become L1 hits
                # within the first 0.4 s on a fast machine, and never touch the dead Redis)
                text = f"load {worker} {i % 7}" if i % 2 else f"load {worker} new {i}"
                async with s.post(p.url + CHAT, json=body(text)) as r:
                    await r.read()
                    statuses.append(r.status)
                slowest = max(slowest, time.perf_counter() - t0)
                i += 1

    workers = [asyncio.create_task(load(w)) for w in range(8)]
    await asyncio.sleep(0.4)
    await asyncio.to_thread(private_redis.stop)
    await asyncio.sleep(0.6)
    assert not l2.up
    await asyncio.to_thread(private_redis.start)  # same port, empty
    assert await _until(lambda: l2.up, 10), "the proxy did not reconnect to Redis"
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)
    assert len(statuses) > 50 and set(statuses) == {200}, set(statuses)
    assert slowest < 2.0, f"a request waited {slowest:.2f} s on a dead Redis"
    # L2 works again: a new answer lands in Redis and serves another proxy
    got, _, raw = await post(p.url, body("after the restart"))
    assert got == 200
    assert await _until(lambda: any(k for k in _redis_keys(private_redis, redis_prefix)))
    q = await make_proxy(tier_names=("small",), cache=cache)
    got, headers, raw2 = await post(q.url, body("after the restart"))
    assert headers["x-cache"] == "hit-exact"
    fresh = ("id", "created")  # a replay has its own (issue 15)
    assert ({k: v for k, v in json.loads(raw2).items() if k not in fresh}
            == {k: v for k, v in json.loads(raw).items() if k not in fresh})


# -- a short soak -----------------------------------------------------------------------------


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_short_soak_subprocesses(tmp_path: Any) -> None:
    """benchmarks/soak.py for ~20 s: no errors beyond the injected faults, bounded RSS/fds."""
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "soak.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "benchmarks/soak.py"), "--minutes", "0.3", "--rate", "40",
        "--out", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    stdout, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stdout.decode()[-3000:]
    res = json.loads(out.read_text())
    assert res["requests"] > 300 and res["unexpected_errors"] == 0, res
    assert res["injected_faults"] > 0 and res["hit_rate"] > 0.2, res
    assert res["fds"]["end"] <= res["fds"]["start"] + 20, res
