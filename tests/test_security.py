"""Security and resource bounds (issue #11): what an attacker on the same network, or a bad
record on the shared Redis, could do before, and must not be able to do now.

Every test runs real processes: the proxy (in this process, or as ``python -m proxy serve``),
the mock vLLM tiers, the suite's own redis-server, and the official openai client as the caller
wherever a client is involved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import redis as redis_sync

from tests.conftest import access_lines, free_port, run_cli, start_proxy
from tests.test_exact import wait_http
from tests.test_faults import _until

CHAT = "/v1/chat/completions"
Q = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
#: proxy.shared.FORMAT_VERSION, the stream record format this version writes
FORMAT_VERSION = 1


def client(url: str, key: str, **kw: Any) -> openai.AsyncOpenAI:
    """The openai client with API key ``key`` (see ``auth`` for none at all)."""
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key or "unused", max_retries=0,
                              timeout=30, **kw)


def auth(key: str) -> dict[str, Any]:
    """Per-request headers: "" = send no Authorization header at all."""
    return {} if key else {"Authorization": openai.Omit()}


async def ask(url: str, key: str, text: str, ns: str | None = None) -> str:
    """x-cache of one chat request through the openai client ("" = no credential)."""
    headers = {"x-cache-namespace": ns} if ns is not None else {}
    headers.update(auth(key))
    r = await client(url, key).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}], extra_headers=headers)
    return r.headers["x-cache"]


async def raw_http(url: str, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes on a new connection; what came back before EOF or ``wait`` seconds."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                out += chunk
                if b"\r\n\r\n" in out:
                    head, _, body = out.partition(b"\r\n\r\n")
                    m = re.search(rb"(?i)content-length: *(\d+)", head)
                    if m and len(body) >= int(m.group(1)):
                        break
    except TimeoutError:
        pass
    writer.close()
    return out


def raw_chat(text: str, extra_head: bytes = b"", path: bytes = CHAT.encode()) -> bytes:
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": text}]}).encode()
    return (b"POST " + path + b" HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sk-raw\r\nConnection: close\r\n" + extra_head
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def json_body(raw: bytes) -> Any:
    return json.loads(raw.partition(b"\r\n\r\n")[2])


async def scrape(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return r.status, await r.text()


# -- High 1: tenant identity ---------------------------------------------------------------------


@pytest.fixture
async def shared_pair(make_proxy: Any, redis_url: str, redis_prefix: str) -> Any:
    """Two sidecars on one Redis (the deployment where a cross-tenant read crosses apps)."""
    cache = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    a = await make_proxy(tier_names=("small",), cache=cache)
    b = await make_proxy(tier_names=("small",), cache=cache)
    return a, b


async def test_namespace_header_cannot_reach_another_tenants_entries(shared_pair: Any) -> None:
    """The attack of the issue: a caller without team-a's key sends x-cache-namespace: team-a.
    Before: an exact hit for the same text, a semantic hit for a paraphrase, and it could plant
    answers that team-a would be served. Now the header only partitions within the caller's own
    credential."""
    a, b = shared_pair
    assert await ask(a.url, "sk-team-a", Q, ns="team-a") == "miss"
    # the entry reached b's index through the stream: a paraphrase inside team-a is a hit there
    assert await _until(lambda: len(b.proxy.semantic.index) >= 1)
    assert await ask(b.url, "sk-team-a", PARAPHRASE, ns="team-a") == "hit-semantic"
    for attacker in ("", "sk-attacker"):  # no credential, or a key of its own
        assert await ask(b.url, attacker, Q, ns="team-a") == "miss", attacker or "anonymous"
        assert await ask(a.url, attacker, "What is the refund policy?", ns="team-a") == "miss"
    # what the attackers stored under "team-a" is in their own namespaces, not team-a's
    assert await ask(a.url, "sk-team-a", "What is the refund policy?", ns="team-a") == "miss"
    # and a paraphrase asked by the attacker is not served from team-a's entry either
    assert await ask(b.url, "sk-attacker2", "how do i reset my password", ns="team-a") == "miss"


async def test_gateway_mode_trusts_the_header(make_proxy: Any) -> None:
    """cache.trust_namespace_header: a gateway sets x-cache-namespace and it names the tenant
    whatever key the request carries (the old behaviour, now opt-in)."""
    p = await make_proxy(tier_names=("small",), cache={"trust_namespace_header": True})
    assert await ask(p.url, "sk-1", Q, ns="team-a") == "miss"
    assert await ask(p.url, "sk-2", Q, ns="team-a") == "hit-exact"
    assert await ask(p.url, "sk-2", Q, ns="team-b") == "miss"
    # without the header, the credential is the tenant
    assert await ask(p.url, "sk-1", Q) == "miss"
    assert await ask(p.url, "sk-2", Q) == "miss"


async def test_anonymous_callers_share_one_namespace_or_are_refused(make_proxy: Any) -> None:
    shared = await make_proxy(tier_names=("small",))
    assert await ask(shared.url, "", Q) == "miss"
    assert await ask(shared.url, "", Q) == "hit-exact"       # one anonymous namespace
    assert await ask(shared.url, "sk-key", Q) == "miss"      # not shared with keyed callers

    refuse = await make_proxy(tier_names=("small",), cache={"anonymous": "refuse"})
    with pytest.raises(openai.AuthenticationError) as info:
        await client(refuse.url, "").chat.completions.create(
            model="auto", messages=[{"role": "user", "content": Q}], extra_headers=auth(""))
    assert info.value.status_code == 401 and info.value.code == "missing_api_key"
    assert await ask(refuse.url, "sk-key", Q) == "miss"      # a credential is enough
    assert refuse.proxy.semantic is not None and len(refuse.proxy.cache.l1) == 1


# -- High 2: input at the edge -------------------------------------------------------------------


@pytest.mark.parametrize("header", [b"x-cache-namespace", b"x-request-id"])
@pytest.mark.parametrize("value", [b"team-\xff\xfe", b"a" * 129, b"caf\xc3\xa9\xed\xa0\x80"])
async def test_bad_header_values_get_a_400_naming_the_header(make_proxy: Any, header: bytes,
                                                            value: bytes) -> None:
    """Before: a non-UTF-8 byte in x-cache-namespace became a metric label and every later
    scrape of /metrics answered 500 until restart."""
    p = await make_proxy(tier_names=("small",))
    out = await raw_http(p.url, raw_chat("bad header", header + b": " + value + b"\r\n"))
    assert status_of(out) == 400, out[:300]
    err = json_body(out)["error"]
    assert err["param"] == header.decode() and err["code"] == "invalid_header"
    assert p.proxy.flights == {} and len(p.proxy.cache.l1) == 0
    status, text = await scrape(p.url)
    assert status == 200 and "edge_proxy_requests_total" in text
    # the proxy goes on, and a valid value of the same header is served
    ok = await raw_http(p.url, raw_chat("bad header", header + b": fine-1\r\n"))
    assert status_of(ok) == 200, ok[:300]
    assert (await scrape(p.url))[0] == 200


async def test_metrics_survive_every_namespace_byte(make_proxy: Any) -> None:
    """Whatever bytes x-cache-namespace carries, /metrics keeps answering 200."""
    p = await make_proxy(tier_names=("small",))
    for i, bad in enumerate((b"\x80", b"\xc3(", b"x\x7fy", b"\xf0\x9f\x98", b"ok\xe2\x82")):
        await raw_http(p.url, raw_chat(f"byte {i}", b"x-cache-namespace: " + bad + b"\r\n"))
        status, _ = await scrape(p.url)
        assert status == 200


async def test_admin_token_with_non_utf8_bytes_is_a_401(make_proxy: Any) -> None:
    p = await make_proxy(tier_names=("small",), server={"admin_token": "adm"})
    req = (b"GET /admin/stats HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
           b"Authorization: Bearer \xff\xfeadm\r\n\r\n")
    out = await raw_http(p.url, req)
    assert status_of(out) == 401, out[:200]
    assert json_body(out)["error"]["code"] == "invalid_admin_token"


async def test_json_access_log_never_raises(make_proxy: Any, caplog: Any) -> None:
    """Before: a non-UTF-8 x-request-id made the JSON access logger raise on every such
    request. The logger now writes one parseable line per request whatever the bytes."""
    p = await make_proxy(tier_names=("small",))  # only for its config (the mock tier)
    logged = await start_proxy(p.config, access_log=True)
    try:
        with caplog.at_level(logging.INFO, logger="edge_proxy.access"):
            for extra, path in ((b"x-request-id: r-\xff\r\n", CHAT.encode()),
                                (b"x-request-id: ok-1\r\n", CHAT.encode()),
                                (b"", b"/v1/%ff%fe%ed%a0%80")):
                out = await raw_http(logged.url, raw_chat("log me", extra, path))
                assert status_of(out) in (200, 400, 404), out[:200]
            lines = await access_lines(caplog, 3)
        assert len(lines) == 3
        assert [rec["status"] for rec in lines] == [400, 200, 404]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await logged.runner.cleanup()


async def test_namespace_series_are_bounded(make_proxy: Any) -> None:
    """One label value per tenant up to server.metrics_max_namespaces, then "other": minting
    keys (or partitions) cannot grow /metrics without bound."""
    p = await make_proxy(tier_names=("small",), server={"metrics_max_namespaces": 3})
    for i in range(8):
        for ns in ("p1", "p2"):  # partitions within a key are one tenant's label
            await ask(p.url, f"sk-tenant-{i}", f"question {i}", ns=ns)
            await ask(p.url, f"sk-tenant-{i}", f"question {i}", ns=ns)  # a hit: cost saved
    _, text = await scrape(p.url)
    for metric in ("edge_proxy_cost_spent_usd_total", "edge_proxy_cost_saved_usd_total"):
        labels = set(re.findall(metric + r'\{[^}]*namespace="([^"]*)"', text))
        assert len(labels) == 4 and "other" in labels, (metric, labels)
        assert not any("/ns:" in ns for ns in labels)


# -- High 3: records on the shared Redis Stream --------------------------------------------------


def _vec(seed: int) -> bytes:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float16).tobytes()


def good_add(n: int, **extra: bytes) -> dict[bytes, bytes]:
    now = time.time()
    return {b"op": b"add", b"o": b"writer-x", b"k": n.to_bytes(16, "big"),
            b"s": b"s" * 16, b"n": b"key:0000000000000000", b"q": f"question {n}".encode(),
            b"t": b"small", b"c": repr(now).encode(), b"e": repr(now + 3600).encode(),
            b"v": _vec(n), **extra}


def malformed_records() -> list[dict[bytes, bytes]]:
    """Records another version (or anyone who can write to Redis) could put on the stream."""
    add = good_add(99)
    without = {k: v for k, v in add.items() if k != b"k"}
    return [
        {b"op": b"purge_ns", b"o": b"x"},                       # the example: no n
        {b"op": b"purge_key", b"o": b"x", b"n": b"ns"},          # no k
        without,                                                 # add without its key
        {**add, b"v": b"\x00\x01"},                               # vector of the wrong size
        {**add, b"v": np.full(384, np.nan, np.float16).tobytes()},  # not a unit vector
        {**add, b"n": b"\xff\xfe"},                               # namespace not UTF-8
        {**add, b"q": b"x" * 100_000},                            # oversized query text
        {**add, b"e": b"tomorrow"},                               # not a number
        {**add, b"fv": b"v2"},                                    # garbage version
        {b"op": b"compact", b"fv": b"2", b"o": b"x"},             # an op of a later version
        {b"garbage": b"\x00" * 10},
    ]


async def test_bad_stream_records_are_skipped_by_a_running_sidecar(
        make_proxy: Any, redis_url: str, redis_prefix: str) -> None:
    """Before: one purge record without its key field made every running sidecar's tailer loop
    hot on the same record, applying nothing more. Now each bad record is counted once, logged
    with its id, skipped, and later good records are applied."""
    p = await make_proxy(tier_names=("small",),
                         cache={"redis_url": redis_url, "redis_prefix": redis_prefix})
    shared = p.proxy.semantic.shared
    assert shared is not None
    r = redis_sync.Redis.from_url(redis_url)
    stream = (redis_prefix + "stream").encode()
    bad = malformed_records()
    for rec in bad:
        r.xadd(stream, rec)
    r.xadd(stream, good_add(1))
    # a record of the next format version: an extra field it does not know, same op: applied
    last = r.xadd(stream, good_add(2, fv=b"2", future_field=b"whatever"))
    assert await _until(lambda: shared.last_id == last, timeout=10)
    assert len(p.proxy.semantic.index) == 2
    assert shared.bad_records == len(bad)  # each counted once: no re-reading, no hot loop
    _, text = await scrape(p.url)
    counted = sum(float(v) for v in re.findall(
        r'edge_proxy_shared_bad_records_total\{reason="[a-z_]+"\} ([\d.]+)', text))
    assert counted == len(bad)
    # and the proxy's own answers still travel: a miss here is published and read back
    assert await ask(p.url, "sk-x", Q) == "miss"
    r.close()


async def test_a_starting_sidecar_replays_past_bad_records(tiers: Any, redis_url: str,
                                                          redis_prefix: str) -> None:
    """Before: every sidecar that started exited during replay (KeyError): a crash loop until
    someone trimmed the stream. Now it starts, reports ready and has the good entries."""
    r = redis_sync.Redis.from_url(redis_url)
    stream = (redis_prefix + "stream").encode()
    r.xadd(stream, good_add(1))
    for rec in malformed_records():
        r.xadd(stream, rec)
    r.xadd(stream, good_add(2))
    r.xadd(stream, good_add(3, fv=str(FORMAT_VERSION + 1).encode()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = run_cli("serve", "--port", str(port), "--tier", f"small={tiers['small'].url}",
                   "--redis", redis_url, env={"EDGE_PROXY_CACHE__REDIS_PREFIX": redis_prefix,
                                              "EDGE_PROXY_SERVER__ADMIN_TOKEN": "adm",
                                              "EDGE_PROXY_ROUTER__ENABLED": "false"})
    try:
        await wait_http(url + "/readyz", proc, timeout=60)
        async with aiohttp.ClientSession() as s, s.get(
                url + "/admin/stats", headers={"Authorization": "Bearer adm"}) as resp:
            stats = await resp.json()
        assert stats["semantic"]["entries"] == 3
        _, text = await scrape(url)
        assert "edge_proxy_shared_bad_records_total" in text
        assert await ask(url, "sk-x", Q) == "miss"  # and it serves
        assert proc.poll() is None
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode(errors="replace")
        r.close()
    assert "Traceback" not in out, out[-3000:]
    assert out.count("skipped") >= len(malformed_records()), out[-3000:]


async def test_records_carry_a_format_version(make_proxy: Any, redis_url: str,
                                              redis_prefix: str) -> None:
    p = await make_proxy(tier_names=("small",), server={"admin_token": "adm"},
                         cache={"redis_url": redis_url, "redis_prefix": redis_prefix})
    await ask(p.url, "sk-x", Q)
    async with aiohttp.ClientSession() as s, s.post(
            p.url + "/admin/purge", headers={"Authorization": "Bearer adm"},
            json={"namespace": "key:0000000000000000"}) as resp:
        assert resp.status == 200
    r = redis_sync.Redis.from_url(redis_url)
    stream = (redis_prefix + "stream").encode()
    assert await _until(lambda: r.xlen(stream) == 2)
    recs = r.xrange(stream)
    assert [f[b"op"] for _, f in recs] == [b"add", b"purge_ns"]
    assert all(f[b"fv"] == str(FORMAT_VERSION).encode() for _, f in recs)
    r.close()


# -- Medium 4: single-flight and token limits ----------------------------------------------------


@pytest.mark.parametrize("leader,follower", [(None, 3), (3, None), (5, 3)])
async def test_single_flight_joins_only_requests_the_answer_satisfies(
        make_proxy: Any, leader: int | None, follower: int | None) -> None:
    """Before: a max_tokens=3 request that joined an identical in-flight request got 24
    tokens, and a request with no limit got the leader's 3-token ``length`` answer."""
    from proxy.mock_vllm import start_mock

    mock, runner, port = await start_mock("small-8b", ttft_ms=300, tpot_ms=2, reply_tokens=24)
    try:
        p = await make_proxy(tier_names=("small",),
                             tier_urls={"small": f"http://127.0.0.1:{port}"})
        c = client(p.url, "sk-flight")
        msgs = [{"role": "user", "content": "single flight and limits"}]

        async def one(limit: int | None, delay: float) -> Any:
            await asyncio.sleep(delay)
            extra = {} if limit is None else {"max_tokens": limit}
            return await c.chat.completions.create(model="auto", messages=msgs, **extra)

        a, b = await asyncio.gather(one(leader, 0), one(follower, 0.1))
        for limit, r in ((leader, a), (follower, b)):
            words = len(r.choices[0].message.content.split())
            if limit is None:
                assert words == 24 and r.choices[0].finish_reason == "stop"
            else:
                assert words == limit and r.choices[0].finish_reason == "length"
        assert mock.requests == 2
    finally:
        await runner.cleanup()


