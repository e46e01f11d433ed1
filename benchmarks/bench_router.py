"""Decision time of the router, given the embedding (budget: 0.1 ms per decision).

    pytest benchmarks/bench_router.py --benchmark-only --benchmark-columns=min,median,mean,ops

Prompts: a short chat turn, a typical MMLU question (~300 characters) and a long prompt (~5,000
characters, past the feature scan cap). The embedding is a fixed unit vector: computing it is the
embedder's cost, not the router's.
"""

from __future__ import annotations

import numpy as np
import pytest

from proxy.router import EMBEDDING_DIM, Router

BUDGET_S = 100e-6

SHORT = "hi, how are you?"
MMLU = (
    "As a general principle what is the best approach to the use of analgesic drugs following "
    "surgery?\nA. Give drugs only 'as required'.\nB. Give drugs regularly with provision for "
    "additional 'as required' doses.\nC. Give drugs regularly.\nD. Give drugs on patient request."
    "\nAnswer:"
)
LONG = (
    "This question refers to the following information.\n"
    + "The treaty of 1648 ended thirty years of war; each of the 300 states kept its own ruler, "
    "then signed articles on trade, religion and the 12 free cities. "
    * 35
    + "\nWhich of the following best explains the outcome?\nA. one\nB. two\nC. three\nD. four"
)


@pytest.fixture(scope="module")
def router() -> Router:
    return Router()


@pytest.fixture(scope="module")
def embedding() -> np.ndarray:
    v = np.random.default_rng(0).standard_normal(EMBEDDING_DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("text", [SHORT, MMLU, LONG], ids=["short", "mmlu", "long"])
def test_route_with_embedding(benchmark, router: Router, embedding: np.ndarray, text: str) -> None:
    decision = benchmark(router.route, text, embedding)
    assert decision.tier in router.tiers
    # min, not mean: the box is shared with other CPU jobs; min is the cost without interference.
    assert benchmark.stats.stats.min < BUDGET_S


def test_route_without_embedding(benchmark, router: Router) -> None:
    decision = benchmark(router.route, MMLU, None)
    assert decision.tier in router.tiers
    assert benchmark.stats.stats.min < BUDGET_S


def test_features_only(benchmark, router: Router) -> None:
    benchmark(router.features, MMLU)
