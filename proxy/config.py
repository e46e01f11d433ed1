"""One frozen, validated configuration: TOML file < EDGE_PROXY_* environment < CLI flags.

Every knob, its default and its unit is a field below. Sections map to TOML tables
(``[server]``, ``[cache]``, ``[semantic]``, ``[router]``, ``[tiers.NAME]``); an environment
variable ``EDGE_PROXY_<SECTION>__<FIELD>`` overrides one field (``EDGE_PROXY_SERVER__PORT=8080``,
``EDGE_PROXY_CACHE__REDIS_URL=redis://...``), and
``EDGE_PROXY_TIERS="small=http://h:9001,http://h2:9001;large=http://h:9003"``
sets tiers (``;`` between tiers, ``,`` between one tier's URLs). Errors name the bad field
(``ConfigError("cache.l1_max_bytes: expected int ...")``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from proxy.config_check import ConfigError as ConfigError
from proxy.config_check import _build, _check_url, _validate
from proxy.config_check import namespace_error_rates as namespace_error_rates
from proxy.config_check import namespace_thresholds as namespace_thresholds
from proxy.config_check import parse_flows as parse_flows
from proxy.config_check import time_sensitive as time_sensitive

ENV_PREFIX: Final = "EDGE_PROXY_"

#: Default prices (USD per 1M input / output tokens) for the conventional tier names; a tier
#: with another name must state its prices or be priced at 0.
DEFAULT_PRICES: Final[dict[str, tuple[float, float]]] = {
    "small": (0.10, 0.20),
    "medium": (0.60, 1.20),
    "large": (3.00, 15.00),
}


@dataclass(frozen=True, slots=True)
class TierConfig:
    """One model tier: a served model behind one or more vLLM base URLs."""

    name: str
    urls: tuple[str, ...]
    #: Served model name; empty = taken from the first upstream's /v1/models at start.
    model: str = ""
    #: USD per 1M prompt tokens.
    price_input_per_m: float = 0.0
    #: USD per 1M completion tokens.
    price_output_per_m: float = 0.0
    #: Seconds to open a TCP connection to an upstream.
    connect_timeout_s: float = 2.0
    #: Seconds from sending the request to the response headers and first SSE event.
    first_token_timeout_s: float = 30.0
    #: Seconds for the whole upstream response.
    total_timeout_s: float = 600.0
    #: Concurrent upstream requests per tier (connection pool size).
    max_concurrency: int = 256
    #: Requests waiting for a slot beyond max_concurrency; more get 429 with Retry-After.
    max_queue: int = 1024
    #: Seconds a request may wait in that queue before 429.
    queue_timeout_s: float = 10.0
    #: Consecutive failures that open an endpoint's circuit breaker.
    breaker_failures: int = 5
    #: Seconds an open breaker waits before letting one probe request through.
    breaker_cooldown_s: float = 10.0
    #: Other tiers to try, in order, when this one fails before the first byte reached the client.
    fallback: tuple[str, ...] = ()
    #: Bearer token sent to this tier's upstreams (``vllm serve --api-key``); never logged.
    api_key: str = field(default="", repr=False)
    #: Send the client's own Authorization header upstream instead of ``api_key``.
    forward_auth: bool = False
    #: Path polled on each upstream to learn when it is down or back; empty = no health checks.
    health_path: str = "/health"
    #: Seconds between health checks (a recovered upstream serves again within about this).
    health_interval_s: float = 1.0
    #: Seconds between re-reads of /v1/models (the served checkpoint may change under a name).
    model_check_interval_s: float = 30.0
    #: Largest upstream response relayed, bytes (a JSON body, or a stream's total); 502 above.
    max_response_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Largest accepted request body, bytes (413 above).
    max_body_bytes: int = 4 * 1024 * 1024
    #: Largest number of messages in a chat request.
    max_messages: int = 1024
    #: Largest prompt, characters (all message texts together).
    max_prompt_chars: int = 400_000
    #: Largest accepted max_tokens.
    max_tokens_limit: int = 1_000_000
    #: Seconds to drain in-flight requests on shutdown.
    shutdown_timeout_s: float = 10.0
    #: Event loop: "uvloop" or "asyncio".
    loop: str = "uvloop"
    log_level: str = "info"
    #: One JSON line per request on the "edge_proxy.access" logger.
    access_log: bool = False
    #: Bearer token for /admin/*; empty disables the admin API.
    admin_token: str = ""
    #: gc.set_threshold at start (gen0, gen1, gen2); empty = Python's (700, 10, 10). Measured
    #: on the load suite's loaded 2-core box (wall time): Python's thresholds stopped the loop
    #: 283 times for 1.6 s in all (gen-2 up to 123 ms); 50000 made collections rare but one
    #: young pass took 171 ms; 10000 gave 5 passes, 109 ms in all, max 52 ms. A pause scales
    #: with the threshold, so this one keeps them few and bounded; cyclic garbage waits for up to
    #: 10k net allocations.
    gc_thresholds: tuple[int, ...] = (10_000, 10, 10)
    #: ``edge-proxy serve`` starts itself again with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
    #: (glibc >= 2.35; the kernel's transparent huge pages in "madvise" mode or "always"), so
    #: the models' weights and buffers sit in 2 MiB pages: a model run after a pause missed the
    #: TLB less, 0.25-0.4 ms less per run, about 1 ms less per novel semantic hit (Xeon,
    #: benchmarks/cold_models.py). No effect elsewhere; false keeps the environment as it is.
    huge_pages: bool = True
    #: Tenants with their own series in the per-namespace metrics; later ones count as "other".
    metrics_max_namespaces: int = 100
    #: Seconds a new connection has to deliver a complete request head, and an idle keep-alive
    #: connection stays open (slowloris: a half-sent head is closed after this).
    idle_timeout_s: float = 15.0
    #: Seconds to receive a request body once its head arrived (408 after).
    body_timeout_s: float = 30.0
    #: Open client connections; more are answered 503 and closed. 0 = half the process's file
    #: limit (raised to its hard limit at start), the rest left for upstreams, Redis and files.
    max_connections: int = 0
    #: Answer a repeated exact request (the same bytes: path, header lines incl. the
    #: credential, body) from L1 below aiohttp's request layer (proxy/fastpath.py).
    fast_path: bool = True
    #: Requests the fast path remembers (LRU), and the bytes their keys may hold in all.
    fast_path_entries: int = 8192
    fast_path_max_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CacheConfig:
    #: Master switch for the exact cache (L1 and L2).
    enabled: bool = True
    #: Byte bound of the in-process LRU (sum of stored response sizes).
    l1_max_bytes: int = 256 * 1024 * 1024
    #: Entry bound of the in-process LRU.
    l1_max_entries: int = 100_000
    #: Seconds an L1 entry lives.
    l1_ttl_s: float = 3600.0
    #: Redis URL for the shared L2; empty = in-process cache only.
    redis_url: str = ""
    #: Connections in the Redis pool (lookups; writes are batched on one).
    redis_max_connections: int = 256
    #: The Redis URL is one node of a Redis Cluster (the client discovers the others).
    redis_cluster: bool = False
    #: Seconds an L2 entry lives.
    redis_ttl_s: int = 86_400
    #: Seconds a Redis command may take before the request goes on without it.
    redis_timeout_s: float = 0.05
    #: Prefix of every Redis key.
    redis_prefix: str = "ep:v1:"
    #: Largest answer stored, bytes.
    max_entry_bytes: int = 1024 * 1024
    #: The tenant is the caller's credential (a hash of its Authorization header) and
    #: x-cache-namespace only partitions within it. true: the header names the tenant; only for
    #: deployments where a gateway in front sets the header and clients cannot.
    trust_namespace_header: bool = False
    #: Callers without a credential: "shared" (one anonymous namespace) or "refuse" (401).
    anonymous: str = "shared"
    #: Sampled requests (temperature > 0 or unset, without a seed; or n > 1): "store" serves one
    #: stored sample to every identical request (what saves money), "skip" neither looks up nor
    #: stores them. Such responses carry ``x-cache-sampled: store|skip``.
    sampled: str = "store"


@dataclass(frozen=True, slots=True)
class SemanticConfig:
    enabled: bool = True
    #: Cosine similarity a candidate must reach before the verifier looks at it.
    threshold: float = 0.85
    #: Per-namespace thresholds, "NAMESPACE=0.9" (a request's x-cache-threshold may only raise).
    namespace_thresholds: tuple[str, ...] = ()
    #: Verifier guards (numbers, negation, entities, order...) on candidates over the threshold.
    guards: bool = True
    #: Learned verifier weights (JSON); empty = guards only.
    verifier_weights: str = ""
    #: Path of the int8 ONNX model; empty = models/minilm-l6-int8.onnx (or $EDGE_PROXY_MODEL).
    model_path: str = ""
    #: Embedder LRU of text digest -> vector, entries (~1.7 KB each, whatever the text length).
    embed_cache_size: int = 10_000
    #: Skip the semantic lookup when the embedder's estimated wait for this query's vector (queue
    #: + its own embedding) is over this, rather than queue (0 = never skip).
    embed_deadline_s: float = 0.010
    #: Skip the semantic lookup (a miss) when the pair verifier's estimated wait for this
    #: candidate (verifications queued ahead x the recent time of one) is over this, rather
    #: than queue behind other lookups (0 = never; at most 32 queued whatever the setting).
    verify_deadline_s: float = 0.010
    #: Longest query (last user message, characters) the semantic layer embeds and stores;
    #: longer ones use the exact cache only. Bounds the query text kept per semantic entry.
    max_query_chars: int = 2048
    #: Longest actual wait for a query's embedding; past it the request skips the semantic layer
    #: (and the router uses its text-only features) instead of queueing behind a busy embedder.
    embed_timeout_s: float = 0.020
    #: Embedding worker threads; 0 = the cores this process may use (affinity, cgroup quota).
    embed_threads: int = 0
    #: CPU policy of the embedding threads: "nice" (nice +embed_nice: the loop wins the core,
    #: the embedder still progresses beside busy neighbours), "idle" (SCHED_IDLE: runs only on
    #: CPU time nothing else wants) or "normal".
    embed_priority: str = "nice"
    embed_nice: int = 5
    #: A miss does not wait for its embedding: the upstream call starts at once, beside the
    #: embedding and the semantic lookup, and is cancelled if a semantic hit turns up (what the
    #: upstream spent is counted: edge_proxy_speculative_upstream_total,
    #: edge_proxy_speculative_cancel_seconds). Routed requests with several tiers wait for the
    #: vector (the router reads it). false: every miss waits for its embedding first.
    speculative: bool = True
    #: Wait this long for the embedding and lookup before starting the speculative upstream
    #: call (hits found by then never reach the upstream; misses pay up to this much).
    speculative_delay_s: float = 0.0
    #: Entries in the semantic index.
    capacity: int = 100_000
    #: Bytes of query texts and keys the index keeps (Python objects); past it the oldest
    #: entries go, as past ``capacity``. Typical questions take ~160 B, so this binds only
    #: when clients send long or astral-plane texts (up to ~8 KB each at max_query_chars).
    max_text_bytes: int = 100 * 1024 * 1024
    ttl_s: float = 86_400.0
    #: Scopes up to this many entries are scored by brute force; larger ones by ANN.
    brute_force_max: int = 256
    #: Queries matching any of these (case-insensitive regex) skip the semantic layer: answers
    #: that depend on the moment must not be served to a merely similar question.
    bypass_patterns: tuple[str, ...] = (
        r"\b(today|tonight|tomorrow|yesterday|right now|currently|latest|this (week|month|year))\b",
        r"\b(current (time|date|day)|what time is it|what day is it)\b",
        r"\b(weather|forecast|stock price|exchange rate|news|score of)\b",
    )
    #: Snapshot file of the index (loaded at start, written at shutdown); empty = none.
    snapshot_path: str = ""
    #: Seconds between periodic snapshots (0 = only at shutdown).
    snapshot_interval_s: float = 0.0
    #: With a Redis URL: share semantic entries with every sidecar through a Redis Stream.
    shared: bool = True
    #: Learned pair verifier (models/pair_verifier.json: int8 cross-encoder, fusion, cuts);
    #: "" = off (threshold + guards only). Issue 13.
    pair_verifier: str = "models/pair_verifier.json"
    #: Error budget: the largest share of semantic hits allowed to be wrong. The probability
    #: cut that meets it was calibrated on held-out pairs; audits and feedback move it.
    max_error_rate: float = 0.01
    #: Per-namespace budgets, "NAMESPACE=0.05" (the namespace as the proxy derives it).
    namespace_error_rates: tuple[str, ...] = ()
    #: Share of semantic hits also asked upstream in the background and compared (evidence).
    audit_rate: float = 0.0
    #: Audit: answers agree when their texts match or their sentence vectors reach this cosine.
    audit_agree_cosine: float = 0.9
    #: Candidates the pair verifier scores per lookup (each costs one cross-encoder run). The
    #: shipped cuts are calibrated for 1: a second candidate, scored when the nearest failed,
    #: is wrong more often, and calibrating for 2 raises the cut past what it adds (issue 13).
    verify_max_candidates: int = 1
    #: The pair verifier's probability per (scope, query text, cached text), this many pairs
    #: (~200 bytes each, whatever the text length): a wording asked again against the same
    #: entry is decided without the cross-encoder (0 = no memo).
    verify_memo_entries: int = 32_768
    #: Exact entries of time-sensitive questions (bypass_patterns) live this long.
    time_sensitive_ttl_s: float = 300.0
    #: Request ids remembered for POST /v1/feedback (older or unknown ids answer 404).
    feedback_window_s: float = 3600.0
    feedback_max_entries: int = 50_000


@dataclass(frozen=True, slots=True)
class RouterConfig:
    #: Tier that serves model "auto" when the router is off.
    default_tier: str = ""
    #: Model names routed by the router, besides "auto".
    aliases: tuple[str, ...] = ()
    #: Route model "auto" with the learned router (else: default_tier).
    enabled: bool = True
    #: Score cut points between tiers (smallest first), len = tiers - 1; empty = the weights'.
    cuts: tuple[float, ...] = ()
    #: Router weights (JSON); empty = the package's (proxy/data/router.json).
    weights_path: str = ""
    #: A/B split of routed traffic: "FROM:TO=FRACTION" sends that fraction of the requests routed
    #: to FROM to TO instead (e.g. "large:medium=0.1").
    split: tuple[str, ...] = ()
    #: Shadow traffic: "FROM:TO=FRACTION" mirrors that fraction of FROM's answered misses to TO;
    #: the shadow answer is logged, never served.
    shadow: tuple[str, ...] = ()
    #: JSONL file of shadow pairs (both answers, latency, tokens); empty = log only metrics.
    shadow_log: str = ""


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """The request event log (proxy/events.py): one JSON object per request, for cost
    attribution (``edge-proxy report``)."""

    #: "" (off), "stdout", "file" (JSON lines at ``path``) or "redis" (a bounded Redis Stream).
    sink: str = ""
    #: JSON-lines file for sink = "file" (appended; its directory must exist).
    path: str = ""
    #: Redis for sink = "redis"; empty = cache.redis_url.
    redis_url: str = ""
    #: Stream key; empty = <cache.redis_prefix>events.
    stream: str = ""
    #: Approximate bound of the stream (XADD MAXLEN ~).
    stream_maxlen: int = 1_000_000
    #: Put the last user message (or the prompt) into each event. Off: no prompt text at all.
    log_prompts: bool = False
    #: Events waiting to be written; past it new events are dropped (and counted).
    max_pending: int = 100_000
    #: Seconds between batched writes.
    flush_interval_s: float = 0.2


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    tiers: tuple[TierConfig, ...] = ()

    def tier(self, name: str) -> TierConfig:
        """The tier called ``name``."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def default_tier(self) -> str:
        """The tier for model "auto" without a router: configured, else the first."""
        return self.router.default_tier or (self.tiers[0].name if self.tiers else "")


