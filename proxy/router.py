"""Tier choice: score a prompt's difficulty from text features and its embedding, cut into tiers.

The model is a linear estimate of the large tier's gain on the prompt (strong model correct minus
weak model correct; ridge regression by models/train_router.py on the RouteLLM MMLU + GSM8K dev
sets) over

* a handful of regex text features (token count, code, math, multi-step markers, question type),
* the 384-d L2-normalised MiniLM embedding the semantic cache has already computed.

Both the full and the text-only (no embedding) model carry an extra weight on the token count
(``len_weight_*`` in train_router.HYPER): fitted on exam questions alone they ignore the length,
and off-domain a greeting then scored like a hard question while the fallback ranked below the
plain length rule. The output is mapped through the empirical CDF of *reference traffic* (half
MMLU/GSM8K dev rows, half chat-style prompts: MT-Bench, Vicuna, Arena-Hard, MATH), so the score
is a difficulty percentile in 0..1 shared by the full and text-only models: with cut points
``(0.5,)`` about half of such traffic goes to the large tier. Production cut points are still
best re-derived from logged scores. Run time needs numpy only; a decision costs 20-80 us,
mostly the text features (the two dot products take ~2 us).
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_right
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Final

import numpy as np

from proxy import data_path

DEFAULT_WEIGHTS: Final = data_path("router.json")  # package data (models/train_router.py)
EMBEDDING_DIM: Final = 384

# Features are read from a lower-cased prefix of the prompt so a pasted document costs at most
# _SCAN_CHARS of scanning (decision budget: 0.1 ms); the word count is extrapolated past it.
# One regex pass finds the words; keyword families are set intersections and literal markers are
# str.count calls, both C loops: a regex alternation of keywords costs ~10x more per prompt.
_SCAN_CHARS: Final = 700
_WORD_RE: Final = re.compile(r"[a-z]+")
_NUMBER_RE: Final = re.compile(r"\d+")


def _words(spaced: str) -> frozenset[str]:
    return frozenset(spaced.split())


_MATH_CHARS: Final = (*"=+*/^<>$\\√∑∫π≤≥≠±÷", "\u00d7")  # u00d7: the multiplication sign
_MATH_WORDS: Final = _words(
    "solve equation equations integral derivative probability prove polynomial matrix theorem "
    "function sqrt log sum product ratio percent percentage average mean calculate compute "
    "evaluate remainder divisible prime value interest rate area volume speed"
)
_CODE_MARKERS: Final = ("```", "def ", "#include", "=>", "::", "();", "{\n", "}\n", "print(")
_CODE_WORDS: Final = _words(
    "return import class const void python javascript java sql code function program "
    "algorithm compile array string int bool null self"
)
_STEP_WORDS: Final = _words(
    "then after before each every total remaining left twice half times per first second third "
    "finally next step steps later fewer altogether respectively rest"
)
_EXPLAIN_WORDS: Final = _words("why explain describe discuss compare analyze analyse justify argue")
_CALC_WORDS: Final = _words("calculate compute find solve determine estimate")
_CALC_PHRASES: Final = ("how many", "how much", "how long", "how far", "how old")
_WRITE_WORDS: Final = _words(
    "write implement create generate compose draft design build refactor translate"
)
_FACT_WORDS: Final = _words("what who when where which define")
_UNIT_WORDS: Final = _words(
    "dollar dollars cent cents hour hours minute minutes day days week weeks km kg mile miles "
    "meter meters pound pounds feet inches liter liters gallon gallons"
)
_PASSAGE_PHRASES: Final = ("the following", "passage", "this question refers", "excerpt")
_CHOICE_MARKERS: Final = ("\na. ", "\nb. ", "\nc. ", "\nd. ", "\na) ", "\nb) ", "\nc) ", "\nd) ")
_NEGATIONS: Final = ("NOT ", "EXCEPT", "LEAST", "FALSE", "INCORRECT")
_SENTENCE_ENDS: Final = (". ", "? ", "! ", ".\n", "?\n", "!\n")

#: Names of the values :func:`text_features` returns, in order (the weights file repeats them).
FEATURE_NAMES: Final = (
    "log_tokens",
    "log_lines",
    "log_sentences",
    "chars_per_word",
    "digit_frac",
    "log_numbers",
    "log_math_sym",
    "math_words",
    "log_code",
    "step_words",
    "q_explain",
    "q_calc",
    "q_write",
    "q_fact",
    "log_qmarks",
    "choices",
    "log_negation",
    "log_statements",
    "passage",
    "units",
)


def text_features(text: str) -> np.ndarray:
    """Text features of a prompt, float64 of len(FEATURE_NAMES); see FEATURE_NAMES.

    Counts are log1p-compressed or count distinct keywords: the model cares about "none / a few /
    many", and raw counts of a pasted document would dominate a linear model.
    """
    n_chars = len(text)
    head = text[:_SCAN_CHARS]
    low = head.lower()
    words = _WORD_RE.findall(low)
    wset = set(words)
    nums = _NUMBER_RE.findall(head)
    n_tok = len(words) + len(nums)
    if n_chars > _SCAN_CHARS:
        n_tok = n_tok * n_chars // _SCAN_CHARS
    log1p = math.log1p
    return np.array(
        (
            log1p(n_tok),
            log1p(head.count("\n")),
            log1p(sum(map(head.count, _SENTENCE_ENDS))),
            len(head) / max(len(words), 1),
            sum(map(len, nums)) / max(len(head), 1),
            log1p(len(nums)),
            log1p(sum(map(head.count, _MATH_CHARS))),
            min(len(wset & _MATH_WORDS), 4),
            log1p(sum(map(low.count, _CODE_MARKERS)) + len(wset & _CODE_WORDS)),
            min(len(wset & _STEP_WORDS), 6),
            min(len(wset & _EXPLAIN_WORDS), 3),
            min(len(wset & _CALC_WORDS) + sum(map(low.count, _CALC_PHRASES)), 3),
            min(len(wset & _WRITE_WORDS), 3),
            min(len(wset & _FACT_WORDS), 3),
            log1p(head.count("?")),
            1.0 if sum(map(low.count, _CHOICE_MARKERS)) >= 2 else 0.0,
            log1p(sum(map(head.count, _NEGATIONS))),
            log1p(low.count("statement ")),
            1.0 if any(map(low.__contains__, _PASSAGE_PHRASES)) else 0.0,
            min(len(wset & _UNIT_WORDS) + head.count("%"), 4),
        ),
        dtype=np.float64,
    )


@dataclass(slots=True, frozen=True)
class RouteDecision:
    """The router's answer for one prompt."""

    tier: str  # one of the configured tier names
    score: float  # 0..1, higher = harder / needs a larger model
    reason: str  # short explanation, e.g. "score 0.71 >= 0.66 -> large (math, long)"


