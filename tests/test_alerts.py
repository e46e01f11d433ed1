"""deploy/prometheus/alerts.yml: validated and unit-tested by promtool, and held against the
metrics a running proxy really exports.

promtool comes with Debian's ``prometheus`` package (``.ci/run`` installs it). The unit tests
(``alerts_test.yml``) name each expected alert by its labels only; the annotations are filled in
here from alerts.yml with those labels, so the runbook text lives in one file and promtool still
compares every alert whole.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.test_deploy import METRIC_RE, check_promql, exported_names

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"

#: what the issue asks for, by alert name
REQUIRED = {
    "EdgeProxyHitRateDrop",  # hit-rate drop against its own baseline
    "EdgeProxyErrorRate",
    "EdgeProxyCachedAnswerSlow",  # cached-answer P99 over 15 ms
    "EdgeProxyTierAllBreakersOpen",
    "EdgeProxyRedisDown", "EdgeProxySharedStreamDown", "EdgeProxySharedStreamLag",
    "EdgeProxyEmbedTimeouts",  # embed timeouts or sheds
    "EdgeProxyMemoryNearLimit",
    "EdgeProxySpendOverBudget",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (.ci/run does)",
                    pytrace=False)
    return path


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def render(template: str, labels: dict[str, str]) -> str:
    """Prometheus' template for the only construct alerts.yml uses: {{ $labels.NAME }}."""
    out = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), template)
    assert "{{" not in out, f"template construct not handled here: {template}"
    return out


def test_promtool_check_rules() -> None:
    res = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules())} rules found" in res.stdout


def test_promtool_unit_tests(tmp_path: Path) -> None:
    spec = yaml.safe_load(RULE_TESTS.read_text())
    by_name = alerts()
    tested: set[str] = set()
    for group in spec["tests"]:
        for case in group.get("alert_rule_test", []):
            rule = by_name[case["alertname"]]
            for exp in case.get("exp_alerts") or []:
                tested.add(case["alertname"])
                labels = {str(k): str(v) for k, v in exp["exp_labels"].items()}
                exp["exp_annotations"] = {k: render(v, labels)
                                          for k, v in rule["annotations"].items()}
    assert tested == set(by_name), f"alerts never seen firing in a test: {set(by_name) - tested}"
    spec["rule_files"] = [str(RULES)]
    filled = tmp_path / "alerts_test.yml"
    filled.write_text(yaml.safe_dump(spec, sort_keys=False))
    res = subprocess.run([promtool(), "test", "rules", str(filled)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_has_severity_summary_and_runbook() -> None:
    found = alerts()
    assert set(found) >= REQUIRED, f"missing: {REQUIRED - set(found)}"
    for name, rule in found.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        ann = rule["annotations"]
        assert ann["summary"].strip(), name
        assert len(ann["runbook"].split()) >= 12, f"{name}: runbook too thin"


async def test_alert_metrics_are_exported_by_the_proxy(make_proxy: Any) -> None:
    p = await make_proxy()
    await p.client().chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hi"}])
    async with aiohttp.ClientSession() as s, s.get(p.url + "/metrics") as r:
        exposition = await r.text()
    names = exported_names(exposition)
    recorded = {r["record"] for r in rules() if "record" in r}
    exprs = []
    for r in rules():
        expr = r["expr"]
        for rec in recorded:  # recording rules are ours, not the proxy's
            expr = expr.replace(rec, "recorded")
        exprs.append(expr)
    assert check_promql(exprs, names) == []
    # prometheus-client's process metrics are not edge_proxy_*: checked by name here
    for expr in exprs:
        for name in re.findall(r"\bprocess_\w+", expr):
            assert name in names, f"{name} not exported"
    assert any(METRIC_RE.search(e) for e in exprs)
