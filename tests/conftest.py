"""Shared fixtures: a real redis-server per session, mock vLLM tiers, the proxy, the openai client.

Every async test runs twice: on uvloop and on the stdlib asyncio loop (the
``pytest_asyncio_loop_factories`` hook below), as uvloop's own tests do.

redis-server must be on PATH (Debian/Ubuntu: ``apt-get install redis-server``; macOS:
``brew install redis``); the suite starts its own on a free port and never touches port 6379.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web

from proxy.config import Config, load_config
from proxy.logs import ACCESS_LOGGER
from proxy.metrics import Metrics
from proxy.mock_vllm import MockVLLM, start_mock
from proxy.server import PROXY_KEY, JsonAccessLogger, build_app, install_protocol

ROOT = Path(__file__).resolve().parent.parent
# Proxies started as child processes (run_cli) read these: no shedding of semantic lookups on a
# loaded CI box (see make_proxy); tests of the deadline set their own.
os.environ.setdefault("EDGE_PROXY_SEMANTIC__EMBED_DEADLINE_S", "0")
os.environ.setdefault("EDGE_PROXY_SEMANTIC__EMBED_TIMEOUT_S", "10")
os.environ.setdefault("EDGE_PROXY_SEMANTIC__SPECULATIVE", "false")


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server child process on a free port (no persistence)."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server not found on PATH: the tests need a real Redis. Install it "
                        "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)",
                        pytrace=False)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="edge-proxy-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@dataclass
class Tier:
    mock: MockVLLM
    runner: web.AppRunner
    url: str


@pytest.fixture
async def tiers() -> AsyncIterator[dict[str, Tier]]:
    """Three mock vLLM tiers (small, medium, large) with short latencies."""
    out: dict[str, Tier] = {}
    for name, model in (("small", "small-8b"), ("medium", "medium-32b"), ("large", "large-70b")):
        mock, runner, port = await start_mock(model, ttft_ms=5, tpot_ms=0.5, reply_tokens=12)
        out[name] = Tier(mock, runner, f"http://127.0.0.1:{port}")
    yield out
    for t in out.values():
        await t.runner.cleanup()


@dataclass
class RunningProxy:
    url: str
    app: web.Application
    runner: web.AppRunner
    config: Config
    metrics: Metrics

    @property
    def proxy(self) -> Any:
        return self.app[PROXY_KEY]

    def client(self, api_key: str = "sk-test", **kwargs: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                                  timeout=30, **kwargs)


async def start_proxy(config: Config, access_log: bool = False) -> RunningProxy:
    """A proxy on a free port, served as Server.serve does (``access_log``: the JSON access
    log on the "edge_proxy.access" logger, as server.access_log = true)."""
    metrics = Metrics()
    app = build_app(config, metrics)
    logged: dict[str, Any] = {"access_log": None}
    if access_log:
        logged = {"access_log": logging.getLogger(ACCESS_LOGGER),
                  "access_log_class": JsonAccessLogger}
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2, **logged)
    await runner.setup()
    install_protocol(runner, 1024)  # as Server.serve does: the fast path and the connection cap
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return RunningProxy(f"http://127.0.0.1:{port}", app, runner, config, metrics)


async def access_lines(caplog: Any, n: int) -> list[dict[str, Any]]:
    """The JSON access log's records so far, once there are ``n`` (aiohttp logs a request
    after its last byte went out: the client can be first), or after 2 s."""
    import json

    lines: list[dict[str, Any]] = []
    for _ in range(200):
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]
        if len(lines) >= n:
            break
        await asyncio.sleep(0.01)
    return lines


@pytest.fixture
async def make_proxy(tiers: dict[str, Tier]) -> AsyncIterator[Any]:
    """Factory: a proxy in front of the mock tiers; keyword sections override the config."""
    started: list[RunningProxy] = []

    async def factory(tier_names: tuple[str, ...] = ("small", "medium", "large"),
                      tier_urls: dict[str, str] | None = None,
                      tier_options: dict[str, dict[str, Any]] | None = None,
                      **sections: dict[str, Any]) -> RunningProxy:
        # the router is off unless a test turns it on: most tests want model "auto" to reach a
        # known tier (the default: small)
        sections.setdefault("router", {"enabled": False})
        # the semantic layer sheds lookups whose embedding would be late (5-20 ms in
        # production); a loaded CI box must not turn the tests' expected hits into sheds, so
        # tests wait for their vectors unless they set the deadline themselves
        sem = sections.setdefault("semantic", {})
        sem.setdefault("embed_deadline_s", 0.0)
        sem.setdefault("verify_deadline_s", 0.0)  # the same for the pair verifier's queue
        sem.setdefault("embed_timeout_s", 10.0)
        # many tests count the upstream calls a hit saves; speculative misses (an upstream call
        # beside the lookup, cancelled on a hit) are tested in test_speculative.py
        sem.setdefault("speculative", False)
        urls = {n: tiers[n].url for n in tier_names}
        urls.update(tier_urls or {})
        cfg = load_config(env={}, overrides=sections, tier_flags=[f"{n}={u}" for n, u in
                                                                   urls.items()])
        if tier_options:
            import dataclasses

            cfg = dataclasses.replace(cfg, tiers=tuple(
                dataclasses.replace(t, **tier_options.get(t.name, {})) for t in cfg.tiers))
        p = await start_proxy(cfg)
        started.append(p)
        return p

    yield factory
    for p in started:
        await p.runner.cleanup()


@pytest.fixture
def redis_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


def run_cli(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[bytes]:
    """Start ``python -m proxy ARGS`` as a child process."""
    e = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "proxy", *args], env=e, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _free_port_pair() -> int:
    """A free port P below 55535 whose cluster bus port P + 10000 is free too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


class RedisClusterNodes:
    """Three redis-server processes joined into a Redis Cluster (no replicas) on free ports."""

    def __init__(self) -> None:
        self.nodes = [RedisServer() for _ in range(3)]
        for n in self.nodes:  # the cluster bus listens on port + 10000: keep both valid
            n.port = _free_port_pair()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        for n in self.nodes:
            assert n.binary is not None
            n.proc = subprocess.Popen(
                [n.binary, "--port", str(n.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", n.dir, "--cluster-enabled", "yes",
                 "--cluster-config-file", os.path.join(n.dir, "nodes.conf")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for n in self.nodes:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", n.port), timeout=0.2):
                    break
                time.sleep(0.05)
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.skip("redis-cli not found: cannot create a local Redis Cluster")
        subprocess.run([cli, "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = subprocess.run([cli, "-p", str(self.nodes[0].port), "cluster", "info"],
                                 capture_output=True, text=True).stdout
            if "cluster_state:ok" in out:
                return
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not become ok")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
            shutil.rmtree(n.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    cluster = RedisClusterNodes()
    cluster.start()
    yield cluster
    cluster.stop()
