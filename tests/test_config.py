"""Configuration: file < environment < flags, and errors that name the field."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, load_config
from tests.conftest import run_cli

TOML = """
[server]
port = 9000
max_body_bytes = 100000

[cache]
redis_url = "redis://127.0.0.1:6379/1"
l1_ttl_s = 60

[tiers.small]
urls = ["http://127.0.0.1:9001"]
model = "small-8b"

[tiers.large]
url = "http://127.0.0.1:9003/"
price_input_per_m = 2.5
price_output_per_m = 10
fallback = ["small"]
"""


def test_defaults_start_with_nothing_configured() -> None:
    cfg = load_config(env={})
    assert cfg.server.host == "127.0.0.1" and cfg.cache.redis_url == "" and cfg.tiers == ()


def test_file_env_flags_precedence(tmp_path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(TOML)
    cfg = load_config(path, env={})
    assert cfg.server.port == 9000 and cfg.cache.l1_ttl_s == 60.0
    large = cfg.tier("large")
    assert large.urls == ("http://127.0.0.1:9003",) and large.price_input_per_m == 2.5
    assert large.fallback == ("small",) and cfg.tier("small").price_input_per_m == 0.10
    cfg = load_config(path, env={"EDGE_PROXY_SERVER__PORT": "9100",
                                 "EDGE_PROXY_CACHE__L1_TTL_S": "5"})
    assert cfg.server.port == 9100 and cfg.cache.l1_ttl_s == 5.0
    cfg = load_config(path, env={"EDGE_PROXY_SERVER__PORT": "9100"},
                      overrides={"server": {"port": 9200}},
                      tier_flags=["small=http://10.0.0.1:8000,http://10.0.0.2:8000"])
    assert cfg.server.port == 9200
    assert cfg.tier("small").urls == ("http://10.0.0.1:8000", "http://10.0.0.2:8000")
    assert cfg.default_tier == "small"


@pytest.mark.parametrize("kwargs,field", [
    ({"env": {"EDGE_PROXY_SERVER__PORT": "eighty"}}, "server.port"),
    ({"env": {"EDGE_PROXY_SERVER__PORT": "70000"}}, "server.port"),
    ({"env": {"EDGE_PROXY_CACHE__COLOUR": "red"}}, "cache.colour"),
    ({"env": {"EDGE_PROXY_SEMANTIC__THRESHOLD": "1.5"}}, "semantic.threshold"),
    ({"env": {"EDGE_PROXY_CACHE__REDIS_URL": "http://x"}}, "cache.redis_url"),
    ({"env": {}, "tier_flags": ["small=ftp://x"]}, "tiers.small.urls[0]"),
    ({"env": {}, "tier_flags": ["small"]}, "tiers"),
    ({"env": {"EDGE_PROXY_ROUTER__DEFAULT_TIER": "huge"}}, "router.default_tier"),
])
def test_errors_name_the_field(kwargs, field) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(**kwargs)
    assert str(exc.value).startswith(field)


def test_bad_file_and_unknown_fallback(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport=1")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(bad, env={})
    fb = tmp_path / "fb.toml"
    fb.write_text('[tiers.small]\nurls=["http://a:1"]\nfallback=["medium"]\n')
    with pytest.raises(ConfigError, match=r"tiers.small.fallback"):
        load_config(fb, env={})


def test_cli_exits_nonzero_naming_the_field() -> None:
    proc = run_cli("serve", "--tier", "small=http://127.0.0.1:1",
                   env={"EDGE_PROXY_CACHE__L1_MAX_BYTES": "lots"})
    out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 2 and "cache.l1_max_bytes" in out
    proc = run_cli("serve")
    out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 2 and "--tier" in out


def test_readme_example_config_loads(tmp_path) -> None:
    # the TOML in the README's Configure section is a working file, not a sketch
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert block is not None
    path = tmp_path / "edge.toml"
    # its paths are the deployment's: point them into a directory that exists here (a
    # snapshot_path in a missing directory is refused at start)
    path.write_text(block.group(1).replace("/var/lib/edge-proxy", str(tmp_path)))
    cfg = load_config(path, env={})
    assert [t.name for t in cfg.tiers] == ["small", "medium", "large"]
    assert cfg.semantic.embed_priority == "nice" and cfg.semantic.embed_timeout_s == 0.02
    assert cfg.semantic.embed_deadline_s == 0.01 and cfg.semantic.embed_threads == 0
    assert cfg.router.cuts == (0.4, 0.7)
