"""Operator's command line and process behaviour: --version, check-config, a snapshot path in
a missing directory refused at start, SIGHUP reloading what can be reloaded (and refusing the
rest with a log line), log lines carrying the request id, the access log as JSON lines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy import __version__
from proxy.config import ConfigError, SemanticConfig, load_config
from tests.conftest import ROOT, free_port, run_cli
from tests.test_exact import wait_http

TOKEN = "admin-secret-token-xyz"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_version() -> None:
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"edge-proxy {__version__}"


def test_check_config_prints_the_effective_config(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'[server]\nadmin_token = "{TOKEN}"\n[semantic]\nthreshold = 0.9\n'
                   '[tiers.small]\nurls = ["http://vllm-small:8000"]\nmodel = "small-8b"\n')
    res = cli("check-config", "--config", str(cfg), "--port", "9999",
              env={"EDGE_PROXY_CACHE__L1_MAX_ENTRIES": "1234"})
    assert res.returncode == 0, res.stderr
    assert TOKEN not in res.stdout and "<redacted" in res.stdout
    printed = tomllib.loads(res.stdout)
    assert printed["server"]["port"] == 9999  # the flag
    assert printed["cache"]["l1_max_entries"] == 1234  # the environment
    assert printed["semantic"]["threshold"] == 0.9  # the file
    assert printed["semantic"]["embed_timeout_s"] == SemanticConfig().embed_timeout_s  # default
    assert printed["tiers"]["small"]["price_input_per_m"] == 0.10  # a default price
    # what it prints loads again to the same configuration (the token aside)
    again = tmp_path / "again.toml"
    again.write_text(res.stdout.replace(printed["server"]["admin_token"], TOKEN))
    assert load_config(again, env={}) == load_config(
        cfg, env={"EDGE_PROXY_CACHE__L1_MAX_ENTRIES": "1234"}, overrides={"server": {"port": 9999}})


def test_check_config_names_the_bad_field(tmp_path: Path) -> None:
    res = cli("check-config", "--tier", "small=http://h:1",
              env={"EDGE_PROXY_CACHE__L1_MAX_BYTES": "lots"})
    assert res.returncode == 2 and "cache.l1_max_bytes" in res.stderr


def test_snapshot_path_in_a_missing_directory_is_refused_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "semantic.snap"
    with pytest.raises(ConfigError, match=r"semantic\.snapshot_path: directory .* does not exist"):
        load_config(env={}, overrides={"semantic": {"snapshot_path": str(missing)}},
                    tier_flags=["small=http://h:1"])
    res = cli("serve", "--tier", "small=http://127.0.0.1:1",
              env={"EDGE_PROXY_SEMANTIC__SNAPSHOT_PATH": str(missing)})
    assert res.returncode == 2 and "semantic.snapshot_path" in res.stderr
    ok = tmp_path / "semantic.snap"  # an existing directory is fine
    load_config(env={}, overrides={"semantic": {"snapshot_path": str(ok)}},
                tier_flags=["small=http://h:1"])


class Output:
    """Collects a child's output lines in a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if needle in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line with {needle!r} in:\n" + "\n".join(self.lines))


