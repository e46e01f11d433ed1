"""Deployment artifacts in deploy/: Kubernetes manifests, Dockerfile, Grafana dashboard.

There is no Docker engine or cluster in CI, so these tests read the files and hold them against
the code they deploy: the ConfigMap's TOML loads through ``proxy.config.load_config``, the
sidecar's probes and scrape annotations hit the configured port, the Dockerfile's CMD reads the
file the ConfigMap is mounted as, the model paths of the config are where the image puts the
model, and every metric the dashboard queries is one a running proxy really exports (and each
exported metric has a panel).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "edge-proxy.json"
SIDECAR = "edge-proxy"


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests


def manifest_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def objects(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in manifest_docs() if d.get("kind") == kind]


def get_object(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in objects(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def pod_containers(deploy: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deploy["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def sidecar() -> tuple[dict[str, Any], dict[str, Any]]:
    """(Deployment, container) of the edge-proxy sidecar: a regular or a native sidecar."""
    found = [(d, c) for d in objects("Deployment") for c in pod_containers(d)
             if c["name"] == SIDECAR]
    assert len(found) == 1, f"expected one {SIDECAR!r} container in deploy/k8s, found {found}"
    return found[0]


def config_arg(args: list[str]) -> str:
    assert "--config" in args, f"no --config in {args}"
    return args[args.index("--config") + 1]


def sidecar_config_text() -> str:
    """The TOML the sidecar reads: --config path -> volumeMount -> ConfigMap key."""
    deploy, c = sidecar()
    path = PurePosixPath(config_arg(c.get("args") or dockerfile().final.cmd))
    mounts = [m for m in c.get("volumeMounts", []) if path.parent == PurePosixPath(m["mountPath"])]
    assert mounts, f"no volume mounted at {path.parent} in the sidecar"
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"].get("volumes", [])}
    volume = volumes[mounts[0]["name"]]
    assert "configMap" in volume, f"volume {volume['name']} is not a ConfigMap"
    cm = get_object("ConfigMap", volume["configMap"]["name"])
    assert path.name in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {path.name}"
    return str(cm["data"][path.name])


def sidecar_config(tmp_path: Path, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "edge.toml"
    path.write_text(sidecar_config_text())
    return load_config(path, env=env or {})


def container_port(c: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
    assert port in named, f"port {port!r} is not a named port of {c['name']}"
    return int(named[port])


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9, "m": 1e-3}


def quantity(q: str | int | float) -> float:
    """A Kubernetes resource quantity as a number (cores or bytes)."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m and (m[2] in _UNITS or not m[2]), f"bad quantity {q!r}"
    return float(m[1]) * _UNITS.get(m[2], 1)


def redis_size(s: str) -> int:
    """A Redis memory size (768mb, 1gb, 100000)."""
    m = re.fullmatch(r"(\d+)(kb|mb|gb|k|m|g)?", s.lower())
    assert m, f"bad redis size {s!r}"
    return int(m[1]) * {"kb": 1024, "mb": 2**20, "gb": 2**30, "k": 1000, "m": 10**6,
                        "g": 10**9, None: 1}[m[2]]


