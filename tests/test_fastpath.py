"""The exact-hit fast path (proxy/fastpath.py): a repeated request is answered below aiohttp's
request layer with the same response the normal path gives, and nothing else is: not another
tenant's request, not a pipelined or split request, not an entry purged or rated bad."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from proxy import fastpath
from proxy.server import CappedServer
from tests.conftest import access_lines, start_proxy

BODY = orjson.dumps({"model": "small-8b", "temperature": 0,
                     "messages": [{"role": "user", "content": "fast path please"}]})


def raw_request(body: bytes = BODY, key: str = "sk-a", path: str = "/v1/chat/completions",
                extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, list[tuple[str, str]], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(x.split(": ", 1)) for x in lines[1:] if x]
    if dict(headers).get("Transfer-Encoding") == "chunked":  # a streamed miss
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if not size:
                return status, headers, body  # type: ignore[return-value]
    length = int(dict(headers)["Content-Length"])
    return status, headers, await reader.readexactly(length)  # type: ignore[return-value]


async def exchange(url: str, *requests: bytes, together: bool = False) -> list[Any]:
    """Send the requests on one keep-alive connection (one write, or one per response)."""
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    out = []
    try:
        if together:
            writer.write(b"".join(requests))
            for _ in requests:
                out.append(await read_response(reader))
        else:
            for r in requests:
                writer.write(r)
                await writer.drain()
                out.append(await read_response(reader))
    finally:
        writer.close()
    return out


async def exchange_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      *requests: bytes) -> list[Any]:
    out = []
    for r in requests:
        writer.write(r)
        await writer.drain()
        out.append(await read_response(reader))
    return out


def h(resp: Any) -> dict[str, str]:
    return dict(resp[1])


def test_this_aiohttp_supports_the_fast_path() -> None:
    # if aiohttp's RequestHandler changes its internals the fast path switches itself off;
    # this makes that loud instead of a silent slowdown
    assert fastpath.supported()


async def test_a_repeated_request_is_replayed_with_the_normal_paths_response(make_proxy) -> None:
    p = await make_proxy()
    assert isinstance(p.runner._server, CappedServer)
    memo = p.proxy.memo
    miss, normal, fast, fast2 = await exchange(p.url, *[raw_request()] * 4)
    assert h(miss)["x-cache"] == "miss" and h(normal)["x-cache"] == "hit-exact"
    assert memo.served == 2 and len(memo) == 1
    for r in (normal, fast, fast2):
        assert r[0] == 200
    # the same header lines in the same order, the same values but the request id and date
    assert [k for k, _ in fast[1]] == [k for k, _ in normal[1]]
    same = {k: v for k, v in normal[1] if k not in ("x-request-id", "Date")}
    assert {k: v for k, v in fast[1] if k in same} == same
    assert len({h(r)["x-request-id"] for r in (normal, fast, fast2)}) == 3  # fresh ids
    a, b = orjson.loads(normal[2]), orjson.loads(fast[2])
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]
    assert a["id"] != b["id"]  # a replay gets its own completion id, as on the normal path
    # counted like any hit
    hits = sum(v for (ep, outcome, _), v in p.metrics.hot.requests.items()
               if outcome == "hit-exact")
    assert hits == 3


async def test_the_openai_client_gets_fast_hits_and_can_rate_them(make_proxy, tiers) -> None:
    import aiohttp

    p = await make_proxy()
    c = p.client(api_key="sk-rate")
    msgs = [{"role": "user", "content": "rate the fast path"}]
    first = await c.chat.completions.create(model="small-8b", messages=msgs, temperature=0)
    for _ in range(3):
        raw = await c.chat.completions.with_raw_response.create(
            model="small-8b", messages=msgs, temperature=0)
        assert raw.headers["x-cache"] == "hit-exact"
        assert raw.parse().choices[0].message.content == first.choices[0].message.content
    assert p.proxy.memo.served >= 1  # the SDK sends identical bytes on one connection
    rid = raw.headers["x-request-id"]
    async with aiohttp.ClientSession() as s, s.post(
            p.url + "/v1/feedback", json={"request_id": rid, "rating": "bad"},
            headers={"Authorization": "Bearer sk-rate"}) as r:
        assert r.status == 200 and (await r.json())["removed"] is True
    calls = tiers["small"].mock.requests
    raw = await c.chat.completions.with_raw_response.create(
        model="small-8b", messages=msgs, temperature=0)
    assert raw.headers["x-cache"] == "miss"  # the rated answer is gone, fast path included
    assert tiers["small"].mock.requests == calls + 1


async def test_another_tenant_never_gets_a_replay(make_proxy) -> None:
    p = await make_proxy()
    await exchange(p.url, raw_request(key="sk-a"), raw_request(key="sk-a"))
    served = p.proxy.memo.served
    (other,) = await exchange(p.url, raw_request(key="sk-b"))
    assert h(other)["x-cache"] == "miss" and p.proxy.memo.served == served
    # the namespace header partitions too
    (part,) = await exchange(p.url, raw_request(key="sk-a", extra="x-cache-namespace: x\r\n"))
    assert h(part)["x-cache"] == "miss" and p.proxy.memo.served == served


async def test_pipelined_and_split_requests_take_the_normal_path(make_proxy) -> None:
    p = await make_proxy()
    await exchange(p.url, raw_request(), raw_request())  # miss, learn
    memo = p.proxy.memo
    served = memo.served
    # two requests in one write: answered in order by aiohttp
    r1, r2 = await exchange(p.url, raw_request(), raw_request(), together=True)
    assert h(r1)["x-cache"] == h(r2)["x-cache"] == "hit-exact"
    assert h(r1)["x-request-id"] != h(r2)["x-request-id"]
    assert memo.served == served
    # a request in pieces (a head cut short; a head then its body, as httpx writes them; a
    # body cut short): aiohttp's parser finds the boundaries, the fast path answers once the
    # body is complete
    req = raw_request()
    cut = req.index(b"\r\n\r\n") + 4
    for i, pieces in enumerate(((req[:40], req[40:]), (req[:cut], req[cut:]),
                   (req[:cut], req[cut:cut + 5], req[cut + 5:]))):
        host, port = p.url.split("//")[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        resp = await read_response(reader)
        assert h(resp)["x-cache"] == "hit-exact" and memo.served == served + 1
        served += 1
        # the same connection goes on serving, the normal path included
        (miss,) = await exchange_on(reader, writer, raw_request(key=f"sk-other-{i}"))
        assert h(miss)["x-cache"] == "miss"
        writer.close()
    # a known head whose body never completes: nothing is answered, the proxy goes on
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(req[:cut + 3])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    (ok,) = await exchange(p.url, raw_request())
    assert h(ok)["x-cache"] == "hit-exact"
    # and a connection that sent garbage first still gets aiohttp's 400
    garbage = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n"
    (bad,) = await exchange(p.url, garbage)
    assert bad[0] == 400


async def test_a_purged_entry_is_not_replayed(make_proxy) -> None:
    import aiohttp

    p = await make_proxy(server={"admin_token": "adm"})
    _, hit = await exchange(p.url, raw_request(), raw_request())
    key = h(hit)["x-cache-key"]
    async with aiohttp.ClientSession() as s, s.post(
            p.url + "/admin/purge", json={"key": key, "namespace": p.proxy.memo.get(
                next(iter(p.proxy.memo._d))).namespace},
            headers={"Authorization": "Bearer adm"}) as r:
        assert r.status == 200
    (after,) = await exchange(p.url, raw_request())
    assert h(after)["x-cache"] == "miss"


async def test_stream_replay_and_token_limit(make_proxy) -> None:
    p = await make_proxy()
    body = orjson.loads(BODY)
    sbody = orjson.dumps({**body, "stream": True})
    _, normal, fast = await exchange(p.url, *[raw_request(sbody)] * 3)
    assert p.proxy.memo.served == 1
    assert h(fast)["Content-Type"] == "text/event-stream"
    assert [k for k, _ in fast[1]] == [k for k, _ in normal[1]]
    assert fast[2].endswith(b"data: [DONE]\n\n")
    assert fast[2].count(b"data: ") == normal[2].count(b"data: ")


async def test_memo_is_bounded_and_cleared_on_reload(make_proxy) -> None:
    from proxy import reload

    p = await make_proxy(server={"fast_path_entries": 2, "admin_token": "adm"})
    for i in range(4):
        b = orjson.dumps({"model": "small-8b", "temperature": 0,
                          "messages": [{"role": "user", "content": f"bounded {i}"}]})
        await exchange(p.url, raw_request(b), raw_request(b))
    memo = p.proxy.memo
    assert len(memo) == 2 and 0 < memo.bytes <= 2 * 3000
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(
            p.url + "/admin/stats", headers={"Authorization": "Bearer adm"}) as r:
        fast = (await r.json())["fast_path"]
    assert fast == {"entries": 2, "bytes": memo.bytes, "served": memo.served}
    reload.apply(p.proxy, p.proxy.config)
    assert len(memo) == 0 and memo.bytes == 0


async def test_fast_path_off(make_proxy) -> None:
    p = await make_proxy(server={"fast_path": False})
    assert p.proxy.memo is None
    _, _, again = await exchange(p.url, *[raw_request()] * 3)
    assert h(again)["x-cache"] == "hit-exact"


async def test_access_log_lines_for_fast_hits(make_proxy, caplog) -> None:
    """With the JSON access log on, a fast-path answer is logged like any other request."""
    import json
    import logging

    p = await make_proxy(tier_names=("small",))  # only for its config (the mock tier)
    logged = await start_proxy(p.config, access_log=True)
    try:
        with caplog.at_level(logging.INFO, logger="edge_proxy.access"):
            out = await exchange(logged.url, *[raw_request()] * 3)
            lines = await access_lines(caplog, 3)
        assert logged.proxy.memo.served == 1
        assert [x["cache"] for x in lines] == ["miss", "hit-exact", "hit-exact"]
        assert [x["request_id"] for x in lines] == [h(r)["x-request-id"] for r in out]
        fast = lines[2]
        assert fast["path"] == "/v1/chat/completions" and fast["status"] == 200
        assert fast["bytes"] == len(out[2][2]) and fast["remote"] == "127.0.0.1"
        assert "sk-a" not in json.dumps(lines)
    finally:
        await logged.runner.cleanup()


def _write_buffered(p: Any) -> int:
    return sum(t.get_write_buffer_size() for t in p.runner.server._connections.values()
               if t is not None)


async def test_a_client_that_never_reads_cannot_grow_memory(make_proxy, tiers) -> None:
    """Before: fast answers were written whatever the connection's write buffer held, so a
    client sending one request per segment and reading nothing made the proxy buffer every
    answer (15 MB for 2,000 requests of one connection). Now a full buffer hands the request
    to aiohttp, whose drain and read pause stop it."""
    import socket

    tiers["small"].mock.reply_tokens = 1500  # a ~10 KB cached answer
    p = await make_proxy()
    req = raw_request()
    await exchange(p.url, req, req)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = p.url.split("//")[1].split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    try:
        for _ in range(2000):
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, req), 0.5)
            except TimeoutError:
                break  # the proxy stopped reading: backpressure reached the client
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.1)
        assert p.proxy.memo.served > 0
        assert _write_buffered(p) < 1_000_000
    finally:
        sock.close()


async def test_a_held_head_keeps_the_body_timeout(make_proxy) -> None:
    """Before: a known head waiting for its body pushed the idle deadline forward on every
    byte, so a client dribbling its body held the connection forever (no 408). Now the head is
    held HOLD_S at most, then aiohttp's handler applies server.body_timeout_s."""
    import time

    p = await make_proxy(server={"idle_timeout_s": 0.5, "body_timeout_s": 1.0})
    await exchange(p.url, raw_request(), raw_request())
    req = raw_request()
    cut = req.index(b"\r\n\r\n") + 4
    host, port = p.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(req[:cut + 1])
    t0 = time.perf_counter()
    i = cut + 1
    while time.perf_counter() - t0 < 6.0 and not reader.at_eof() and not reader._buffer:
        await asyncio.sleep(0.3)
        writer.write(req[i:i + 1])
        i += 1
    status, _, _ = await read_response(reader)
    writer.close()
    assert status == 408 and time.perf_counter() - t0 < 4.0


async def test_http10_is_never_answered_by_the_fast_path(make_proxy) -> None:
    p = await make_proxy()
    req11 = raw_request(extra="Connection: keep-alive\r\n")
    await exchange(p.url, req11, req11)
    req10 = req11.replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1)
    host, port = p.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(req10)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.0 200") and p.proxy.memo.served == 0


async def test_event_log_keeps_the_prompt_of_fast_hits(make_proxy, tmp_path) -> None:
    p = await make_proxy(events={"sink": "file", "path": str(tmp_path / "ev.jsonl"),
                                 "log_prompts": True})
    captured: list[dict[str, Any]] = []
    orig = p.proxy.events.emit
    p.proxy.events.emit = lambda e: (captured.append(e), orig(e))[1]
    await exchange(p.url, *[raw_request()] * 3)
    assert p.proxy.memo.served == 1
    assert [e["prompt"] for e in captured] == ["fast path please"] * 3
    assert [e["outcome"] for e in captured] == ["miss", "hit-exact", "hit-exact"]