async def spent(url: str, tier: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(
            url + "/admin/stats", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        body = await r.json()
    return float(body["cost"]["tiers"].get(tier, {}).get("spent_usd", 0.0))


def write_config(path: Path, small_url: str, dead_port: int, price: float, threshold: float,
                 log_level: str, l1_entries: int) -> None:
    path.write_text(f"""
[server]
admin_token = "{TOKEN}"
log_level = "{log_level}"
access_log = true
[cache]
l1_max_entries = {l1_entries}
[semantic]
threshold = {threshold}
[router]
enabled = false
[tiers.small]
urls = ["{small_url}"]
price_input_per_m = {price}
price_output_per_m = {price}
[tiers.dead]
urls = ["http://127.0.0.1:{dead_port}"]
model = "dead-model"
fallback = ["small"]
""")


async def test_sighup_reloads_prices_thresholds_log_level_and_refuses_the_rest(
        tiers: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "edge.toml"
    dead = free_port()
    write_config(cfg, tiers["small"].url, dead, price=1.0, threshold=0.85, log_level="info",
                 l1_entries=1000)
    port = free_port()
    proc = run_cli("serve", "--config", str(cfg), "--port", str(port))
    out = Output(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(url + "/readyz", proc)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-never-logged",
                                    max_retries=0)

        async def ask(q: str) -> Any:
            return await client.chat.completions.create(
                model="small-8b", messages=[{"role": "user", "content": q}])

        r1 = await ask("first question")
        usd1 = await spent(url, "small")
        tokens1 = r1.usage.prompt_tokens + r1.usage.completion_tokens
        assert usd1 == pytest.approx(tokens1 * 1.0 / 1e6)

        write_config(cfg, tiers["small"].url, dead, price=100.0, threshold=0.95,
                     log_level="debug", l1_entries=5)
        proc.send_signal(signal.SIGHUP)
        applied = out.wait_for("SIGHUP: reloaded")
        for field in ("server.log_level", "semantic.threshold",
                      "tiers.small.price_input_per_m", "tiers.small.price_output_per_m"):
            assert field in applied
        refused = out.wait_for("SIGHUP: not reloaded, needs a restart")
        assert "cache.l1_max_entries" in refused
        assert proc.poll() is None  # alive: SIGHUP no longer kills the process

        r2 = await ask("second question")
        tokens2 = r2.usage.prompt_tokens + r2.usage.completion_tokens
        assert await spent(url, "small") - usd1 == pytest.approx(tokens2 * 100.0 / 1e6)

        # an invalid file is refused whole; the proxy keeps serving with what it has
        cfg.write_text("[cache]\nl1_max_bytes = 'lots'\n")
        proc.send_signal(signal.SIGHUP)
        out.wait_for("SIGHUP: configuration not reloaded, it does not load")
        await ask("third question")

        # log lines of a request carry its id: the dead tier's failure, before the fallback
        await client.chat.completions.create(
            model="dead-model", messages=[{"role": "user", "content": "via the dead tier"}],
            extra_headers={"x-request-id": "rid-ops-test-42"})
        line = out.wait_for("tier dead failed before first byte")
        assert "[rid-ops-test-42]" in line
    finally:
        proc.terminate()
        proc.wait(15)
        out.thread.join(5)
    # the access log: one JSON object per line, nothing else on it, never the API key
    access = [json.loads(line) for line in out.lines if line.startswith("{")]
    chat = [a for a in access if a["path"] == "/v1/chat/completions"]
    assert len(chat) == 4 and all(a["status"] == 200 for a in chat)
    assert "rid-ops-test-42" in {a["request_id"] for a in chat}
    assert not any("sk-never-logged" in line for line in out.lines)


def test_huge_pages_env(tmp_path: Path) -> None:
    from proxy.__main__ import HUGE_PAGES_TUNABLE, huge_pages_env

    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    assert huge_pages_env({"A": "1"}, thp) == {"A": "1", "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    # other tunables are kept; one already asking for it (either value) is left alone
    got = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp)
    assert got == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"}
    assert huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp) is None
    thp.write_text("always madvise [never]\n")
    assert huge_pages_env({}, thp) is None
    assert huge_pages_env({}, tmp_path / "missing") is None


@pytest.mark.parametrize("wanted", [True, False])
async def test_serve_starts_again_with_huge_pages(tiers: Any, wanted: bool) -> None:
    """``server.huge_pages``: the same process (exec keeps the pid) runs with glibc asking for
    transparent huge pages, and its heap has some; off, the environment is left alone."""
    from proxy.__main__ import huge_pages_env

    port = free_port()
    proc = run_cli("serve", "--tier", f"small={tiers['small'].url}", "--port", str(port),
                   env={"EDGE_PROXY_SERVER__HUGE_PAGES": str(wanted).lower(),
                        "GLIBC_TUNABLES": ""})
    out = Output(proc)
    try:
        await wait_http(f"http://127.0.0.1:{port}/readyz", proc)
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        tunables = [e for e in environ if e.startswith(b"GLIBC_TUNABLES=")]
        if wanted and huge_pages_env({}) is not None:  # glibc, huge pages not off
            assert tunables == [b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1"], out.lines
            rollup = Path(f"/proc/{proc.pid}/smaps_rollup").read_text()
            huge = [int(x.split()[1]) for x in rollup.splitlines() if x.startswith("AnonHuge")]
            assert huge and huge[0] > 0, rollup
        else:
            assert tunables == [b"GLIBC_TUNABLES="]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
