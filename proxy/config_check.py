"""Validation of the configuration (proxy/config.py): coercing TOML / environment values to the
schema's types and checking each section, with errors that name the bad field.

``proxy.config`` re-exports the public names (``ConfigError``, ``parse_flows``,
``namespace_thresholds``, ``namespace_error_rates``); import them from there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from proxy.config import CacheConfig, Config, SemanticConfig, ServerConfig


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


def time_sensitive(cfg: SemanticConfig) -> re.Pattern[str] | None:
    """One case-insensitive regex of semantic.bypass_patterns (None when there are none): the
    questions whose answer depends on the moment. The semantic layer skips them and their exact
    entries live semantic.time_sensitive_ttl_s; the evaluation leaves them out the same way."""
    if not cfg.bypass_patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in cfg.bypass_patterns), re.I)


def namespace_error_rates(cfg: SemanticConfig) -> dict[str, float]:
    """Parse semantic.namespace_error_rates ("NAMESPACE=0.05")."""
    out = {}
    for i, spec in enumerate(cfg.namespace_error_rates):
        ns, sep, value = spec.rpartition("=")
        try:
            e = float(value)
        except ValueError:
            e = -1.0
        if not sep or not ns or not 0.0 < e < 1.0:
            raise ConfigError(f"semantic.namespace_error_rates[{i}]: expected NAMESPACE=VALUE "
                              f"with VALUE in (0, 1), got {spec!r}")
        out[ns] = e
    return out


def namespace_thresholds(cfg: SemanticConfig) -> dict[str, float]:
    """Parse semantic.namespace_thresholds ("NAMESPACE=0.9")."""
    out = {}
    for i, spec in enumerate(cfg.namespace_thresholds):
        ns, sep, value = spec.rpartition("=")
        try:
            t = float(value)
        except ValueError:
            t = -1.0
        if not sep or not ns or not 0.0 < t <= 1.0:
            raise ConfigError(f"semantic.namespace_thresholds[{i}]: expected NAMESPACE=VALUE "
                              f"with VALUE in (0, 1], got {spec!r}")
        out[ns] = t
    return out


def parse_flows(specs: tuple[str, ...], field_path: str, tiers: list[str]
                ) -> dict[str, list[tuple[str, float]]]:
    """Parse "FROM:TO=FRACTION" entries (router.split / router.shadow)."""
    out: dict[str, list[tuple[str, float]]] = {}
    for i, spec in enumerate(specs):
        path = f"{field_path}[{i}]"
        pair, sep, frac = spec.partition("=")
        src, sep2, dst = pair.partition(":")
        src, dst = src.strip(), dst.strip()
        if not sep or not sep2:
            raise ConfigError(f"{path}: expected FROM:TO=FRACTION, got {spec!r}")
        for name in (src, dst):
            if name not in tiers:
                raise ConfigError(f"{path}: unknown tier {name!r}")
        try:
            f = float(frac)
        except ValueError:
            raise ConfigError(f"{path}: fraction must be a number, got {frac!r}") from None
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"{path}: fraction must be in [0, 1], got {f}")
        out.setdefault(src, []).append((dst, f))
    for src, flows in out.items():
        if sum(f for _, f in flows) > 1.0:
            raise ConfigError(f"{field_path}: fractions leaving {src!r} add up to more than 1")
    return out


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` (from TOML or an env string) to ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    scalar = _SCALARS.get(tp)
    if scalar is None:
        raise ConfigError(f"{path}: unsupported type {tp!r}")  # pragma: no cover - schema bug
    return scalar(value, path)


def _to_bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                     "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{path}: expected true or false, got {value!r}")


def _to_int(value: Any, path: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"{path}: expected an integer, got {value!r}")


def _to_float(value: Any, path: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{path}: expected a number, got {value!r}")


def _to_str(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{path}: expected a string, got {value!r}")


_SCALARS: Final[dict[Any, Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _build(cls: type, data: Mapping[str, Any], path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{path}: {exc}") from None


def _check_url(url: str, path: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{path}: expected an http(s) URL, got {url!r}")
    return url.rstrip("/")


def _validate(cfg: Config) -> Config:
    names = [t.name for t in cfg.tiers]
    _check_tiers(cfg, names)
    _check_server(cfg.server)
    _check_cache(cfg.cache)
    _check_semantic(cfg.semantic)
    _check_events(cfg)
    cuts = cfg.router.cuts
    if cuts and (len(cuts) != len(names) - 1 or list(cuts) != sorted(cuts)):
        raise ConfigError(f"router.cuts: need {max(len(names) - 1, 0)} increasing numbers, one "
                          f"per boundary between tiers, got {list(cuts)}")
    return cfg


def _check_tiers(cfg: Config, names: list[str]) -> None:
    """Tier names unique; fallbacks, flows and the default tier name known tiers."""
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"tiers.{sorted(dup)[0]}: defined twice")
    for t in cfg.tiers:
        for fb in t.fallback:
            if fb not in names:
                raise ConfigError(f"tiers.{t.name}.fallback: unknown tier {fb!r}")
    parse_flows(cfg.router.split, "router.split", names)
    parse_flows(cfg.router.shadow, "router.shadow", names)
    if cfg.router.default_tier and cfg.router.default_tier not in names:
        raise ConfigError(f"router.default_tier: unknown tier {cfg.router.default_tier!r}")


def _check_server(s: ServerConfig) -> None:
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"server.port: must be 0..65535, got {s.port}")
    if s.loop not in ("uvloop", "asyncio"):
        raise ConfigError(f"server.loop: expected 'uvloop' or 'asyncio', got {s.loop!r}")
    if s.max_body_bytes < 1024:
        raise ConfigError("server.max_body_bytes: must be >= 1024")
    gct = s.gc_thresholds
    if gct and (len(gct) > 3 or gct[0] < 1 or any(t < 0 for t in gct)):
        raise ConfigError("server.gc_thresholds: up to three integers, the first >= 1")
    for fname in ("idle_timeout_s", "body_timeout_s"):
        if getattr(s, fname) <= 0:
            raise ConfigError(f"server.{fname}: must be > 0")
    if s.max_connections < 0:
        raise ConfigError("server.max_connections: must be >= 0 (0 = from the file limit)")
    if s.fast_path_entries < 1 or s.fast_path_max_bytes < 1:
        raise ConfigError("server.fast_path_entries and fast_path_max_bytes: must be >= 1 "
                          "(server.fast_path = false turns the fast path off)")


def _check_cache(c: CacheConfig) -> None:
    if c.l1_max_bytes < 0 or c.l1_max_entries < 0:
        raise ConfigError("cache.l1_max_bytes / cache.l1_max_entries: must be >= 0")
    if c.redis_url and urlsplit(c.redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"cache.redis_url: expected redis://, rediss:// or unix://, got "
                          f"{c.redis_url!r}")
    if c.anonymous not in ("shared", "refuse"):
        raise ConfigError(f"cache.anonymous: expected 'shared' or 'refuse', got {c.anonymous!r}")
    if c.sampled not in ("store", "skip"):
        raise ConfigError(f"cache.sampled: expected 'store' or 'skip', got {c.sampled!r}")


def _check_semantic(sem: SemanticConfig) -> None:
    _check_semantic_rates(sem)
    _check_semantic_embed(sem)
    _check_semantic_files(sem)


def _check_semantic_rates(sem: SemanticConfig) -> None:
    """Thresholds, error rates, audit and feedback limits."""
    if not 0.0 < sem.threshold <= 1.0:
        raise ConfigError("semantic.threshold: must be in (0, 1]")
    namespace_thresholds(sem)
    namespace_error_rates(sem)
    if not 0.0 < sem.max_error_rate < 1.0:
        raise ConfigError("semantic.max_error_rate: must be in (0, 1)")
    if not 0.0 <= sem.audit_rate <= 1.0:
        raise ConfigError("semantic.audit_rate: must be in [0, 1]")
    if not 0.0 < sem.audit_agree_cosine <= 1.0:
        raise ConfigError("semantic.audit_agree_cosine: must be in (0, 1]")
    if sem.verify_max_candidates < 1:
        raise ConfigError("semantic.verify_max_candidates: must be >= 1")
    if sem.verify_memo_entries < 0:
        raise ConfigError("semantic.verify_memo_entries: must be >= 0")
    if sem.time_sensitive_ttl_s <= 0 or sem.feedback_window_s <= 0:
        raise ConfigError("semantic.time_sensitive_ttl_s / feedback_window_s: must be > 0")
    if sem.feedback_max_entries < 0:
        raise ConfigError("semantic.feedback_max_entries: must be >= 0")


def _check_semantic_embed(sem: SemanticConfig) -> None:
    """The embedder: priority, limits, timeouts and threads."""
    if sem.embed_priority not in ("idle", "nice", "normal"):
        raise ConfigError(f"semantic.embed_priority: expected idle, nice or normal, got "
                          f"{sem.embed_priority!r}")
    if sem.max_query_chars < 1:
        raise ConfigError("semantic.max_query_chars: must be >= 1")
    if sem.embed_timeout_s <= 0:
        raise ConfigError("semantic.embed_timeout_s: must be > 0")
    if sem.speculative_delay_s < 0:
        raise ConfigError("semantic.speculative_delay_s: must be >= 0")
    if sem.embed_deadline_s < 0:
        raise ConfigError("semantic.embed_deadline_s: must be >= 0")
    if sem.max_text_bytes < 64 * 1024:
        raise ConfigError("semantic.max_text_bytes: must be >= 65536")
    if sem.verify_deadline_s < 0:
        raise ConfigError("semantic.verify_deadline_s: must be >= 0")
    if sem.embed_threads < 0:
        raise ConfigError("semantic.embed_threads: must be >= 0 (0: the cores available)")
    if not 0 <= sem.embed_nice <= 19:
        raise ConfigError("semantic.embed_nice: must be in 0..19")


def _check_semantic_files(sem: SemanticConfig) -> None:
    """The snapshot file's directory and the bypass patterns."""
    snap = sem.snapshot_path
    if snap:
        parent = Path(snap).resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"semantic.snapshot_path: directory {str(parent)!r} does not exist")
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"semantic.snapshot_path: directory {str(parent)!r} is not "
                              "writable")
    for i, pat in enumerate(sem.bypass_patterns):
        try:
            re.compile(pat)
        except re.error as exc:
            raise ConfigError(f"semantic.bypass_patterns[{i}]: {exc}") from None


def _check_events(cfg: Config) -> None:
    """The request event log: a known sink, and what that sink needs."""
    ev = cfg.events
    if ev.sink not in ("", "stdout", "file", "redis"):
        raise ConfigError(f"events.sink: expected '', stdout, file or redis, got {ev.sink!r}")
    if ev.sink == "file":
        if not ev.path:
            raise ConfigError("events.path: required with events.sink = file")
        if not Path(ev.path).resolve().parent.is_dir():
            raise ConfigError(f"events.path: directory {str(Path(ev.path).parent)!r} does not "
                              "exist")
    if ev.sink == "redis" and not (ev.redis_url or cfg.cache.redis_url):
        raise ConfigError("events.redis_url: required with events.sink = redis (or set "
                          "cache.redis_url)")
    if ev.stream_maxlen < 1 or ev.max_pending < 1 or ev.flush_interval_s <= 0:
        raise ConfigError("events: stream_maxlen and max_pending must be >= 1, "
                          "flush_interval_s > 0")
