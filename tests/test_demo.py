"""``edge-proxy demo`` adds up: every request is a hit, a single-flight join or an upstream
call, spent + saved equals the cost straight to vLLM, and paraphrases visibly hit the semantic
cache."""

from __future__ import annotations

import re
from typing import Any

from proxy.demo import run_demo, workload


def test_workload_has_paraphrases_and_bursts() -> None:
    batches = workload(300)
    kinds = [kind for b in batches for _, kind, _, _ in b]
    assert len(kinds) == 300
    assert 0.15 <= kinds.count("paraphrase") / 300 <= 0.35
    assert any(len(b) > 1 for b in batches)  # identical copies sent together


def test_demo_accounts_for_every_request(capsys: Any) -> None:
    assert run_demo(requests=150, concurrency=16) == 0
    out = capsys.readouterr().out
    assert "check: spent + saved = straight-to-vLLM cost: yes; hits + joined + upstream " \
           "calls = answered requests: yes" in out
    m = re.search(r"paraphrases served from the semantic cache: (\d+) of (\d+)", out)
    assert m is not None and int(m[2]) > 0 and int(m[1]) > 0
    for line in ("straight to vLLM, same tiers", "straight to vLLM, all on large",
                 "with edge-proxy (spent)", "per 1,000 req", "What the lines mean"):
        assert line in out