class Router:
    """Score prompts and map the score to a tier by cut points.

    ``tiers`` are ordered smallest -> largest; ``cuts`` (len(tiers) - 1 increasing values in
    [0, 1]) split the score range: score < cuts[0] -> tiers[0], cuts[i-1] <= score < cuts[i] ->
    tiers[i], score >= cuts[-1] -> tiers[-1]. Without ``cuts`` the weights file's defaults for that
    number of tiers are used (equal shares if it has none).
    """

    __slots__ = (
        "_bias_full",
        "_bias_text",
        "_q_full",
        "_q_text",
        "_w_emb",
        "_w_text_full",
        "_w_text_only",
        "cuts",
        "tiers",
        "weights_path",
    )

    def __init__(
        self,
        tiers: Sequence[str] = ("small", "medium", "large"),
        *,
        cuts: Sequence[float] | None = None,
        weights_path: str | Path | None = None,
    ) -> None:
        tiers = tuple(tiers)
        if not tiers:
            raise ValueError("Router needs at least one tier")
        if len(set(tiers)) != len(tiers):
            raise ValueError(f"duplicate tier names in {tiers!r}")
        self.tiers: tuple[str, ...] = tiers
        self.weights_path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
        spec = json.loads(self.weights_path.read_text(encoding="utf-8"))
        self._load_model(spec)
        if cuts is None:
            defaults = spec.get("default_cuts", {}).get(str(len(tiers)))
            n = len(tiers)
            cuts = defaults if defaults is not None else [i / n for i in range(1, n)]
        self.cuts: tuple[float, ...] = _check_cuts(cuts, len(tiers))

    def _load_model(self, spec: dict) -> None:
        names = tuple(spec["feature_names"])
        if names != FEATURE_NAMES:
            raise ValueError(
                f"{self.weights_path}: feature names differ from this code's FEATURE_NAMES "
                "(retrain with models/train_router.py)"
            )
        mean = np.asarray(spec["feature_mean"], np.float64)
        std = np.asarray(spec["feature_std"], np.float64)
        full, text = spec["full"], spec["text_only"]
        # Fold the standardisation into the weights so scoring is one dot per part.
        w_full = np.asarray(full["w_text"], np.float64) / std
        w_text = np.asarray(text["w_text"], np.float64) / std
        self._w_text_full = w_full
        self._w_text_only = w_text
        self._bias_full = float(full["bias"]) - float(w_full @ mean)
        self._bias_text = float(text["bias"]) - float(w_text @ mean)
        self._w_emb = np.asarray(full["w_emb"], np.float32)
        if self._w_emb.shape != (EMBEDDING_DIM,):
            raise ValueError(f"{self.weights_path}: w_emb must have {EMBEDDING_DIM} values")
        self._q_full = [float(x) for x in full["raw_quantiles"]]
        self._q_text = [float(x) for x in text["raw_quantiles"]]

    def features(self, text: str) -> np.ndarray:
        """Text features of ``text`` (see :data:`FEATURE_NAMES`)."""
        return text_features(text)

    def raw_score(
        self, text: str, embedding: np.ndarray | None, feats: np.ndarray | None = None
    ) -> float:
        """Raw model output: the estimated gain of the large tier (roughly -0.1..0.6)."""
        if feats is None:
            feats = text_features(text)
        if embedding is None:
            return float(self._w_text_only @ feats) + self._bias_text
        emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if emb.shape[0] != EMBEDDING_DIM:
            raise ValueError(f"embedding must have {EMBEDDING_DIM} values, got {emb.shape[0]}")
        return float(self._w_text_full @ feats) + float(self._w_emb @ emb) + self._bias_full

    def score(self, text: str, embedding: np.ndarray | None) -> float:
        """Difficulty percentile in 0..1 (higher needs a larger model); embedding optional."""
        q = self._q_text if embedding is None else self._q_full
        return _percentile(q, self.raw_score(text, embedding))

    def tier_for_score(self, score: float) -> str:
        """The configured tier for ``score`` under the cut points (no availability check)."""
        return self.tiers[bisect_right(self.cuts, score)]

    def route(
        self,
        text: str,
        embedding: np.ndarray | None,
        available: Collection[str] | None = None,
    ) -> RouteDecision:
        """Choose a tier for ``text``.

        ``available`` (default: all configured tiers) restricts the choice: when the scored tier
        is not in it, the nearest larger available tier is taken, else the nearest smaller one.
        Raises ``LookupError`` if no configured tier is available.
        """
        feats = text_features(text)
        q = self._q_text if embedding is None else self._q_full
        s = _percentile(q, self.raw_score(text, embedding, feats))
        i = bisect_right(self.cuts, s)
        if not self.cuts:
            why = f"score {s:.2f}, single tier"
        elif i == 0:
            why = f"score {s:.2f} < {self.cuts[0]:.2f}"
        else:
            why = f"score {s:.2f} >= {self.cuts[i - 1]:.2f}"
        chosen = self.tiers[i]
        tier = chosen
        if available is not None and chosen not in available:
            order = list(range(i + 1, len(self.tiers))) + list(range(i - 1, -1, -1))
            for j in order:
                if self.tiers[j] in available:
                    tier = self.tiers[j]
                    break
            else:
                raise LookupError(f"none of the tiers {self.tiers!r} is available")
        tags = _tags(feats, embedding is None)
        reason = f"{why} -> {chosen}"
        if tier != chosen:
            reason += f" (unavailable) -> {tier}"
        if tags:
            reason += f" ({tags})"
        return RouteDecision(tier, s, reason)


