"""Splits and pair sets for the pair verifier (issue 13): train / calibration / evaluation.

Every split is a pure function of the row (a hash), so training, calibration and evaluation agree
without a file of indices:

* QQP (``qqp_dev.csv.gz``), by connected question group (``component``), so no question group
  crosses splits: ``h = int(component[:8], 16)``; ``h % 2 == 0`` -> train (the same half the older
  ``models/train_verifier.py`` trained on), else ``(h >> 1) % 2 == 0`` -> calib, else eval.
* banking77 / clinc150 / hwu64: the *train* split's utterances are divided by a hash of the text
  into ``train`` (85 %, the verifier trains on pairs among them) and ``calib`` (15 %: calibration
  queries, asked against the cache of the train part). Evaluation queries are banking77 test,
  clinc150 val (with its 100 out-of-scope queries) and hwu64 test: the verifier never saw them.
  The cache of the evaluation holds train-split texts (the verifier has seen those texts, paired
  with other train texts, never with an evaluation query).

Training pairs (``training_pairs``): QQP train pairs; per intent set, each train utterance with a
same-intent one (positive) and with its nearest other-intent one by the embedder cosine (hard
negative); clinc150's train out-of-scope utterances against their nearest in-scope one; and
synthetic pairs from ``models/synth_pairs.py`` (swapped roles, negation, numbers, units, entities,
antonyms as negatives; surface rewrites as positives).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

REPO: Final = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    """``../shared/data`` of the checkout (or of a worktree's parent), or $EDGE_PROXY_DATA."""
    env = os.environ.get("EDGE_PROXY_DATA")
    if env:
        return Path(env)
    for up in (REPO.parent, REPO.parent.parent):
        if (up / "shared" / "data").is_dir():
            return up / "shared" / "data"
    return REPO.parent / "shared" / "data"


DATA: Final = _data_dir()
INTENT_SETS: Final = ("banking77", "clinc150", "hwu64")
CALIB_SHARE: Final = 0.15


def qqp_split(component: str) -> str:
    """'train', 'calib' or 'eval' for a QQP connected component id."""
    h = int(component[:8], 16)
    if h % 2 == 0:
        return "train"
    return "calib" if (h >> 1) % 2 == 0 else "eval"


def text_split(text: str) -> str:
    """'train' or 'calib' for an intent-set train-split utterance (hash of its text)."""
    h = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)
    return "calib" if h % 1000 < CALIB_SHARE * 1000 else "train"


def load_qqp(split: str) -> list[tuple[str, str, int]]:
    """(text_a, text_b, label) rows of one QQP split."""
    with gzip.open(DATA / "qqp" / "qqp_dev.csv.gz", "rt", newline="", encoding="utf-8") as f:
        return [
            (r["text_a"], r["text_b"], int(r["label"]))
            for r in csv.DictReader(f)
            if qqp_split(r["component"]) == split
        ]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@dataclass(slots=True)
class Utterances:
    """One data set's utterances of one split: text, intent label, out-of-scope flag."""

    texts: list[str]
    labels: list[str]
    oos: list[bool]


def load_intent(name: str, split: str) -> Utterances:
    """split: 'train' / 'calib' (parts of the data set's train split) or 'eval' (its test/val)."""
    if name == "banking77":
        src = "train.csv" if split != "eval" else "test.csv"
        rows = [(r["text"], r["category"], False) for r in _read_csv(DATA / "banking77" / src)]
    elif name == "clinc150":
        want = "val" if split == "eval" else "train"
        rows = [
            (r["text"], r["intent"], r["is_oos"] == "1")
            for r in _read_csv(DATA / "clinc150" / "clinc150_train_val.csv")
            if r["split"] == want
        ]
    elif name == "hwu64":
        want = "test" if split == "eval" else "train"
        rows = [
            (r["text_raw"], r["intent"], False)
            for r in _read_csv(DATA / "hwu64" / "hwu64_kfold1.csv")
            if r["split"] == want
        ]
    else:
        raise ValueError(name)
    if split in ("train", "calib"):
        rows = [r for r in rows if text_split(r[0]) == split]
    return Utterances([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def cache_of(name: str) -> Utterances:
    """The cache side of an intent set for calibration and evaluation: the train part only for
    calibration queries would leak nothing either way; we use the whole train split minus the
    calibration utterances so a calibration query never finds itself."""
    return load_intent(name, "train")


def sparse_cache_mask(labels: np.ndarray, oos: np.ndarray, per_intent: int,
                      rng: np.random.Generator) -> np.ndarray:
    """A random cache of ``per_intent`` utterances per in-scope intent, as a boolean mask (the
    evaluation's sparse cache, drawn from the training utterances)."""
    keep = np.zeros(len(labels), bool)
    for lab in np.unique(labels[~oos]):
        members = np.flatnonzero((labels == lab) & ~oos)
        keep[rng.choice(members, min(per_intent, len(members)), replace=False)] = True
    return keep


def mine_intent_pairs(
    u: Utterances,
    vecs: np.ndarray,
    rng: np.random.Generator,
    max_queries: int,
    sparse_per_intent: int = 0,
    sparse_draws: int = 1,
) -> list[tuple[str, str, int, str]]:
    """Per utterance: a same-intent positive (its nearest or a random one) and the nearest
    utterance of another intent (hard negative). Out-of-scope utterances get negatives only.

    With ``sparse_per_intent``, also the pair a lookup meets in a sparse cache: the utterance
    and its nearest entry in a random cache of that many utterances per intent (drawn anew for
    every block of 512 queries), labelled by whether the intents match. That is the candidate
    the evaluation's sparse cache hands the verifier, where the nearest is often another
    intent's or a same-intent utterance worded quite differently. ``sparse_draws`` caches are
    drawn per block (a pair met twice is kept once), so each utterance meets up to that many
    different nearest entries."""
    n = len(u.texts)
    labels = np.array(u.labels)
    oos = np.array(u.oos)
    order = rng.permutation(n)[:max_queries]
    out: list[tuple[str, str, int, str]] = []
    for start in range(0, len(order), 512):
        idx = order[start : start + 512]
        sims = vecs[idx] @ vecs.T
        sims[np.arange(len(idx)), idx] = -2.0
        seen: set[tuple[int, int]] = set()
        for _ in range(sparse_draws if sparse_per_intent else 0):
            cached = sparse_cache_mask(labels, oos, sparse_per_intent, rng)
            for row, i in zip(np.where(cached, sims, -2.0), idx, strict=True):
                j = int(np.argmax(row))
                if (int(i), j) in seen:
                    continue
                seen.add((int(i), j))
                y = int(labels[j] == labels[i] and not oos[i])
                out.append((u.texts[i], u.texts[j], y, "intent-sparse"))
        for row, i in zip(sims, idx, strict=True):
            other = (labels != labels[i]) | oos
            if oos[i]:
                other = ~oos
            j = int(np.argmax(np.where(other, row, -2.0)))
            out.append((u.texts[i], u.texts[j], 0, "intent-neg"))
            if oos[i]:
                continue
            same = np.flatnonzero((labels == labels[i]) & ~oos)
            same = same[same != i]
            if not len(same):
                continue
            k = int(same[np.argmax(row[same])]) if rng.random() < 0.5 else int(rng.choice(same))
            out.append((u.texts[i], u.texts[k], 1, "intent-pos"))
    return out