# ---------------------------------------------------------------------------------------------
# Building a Config from plain data, with errors that name the field


def _tier(name: str, data: Mapping[str, Any]) -> TierConfig:
    path = f"tiers.{name}"
    data = dict(data)
    if "url" in data:  # convenience: one URL
        data.setdefault("urls", [data.pop("url")])
    if not data.get("urls"):
        raise ConfigError(f"{path}.urls: at least one vLLM base URL is required")
    prices = DEFAULT_PRICES.get(name, (0.0, 0.0))
    data.setdefault("price_input_per_m", prices[0])
    data.setdefault("price_output_per_m", prices[1])
    tier: TierConfig = _build(TierConfig, {"name": name, **data}, path)
    urls = tuple(_check_url(u, f"{path}.urls[{i}]") for i, u in enumerate(tier.urls))
    tier = dataclasses.replace(tier, urls=urls)
    for fname in ("connect_timeout_s", "first_token_timeout_s", "total_timeout_s"):
        if getattr(tier, fname) <= 0:
            raise ConfigError(f"{path}.{fname}: must be > 0")
    if tier.price_input_per_m < 0 or tier.price_output_per_m < 0:
        raise ConfigError(f"{path}: prices must be >= 0")
    if tier.max_concurrency < 1:
        raise ConfigError(f"{path}.max_concurrency: must be >= 1")
    if tier.max_queue < 0:
        raise ConfigError(f"{path}.max_queue: must be >= 0")
    if tier.breaker_failures < 1:
        raise ConfigError(f"{path}.breaker_failures: must be >= 1")
    if tier.health_interval_s <= 0 or tier.model_check_interval_s <= 0:
        raise ConfigError(f"{path}.health_interval_s / model_check_interval_s: must be > 0")
    if tier.health_path and not tier.health_path.startswith("/"):
        raise ConfigError(f"{path}.health_path: must start with '/', got {tier.health_path!r}")
    return tier