# -- Medium 6: connection hygiene ----------------------------------------------------------------


def serve(tiers: Any, **env: str) -> tuple[Any, str]:
    """``python -m proxy serve`` in front of the small mock tier, with EDGE_PROXY_* overrides."""
    port = free_port()
    proc = run_cli("serve", "--port", str(port), "--tier", f"small={tiers['small'].url}",
                   env={"EDGE_PROXY_ROUTER__ENABLED": "false", **env})
    return proc, f"http://127.0.0.1:{port}"


async def open_slow(url: str, n: int, data: bytes) -> list[Any]:
    host, port = url.removeprefix("http://").split(":")
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(data)
        conns.append((reader, writer))
    return conns


async def closed_by_server(reader: asyncio.StreamReader, wait: float) -> bool:
    """True when the server closes the connection (EOF, possibly after an error answer)."""
    try:
        async with asyncio.timeout(wait):
            while await reader.read(65536):
                pass
        return True
    except (TimeoutError, ConnectionResetError):
        return False


async def test_slowloris_heads_are_closed_and_others_served(tiers: Any) -> None:
    """Before: connections that sent half a request head were never timed out (1,000 of them
    were all still open after 100 s). Now each is closed once server.idle_timeout_s passes
    without a complete head, idle keep-alive connections too, while normal requests go on."""
    proc, url = serve(tiers, EDGE_PROXY_SERVER__IDLE_TIMEOUT_S="1")
    try:
        await wait_http(url + "/readyz", proc, timeout=60)
        half = b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Ty"
        slow = await open_slow(url, 50, half)
        idle = await open_slow(url, 1, b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        assert await ask(url, "sk-normal", "served beside slowloris") == "miss"
        results = await asyncio.gather(*(closed_by_server(r, 15) for r, _ in slow + idle))
        assert all(results), f"{results.count(False)} slow connections still open"
        assert await ask(url, "sk-normal", "served beside slowloris") == "hit-exact"
        for _, w in slow + idle:
            w.close()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_connection_cap_answers_503(tiers: Any) -> None:
    """Before: connections past the file limit made normal requests fail at accept. Now
    past server.max_connections a new connection gets an OpenAI-style 503 and is closed."""
    proc, url = serve(tiers, EDGE_PROXY_SERVER__MAX_CONNECTIONS="20",
                      EDGE_PROXY_SERVER__IDLE_TIMEOUT_S="3")
    try:
        await wait_http(url + "/readyz", proc, timeout=60)
        held = await open_slow(url, 20, b"POST /v1/chat/completions HTTP/1.1\r\n")
        await asyncio.sleep(0.3)
        out = await raw_http(url, raw_chat("over the cap"))
        assert status_of(out) == 503, out[:300]
        assert json_body(out)["error"]["code"] == "too_many_connections"
        with pytest.raises(openai.InternalServerError):
            await client(url, "sk-cap").chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "over the cap"}])
        # the held connections time out; then requests are served again
        assert all(await asyncio.gather(*(closed_by_server(r, 15) for r, _ in held)))
        assert await ask(url, "sk-cap", "after the cap") == "miss"
        for _, w in held:
            w.close()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_slow_body_gets_a_408(make_proxy: Any) -> None:
    p = await make_proxy(tier_names=("small",), server={"body_timeout_s": 0.5})
    host, port = p.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: "
                 b"application/json\r\nContent-Length: 500\r\n\r\n{\"model\": ")
    async with asyncio.timeout(10):
        out = await reader.read(65536)
    writer.close()
    assert status_of(out) == 408 and json_body(out)["error"]["code"] == "request_timeout"
    assert p.proxy.flights == {}
    assert await ask(p.url, "sk-x", "after a slow body") == "miss"


