"""The status page (/admin/) in a real headless Chromium (Debian's package, driven over the
DevTools protocol by tests/browser.py): after a known workload, the rendered page shows the same
numbers as /admin/stats; the token comes from the URL fragment or the login field and lives only
in the tab's session storage; the page loads nothing from elsewhere (its CSP allows only its own
inline script and style, and the test fails on any CSP report or script error).

``EDGE_PROXY_SCREENSHOT=docs/status-page.png python -m pytest tests/test_status_page.py``
refreshes the README's screenshot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.admin import ADMIN_KEY
from tests.browser import Browser, Page

TOKEN = "admin-test-token-1234"
ROOT = Path(__file__).resolve().parent.parent

# fmt: the page's formats (proxy/static/status.html: usd, pct, ms, int)


def fixed(x: float, digits: int) -> str:
    """JavaScript's Number.prototype.toFixed: the exact value of the double, ties rounded up
    (Python's format rounds ties to even: 0.125 -> '0.12' where the page shows '0.13')."""
    return str(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def usd(x: float) -> str:
    return "$" + fixed(x, 6)


def pct(x: float | None) -> str:
    return "-" if x is None else fixed(100 * x, 1) + "%"


def ms(x: float | None) -> str:
    return "-" if x is None else fixed(x, 2)


async def stats(url: str, token: str = TOKEN) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            url + "/admin/stats", headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


async def workload(p: Any) -> None:
    """A known mix: exact repeats, a paraphrase, two tiers, two namespaces, a stream, an
    error; the series is sampled between the steps."""
    admin = p.app[ADMIN_KEY]
    a = p.client(default_headers={"x-cache-namespace": "team-a"})
    b = p.client(default_headers={"x-cache-namespace": "team-b"})
    other = p.client(api_key="sk-another-tenant")
    admin.series.sample()
    for _ in range(3):  # miss, hit, hit
        await a.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "What is the capital of France?"}])
    admin.series.sample()
    await a.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "How do I reset my password?"}])
    await a.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "How can I reset my password?"}])
    admin.series.sample()
    for _ in range(2):  # large tier: miss, hit
        await b.chat.completions.create(
            model="large-70b",
            messages=[{"role": "user", "content": "Write a haiku about the sea."}])
    stream = await other.chat.completions.create(
        model="auto", stream=True, messages=[{"role": "user", "content": "Why is the sky blue?"}])
    async for _ in stream:
        pass
    with pytest.raises(openai.NotFoundError):  # unknown model: a 404, counted as an error
        await other.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    admin.series.sample()


async def cells(page: Page, table: str, key: str) -> dict[str, list[str]]:
    """Rows of a table body by their data-KEY attribute -> the cells' text."""
    return await page.evaluate(
        f"Object.fromEntries([...document.querySelectorAll('#{table} tbody tr')].map("
        f"tr => [tr.dataset.{key}, [...tr.children].map(td => td.textContent)]))")


async def text(page: Page, element_id: str) -> str:
    return await page.evaluate(f"document.getElementById('{element_id}').textContent")


async def fresh_render(page: Page) -> None:
    """Wait for a render that started after now (the page refreshes every 2 s)."""
    before = int(await page.evaluate("Number(document.body.dataset.renders || 0)"))
    await page.wait_for(f"Number(document.body.dataset.renders || 0) >= {before + 2}")