def _check_cuts(cuts: Sequence[float], n_tiers: int) -> tuple[float, ...]:
    """Validate cut points for ``n_tiers`` tiers; a clear ValueError says what is wrong."""
    try:
        out = tuple(float(c) for c in cuts)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"router cuts must be numbers, got {cuts!r}") from exc
    if len(out) != n_tiers - 1:
        raise ValueError(
            f"router cuts: {n_tiers} tiers need {n_tiers - 1} cut point(s), got {len(out)}: {out}"
        )
    if any(not 0.0 <= c <= 1.0 for c in out):
        raise ValueError(f"router cuts must lie in [0, 1] (scores are percentiles), got {out}")
    if any(b <= a for a, b in pairwise(out)):
        raise ValueError(f"router cuts must be strictly increasing, got {out}")
    return out


def _percentile(quantiles: list[float], x: float) -> float:
    """Position of ``x`` in the training distribution, given its quantiles at 0%, 1%, ..., 100%."""
    n = len(quantiles) - 1
    j = bisect_right(quantiles, x)
    if j == 0:
        return 0.0
    if j > n:
        return 1.0
    lo, hi = quantiles[j - 1], quantiles[j]
    frac = (x - lo) / (hi - lo) if hi > lo else 0.0
    return (j - 1 + frac) / n


_F_TOKENS: Final = FEATURE_NAMES.index("log_tokens")
_F_CODE: Final = FEATURE_NAMES.index("log_code")
_F_MATH_SYM: Final = FEATURE_NAMES.index("log_math_sym")
_F_MATH_WORDS: Final = FEATURE_NAMES.index("math_words")
_F_STEPS: Final = FEATURE_NAMES.index("step_words")


def _tags(feats: np.ndarray, text_only: bool) -> str:
    """A few words on what stands out in the prompt, for the decision's reason."""
    tags = []
    if feats[_F_TOKENS] > 5.3:  # log1p(200 tokens)
        tags.append("long")
    elif feats[_F_TOKENS] < 2.1:  # log1p(7 tokens)
        tags.append("short")
    if feats[_F_CODE] > 0.0:
        tags.append("code")
    if feats[_F_MATH_SYM] > 1.1 or feats[_F_MATH_WORDS] > 0.0:
        tags.append("math")
    if feats[_F_STEPS] >= 3:
        tags.append("multi-step")
    if text_only:
        tags.append("no embedding")
    return ", ".join(tags)
