"""SIGHUP: reload what can change under a running proxy, refuse the rest with a log line.

Reloaded in place: ``server.log_level``; ``semantic.threshold`` and
``semantic.namespace_thresholds``; per existing tier: prices, ``fallback``, breaker settings
(``breaker_failures``, ``breaker_cooldown_s``), ``max_queue`` and ``queue_timeout_s``. Everything
else (listen address, Redis, caches and their sizes, the model, router cuts, tiers added or
removed, a tier's URLs, model, timeouts and concurrency, which its connection pool is built with)
needs a restart: a SIGHUP that changes it logs which fields were not applied and keeps the
running value. A configuration that does not load is refused whole; the proxy keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Final

from proxy.config import Config, ConfigError, SemanticConfig, TierConfig, namespace_thresholds

log = logging.getLogger(__name__)

RELOADABLE_SEMANTIC: Final = ("threshold", "namespace_thresholds")
RELOADABLE_TIER: Final = ("price_input_per_m", "price_output_per_m", "fallback",
                          "breaker_failures", "breaker_cooldown_s", "max_queue",
                          "queue_timeout_s")


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    return [f"{prefix}.{f.name}" for f in dataclasses.fields(old)
            if getattr(old, f.name) != getattr(new, f.name)]


def plan(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """(the config to run with, fields applied, fields refused)."""
    applied: list[str] = []
    refused: list[str] = []
    server = old.server
    for name in _diff(old.server, new.server, "server"):
        if name == "server.log_level":
            server = dataclasses.replace(server, log_level=new.server.log_level)
            applied.append(name)
        else:
            refused.append(name)
    semantic: SemanticConfig = old.semantic
    for name in _diff(old.semantic, new.semantic, "semantic"):
        field = name.split(".", 1)[1]
        if field in RELOADABLE_SEMANTIC:
            semantic = dataclasses.replace(semantic, **{field: getattr(new.semantic, field)})
            applied.append(name)
        else:
            refused.append(name)
    for section in ("cache", "router", "events"):
        refused += _diff(getattr(old, section), getattr(new, section), section)
    old_tiers = {t.name: t for t in old.tiers}
    new_tiers = {t.name: t for t in new.tiers}
    refused += [f"tiers.{n} (added)" for n in new_tiers.keys() - old_tiers.keys()]
    refused += [f"tiers.{n} (removed)" for n in old_tiers.keys() - new_tiers.keys()]
    tiers: list[TierConfig] = []
    for name, t in old_tiers.items():
        nt = new_tiers.get(name)
        if nt is None:
            tiers.append(t)
            continue
        for fname in _diff(t, nt, f"tiers.{name}"):
            field = fname.rsplit(".", 1)[1]
            if field in RELOADABLE_TIER:
                t = dataclasses.replace(t, **{field: getattr(nt, field)})
                applied.append(fname)
            else:
                refused.append(fname)
        tiers.append(t)
    merged = dataclasses.replace(old, server=server, semantic=semantic, tiers=tuple(tiers))
    # fallbacks must still name tiers that exist (they do: tiers are never added or removed)
    return merged, applied, refused


def apply(proxy: Any, merged: Config) -> None:
    """Put ``merged`` (from ``plan``) into the running proxy."""
    logging.getLogger().setLevel(merged.server.log_level.upper())
    proxy.config = merged
    memo = getattr(proxy, "memo", None)
    if memo is not None:  # its plans were derived under the old configuration
        memo.clear()
    sem = getattr(proxy, "semantic", None)
    if sem is not None:
        sem.cfg = merged.semantic
        sem.ns_thresholds = namespace_thresholds(merged.semantic)
    for t in merged.tiers:
        client = proxy.tiers.get(t.name)
        if client is None:
            continue
        client.cfg = dataclasses.replace(t, model=client.cfg.model)
        for ep in client.upstreams:
            ep.max_failures = t.breaker_failures
            ep.cooldown_s = t.breaker_cooldown_s


def reload(proxy: Any, load: Any) -> tuple[list[str], list[str]]:
    """Load the configuration again (``load()``: file, environment, flags) and apply what can
    be applied; returns (applied, refused). Logs both."""
    try:
        new = load()
        if not new.tiers:
            raise ConfigError("tiers: none configured")
    except ConfigError as exc:
        log.error("SIGHUP: configuration not reloaded, it does not load: %s", exc)
        return [], ["(invalid configuration)"]
    merged, applied, refused = plan(proxy.config, new)
    apply(proxy, merged)
    if applied:
        log.warning("SIGHUP: reloaded %s", ", ".join(applied))
    else:
        log.warning("SIGHUP: configuration reloaded, nothing reloadable changed")
    if refused:
        log.warning("SIGHUP: not reloaded, needs a restart: %s", ", ".join(refused))
    return applied, refused
