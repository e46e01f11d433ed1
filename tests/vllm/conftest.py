"""A real vLLM (CPU) for the conformance suite: started once per session, stopped with SIGTERM.

``tests/vllm/setup_vllm.sh`` builds the venv (outside the repo) and the tiny hand-weighted
Llama when they are missing. At most ``EDGE_PROXY_VLLM_SLOTS`` (default 2) servers run at once
on the machine: each server holds a flock'd slot file for its lifetime, so parallel checkouts
running the suite queue instead of piling vLLMs onto the CPU.

The session's server serves the tiny model as ``tiny-llama`` with the Hermes tool parser. Its
chat template writes ``<think>...</think>`` first when the request sets
``chat_template_kwargs: {"enable_thinking": true}``; test_reasoning.py (last in file order)
replaces it with a server run with ``--reasoning-parser deepseek_r1`` (that parser reads any
answer without ``</think>`` as all reasoning, so it cannot share the plain server). A session
holds one slot at most: two sessions each holding one and waiting for another would deadlock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conftest import ROOT, free_port

MODEL_NAME = "tiny-llama"
ANSWER = "Hello! This is the tiny test model speaking."
SETUP = ROOT / "tests" / "vllm" / "setup_vllm.sh"
SLOTS = int(os.environ.get("EDGE_PROXY_VLLM_SLOTS", "2"))
START_TIMEOUT_S = 240.0


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM venv's python (built or reused by setup_vllm.sh, with the tiny model)."""
    try:
        out = subprocess.run(["bash", str(SETUP)], check=True, capture_output=True, text=True,
                             timeout=1800)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"tests/vllm/setup_vllm.sh failed:\n{exc.stderr[-4000:]}", pytrace=False)
    return out.stdout.strip().splitlines()[-1]


def _model_dir() -> str:
    return os.environ.get("EDGE_PROXY_VLLM_MODEL", str(ROOT / "models" / "build" / "tiny-llama"))


class _Slot:
    """One of SLOTS machine-wide lock files, held while a vLLM server runs."""

    def __init__(self) -> None:
        self.fh: IO[bytes] | None = None

    def acquire(self, timeout_s: float = 1800.0) -> None:
        deadline = time.monotonic() + timeout_s
        lock_dir = Path(tempfile.gettempdir())
        while True:
            for i in range(SLOTS):
                fh = open(lock_dir / f"edge-proxy-vllm-slot-{i}.lock", "wb")  # noqa: SIM115
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    fh.close()
                    continue
                self.fh = fh
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no free vLLM slot in {timeout_s:.0f} s ({SLOTS} slots busy)")
            time.sleep(1.0)

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` as a child process."""

    def __init__(self, python: str, *extra: str, name: str = MODEL_NAME) -> None:
        self.python = python
        self.extra = list(extra)
        self.name = name
        self.port = free_port()
        self.api_key: str | None = None
        self.external = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.slot = _Slot()
        self.log_path = Path(tempfile.mkdtemp(prefix="edge-proxy-vllm-")) / "vllm.log"
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, api_key: str | None = None) -> None:
        """Start (or restart, on the same port) and wait until /health answers 200.

        ``-O0``: no torch.compile warm-up (minutes on a busy 2-core machine; eager is plenty
        for a 2-layer model)."""
        assert self.proc is None
        if self.slot.fh is None:
            self.slot.acquire()
        self.api_key = api_key
        cmd = ["nice", "-n", "10", self.python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", _model_dir(), "--served-model-name", self.name, "--dtype", "float32",
               "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048",
               "--disable-uvicorn-access-log", "-O0", *self.extra]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}
        env.pop("PYTHONPATH", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        # its own process group: the API server's SIGTERM handler stops EngineCore and workers;
        # the group is what a last-resort SIGKILL reaches
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not become healthy in {START_TIMEOUT_S:.0f} s:\n"
                           f"{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, keep_slot: bool = False) -> None:
        """SIGTERM (SIGKILL would orphan EngineCore and its workers), then wait."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):  # stragglers of the group
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        if not keep_slot:
            self.slot.release()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def client(self, **kwargs: Any) -> Any:
        """The openai client straight to vLLM (the reference answers)."""
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                                  max_retries=0, timeout=60, **kwargs)


@contextlib.contextmanager
def running(server: VLLMServer) -> Iterator[VLLMServer]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm(vllm_python: str) -> Iterator[VLLMServer]:
    """The plain server: chat, completions, tools (Hermes parser).

    ``EDGE_PROXY_VLLM_URL`` points the suite at a server already running with these flags
    (while developing; the restart tests skip then)."""
    external = os.environ.get("EDGE_PROXY_VLLM_URL")
    if external:
        server = VLLMServer(vllm_python)
        server.port = int(external.rsplit(":", 1)[1])
        server.external = True
        yield server
        return
    with running(VLLMServer(vllm_python, "--enable-auto-tool-choice",
                             "--tool-call-parser", "hermes")) as server:
        yield server


@pytest.fixture
async def make_vproxy() -> Any:
    """Factory: a proxy (L1 cache, no semantic layer, no router) in front of vLLM servers."""
    from proxy.config import load_config
    from tests.conftest import start_proxy

    started = []

    async def factory(*servers: VLLMServer, **sections: dict[str, Any]) -> Any:
        sections.setdefault("router", {"enabled": False})
        sections.setdefault("semantic", {"enabled": False})
        tiers = sections.pop("tiers", {})  # tier name -> fields (as EDGE_PROXY_TIERS__N__F)
        env = {f"EDGE_PROXY_TIERS__{t.upper()}__{k.upper()}": str(v)
               for t, fields in tiers.items() for k, v in fields.items()}
        flags = [f"t{i}={s.url}" for i, s in enumerate(servers)]
        cfg = load_config(env=env, overrides=sections, tier_flags=flags)
        p = await start_proxy(cfg)
        started.append(p)
        return p

    yield factory
    for p in started:
        await p.runner.cleanup()