@pytest.mark.parametrize("ctype", [b"text/plain", b"application/x-www-form-urlencoded",
                                   b"multipart/form-data; boundary=x", None])
async def test_non_json_content_types_get_a_415(make_proxy: Any, tiers: Any,
                                                ctype: bytes | None) -> None:
    """Before: a text/plain cross-site POST (no CORS preflight) was served: any web page could
    spend tokens through a proxy on localhost. No Content-Type at all is what a page's fetch()
    of a Blob sends, so it is refused too."""
    p = await make_proxy(tier_names=("small",))
    req = raw_chat("content type").replace(b"Content-Type: application/json\r\n",
                                           b"" if ctype is None else b"Content-Type: " + ctype
                                           + b"\r\n")
    out = await raw_http(p.url, req)
    assert status_of(out) == 415, out[:300]
    assert json_body(out)["error"]["code"] == "unsupported_media_type"
    assert tiers["small"].mock.requests == 0
    ok = await raw_http(p.url, raw_chat("content type").replace(
        b"application/json", b"Application/JSON; charset=utf-8"))
    assert status_of(ok) == 200


# -- Low: what an upstream may send --------------------------------------------------------------


async def faults(tier: Any, **f: Any) -> None:
    async with aiohttp.ClientSession() as s, s.post(tier.url + "/faults", json=f) as r:
        assert r.status == 200


