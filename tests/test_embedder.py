"""proxy.semantic.embedder with the real int8 model and tokenizer (models/build_model.py)."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from proxy.semantic.embedder import (
    DEFAULT_MODEL_PATH,
    MODEL_SHA256,
    Embedder,
    ModelChecksumError,
    text_key,
)

pytestmark = pytest.mark.skipif(
    not DEFAULT_MODEL_PATH.exists(), reason="run `python models/build_model.py` first"
)

PARAPHRASES = [
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("My card has not arrived yet", "I am still waiting for my card to be delivered"),
    ("How do I cook rice?", "What is the best way to make rice?"),
]


@pytest.fixture(scope="module")
def sync_embedder() -> Embedder:
    e = Embedder()
    e.load()
    return e


def test_pin_matches_build_script() -> None:
    pin = (DEFAULT_MODEL_PATH.parent / "MODEL.sha256").read_text().split()[0]
    assert pin == MODEL_SHA256


def test_normalised_and_shape(sync_embedder: Embedder) -> None:
    v = sync_embedder.embed_batch(["hello world", "a" * 2000, ""])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert sync_embedder.embed_batch([]).shape == (0, 384)


def test_paraphrases_beat_unrelated(sync_embedder: Embedder) -> None:
    a = sync_embedder.embed_batch([p[0] for p in PARAPHRASES])
    b = sync_embedder.embed_batch([p[1] for p in PARAPHRASES])
    sims = a @ b.T
    for i in range(len(PARAPHRASES)):
        others = np.delete(sims[i], i)
        assert sims[i, i] > 0.6
        assert sims[i, i] > others.max() + 0.2, (i, sims[i])


def test_batch_equals_single(sync_embedder: Embedder) -> None:
    texts = [p for pair in PARAPHRASES for p in pair] + ["short", "a much longer text " * 20]
    batch = sync_embedder.embed_batch(texts)
    single = np.vstack([sync_embedder.embed_batch([t]) for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_padded_batches_close_to_single() -> None:
    # Documented trade-off: one padded run shares the int8 activation scale across texts.
    e = Embedder(padded_batches=True)
    e.load()
    texts = [p for pair in PARAPHRASES for p in pair]
    batch = e.embed_batch(texts)
    single = np.vstack([e.embed_batch([t]) for t in texts])
    assert (batch * single).sum(1).min() > 0.95


def test_sha256_mismatch(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    shutil.copyfile(DEFAULT_MODEL_PATH, bad)
    with bad.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    e = Embedder(bad)  # the tokenizer: the package's
    with pytest.raises(ModelChecksumError, match=re.escape(str(bad))):
        e.load()
    assert not e.ready


def test_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_PROXY_MODEL", str(tmp_path / "m.onnx"))
    e = Embedder()
    assert e.model_path == tmp_path / "m.onnx"
    assert e.tokenizer_path.name == "tokenizer.json"  # the package's: none beside the model
    (tmp_path / "tokenizer.json").write_text("{}")
    assert Embedder().tokenizer_path == tmp_path / "tokenizer.json"


async def test_concurrent_embeds_get_their_own_vectors(sync_embedder: Embedder) -> None:
    texts = [f"question number {i} about topic {i * 7 % 13}" for i in range(60)]
    want = sync_embedder.embed_batch(texts)
    e = Embedder(max_batch=16, workers=1)
    await e.start()
    try:
        got = await asyncio.gather(*(e.embed(t) for t in texts))
    finally:
        await e.close()
    np.testing.assert_allclose(np.vstack(got), want, atol=1e-5)
    assert e.stats.texts == 60
    assert e.stats.batches < 60  # the worker drained several queued requests per wake-up
    assert max(e.stats.batch_sizes) <= 16


def test_equal_length_batch_is_not_single(sync_embedder: Embedder) -> None:
    # Why the embedder never batches texts by default, not even equal token lengths (no
    # padding): dynamic int8 quantization takes one activation scale per tensor, so a text's
    # vector would depend on its batch neighbours.
    texts = ["How do I learn Python fast?", "What is the capital of France?",
             "How can I lose weight quickly?", "Why is the sky blue today?"]
    encs = sync_embedder._tokenizer.encode_batch(texts)
    assert len({len(x.ids) for x in encs}) == 1  # one length: no padding involved
    ids = np.asarray([x.ids for x in encs], np.int64)
    together = sync_embedder._run(ids, np.ones_like(ids))
    single = sync_embedder.embed_batch(texts)
    assert np.abs(together - single).max() > 1e-3


async def test_workers_give_the_vectors_of_single_runs(sync_embedder: Embedder) -> None:
    # Several worker threads share one session: a text's vector must be bit for bit the one a
    # lone run gives, whatever ran beside it.
    texts = [f"question {i}: how do I {['cook', 'fix', 'learn'][i % 3]} {i * 7 % 13} things?"
             for i in range(40)]
    want = np.vstack([sync_embedder.embed_batch([t]) for t in texts])
    e = Embedder(workers=3)
    await e.start()
    try:
        assert len(e._threads) == 3
        got = await asyncio.gather(*(e.embed(t) for t in texts))
    finally:
        await e.close()
    assert np.array_equal(np.vstack(got), want)


async def test_estimate_follows_the_queue() -> None:
    e = Embedder(workers=1)
    await e.start()
    try:
        assert e.estimate_s("anything") == 0.0  # nothing measured, nothing queued
        await e.embed("a first text to measure the time per embedding")
        one = e.service_s
        assert one > 0
        assert e.estimate_s("new text") == 0.0  # the worker is free: no wait
        long = [f"backlog {i} " + "lorem ipsum dolor sit amet " * 20 for i in range(16)]
        tasks = [asyncio.ensure_future(e.embed(t)) for t in long]
        await asyncio.sleep(0)
        # 15 ahead of a new text beyond the one the worker takes
        assert e.estimate_s("new text") >= 15 * min(one, e.service_s)
        assert e.estimate_s(long[3]) == 0.0  # in flight already: it waits for nobody new
        await asyncio.gather(*tasks)
        assert e.estimate_s("new text") == 0.0
        assert e.estimate_s("a first text to measure the time per embedding") == 0.0  # LRU
    finally:
        await e.close()


async def test_timed_out_texts_leave_the_queue() -> None:
    # A text whose waiters all timed out is not embedded: under overload the worker spends the
    # CPU on texts still awaited (the running one completes).
    e = Embedder(workers=1)
    await e.start()
    try:
        long = [f"backlog {i} " + "lorem ipsum dolor sit amet " * 20 for i in range(12)]
        keep = [asyncio.ensure_future(e.embed(t)) for t in long]
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            await e.embed("given up on", timeout=0.0001)
        await asyncio.sleep(0)
        assert e.stats.dropped == 1 and text_key("given up on") not in e._pending
        await asyncio.gather(*keep)
        assert e.stats.texts == 12 and not e.has("given up on")  # never embedded
        assert np.array_equal(await e.embed("given up on"), e.embed_batch(["given up on"])[0])
    finally:
        await e.close()


async def test_cache_hit_and_coalescing() -> None:
    e = Embedder(cache_size=2)
    await e.start()
    try:
        a1, _a2 = await asyncio.gather(e.embed("same text"), e.embed("same text"))
        assert e.stats.coalesced == 1 and e.stats.texts == 1
        a3 = await e.embed("same text")
        assert e.stats.cache_hits == 1 and e.stats.texts == 1
        assert a3 is a1 and not a3.flags.writeable
        await e.embed("b")
        await e.embed("c")  # evicts "same text" (LRU of 2)
        await e.embed("same text")
        assert e.stats.texts == 4
    finally:
        await e.close()


async def test_cache_and_coalescing_are_per_tenant() -> None:
    """A tenant never gets another tenant's vector from the LRU, nor joins its text in flight:
    either would answer faster and so tell it that someone else asked that text."""
    e = Embedder(cache_size=8)
    await e.start()
    try:
        a, b = await asyncio.gather(e.embed("same text", scope="key:a"),
                                    e.embed("same text", scope="key:b"))
        assert e.stats.coalesced == 0 and e.stats.texts == 2  # two runs, none joined
        assert np.array_equal(a, b)  # the same text still has the same vector
        assert e.has("same text", "key:a") and not e.has("same text", "key:c")
        assert e.cached("same text", "key:c") is None and e.stats.cache_hits == 0
        assert e.cached("same text", "key:b") is b and e.stats.cache_hits == 1
        # the scope cannot be forged by moving bytes between scope and text
        assert text_key("b:x", "key:a") != text_key("x", "key:a:b")
        assert text_key("x", "") == text_key("x")  # unscoped keys as before
    finally:
        await e.close()


async def test_loop_stays_responsive() -> None:
    e = Embedder(max_batch=64)
    await e.start()
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.002)

    task = asyncio.create_task(ticker())
    try:
        t0 = time.perf_counter()
        texts = [f"a long sentence to embed, number {i}, " * 12 for i in range(64)]
        await asyncio.gather(*(e.embed(t) for t in texts))
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        await task
        await e.close()
    gaps = np.diff(ticks)
    assert elapsed > 0.05, "batch too small to test anything"
    # The loop kept ticking while the worker ran; a blocked loop would show one gap ~ elapsed.
    assert len(ticks) > 5
    assert gaps.max() < max(0.05, elapsed / 3), (gaps.max(), elapsed)


async def test_embed_before_start_fails() -> None:
    with pytest.raises(RuntimeError, match="start"):
        await Embedder().embed("x")


def test_session_keeps_layernorm_unfused(tmp_path: Path) -> None:
    # The shipped graph has Add + LayerNormalization instead of SkipLayerNormalization (faster
    # here); the session must not fuse them back (proxy.semantic.embedder.DISABLED_OPTIMIZERS).
    import onnx
    import onnxruntime as ort

    from proxy.semantic.embedder import DISABLED_OPTIMIZERS

    shipped = {n.op_type for n in onnx.load(str(DEFAULT_MODEL_PATH)).graph.node}
    assert "SkipLayerNormalization" not in shipped and "LayerNormalization" in shipped
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(DEFAULT_MODEL_PATH), so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(DISABLED_OPTIMIZERS))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "SkipLayerNormalization" not in ops
    assert {"DynamicQuantizeMatMul", "QAttention"} <= ops  # the int8 kernels are in use