def parse_tier_flag(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse ``NAME=URL[,URL...][@MODEL]`` (CLI ``--tier`` / ``EDGE_PROXY_TIERS``).

    ``@MODEL`` sets the served model name, so the proxy need not ask /v1/models for it (URLs
    with credentials in them are not supported here: use ``tiers.NAME.api_key``)."""
    name, sep, urls = spec.partition("=")
    name = name.strip()
    if not sep or not name or not urls.strip():
        raise ConfigError(f"tiers: expected NAME=URL[,URL...][@MODEL], got {spec!r}")
    out: dict[str, Any] = {}
    if "@" in urls:
        urls, _, model = urls.rpartition("@")
        if not model.strip():
            raise ConfigError(f"tiers.{name}: empty model after '@' in {spec!r}")
        out["model"] = model.strip()
    out["urls"] = [u.strip() for u in urls.split(",") if u.strip()]
    return name, out


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """EDGE_PROXY_SECTION__FIELD=value -> {"section": {"field": "value"}}."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, fname = key[len(ENV_PREFIX):].lower().partition("__")
        out.setdefault(section, {})[fname] = value
    return out


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    tier_flags: list[str] | None = None,
) -> Config:
    """Build the Config: TOML file, then environment, then ``overrides`` (CLI flags).

    ``overrides`` maps section -> field -> value; ``tier_flags`` are ``NAME=URL[,URL]`` strings
    that add or replace tiers' URLs.
    """
    env = os.environ if env is None else env
    data = _read_toml(path)
    tiers_data: dict[str, dict[str, Any]] = {
        name: dict(t) for name, t in (data.pop("tiers", {}) or {}).items()
    }
    tier_env = _apply_env(data, env)
    for section, given in (overrides or {}).items():
        data.setdefault(section, {}).update({k: v for k, v in given.items() if v is not None})
    flags = list(tier_flags or [])
    if env.get(ENV_PREFIX + "TIERS"):
        flags = [s for s in env[ENV_PREFIX + "TIERS"].split(";") if s.strip()] + flags
    for spec in flags:
        name, tdata = parse_tier_flag(spec)
        tiers_data.setdefault(name, {}).update(tdata)
        tiers_data[name].pop("url", None)
    for name, values in tier_env.items():
        tiers_data.setdefault(name, {}).update(values)
    return _validate(_assemble(data, tiers_data))