async def test_upstream_redirects_are_not_followed(make_proxy: Any, tiers: Any) -> None:
    """Before: a redirect to another host was followed (the request, with its prompt, went
    there)."""
    p = await make_proxy(tier_names=("small",))
    await faults(tiers["small"], redirect=tiers["large"].url + "/v1/chat/completions", count=-1)
    with pytest.raises(openai.APIStatusError) as info:
        await client(p.url, "sk-r").chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "redirect me"}])
    assert info.value.status_code == 502
    assert tiers["large"].mock.requests == 0
    assert len(p.proxy.cache.l1) == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_200_with_an_error_body_is_a_502(make_proxy: Any, tiers: Any,
                                                        stream: bool) -> None:
    p = await make_proxy(tier_names=("small",))
    await faults(tiers["small"], ok_error="context length exceeded (upstream)", count=-1)
    with pytest.raises(openai.APIError) as info:
        r = await client(p.url, "sk-e").chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "error in a 200"}],
            stream=stream)
        if stream:
            async for _ in r:  # type: ignore[union-attr]
                pass
    assert "context length exceeded (upstream)" in str(info.value)
    if not stream:
        assert getattr(info.value, "status_code", None) == 502
    assert len(p.proxy.cache.l1) == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_answer_size_is_bounded(make_proxy: Any, stream: bool) -> None:
    """Before: an upstream answer had no size limit (100 MB was relayed)."""
    from proxy.mock_vllm import start_mock

    _, runner, port = await start_mock("small-8b", ttft_ms=1, tpot_ms=0, reply_tokens=5000)
    try:
        p = await make_proxy(tier_names=("small",),
                             tier_urls={"small": f"http://127.0.0.1:{port}"},
                             tier_options={"small": {"max_response_bytes": 8192}})
        with pytest.raises(openai.APIError) as info:
            r = await client(p.url, "sk-big").chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "a long one"}],
                stream=stream)
            if stream:
                async for _ in r:  # type: ignore[union-attr]
                    pass
        assert "larger than 8192 bytes" in str(info.value)
        assert len(p.proxy.cache.l1) == 0
        assert p.proxy.flights == {}
    finally:
        await runner.cleanup()