def test_every_manifest_parses_with_kind_and_name() -> None:
    docs = manifest_docs()
    assert docs, "no manifests in deploy/k8s"
    for path, doc in docs:
        assert "apiVersion" in doc and "kind" in doc, f"{path.name}: {doc!r:.80}"
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], f"{path.name}: {doc['kind']} without a name"


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = objects("Kustomization")
    listed = set(kust["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files, f"kustomization.yaml resources {sorted(listed)} != {sorted(files)}"


def test_selectors_match_pods_and_ports() -> None:
    deployments = objects("Deployment")
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        sel = d["spec"]["selector"]["matchLabels"]
        assert sel.items() <= labels.items(), f"{d['metadata']['name']}: selector != labels"
    for svc in objects("Service"):
        sel = svc["spec"]["selector"]
        pods = [d for d in deployments
                if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {svc['metadata']['name']} selects no Deployment's pods"
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert any(target in (cp["containerPort"], cp.get("name"))
                       for c in pod_containers(pods[0]) for cp in c.get("ports", [])), \
                f"Service {svc['metadata']['name']}: targetPort {target!r} is no container port"


def test_configmap_toml_parses_and_loads_through_load_config(tmp_path: Path) -> None:
    tomllib.loads(sidecar_config_text())  # a TOML syntax error shows here first
    cfg = sidecar_config(tmp_path)
    assert [t.name for t in cfg.tiers], "the ConfigMap configures no tier"
    for t in cfg.tiers:
        # a set model lets the sidecar start while vLLM is still loading (no /v1/models call)
        assert t.model, f"tiers.{t.name}.model is empty: the sidecar would crash-loop while " \
                        "vLLM loads"


def test_sidecar_env_maps_to_config_fields(tmp_path: Path) -> None:
    """Every EDGE_PROXY_* variable of the sidecar names a real field (load_config rejects
    unknown ones), and the admin token comes from a Secret."""
    _, c = sidecar()
    env = {}
    for var in c.get("env", []):
        if var["name"].startswith("EDGE_PROXY_"):
            env[var["name"]] = var.get("value", "from-a-secret")
    cfg = sidecar_config(tmp_path, env)
    assert cfg.server.admin_token == "from-a-secret"
    (token,) = [v for v in c["env"] if v["name"] == "EDGE_PROXY_SERVER__ADMIN_TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]


def test_probes_and_scrape_target_the_configured_port(tmp_path: Path) -> None:
    deploy, c = sidecar()
    cfg = sidecar_config(tmp_path)
    assert cfg.server.port in [p["containerPort"] for p in c["ports"]]
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    if "startupProbe" in c:
        expected["startupProbe"] = "/healthz"
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, f"{probe} -> {get['path']}, want {path}"
        assert container_port(c, get["port"]) == cfg.server.port, f"{probe}: wrong port"
    # the kubelet's probes and Prometheus come to the pod IP, never to its loopback
    host = cfg.server.host
    assert host in ("", "0.0.0.0", "::") or not ipaddress.ip_address(host).is_loopback, \
        f"server.host {host}: httpGet probes and scrapes cannot reach a loopback listener"
    ann = deploy["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == cfg.server.port
    assert ann.get("prometheus.io/path", "/metrics") == "/metrics"


def test_sidecar_resources_and_security() -> None:
    _, c = sidecar()
    res = c["resources"]
    for kind in ("cpu", "memory"):
        req, lim = quantity(res["requests"][kind]), quantity(res["limits"][kind])
        assert 0 < req <= lim, f"{kind}: request {req} > limit {lim}"
    assert quantity(res["limits"]["cpu"]) >= 1, "the embedder alone needs about one core"
    assert quantity(res["limits"]["memory"]) >= 512 * 2**20
    sc = c["securityContext"]
    assert sc.get("runAsNonRoot") or sc.get("runAsUser", 0) != 0
    assert sc["allowPrivilegeEscalation"] is False


def test_redis_is_the_configured_l2_with_lru_and_no_persistence(tmp_path: Path) -> None:
    cfg = sidecar_config(tmp_path)
    url = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", cfg.cache.redis_url)
    assert url, f"cache.redis_url {cfg.cache.redis_url!r}"
    svc = get_object("Service", url[1])
    assert int(url[2]) in [p["port"] for p in svc["spec"]["ports"]]
    pods = [d for d in objects("Deployment") if svc["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()]
    (redis,) = [c for c in pod_containers(pods[0]) if "redis" in c["image"]]
    args = [*redis.get("command", []), *redis.get("args", [])]
    opts = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert opts["--maxmemory-policy"] == "allkeys-lru"
    assert opts["--save"] == "" and opts["--appendonly"] == "no"
    limit = quantity(redis["resources"]["limits"]["memory"])
    assert redis_size(opts["--maxmemory"]) < 0.9 * limit, "maxmemory leaves no headroom"


# ---------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]

    def last(self, op: str) -> str:
        found = self.all(op)
        assert found, f"stage {self.name or self.image}: no {op}"
        return found[-1]

    @property
    def cmd(self) -> list[str]:
        return json.loads(self.last("CMD"))


@dataclass
class Dockerfile:
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def logical_lines(text: str) -> Iterator[str]:
    """Instructions with their continuation lines joined; comments dropped."""
    buf = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            yield buf.strip()
        buf = ""
    if buf.strip():
        yield buf.strip()


def parse_dockerfile(text: str) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif op == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), words[0])
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else ""
            stages.append(Stage(image, name))
        else:
            assert stages, f"{op} before FROM"
            stages[-1].instructions.append((op, rest))
    return Dockerfile(stages)


def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def copy_sources(arg: str) -> tuple[list[str], str, str | None]:
    """(sources, destination, --from stage) of a COPY instruction."""
    words = shlex.split(arg)
    frm = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], paths[-1], frm


def test_dockerfile_parser_sees_continuations_and_stages() -> None:
    df = parse_dockerfile("ARG B=python:3.11-slim\nFROM ${B} AS one\n# c\nRUN a \\\n  && b\n"
                          "FROM one\nUSER 1000\n")
    assert [s.image for s in df.stages] == ["python:3.11-slim", "one"]
    assert df.stages[0].all("RUN") == ["a    && b"]
    assert df.final.last("USER") == "1000"


def test_dockerfile_runtime_stage() -> None:
    df = dockerfile()
    final = df.final
    assert final.image.startswith("python:3.11-slim")
    for s in df.stages:
        assert s.image.startswith("python:3.11") or s.image in {x.name for x in df.stages}
    user = final.last("USER").split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert json.loads(final.last("ENTRYPOINT")) == ["edge-proxy"]
    assert final.cmd == ["serve", "--config", "/etc/edge-proxy/edge.toml"]
    exposed = {int(p.split("/")[0]) for e in final.all("EXPOSE") for p in e.split()}
    assert 8080 in exposed
    health = final.last("HEALTHCHECK")
    assert "/healthz" in health and re.search(r"\bCMD\b", health)
    assert re.search(r"'8080'|:8080/", health), "HEALTHCHECK does not probe the exposed port"
    # no compiler, no model-build packages: nothing is installed in the final stage
    for run in final.all("RUN"):
        assert not re.search(r"pip install|apt-get install|setup\.sh", run), run
    # the console script of ENTRYPOINT exists
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "edge-proxy" in scripts


def test_dockerfile_builds_extensions_and_model_in_earlier_stages() -> None:
    df = dockerfile()
    builders = df.stages[:-1]
    runs = [r for s in builders for r in s.all("RUN")]
    assert any(re.search(r"apt-get install .*\bgcc\b", r) for r in runs), "no gcc for Cython"
    assert any(re.search(r"pip install \.(\s|$)", r) for r in runs), "package not installed"
    assert any("bash models/setup.sh" in r for r in runs), "model not built at build time"
    names = {s.name for s in builders}
    for _, _, frm in map(copy_sources, df.final.all("COPY")):
        assert frm in names, f"runtime COPY from {frm!r}, not a build stage"


def test_dockerfile_copy_sources_exist() -> None:
    for stage in dockerfile().stages:
        for src, _, frm in map(copy_sources, stage.all("COPY")):
            if frm is None:
                for s in src:
                    assert (ROOT / s).exists(), f"COPY {s}: not in the repository"
                    # the model must be built in the image, not copied from the host
                    assert not s.endswith(".onnx"), f"COPY {s}: build it with models/setup.sh"


def test_dockerfile_pins_the_versions_of_the_model_pin() -> None:
    """The model stage verifies a sha256 that only the pinned onnx/onnxruntime/numpy give."""
    said = re.search(r"pin was made with onnx ([\d.]+), onnxruntime ([\d.]+), numpy ([\d.]+)",
                     " ".join((ROOT / "models" / "README.md").read_text().split()))
    assert said, "models/README.md no longer states the versions of the model pin"
    pins = dict(re.findall(r"\b([A-Za-z][\w.-]*)==([\w.]+)", DOCKERFILE.read_text()))
    assert (pins.get("onnx"), pins.get("onnxruntime"), pins.get("numpy")) == said.groups()


def test_config_and_model_paths_match_the_image(tmp_path: Path) -> None:
    df = dockerfile()
    _, c = sidecar()
    # the pod runs the image's CMD (or the same args) against the mounted ConfigMap
    assert config_arg(c.get("args") or df.final.cmd) == config_arg(df.final.cmd)
    shipped = set()
    for src, dest, _ in map(copy_sources, df.final.all("COPY")):
        for s in src:
            shipped.add(str(PurePosixPath(dest) / PurePosixPath(s).name)
                        if dest.endswith("/") else dest)
    cfg = sidecar_config(tmp_path)
    assert cfg.semantic.model_path in shipped, f"{cfg.semantic.model_path} not in the image"
    # router weights and tokenizer are package data: a path, if configured, must be shipped
    assert not cfg.router.weights_path or cfg.router.weights_path in shipped
    env = " ".join(final_env for final_env in df.final.all("ENV"))
    model_env = re.search(r"EDGE_PROXY_MODEL=(\S+)", env)
    assert model_env and model_env[1] in shipped


def test_image_default_config_loads(tmp_path: Path) -> None:
    """The config the image writes to /etc/edge-proxy/edge.toml (for `docker run` without a
    mount) loads, and with EDGE_PROXY_TIERS set gives a servable config."""
    (run,) = [r for r in dockerfile().final.all("RUN") if "/etc/edge-proxy/edge.toml" in r]
    lines = re.findall(r"'([^']*)'", run.split("printf", 1)[1])[1:]  # [0] is the format
    path = tmp_path / "edge.toml"
    path.write_text("\n".join(lines) + "\n")
    cfg = load_config(path, env={"EDGE_PROXY_TIERS": "small=http://vllm:8000"})
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8080
    assert [t.name for t in cfg.tiers] == ["small"]
    assert cfg.semantic.model_path and not cfg.router.weights_path  # the package's weights


# ---------------------------------------------------------------------------------------------
# Grafana dashboard

METRIC_RE = re.compile(r"\bedge_proxy_[a-zA-Z0-9_:]*")
RATE_FUNCS = {"rate", "irate", "increase"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def dashboard_exprs(d: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and template variable queries."""
    exprs = [t["expr"] for p in dashboard_panels(d) for t in p.get("targets", [])]
    for var in d.get("templating", {}).get("list", []):
        q = var.get("query")
        if var.get("type") == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def exported_names(exposition: str) -> dict[str, str]:
    """Sample name -> type for every metric family in a /metrics text, samples or not.

    A family with labels but no children yet appears only as HELP/TYPE; its samples would be
    NAME_total (counter), NAME_bucket/_sum/_count (histogram), NAME (gauge).
    """
    out: dict[str, str] = {}
    for fam in text_string_to_metric_families(exposition):
        if fam.type == "counter":
            out[fam.name + "_total"] = "counter"
        elif fam.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[fam.name + suffix] = "histogram"
        else:
            out.setdefault(fam.name, fam.type)
        for s in fam.samples:
            out.setdefault(s.name, fam.type)
    return out


def enclosing_function(expr: str, pos: int) -> str:
    """Name of the innermost function call around ``expr[pos]`` ("" at top level, "agg" for
    an aggregation like ``sum by (x) (...)``)."""
    depth = 0
    for j in range(pos - 1, -1, -1):
        ch = expr[j]
        if ch == ")":
            depth += 1
        elif ch == "(":
            if depth == 0:
                before = expr[:j].rstrip()
                if before.endswith(")"):
                    return "agg"
                m = re.search(r"([A-Za-z_]\w*)$", before)
                return m[1] if m else ""
            depth -= 1
    return ""


def check_promql(exprs: list[str], names: dict[str, str]) -> list[str]:
    """Problems of the dashboard's expressions against the exported names (empty = none)."""
    problems = []
    for expr in exprs:
        for m in METRIC_RE.finditer(expr):
            name = m[0]
            kind = names.get(name)
            if kind is None:
                problems.append(f"{name}: not exported by /metrics (in {expr})")
                continue
            func = enclosing_function(expr, m.start())
            is_counter_like = kind in ("counter", "histogram")
            if is_counter_like and func not in RATE_FUNCS and "label_values" not in expr:
                problems.append(f"{name} ({kind}) used without rate/increase in {expr}")
            if kind == "gauge" and func in RATE_FUNCS:
                problems.append(f"{name} (gauge) inside {func}() in {expr}")
            if name.endswith("_bucket") and not (
                    "histogram_quantile" in expr and re.search(r"by \([^)]*\ble\b", expr)):
                problems.append(f"{name}: buckets outside histogram_quantile(... by (le)) "
                                f"in {expr}")
    return problems


SAMPLE_EXPOSITION = """\
# HELP edge_proxy_requests_total Requests
# TYPE edge_proxy_requests_total counter
edge_proxy_requests_total{outcome="miss"} 1.0
# HELP edge_proxy_request_seconds Latency
# TYPE edge_proxy_request_seconds histogram
edge_proxy_request_seconds_bucket{le="+Inf"} 1.0
edge_proxy_request_seconds_count 1.0
edge_proxy_request_seconds_sum 0.1
# HELP edge_proxy_redis_up Up
# TYPE edge_proxy_redis_up gauge
edge_proxy_redis_up 1.0
# HELP edge_proxy_semantic_rejects_total Rejects
# TYPE edge_proxy_semantic_rejects_total counter
"""


@pytest.mark.parametrize(("expr", "ok"), [
    ('sum by (outcome) (rate(edge_proxy_requests_total{outcome="miss"}[5m]))', True),
    ("sum(rate(edge_proxy_semantic_rejects_total[5m]))", True),  # no samples yet: still known
    ("sum(rate(edge_proxy_requests[5m]))", False),  # counter without _total
    ("edge_proxy_requests_total", False),  # raw counter
    ("histogram_quantile(0.99, sum by (le) (rate(edge_proxy_request_seconds_bucket[5m])))", True),
    ("histogram_quantile(0.99, sum(rate(edge_proxy_request_seconds_bucket[5m])))", False),
    ("rate(edge_proxy_request_seconds[5m])", False),  # histogram family name has no samples
    ("min(edge_proxy_redis_up)", True),
    ("rate(edge_proxy_redis_up[5m])", False),  # gauge under rate
    ("sum(rate(edge_proxy_cache_hits_total[5m]))", False),  # not a metric of the proxy
])
def test_promql_check_catches_wrong_names(expr: str, ok: bool) -> None:
    assert (check_promql([expr], exported_names(SAMPLE_EXPOSITION)) == []) is ok


def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    panels = dashboard_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"panel {p['title']!r} off the grid"
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in [p, *p["targets"]]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    # every $variable used is defined (Grafana's built-ins aside)
    used = set(re.findall(r"\$(\w+)", json.dumps(dashboard_exprs(d))))
    assert used <= set(variables) | {"__rate_interval", "__range", "__interval"}, used


def test_dashboard_has_the_required_views() -> None:
    exprs = "\n".join(dashboard_exprs(dashboard()))
    for needed in (
        r"by \(outcome\) \(rate\(edge_proxy_requests_total",  # hit rates by layer
        r"edge_proxy_cost_spent_usd_total", r"edge_proxy_cost_saved_usd_total",
        r"by \(tier\) \(rate\(edge_proxy_requests_total", r"edge_proxy_route_decisions_total",
        r"histogram_quantile\(0\.99, sum by \(le, outcome\) "
        r"\(rate\(edge_proxy_request_seconds_bucket",
        r"by \(le, tier\) \(rate\(edge_proxy_upstream_first_byte_seconds_bucket",
        r"edge_proxy_upstream_errors_total", r'kind="breaker_open"', r"edge_proxy_redis_up",
        r"edge_proxy_embed_seconds_bucket", r"by \(layer\) \(edge_proxy_cache_entries",
        r"by \(layer\) \(edge_proxy_cache_bytes", r"by \(reason\) \(rate\("
        r"edge_proxy_semantic_rejects_total",
    ):
        assert re.search(needed, exprs), f"no panel queries {needed}"


async def test_dashboard_metrics_are_exported_by_the_proxy(make_proxy: Any) -> None:
    p = await make_proxy()
    await p.client().chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hi"}])
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz"):  # the probes' endpoints answer 200
            async with s.get(p.url + path) as r:
                assert r.status == 200, path
        async with s.get(p.url + "/metrics") as r:
            assert r.status == 200
            exposition = await r.text()
    names = exported_names(exposition)
    assert "edge_proxy_requests_total" in names  # the request above was counted
    exprs = dashboard_exprs(dashboard())
    assert check_promql(exprs, names) == []
    # and the other way: every family the proxy exports has a panel (add one with a new metric)
    def family(name: str) -> str:
        return re.sub(r"_(bucket|sum|count)$", "", name) if names[name] == "histogram" else name

    used = {family(m) for e in exprs for m in METRIC_RE.findall(e)}
    exported = {family(n) for n in names
                if n.startswith("edge_proxy_") and not n.endswith("_created")}
    assert exported - used == set(), f"exported but on no dashboard panel: {exported - used}"


# ---------------------------------------------------------------------------------------------
# docker-compose (vLLM + Redis + the proxy)


def test_compose_environment_is_a_valid_config() -> None:
    """deploy/docker-compose.yml: the proxy's environment loads (with the compose defaults
    substituted), points its tier at the vllm service with that vLLM's served name and api key,
    and Redis at the redis service; the proxy does not wait for vLLM to start."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    proxy, vllm = services["edge-proxy"], services["vllm"]

    def subst(v: str) -> str:
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v)

    env = {k: subst(str(v)) for k, v in proxy["environment"].items()}
    cfg = load_config(env=env)
    tier = cfg.tier("small")
    args = [subst(a) for a in vllm["command"]]
    assert tier.urls == ("http://vllm:8000",)
    assert tier.model == args[args.index("--served-model-name") + 1]
    assert tier.api_key == args[args.index("--api-key") + 1]
    assert cfg.cache.redis_url == "redis://redis:6379/0" and "redis" in services
    assert "vllm" not in proxy.get("depends_on", [])
    assert proxy["ports"] == [f"{cfg.server.port}:{cfg.server.port}"]
    assert cfg.server.host == "0.0.0.0"