def _read_toml(path: str | Path | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Merge EDGE_PROXY_<SECTION>__<FIELD> into ``data``; returns the per-tier fields
    (EDGE_PROXY_TIERS__<NAME>__<FIELD>, e.g. ..._SMALL__API_KEY) by tier name."""
    tier_env: dict[str, dict[str, Any]] = {}
    for section, values in _env_overrides(env).items():
        if section != "tiers":
            data.setdefault(section, {}).update(values)
            continue
        for key, value in values.items():
            tname, sep, fname = key.partition("__")
            if not sep or not tname or not fname:
                raise ConfigError(f"EDGE_PROXY_TIERS__{key.upper()}: expected "
                                  "EDGE_PROXY_TIERS__<NAME>__<FIELD>")
            tier_env.setdefault(tname, {})[fname] = value
    return tier_env


def _assemble(data: dict[str, Any], tiers_data: dict[str, dict[str, Any]]) -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "tiers"}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(sections))}, "
                          "tiers)")
    hints = typing.get_type_hints(Config)
    kwargs: dict[str, Any] = {s: _build(hints[s], data.get(s, {}), s) for s in sections}
    kwargs["tiers"] = tuple(_tier(name, t) for name, t in tiers_data.items())
    return Config(**kwargs)


#: Fields whose values check-config never prints.
SECRET_FIELDS: Final = frozenset({"admin_token"})


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def effective_toml(cfg: Config) -> str:
    """The whole effective configuration as TOML (defaults included, secrets redacted):
    what ``edge-proxy check-config`` prints, loadable again with ``--config``."""
    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        if f.name == "tiers":
            continue
        lines.append(f"[{f.name}]")
        section = getattr(cfg, f.name)
        for sf in dataclasses.fields(section):
            value = getattr(section, sf.name)
            if sf.name in SECRET_FIELDS and value:
                lines.append(f'{sf.name} = "<redacted: {len(value)} characters>"')
            else:
                lines.append(f"{sf.name} = {_toml_value(value)}")
        lines.append("")
    for t in cfg.tiers:
        lines.append(f"[tiers.{t.name}]")
        for sf in dataclasses.fields(t):
            if sf.name != "name":
                lines.append(f"{sf.name} = {_toml_value(getattr(t, sf.name))}")
        lines.append("")
    return "\n".join(lines)