async def test_upstream_usage_of_wrong_types_and_long_sse_lines(make_proxy: Any,
                                                                tiers: Any) -> None:
    """Before: a usage with wrong types, or an SSE line over 512 KiB, gave a 500."""
    p = await make_proxy(tier_names=("small",))
    c = client(p.url, "sk-u")
    await faults(tiers["small"], usage={"prompt_tokens": "lots", "completion_tokens": [1]},
                 count=1)
    r = await c.chat.completions.create(model="auto",
                                        messages=[{"role": "user", "content": "odd usage"}])
    assert r.choices[0].message.content  # served; tokens counted by the tokenizer
    await faults(tiers["small"], long_line=600 * 1024, count=1)
    with pytest.raises(openai.APIError) as info:
        s = await c.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "long line"}], stream=True)
        async for _ in s:
            pass
    assert getattr(info.value, "status_code", 502) != 500
    assert "internal" not in str(info.value).lower()
    assert await ask(p.url, "sk-u", "after the faults") == "miss"


# -- Medium 5: tool calls and reasoning, every vLLM shape ----------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "search_docs", "description": "Search the docs",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                    "limit": {"type": "integer"}}}}}]
#: (request extras, mock faults) of each shape vLLM answers with
SHAPES = {
    # vLLM 0.32: a named tool_choice is answered with tool_calls and finish_reason "stop"
    "named_tool_stop": ({"tools": TOOLS, "tool_choice": {"type": "function",
                                                         "function": {"name": "search_docs"}}},
                        {}),
    "required_tool_calls": ({"tools": TOOLS, "tool_choice": "required"}, {}),
    "auto_tool_calls": ({"tools": TOOLS, "tool_choice": "auto"}, {}),
    # vLLM 0.32 renamed reasoning_content to reasoning, in messages and deltas
    "reasoning": ({}, {"reasoning": "reasoning"}),
    "reasoning_content": ({}, {"reasoning": "reasoning_content"}),
}
REASONING = ("reasoning", "reasoning_content")