async def test_status_page_shows_admin_stats(make_proxy: Any, tmp_path: Path, redis_url: str,
                                             redis_prefix: str) -> None:
    p = await make_proxy(server={"admin_token": TOKEN},
                         cache={"redis_url": redis_url, "redis_prefix": redis_prefix,
                                "trust_namespace_header": True})
    await workload(p)
    for _ in range(300):  # let the background stream writes land: then nothing changes
        status, s = await stats(p.url)
        if s["stream"]["length"] == s["semantic"]["entries"]:
            break
        await asyncio.sleep(0.01)
    async with Browser() as browser:
        page = await browser.new_page()
        await page.goto(p.url + f"/admin/#token={TOKEN}")
        await page.wait_for("Number(document.body.dataset.renders || 0) >= 1")
        # the token left the address bar and lives in this tab's session storage only
        assert await page.evaluate("location.hash") == ""
        assert await page.evaluate("sessionStorage.getItem('edge-proxy-admin-token')") == TOKEN
        assert await page.evaluate("localStorage.length") == 0
        assert await page.evaluate("document.cookie") == ""

        status, s = await stats(p.url)
        assert status == 200
        await fresh_render(page)  # no traffic since: the page's numbers are these

        # the workload is what we think it is
        req = s["requests"]
        assert req["hit-exact"] == 3 and req["error"] == 1
        assert req["miss"] + req.get("hit-semantic", 0) == 5
        assert sum(req.values()) == 9

        assert await text(page, "v-requests") == str(sum(req.values()))
        assert await text(page, "v-hit-rate") == pct(s["hit_rate"])
        cost = s["cost"]
        assert await text(page, "v-spent") == usd(cost["spent_usd"])
        assert await text(page, "v-saved") == usd(cost["saved_usd"])
        both = cost["spent_usd"] + cost["saved_usd"]
        assert await text(page, "v-saving") == pct(cost["saved_usd"] / both)
        assert cost["saved_usd"] > 0 and cost["spent_usd"] > 0

        rows = await cells(page, "t-cost", "tier")
        assert set(rows) == set(cost["tiers"]) >= {"small", "large"}
        for tier, t in cost["tiers"].items():
            total = t["spent_usd"] + t["saved_usd"]
            assert rows[tier] == [tier, str(t["upstream_calls"]), str(t["cache_hits"]),
                                  usd(t["spent_usd"]), usd(t["saved_usd"]),
                                  pct(t["saved_usd"] / total if total else None)]

        rows = await cells(page, "t-latency", "outcome")
        assert set(rows) == set(s["latency"]) == set(req)
        for outcome, lat in s["latency"].items():
            assert lat["count"] == req[outcome]
            assert rows[outcome] == [outcome, str(lat["count"]), ms(lat["p50_ms"]),
                                     ms(lat["p99_ms"]), ms(lat["mean_ms"])]

        rows = await cells(page, "t-ns", "namespace")
        assert [n["namespace"] for n in s["namespaces"]] == list(rows)
        assert {"ns:team-a", "ns:team-b"} <= set(rows)
        for n in s["namespaces"]:
            assert rows[n["namespace"]][1:] == [usd(n["spent_usd"]), usd(n["saved_usd"])]
        assert s["namespaces"][0]["namespace"] == "ns:team-b"  # large tier: the most spent

        rows = await cells(page, "t-tiers", "url")
        eps = {e["url"]: (name, t, e) for name, t in s["tiers"].items() for e in t["endpoints"]}
        assert set(rows) == set(eps)
        for url, (name, t, e) in eps.items():
            assert rows[url] == [name, t["model"], url, str(e["in_flight"]), e["state"]]

        assert await text(page, "v-redis") == s["cache"]["redis"] == "up"
        st = s["stream"]
        assert await text(page, "v-stream") == st["state"] == "up"
        assert await text(page, "v-stream-length") == str(st["length"])
        assert await text(page, "v-stream-lag") == f"{st['lag_ms']} ms"
        assert await text(page, "v-stream-applied") == str(st["applied"])
        assert await text(page, "v-l1-entries") == str(s["cache"]["l1_entries"])
        assert await text(page, "v-sem-entries") == str(s["semantic"]["entries"])
        assert await text(page, "v-embed-queue") == str(s["embedder"]["queued"])

        # the plots: one interval per sample step, stacked areas by outcome, hit-rate lines
        assert len(s["series"]["t"]) >= 3
        assert await page.evaluate("document.querySelectorAll('#plot-rps polygon').length") >= 2
        assert await page.evaluate("document.querySelectorAll('#plot-hit path').length") == 3
        assert page.problems == []  # no script error, no CSP violation

        shot = tmp_path / "status-page.png"
        await page.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        target = os.environ.get("EDGE_PROXY_SCREENSHOT")
        if target:
            shutil.copy(shot, ROOT / target)


async def test_status_page_login_and_wrong_token(make_proxy: Any) -> None:
    p = await make_proxy(server={"admin_token": TOKEN})
    async with Browser() as browser:
        page = await browser.new_page()
        await page.goto(p.url + "/admin/")
        # no token yet: the login form, no data
        await page.wait_for("!document.getElementById('login').classList.contains('hidden')")
        assert await page.evaluate("document.getElementById('dash').classList.contains('hidden')")
        # a wrong token is refused and forgotten
        await page.evaluate("document.getElementById('token').value = 'wrong';"
                            "document.getElementById('login-form').requestSubmit()")
        await page.wait_for("document.getElementById('error').textContent === 'token refused'")
        assert await page.evaluate("sessionStorage.getItem('edge-proxy-admin-token')") is None
        # the right one shows the dashboard
        await page.evaluate(f"document.getElementById('token').value = '{TOKEN}';"
                            "document.getElementById('login-form').requestSubmit()")
        await page.wait_for("Number(document.body.dataset.renders || 0) >= 1")
        assert await text(page, "v-requests") == "0"
        # "Forget token" clears it
        await page.evaluate("document.getElementById('logout').click()")
        assert await page.evaluate("sessionStorage.getItem('edge-proxy-admin-token')") is None
        # 401 answers from the wrong token are expected console noise; nothing else
        assert [m for m in page.problems if "401" not in m] == []


async def test_status_page_http(make_proxy: Any) -> None:
    off = await make_proxy()
    async with aiohttp.ClientSession() as s, s.get(off.url + "/admin/") as r:
        assert r.status == 404  # no admin token: no admin API, no page
    on = await make_proxy(server={"admin_token": TOKEN})
    async with aiohttp.ClientSession() as s:
        async with s.get(on.url + "/admin", allow_redirects=False) as r:
            assert r.status == 308 and r.headers["Location"] == "/admin/"
        async with s.get(on.url + "/admin/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            html = await r.text()
            csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp and "sha256-" in csp
        # self-contained: no external script, style, font or image
        for needle in ("http://", "https://", "//cdn", "<link", "src="):
            assert needle not in html.replace("http://www.w3.org/2000/svg", ""), needle
        assert (await stats(on.url, "nope"))[0] == 401


async def test_stats_show_redis_and_the_shared_stream(make_proxy: Any, redis_url: str,
                                                      redis_prefix: str) -> None:
    p = await make_proxy(server={"admin_token": TOKEN},
                         cache={"redis_url": redis_url, "redis_prefix": redis_prefix})
    await p.client().chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Why is the sky blue?"}])
    for _ in range(200):  # the entry's announcement reaches the stream in the background
        _, s = await stats(p.url)
        if s["stream"]["length"]:
            break
        await asyncio.sleep(0.01)
    assert s["cache"]["redis"] == "up"
    st = s["stream"]
    assert st["state"] == "up" and st["length"] >= 1 and isinstance(st["newest_id"], str)
    assert st["lag_ms"] is not None and st["lag_ms"] >= 0
    assert s["embedder"]["queued"] == 0 and s["semantic"]["entries"] >= 1
