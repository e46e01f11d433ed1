"""Error-budget evaluation of the pair verifier (issue 13): calibration, evaluation, replay.

Pair sets (``models/pair_data.py`` defines the splits; none of them is a training pair):

* ``qqp``: a balanced sample of QQP pairs (half duplicates) of the *calib* or *eval* components;
  store ``text_a``, query ``text_b``.
* ``banking77`` / ``clinc150`` / ``hwu64``, ``full`` cache (every train-part utterance) or
  ``sparse`` (10 per intent): each calibration (held-out 15 % of the train split) or evaluation
  (test / val) query against its ``SEARCH_K`` nearest cached utterances by the project
  embedder's cosine. A hit is right only when the intents match; clinc150's out-of-scope
  queries must miss.

A query is decided as ``SemanticCache.lookup`` decides it: its candidates in cosine order,
those under the similarity floor or rejected by the hand guards skipped, the first
``candidates`` of the rest (``semantic.verify_max_candidates``) scored, and the first whose
calibrated probability ``p = sigmoid(a * logit + b * cosine + c)`` reaches the cut of the error
budget served. The cut for each budget is chosen on the calibration sets only
(``models/train_pair_verifier.py calibrate``) and shipped in ``models/pair_verifier.json``.

Run::

    python benchmarks/eval_budget.py                    # all reports, eval split
    python benchmarks/eval_budget.py --quick            # smaller samples

Writes ``benchmarks/results/budget_eval.json`` and ``budget_eval.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "models"))

import pair_data as pdata  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SCORE_FLOOR = 0.55  # pairs below this cosine are never scored (a miss at any operating point)
BUDGETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
MIN_HITS = 30  # a calibration set with fewer hits at a cut does not decide that cut
SOURCES = ("qqp", *pdata.INTENT_SETS)


#: Candidates the index returns per lookup (SemanticCache.lookup's k).
SEARCH_K = 4
#: Candidates scored per lookup when the pair verifier's metadata does not say
#: (``semantic.verify_max_candidates``' default).
CANDIDATES = 1


@dataclass(slots=True)
class PairSet:
    """Up to SEARCH_K candidates per query, nearest first, with what is needed to decide and to
    judge a hit. 2-D arrays are (queries, candidates); a missing candidate has cosine -1."""

    name: str
    query: list[str]
    cand: list[list[str]]
    cos: np.ndarray
    correct: np.ndarray  # serving cand's answer to query is right
    oos: np.ndarray  # (queries,): query is out of scope
    guard_ok: np.ndarray
    logit: np.ndarray  # NaN where cos < SCORE_FLOOR (never scored)

    def subset(self, rows: np.ndarray) -> PairSet:
        return PairSet(
            self.name,
            [self.query[i] for i in rows],
            [self.cand[i] for i in rows],
            self.cos[rows],
            self.correct[rows],
            self.oos[rows],
            self.guard_ok[rows],
            self.logit[rows],
        )


@dataclass(slots=True)
class Served:
    """Per query: whether a candidate was served and whether serving it was right."""

    hit: np.ndarray
    right: np.ndarray


# --------------------------------------------------------------------------- embeddings


def embed(texts: Sequence[str], tag: str) -> np.ndarray:
    """Project embedder vectors (int8 ONNX), cached on disk by text hash."""
    h = hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:16]
    path = RESULTS / f"emb_pair_{tag}_{h}.npy"
    if path.exists():
        return np.load(path)
    import check_model

    t0 = time.perf_counter()
    vecs = check_model.embed_all(REPO / "models" / "minilm-l6-int8.onnx", list(texts), batch=32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    print(
        f"  embedded {len(texts)} texts ({tag}) in {time.perf_counter() - t0:.0f}s", file=sys.stderr
    )
    return vecs


def guard_ok(query: list[str], cand: list[list[str]]) -> np.ndarray:
    """The hand guards of proxy.semantic.verifier (numbers, negation, entities, order...), and
    the default ``semantic.bypass_patterns`` as ``SemanticCache.eligible`` applies them: a
    time-sensitive query skips the semantic layer (a miss) and a time-sensitive text is never
    in the index (its candidate is skipped, as a rejected one is)."""
    from proxy.config import SemanticConfig, time_sensitive
    from proxy.semantic.verifier import Verifier

    v = Verifier(guards=True)
    ts = time_sensitive(SemanticConfig())

    def eligible(text: str) -> bool:
        return ts is None or not ts.search(text)

    return np.array(
        [
            [bool(c) and eligible(q) and eligible(c) and v.verify(q, c, 1.0, 0.0).ok for c in cs]
            for q, cs in zip(query, cand, strict=True)
        ]
    )


def scorer() -> Any:
    from proxy.semantic.pairmodel import PairModel

    m = PairModel()
    m.load()
    return m


def logits_for(query: list[str], cand: list[list[str]], cos: np.ndarray, tag: str) -> np.ndarray:
    """Cross-encoder logits (batch 1, as at run time) for candidates with cos >= SCORE_FLOOR."""
    from proxy.semantic.pairmodel import PairModel

    meta = json.loads((REPO / "models" / "pair_verifier.json").read_text())
    todo = np.argwhere(cos >= SCORE_FLOOR)
    key = hashlib.sha1(
        (
            meta["sha256"]
            + "\x01"
            + "\x00".join(query[i] + "\x02" + cand[i][j] for i, j in todo)
        ).encode()
    ).hexdigest()[:16]
    path = RESULTS / f"logit_{tag}_{key}.npy"
    if path.exists():
        return np.load(path)
    m = PairModel()
    m.load()
    out = np.full(cos.shape, np.nan, np.float32)
    t0 = time.perf_counter()
    for i, j in todo:
        out[i, j] = m.logit(query[i], cand[i][j])
    print(f"  scored {len(todo)} pairs ({tag}) in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


# --------------------------------------------------------------------------- pair sets


def qqp_set(split: str, n: int, seed: int = 0, with_logits: bool = True) -> PairSet:
    """Balanced sample: n/2 duplicates and n/2 non-duplicates of one QQP split."""
    rows = pdata.load_qqp(split)
    rng = np.random.default_rng(seed)
    pos = [r for r in rows if r[2] == 1]
    neg = [r for r in rows if r[2] == 0]
    k = min(n // 2, len(pos), len(neg))
    pick = [pos[i] for i in rng.choice(len(pos), k, replace=False)]
    pick += [neg[i] for i in rng.choice(len(neg), k, replace=False)]
    a = embed([r[0] for r in pick], f"qqp-{split}-a")
    b = embed([r[1] for r in pick], f"qqp-{split}-b")
    cos = np.einsum("ij,ij->i", a, b)[:, None]
    query, cand = [r[1] for r in pick], [[r[0]] for r in pick]
    lg = logits_for(query, cand, cos, f"qqp-{split}") if with_logits else np.full(cos.shape, np.nan)
    return PairSet(
        f"qqp/{split}",
        query,
        cand,
        cos,
        np.array([[r[2] == 1] for r in pick]),
        np.zeros(len(pick), bool),
        guard_ok(query, cand),
        lg,
    )


def sparse_cache(u: pdata.Utterances, per_intent: int) -> pdata.Utterances:
    """First per_intent utterances of each intent in a hash order (deterministic)."""
    order = sorted(range(len(u.texts)), key=lambda i: hashlib.sha1(u.texts[i].encode()).digest())
    seen: dict[str, int] = {}
    keep = []
    for i in order:
        seen[u.labels[i]] = seen.get(u.labels[i], 0) + 1
        if seen[u.labels[i]] <= per_intent:
            keep.append(i)
    keep.sort()
    return pdata.Utterances(
        [u.texts[i] for i in keep], [u.labels[i] for i in keep], [u.oos[i] for i in keep]
    )


def intent_set(
    name: str, split: str, per_intent: int = 0, max_queries: int = 0, with_logits: bool = True
) -> PairSet:
    """Queries of ``split`` against the nearest entry of the train-part cache."""
    cache = pdata.load_intent(name, "train")
    if per_intent:
        cache = sparse_cache(cache, per_intent)
    q = pdata.load_intent(name, split)
    if max_queries and len(q.texts) > max_queries:
        idx = sorted(np.random.default_rng(0).choice(len(q.texts), max_queries, replace=False))
        q = pdata.Utterances(
            [q.texts[i] for i in idx], [q.labels[i] for i in idx], [q.oos[i] for i in idx]
        )
    cv = embed(cache.texts, f"{name}-cache{per_intent or ''}")
    qv = embed(q.texts, f"{name}-{split}")
    s = qv @ cv.T
    k = min(SEARCH_K, s.shape[1])
    nn = np.argpartition(-s, k - 1, axis=1)[:, :k]
    rows = np.arange(len(nn))[:, None]
    nn = nn[rows, np.argsort(-s[rows, nn], axis=1)]  # nearest first
    cos = s[rows, nn]
    cand = [[cache.texts[j] for j in r] for r in nn]
    correct = np.array(
        [
            [(not o) and ql == cache.labels[j] and not cache.oos[j] for j in r]
            for ql, r, o in zip(q.labels, nn, q.oos, strict=True)
        ]
    )
    mode = f"sparse{per_intent}" if per_intent else "full"
    tag = f"{name}-{split}-{mode}"
    lg = logits_for(q.texts, cand, cos, tag) if with_logits else np.full(cos.shape, np.nan)
    return PairSet(
        f"{name}/{split}/{mode}",
        q.texts,
        cand,
        cos,
        correct,
        np.array(q.oos),
        guard_ok(q.texts, cand),
        lg,
    )


def pair_sets(split: str, quick: bool = False, with_logits: bool = True) -> list[PairSet]:
    """QQP + the three intent sets with full and sparse caches."""
    n_qqp = 1000 if quick else 3000
    mq = 600 if quick else 0
    out = [qqp_set(split, n_qqp, with_logits=with_logits)]
    for name in pdata.INTENT_SETS:
        out.append(intent_set(name, split, 0, mq, with_logits))
        out.append(intent_set(name, split, 10, mq, with_logits))
    return out


# --------------------------------------------------------------------------- decisions


def fuse(ps: PairSet, fusion: dict[str, float]) -> np.ndarray:
    """Calibrated probability per candidate (0 where never scored)."""
    z = fusion["a"] * np.nan_to_num(ps.logit, nan=-50.0) + fusion["b"] * ps.cos + fusion["c"]
    p = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
    p = np.where(np.isnan(ps.logit), 0.0, p)
    # as PairModel.score: the same question spelled differently is 1.0 without the model
    from proxy.semantic.features import question_form

    qf = [question_form(q) for q in ps.query]
    same = np.array(
        [[bool(c) and f == question_form(c) for c in cs] for f, cs in zip(qf, ps.cand, strict=True)]
    )
    return np.where(same & (ps.cos >= SCORE_FLOOR), 1.0, p)


def scored(ps: PairSet, floor: float, guards: bool, candidates: int = CANDIDATES) -> np.ndarray:
    """The candidates a lookup scores: nearest first, those under the floor or rejected by the
    guards skipped, the first ``candidates`` of the rest."""
    ok = ps.cos >= floor
    if guards:
        ok &= ps.guard_ok
    return ok & (np.cumsum(ok, axis=1) <= candidates)


def hits(
    ps: PairSet,
    p: np.ndarray,
    cut: float,
    floor: float,
    guards: bool,
    candidates: int = CANDIDATES,
) -> Served:
    """Decide each query as SemanticCache.lookup does: the first scored candidate (``scored``)
    with ``p >= cut`` is served."""
    passed = scored(ps, floor, guards, candidates) & (p >= cut)
    hit = passed.any(axis=1)
    col = passed.argmax(axis=1)
    return Served(hit, hit & ps.correct[np.arange(len(col)), col])


def stats(ps: PairSet, s: Served) -> dict[str, float]:
    """precision, hit rate (hits / queries), recall (right hits / servable), OOS false hits."""
    nh = int(s.hit.sum())
    tp = int(s.right.sum())
    n_oos = int(ps.oos.sum())
    out = {
        "n": len(s.hit),
        "hits": nh,
        "precision": tp / nh if nh else 1.0,
        "error": 1 - tp / nh if nh else 0.0,
        "hit_rate": nh / len(s.hit),
        # right hits / queries that some cached entry could have answered
        "recall": tp / max(int(ps.correct.any(axis=1).sum()), 1),
    }
    if n_oos:
        out["oos_false_hit_rate"] = int((s.hit & ps.oos).sum()) / n_oos
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Weighted logistic regression with a bias (Newton steps); returns [coefs..., bias]."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    beta = np.zeros(xb.shape[1])
    for _ in range(50):
        z = xb @ beta
        p = 1 / (1 + np.exp(-np.clip(z, -50, 50)))
        g = xb.T @ (w * (p - y)) + l2 * np.r_[beta[:-1], 0]
        hess = (xb * (w * p * (1 - p))[:, None]).T @ xb + l2 * np.eye(len(beta))
        step = np.linalg.solve(hess, g)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta


def error_upper(k: int, n: int, z: float = 1.0) -> float:
    """Wilson upper bound of an error rate k/n (z=1: ~84 % one-sided)."""
    if n == 0:
        return 1.0
    ph = k / n
    d = 1 + z * z / n
    c = ph + z * z / (2 * n)
    r = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n))
    return (c + r) / d


def calibrate_cuts(
    sets: list[PairSet],
    probs: list[np.ndarray],
    floor: float,
    guards: bool,
    budgets: Sequence[float] = BUDGETS,
    rule: str = "max",
    candidates: int = CANDIDATES,
) -> list[dict[str, float]]:
    """Per budget: the lowest probability cut from which on (every higher cut too) the error
    among calibration hits is within the budget.

    rule "max": each calibration set's error (among at least MIN_HITS hits) must be within the
    budget (no data set pays for another's precision); "pooled": the mean of the sets' error
    rates (each set weighs the same; again only sets with at least MIN_HITS hits) must be."""
    grid = np.unique(
        np.concatenate(
            [np.quantile(p[p > 0], np.linspace(0, 1, 400)) for p in probs if (p > 0).any()]
        )
    )
    grid = np.unique(np.r_[grid, np.linspace(0.5, 0.9999, 200)])
    errs = np.zeros(len(grid))
    for gi, cut in enumerate(grid):
        per = []
        for ps, p in zip(sets, probs, strict=True):
            s = hits(ps, p, float(cut), floor, guards, candidates)
            n = int(s.hit.sum())
            k = n - int(s.right.sum())
            # point estimate where the set has enough hits to tell (>= MIN_HITS): near the top
            # of the grid a set's few hits are the p = 1 question forms, and one noisy label
            # among 3 would otherwise read as 33 % and push the cut to 1
            per.append(k / n if n >= MIN_HITS else 0.0)
        errs[gi] = max(per) if rule == "max" else float(np.mean(per))
    rows = []
    for e in budgets:
        bad = np.flatnonzero(errs > e)
        # the first grid cut above the last failing one: monotone-safe
        i = int(bad[-1]) + 1 if len(bad) else 0
        cut = float(grid[i]) if i < len(grid) else 1.0
        rows.append({"max_error_rate": e, "cut": cut})
    return rows


# --------------------------------------------------------------------------- reports


def static_best(ps: PairSet, max_error: float, guards: bool = True) -> dict[str, float] | None:
    """Best hit rate of a bare cosine threshold (+ guards) whose error <= max_error: the
    nearest candidate over the threshold (that the guards pass) is served."""
    best = None
    ones = np.ones(ps.cos.shape)
    for t in np.round(np.arange(0.60, 0.995, 0.005), 3):
        st = stats(ps, hits(ps, ones, 1.0, float(t), guards, SEARCH_K))
        if (
            st["hits"]
            and st["error"] <= max_error + 1e-12
            and (best is None or st["hit_rate"] > best["hit_rate"])
        ):
            best = {"threshold": float(t), **st}
    return best


def replay(
    ps: PairSet, meta: dict[str, Any], budget: float, audit_rate: float, seed: int = 0
) -> dict[str, Any]:
    """Online replay of one evaluation set through the error-budget controller.

    Queries arrive in a random order; each is decided with the namespace's current cut; 10 % of
    the hits are audited and the label gives the verdict (standing in for comparing the cached
    and the fresh answer). Reports hit rate and realised error per quarter of the stream.
    """
    from proxy.semantic.budget import BudgetController

    fusion = meta["fusion"]
    floor = meta["similarity_floor"]
    from proxy.semantic.pairmodel import PairModel

    ctl = BudgetController(
        [tuple(x) for x in meta["curve"]], base_cut=PairModel().cut, default_budget=budget
    )
    p = fuse(ps, fusion)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ps.query))
    hit = np.zeros(len(order), bool)
    right = np.zeros(len(order), bool)
    cuts = []
    guards = meta.get("guards", True)
    candidates = int(meta.get("candidates", 1))
    for t, i in enumerate(order):
        scored = 0
        for j in range(ps.cos.shape[1]):  # as SemanticCache.lookup
            if ps.cos[i, j] < floor or scored >= candidates:
                break
            if guards and not ps.guard_ok[i, j]:
                continue
            scored += 1
            if ctl.allow("ns", float(p[i, j]), None, budget):
                hit[t] = True
                right[t] = bool(ps.correct[i, j])
                if rng.random() < audit_rate:
                    ctl.observe("ns", float(p[i, j]), not ps.correct[i, j])
                break
        cuts.append(ctl.cut("ns", budget))
    q = len(order) // 4
    quarters = []
    for k in range(4):
        sl = slice(k * q, (k + 1) * q if k < 3 else len(order))
        nh = int(hit[sl].sum())
        quarters.append(
            {
                "hit_rate": nh / max(len(order[sl]), 1),
                "error": 1 - int(right[sl].sum()) / nh if nh else 0.0,
                "cut_end": cuts[sl][-1],
            }
        )
    half = slice(len(order) // 2, len(order))
    nh2 = int(hit[half].sum())
    err2 = 1 - int(right[half].sum()) / nh2 if nh2 else 0.0
    # best static cosine threshold (guards on) with the same realised error, same half
    sub = ps.subset(order[half])
    st = static_best(sub, err2)
    return {
        "budget": budget,
        "audit_rate": audit_rate,
        "second_half": {"hit_rate": nh2 / max(len(order) - len(order) // 2, 1), "error": err2},
        "within_budget": err2 <= budget,
        "static_same_error": st,
        "quarters": quarters,
        "audits": ctl.snapshot()["ns"]["audits"],
    }


def latency(n: int = 300) -> dict[str, Any]:
    """Per verified candidate: tokenize + int8 cross-encoder + head, one thread, real QQP pairs.

    Wall time on a shared machine includes waiting for a core; the thread's CPU time does not,
    so both are reported (the CPU time is what the verifier costs)."""
    m = scorer()
    rows = pdata.load_qqp("eval")[:n]
    for a, b, _ in rows[:20]:
        m.logit(b, a)
    wall, cpu, toks = [], [], []
    for a, b, _ in rows:
        t0, c0 = time.perf_counter(), time.thread_time()
        m.logit(b, a)
        cpu.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
        toks.append(len(m._tok.encode(b, a).ids))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import machine

    return {
        "p50_ms": float(np.percentile(wall, 50)),
        "p99_ms": float(np.percentile(wall, 99)),
        "cpu_p50_ms": float(np.percentile(cpu, 50)),
        "cpu_p99_ms": float(np.percentile(cpu, 99)),
        "tokens_p50": float(np.median(toks)),
        "threads": 1,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--audit-rate", type=float, default=0.10)
    ap.add_argument("--out", default=str(RESULTS / "budget_eval"))
    args = ap.parse_args(argv)
    meta = json.loads((REPO / "models" / "pair_verifier.json").read_text())
    from proxy.semantic.pairmodel import PairModel

    pm = PairModel()
    floor, guards, fusion = meta["similarity_floor"], meta.get("guards", True), meta["fusion"]
    # candidates scored per lookup: as calibrated (an older calibration scored the nearest only)
    ncand = int(meta.get("candidates", 1))
    sets = pair_sets("eval", quick=args.quick)
    report: dict[str, Any] = {
        "budget": args.budget,
        "split": "eval",
        "meta": {k: meta.get(k) for k in
                 ("sha256", "fusion", "similarity_floor", "guards", "cuts", "candidates")},
    }
    # 1. default budget, per set; calibration curve (budget -> realised error)
    per_set: dict[str, Any] = {}
    curve: dict[str, list[dict[str, float]]] = {}
    print(f"\nbudget {args.budget}: eval split (never trained or calibrated on)")
    print(f"{'set':28s} {'prec':>6s} {'hit':>6s} {'recall':>6s} {'oos':>6s} | static same err")
    for ps in sets:
        p = fuse(ps, fusion)
        st = stats(ps, hits(ps, p, pm.cut(args.budget), floor, guards, ncand))
        sb = static_best(ps, st["error"])
        per_set[ps.name] = {
            "verifier": st,
            "static_same_error": sb,
            "cosine_only_nohit_guard": static_best(ps, st["error"], False),
        }
        curve[ps.name] = [
            {"budget": b, **stats(ps, hits(ps, p, pm.cut(b), floor, guards, ncand))}
            for b in BUDGETS
        ]
        oos = f"{st['oos_false_hit_rate']:.4f}" if "oos_false_hit_rate" in st else "  -   "
        sbs = f"thr {sb['threshold']:.3f} hit {sb['hit_rate']:.3f}" if sb else "none"
        print(
            f"{ps.name:28s} {st['precision']:.4f} {st['hit_rate']:.4f} {st['recall']:.4f} "
            f"{oos} | {sbs}"
        )
    report["default_budget"] = per_set
    report["calibration_curve"] = curve
    print("\ncalibration curve (budget -> realised error on eval):")
    for name, rows in curve.items():
        print(f"  {name:28s} " + " ".join(f"{r['budget']}:{r['error']:.3f}" for r in rows))
    # 2. leave one data set out of the calibration (the cut is set without that set)
    calib = [s for s in pair_sets("calib", quick=args.quick) if not s.name.startswith("qqp")]
    lodo: dict[str, Any] = {}
    for name in pdata.INTENT_SETS:
        rest = [s for s in calib if not s.name.startswith(name)]
        cuts = calibrate_cuts(
            rest, [fuse(s, fusion) for s in rest], floor, guards, (args.budget,),
            meta.get("rule", "max"), ncand,
        )
        for ps in sets:
            if ps.name.startswith(name):
                p = fuse(ps, fusion)
                st = stats(ps, hits(ps, p, cuts[0]["cut"], floor, guards, ncand))
                lodo[ps.name] = {"cut": cuts[0]["cut"], **st}
    report["leave_one_out_of_calibration"] = lodo
    print("\nleft out of calibration:")
    for name, st in lodo.items():
        print(f"  {name:28s} cut {st['cut']:.4f} error {st['error']:.4f} hit {st['hit_rate']:.4f}")
    # 3. online replay with 10 % audits
    rep = {ps.name: replay(ps, meta, args.budget, args.audit_rate) for ps in sets}
    report["replay"] = rep
    print(f"\nonline replay, audit {args.audit_rate:.0%}, second half of the stream:")
    for name, r in rep.items():
        sb = r["static_same_error"]
        sbs = f"static hit {sb['hit_rate']:.3f}" if sb else "static: none at that error"
        print(
            f"  {name:28s} error {r['second_half']['error']:.4f} hit "
            f"{r['second_half']['hit_rate']:.4f} within={r['within_budget']} | {sbs}"
        )
    # 4. latency per verified candidate
    report["latency"] = latency(100 if args.quick else 300)
    lat = report["latency"]
    print(
        f"\nlatency per verified candidate: wall p50 {lat['p50_ms']:.2f} ms p99 "
        f"{lat['p99_ms']:.2f} ms, thread CPU p50 {lat['cpu_p50_ms']:.2f} ms p99 "
        f"{lat['cpu_p99_ms']:.2f} ms ({lat['tokens_p50']:.0f} tokens, 1 thread)"
    )
    from machine import describe

    print(describe(lat["machine"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    try:
        plot(report, out.with_suffix(".png"))
    except ImportError:  # matplotlib is optional (not a project dependency)
        print("matplotlib not installed: no plot", file=sys.stderr)
    print(f"wrote {out.with_suffix('.json')}")
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    """Calibration curve (budget vs realised error) and replay error/hit rate per quarter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, rows in report["calibration_curve"].items():
        b = [r["budget"] for r in rows]
        ax[0].plot(b, [r["error"] for r in rows], marker="o", label=name)
        ax[1].plot(b, [r["hit_rate"] for r in rows], marker="o", label=name)
    ax[0].plot([0, 0.1], [0, 0.1], "k--", lw=0.8)
    ax[0].set_xlabel("max_error_rate (budget)")
    ax[0].set_ylabel("realised error among hits (eval)")
    ax[1].set_xlabel("max_error_rate (budget)")
    ax[1].set_ylabel("hit rate (eval)")
    for name, r in report["replay"].items():
        ax[2].plot(range(1, 5), [q["error"] for q in r["quarters"]], marker="o", label=name)
    ax[2].axhline(report["budget"], color="k", ls="--", lw=0.8)
    ax[2].set_xlabel("stream quarter (replay, 10 % audit)")
    ax[2].set_ylabel("realised error")
    for a in ax:
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