async def answer_of(c: openai.AsyncOpenAI, text: str, stream: bool, extra: dict[str, Any]
                    ) -> tuple[str, Any]:
    """(x-cache, what the client sees: content, reasoning by field name, tool calls, finish)."""
    msgs = [{"role": "user", "content": text}]
    r = await c.chat.completions.with_raw_response.create(model="auto", messages=msgs,
                                                          stream=stream, **extra)
    if not stream:
        ch = r.parse().choices[0]
        m = ch.message
        calls = [(t.id, t.function.name, t.function.arguments) for t in m.tool_calls or ()]
        return r.headers["x-cache"], (m.content or "", {k: getattr(m, k, None) for k in
                                                        REASONING}, calls, ch.finish_reason)
    content, reasoning, tools, finish = "", dict.fromkeys(REASONING, ""), {}, None
    async for chunk in r.parse():
        for ch in chunk.choices:
            d = ch.delta
            content += d.content or ""
            for k in REASONING:
                reasoning[k] += getattr(d, k, None) or ""
            for t in d.tool_calls or ():
                acc = tools.setdefault(t.index, [None, "", ""])
                acc[0] = t.id or acc[0]
                if t.function is not None:
                    acc[1] += t.function.name or ""
                    acc[2] += t.function.arguments or ""
            finish = ch.finish_reason or finish
    calls = [tuple(v) for _, v in sorted(tools.items())]
    return r.headers["x-cache"], (content, {k: v or None for k, v in reasoning.items()}, calls,
                                  finish)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("first_stream", [False, True])
