"""Command line: ``edge-proxy serve | check-config | report | demo | mock-vllm | models`` (also
``python -m proxy``).

File, environment and flags become one Config; ``serve`` then runs ``Server(config)``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

from proxy import __version__
from proxy.config import Config, ConfigError, load_config


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML configuration file")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8080)")
    p.add_argument("--tier", action="append", default=[], metavar="NAME=URL[,URL...][@MODEL]",
                   help="a model tier, its vLLM base URL(s) and optionally its served model "
                   "(else asked from /v1/models); repeat, smallest first")
    p.add_argument("--redis", metavar="URL", help="Redis URL for the shared L2 cache")
    p.add_argument("--default-tier", help="tier for model 'auto'")
    p.add_argument("--loop", choices=["uvloop", "asyncio"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _config_from(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        overrides={
            "server": {"host": args.host, "port": args.port, "loop": args.loop,
                       "log_level": args.log_level},
            "cache": {"redis_url": args.redis},
            "router": {"default_tier": args.default_tier},
        },
        tier_flags=args.tier,
    )


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_env(env: Mapping[str, str], thp_mode: Path = THP_MODE) -> dict[str, str] | None:
    """The environment to start ``serve`` again with so that glibc's malloc asks for
    transparent huge pages (``server.huge_pages``), or None: already asked, not glibc, or the
    kernel's huge pages are off ("[never]") or unknown."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mode = thp_mode.read_text()
    except OSError:
        return None
    if "[never]" in mode:
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)}


def _models(action: str, out: str | None) -> int:
    """``models``: print the model path and its state; ``models build``: build and pin-check."""
    from proxy.semantic import model

    if action == "build":
        target = Path(out) if out else model.cache_dir() / model.MODEL_FILE
        if not model.can_build():
            print(f"edge-proxy: the build needs its inputs: {model.BUILD_HINT}", file=sys.stderr)
            return 1
        print(model.build(target))
        return 0
    path = model.model_path()
    print(f"{path} ({'present' if path.exists() else 'missing: edge-proxy models build'})")
    return 0 if path.exists() else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edge-proxy`` console script."""
    parser = argparse.ArgumentParser(prog="edge-proxy", description="OpenAI-compatible caching "
                                     "and routing sidecar for vLLM")
    parser.add_argument("--version", action="version", version=f"edge-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the proxy")
    _serve_args(p_serve)
    p_check = sub.add_parser("check-config", help="load the configuration (file, environment, "
                             "flags) like serve, print the effective values, exit 2 if invalid")
    _serve_args(p_check)
    p_report = sub.add_parser("report", help="cost, savings and hit rate by namespace, tier and "
                              "hour from the event log")
    from proxy import report

    report.add_arguments(p_report)
    p_demo = sub.add_parser("demo", help="three mock tiers + the proxy + a workload, then a table")
    p_demo.add_argument("--requests", type=int, default=300, help="requests to send")
    p_demo.add_argument("--concurrency", type=int, default=16)
    p_demo.add_argument("--redis", metavar="URL", help="also use a shared Redis L2")
    p_mock = sub.add_parser("mock-vllm", help="a stand-in vLLM OpenAI server")
    p_models = sub.add_parser("models", help="where the embedding model is; `models build` "
                              "builds it (needs the model extra)")
    p_models.add_argument("action", nargs="?", choices=["path", "build"], default="path")
    p_models.add_argument("--out", help="the .onnx to build (default: the cache directory)")
    from proxy import mock_vllm

    mock_vllm.add_arguments(p_mock)
    args = parser.parse_args(argv)

    if args.command == "mock-vllm":
        mock_vllm.run(args)
        return 0
    if args.command == "models":
        return _models(args.action, args.out)
    if args.command == "report":
        return report.run(args)
    if args.command == "demo":
        from proxy.demo import run_demo

        return run_demo(requests=args.requests, concurrency=args.concurrency, redis=args.redis)
    try:
        config = _config_from(args)
        if not config.tiers:
            raise ConfigError("tiers: none configured; pass --tier NAME=URL or a [tiers.NAME] "
                              "table")
    except ConfigError as exc:
        print(f"edge-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        from proxy.config import effective_toml

        print(effective_toml(config), end="")
        return 0
    # the console script or `python -m proxy` (not main(argv) called in-process): start again
    # with huge pages asked for, before anything is loaded; exec keeps the pid
    if argv is None and config.server.huge_pages:
        env = huge_pages_env(os.environ)
        if env is not None:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    from proxy import logs

    logs.setup(config.server.log_level)
    from proxy.server import Server

    try:
        Server(config, load=lambda: _config_from(args)).run()
    except RuntimeError as exc:
        print(f"edge-proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