async def test_tool_calls_and_reasoning_are_stored_and_replayed_faithfully(
        make_proxy: Any, tiers: Any, shape: str, first_stream: bool) -> None:
    """Policy: an answer with tool calls or reasoning is stored like any complete answer and
    replayed as it came, in both forms. Before: the streamed replay of a named tool_choice
    answer dropped the tool call (an empty assistant message), and reasoning under vLLM 0.32's
    name ``reasoning`` was lost in both directions."""
    extra, fault = SHAPES[shape]
    p = await make_proxy(tier_names=("small",))
    if fault:
        await faults(tiers["small"], **fault, count=-1)
    c = client(p.url, "sk-tools")
    text = f"shape {shape} first {'stream' if first_stream else 'json'}"
    outcome, first = await answer_of(c, text, first_stream, extra)
    assert outcome == "miss"
    content, reasoning, calls, finish = first
    if "tool" in shape:
        assert calls and calls[0][1] == "search_docs" and json.loads(calls[0][2])["limit"] > 0
        assert finish == ("stop" if shape == "named_tool_stop" else "tool_calls")
    else:
        assert content and reasoning[shape] and finish == "stop"
        assert reasoning[{"reasoning": "reasoning_content"}.get(shape, "reasoning")] is None
    for stream in (False, True):
        outcome, again = await answer_of(c, text, stream, extra)
        assert outcome == "hit-exact", (shape, stream)
        assert again == first, (shape, stream)
    assert tiers["small"].mock.requests == 1
    if "tool" in shape:  # the JSON form keeps vLLM's content: null beside chosen calls, else ""
        r = await c.chat.completions.create(model="auto", messages=[
            {"role": "user", "content": text}], **extra)
        assert r.choices[0].message.content == (None if shape == "auto_tool_calls" else "")


# -- Low: sampled answers ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["store", "skip"])
async def test_sampled_answers_follow_an_explicit_policy(make_proxy: Any, tiers: Any,
                                                         policy: str) -> None:
    """Before: random samples were cached and replayed to everyone with no word of it. Now
    cache.sampled decides, and x-cache-sampled says it on every sampled response."""
    p = await make_proxy(tier_names=("small",), cache={"sampled": policy})
    c = client(p.url, "sk-sampled")

    async def go(text: str, **params: Any) -> tuple[str, str | None]:
        r = await c.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": text}], **params)
        return r.headers["x-cache"], r.headers.get("x-cache-sampled")

    for params in ({}, {"temperature": 0.7}, {"n": 2, "temperature": 0, "seed": 1}):
        first, again = await go(f"sampled {params}", **params), await go(f"sampled {params}",
                                                                          **params)
        if policy == "store":
            assert (first, again) == (("miss", "store"), ("hit-exact", "store")), params
        else:
            assert first == again == ("bypass", "skip"), params
    # greedy, or seeded: the one answer, cached whatever the policy, no sampled header
    for params in ({"temperature": 0}, {"temperature": 0.7, "seed": 7}):
        assert await go(f"greedy {params}", **params) == ("miss", None)
        assert await go(f"greedy {params}", **params) == ("hit-exact", None)


# -- #9: a live stream keeps a bounded replay buffer ---------------------------------------------


@pytest.mark.asyncio(loop_factories=["uvloop"])  # a long stream: once is enough
async def test_a_long_stream_keeps_a_bounded_buffer(make_proxy: Any) -> None:
    """Before: a live stream kept every frame until it ended (6.6 MiB for 20,000 tokens).
    Now past the replay buffer (proxy.flight.REPLAY_BYTES) it keeps only what a subscriber has
    not written yet; identical requests that arrive later start their own call, and every
    client gets the whole answer."""
    from proxy.flight import REPLAY_BYTES
    from proxy.mock_vllm import start_mock

    mock, runner, port = await start_mock("small-8b", ttft_ms=1, tpot_ms=0.1,
                                          reply_tokens=8_000)
    try:
        p = await make_proxy(tier_names=("small",),
                             tier_urls={"small": f"http://127.0.0.1:{port}"})
        c = client(p.url, "sk-long")
        msgs = [{"role": "user", "content": "a very long story"}]
        held: list[int] = []
        streamed: list[int] = []

        async def watch() -> None:
            while True:
                for f in list(p.proxy.flights.values()):
                    held.append(sum(map(len, f.events)))
                    streamed.append(getattr(f, "streamed", held[-1]))
                await asyncio.sleep(0.005)

        async def read(late: bool) -> str:
            if late:  # once the first flight holds more than its replay buffer
                assert await _until(lambda: any(not f.replayable and not f.done
                                                 for f in p.proxy.flights.values()), 30)
            s = await c.chat.completions.create(model="auto", messages=msgs, stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

        watcher = asyncio.create_task(watch())
        early, late = await asyncio.gather(read(False), read(True))
        watcher.cancel()
        assert len(early.split()) == len(late.split()) == 8_000 and early == late
        assert max(streamed) > 3 * REPLAY_BYTES          # the stream was long
        assert max(held) <= REPLAY_BYTES + 64 * 1024     # what the flight held was not
        assert mock.requests == 2                        # the late one made its own call
        assert p.proxy.flights == {}
    finally:
        await runner.cleanup()


# -- #7, #8: memory bounded by bytes, not by prompt length or scope count ------------------------


async def test_long_prompts_keep_no_text(make_proxy: Any) -> None:
    """Before: whole prompts (up to 400k characters) were kept as embedder-LRU keys and as the
    query text of semantic entries (300 long prompts: +920 MiB RSS). Now the LRU is keyed by a
    16-byte digest and queries over semantic.max_query_chars use the exact cache only."""
    p = await make_proxy(tier_names=("small",), semantic={"max_query_chars": 2048})
    sem = p.proxy.semantic
    long_text = "Summarize this. " + "lorem ipsum dolor sit amet " * 4000   # ~108k chars
    assert await ask(p.url, "sk-long", long_text) == "miss"
    assert await ask(p.url, "sk-long", long_text) == "hit-exact"     # the exact cache serves it
    assert len(sem.index) == 0                                       # no entry kept its text
    assert await ask(p.url, "sk-long", Q) == "miss"                  # a short query is indexed
    assert await _until(lambda: len(sem.index) == 1)
    keys = list(sem.embedder._cache)
    assert keys and all(isinstance(k, bytes) and len(k) == 16 for k in keys)


def test_small_scopes_start_small() -> None:
    """Before: every new scope allocated an 8-row float16 block (6 KB), so 10,000 namespaces
    took 6.5x the semantic memory of one. A scope now starts with one row and doubles."""
    from proxy.semantic import SemanticEntry, SemanticIndex

    rng = np.random.default_rng(1)
    now = time.time()

    def index_of(scopes: int, n: int = 512) -> SemanticIndex:
        idx = SemanticIndex(capacity=4096, brute_force_max=1024)
        for i in range(n):
            v = rng.standard_normal(384).astype(np.float32)
            idx.add(v / np.linalg.norm(v), SemanticEntry(
                key=i.to_bytes(16, "big"), scope=(i % scopes).to_bytes(16, "big"),
                namespace="key:x", query_text="q", tier="small", max_tokens=None,
                created=now, expires=now + 60))
        return idx

    one, spread = index_of(1), index_of(512)
    vectors = lambda idx: sum(sc.block.nbytes for sc in idx._scopes.values())  # noqa: E731
    # 512 one-entry scopes hold 512 rows of vectors, as one scope of 512 does
    assert vectors(spread) == vectors(one) == 512 * 384 * 2
    assert spread.memory_bytes() <= 1.25 * one.memory_bytes()
