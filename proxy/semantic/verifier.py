"""Verifier for semantic cache hits: is it safe to serve the candidate's answer to the query?

Sentence embeddings are nearly blind to the details that change an answer: "What is 2+3?" and
"What is 2+4?" score about 0.82 with all-MiniLM-L6-v2, the same as a true paraphrase. Mean pooling
is also close to order-invariant ("Python faster than Java" ~ "Java faster than Python"). So after
the nearest candidate clears the similarity threshold, the verifier compares what must match:

* numbers and quantities (digits, number words, ordinals, units, arithmetic operators);
* negation (one side negated, the other not);
* named entities, quoted strings, code identifiers (camelCase, snake_case, dotted names, files,
  URLs), and a small gazetteer of lower-case names (countries, cities, languages, months, days);
* opposite words ("turn on" / "turn off", "buy" / "sell", "best" / "worst", ...);
* order across a directional word ("convert a list to a dict" vs "a dict to a list").

Optionally a logistic regression over pair features (JSON weights written by
models/train_verifier.py) turns the remaining pairs into a probability. Inference is pure Python
plus a dot product; everything about a text is extracted once and memoised (candidates repeat):
the extractors are proxy/semantic/features.py, the guards are here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final

import numpy as np

from proxy.semantic.features import OPPOSITES, TextFeatures, extract, plural_base, stem

__all__ = ["TextFeatures", "Verdict", "Verifier", "extract", "pair_features"]


@dataclass(slots=True, frozen=True)
class Verdict:
    """Outcome of one check: ok, why not, and the confidence used for the decision."""

    ok: bool
    reason: str  # "" when ok; else e.g. "numbers differ: {3} vs {4}", "negation"
    score: float  # similarity, or the learned probability when weights are loaded


# --------------------------------------------------------------------------- guards

# Content-word Jaccard above which two texts "say the same words": the negation guard and the
# order guard only fire above it. Chosen on the training side (QQP train half, intent train
# leave-one-out, sim >= 0.8): negation asymmetry fired on 57 QQP pairs (25 unsafe) and 790
# banking77 pairs (76 unsafe) unconditionally; at >= 0.7 on 9 (7 unsafe) and 101 (7 unsafe).
_NEGATION_SAME: Final = 0.7
_ORDER_SAME: Final = 0.5

# One small class per check behind one interface (GPTCache's similarity evaluations): a guard
# looks at the two texts' features and says why the pair is unsafe, or nothing.


def _fmt(items: Iterable[str]) -> str:
    s = sorted(items)
    return "{" + ", ".join(s) + "}" if s else "{}"


def _missing(names: frozenset[str], other: TextFeatures) -> list[str]:
    """Names of one text that the other text does not mention in any form."""
    out = []
    for chunk in names:
        if any(_mentions(e, other) for e in chunk.split()):
            continue
        out.append(chunk)
    return out


def _mentions(e: str, other: TextFeatures) -> bool:
    """Whether ``other`` mentions the name word ``e`` in some form."""
    if e in other.surface or stem(e) in other.surface:
        return True
    # "India" ~ "Indian", "America" ~ "Americans": a short suffix is the same name,
    # but "Java" vs "JavaScript" is not.
    return len(e) >= 4 and any(
        (s.startswith(e) and len(s) - len(e) <= 3)
        or (e.startswith(s) and len(e) - len(s) <= 3 and len(s) >= 4)
        for s in other.content
    )


def _order_swapped(a: TextFeatures, b: TextFeatures) -> tuple[str, str] | None:
    """Two content words on opposite sides of the same directional word, swapped, or None."""
    if not a.ordered or not b.ordered:
        return None
    for x, m, y in a.ordered:
        if (y, m, x) in b.ordered and (x, m, y) not in b.ordered:
            return (x, y)
    return None


class Guard:
    """A check of a (query, candidate) pair; ``check`` returns why it is unsafe, or None.

    ``jaccard`` is the content-word Jaccard of the two texts (some guards only decide when the
    texts say nearly the same words).
    """

    __slots__ = ()
    name: ClassVar[str]

    def check(self, q: TextFeatures, c: TextFeatures, jaccard: float) -> str | None:
        raise NotImplementedError


class NumbersGuard(Guard):
    """Numbers, arithmetic operators, or the unit of a shared number differ."""

    __slots__ = ()
    name = "numbers"

    def check(self, q: TextFeatures, c: TextFeatures, jaccard: float) -> str | None:
        if q.numbers != c.numbers:
            return f"numbers differ: {_fmt(set(q.numbers))} vs {_fmt(set(c.numbers))}"
        if q.operators != c.operators:
            return f"operators differ: {_fmt(set(q.operators))} vs {_fmt(set(c.operators))}"
        qu = dict(q.units)
        for v, u in c.units:
            if v in qu and qu[v] != u:
                return f"units differ: {v} {qu[v]} vs {v} {u}"
        return None


class NegationGuard(Guard):
    """One side negated, when the two say nearly the same words: then "not" is the difference.
    Lexically different paraphrases express negation in other ways ("was not accepted" / "was
    rejected"), and there the embedding already sees the meaning."""

    __slots__ = ()
    name = "negation"

    def check(self, q: TextFeatures, c: TextFeatures, jaccard: float) -> str | None:
        if q.negated != c.negated and jaccard >= _NEGATION_SAME:
            return "negation: " + ("query" if q.negated else "candidate") + " negated"
        return None


class QuotedGuard(Guard):
    """A quoted string of one text missing from the other (quoted there or not: a quoted phrase
    the other text contains unquoted is emphasis, not a different string)."""

    __slots__ = ()
    name = "quoted"

    def check(self, q: TextFeatures, c: TextFeatures, jaccard: float) -> str | None:
        if q.quoted == c.quoted:
            return None
        mq = [x for x in q.quoted if f" {x} " not in c.joined]
        mc = [x for x in c.quoted if f" {x} " not in q.joined]
        return f"quoted: {_fmt(mq)} vs {_fmt(mc)}" if mq or mc else None


class CodeGuard(Guard):
    """A code identifier or URL of one text that the other does not mention."""

    __slots__ = ()
    name = "code"

    def check(self, q: TextFeatures, c: TextFeatures, jaccard: float) -> str | None:
        if q.code == c.code:
            return None
        mq, mc = _missing(q.code, c), _missing(c.code, q)
        return f"code: {_fmt(mq)} vs {_fmt(mc)}" if mq or mc else None


class EntityGuard(Guard):
    """A name of one text that the other does not mention in any form."""

    __slots__ = ()
    name = "entity"

    def check(self, q: TextFeatures, c: TextFeatures, jaccard: float) -> str | None:
        mq, mc = _missing(q.entities, c), _missing(c.entities, q)
        if not (mq or mc):
            return None
        return "entity: " + _fmt(f"'{e}'" for e in mq) + " vs " + _fmt(f"'{e}'" for e in mc)


#: Prefixes that negate the word they are put before: "safe" / "unsafe", "legal" / "illegal".
_NEG_PREFIXES: Final = ("un", "in", "im", "il", "ir", "dis", "non")


def _prefix_opposite(a: TextFeatures, b: TextFeatures) -> tuple[str, str] | None:
    """A word of one text that the other says with a negating prefix, and not plain."""
    for x, y in ((a, b), (b, a)):
        for w in y.content - x.content:
            for pre in _NEG_PREFIXES:
                base = w[len(pre):]
                if w.startswith(pre) and len(base) >= 4 and base in x.content \
                        and base not in y.content:
                    return base, w
    return None


class OppositeGuard(Guard):
    """One side of an opposite pair in one text, the other side (only) in the other; or a word
    in one text and its prefix negation ("safe" / "unsafe") in the other."""

    __slots__ = ()
    name = "opposite"

    def check(self, q: TextFeatures, c: TextFeatures, jaccard: float) -> str | None:
        pre = _prefix_opposite(q, c)
        if pre is not None:
            return f"opposite: {pre[0]}/{pre[1]}"
        if q.poles == c.poles:
            return None
        qg = {g: s for g, s in q.poles}
        for g, s in c.poles:
            if g in qg and qg[g] != s and (g, s) not in q.poles and (g, qg[g]) not in c.poles:
                a, b = OPPOSITES[g]
                return f"opposite: {a.split()[0]}/{b.split()[0]}"
        return None


class OrderGuard(Guard):
    """Two words swapped across a directional word ("list to dict" / "dict to list"), when the
    texts say mostly the same words."""

    __slots__ = ()
    name = "order"

    def check(self, q: TextFeatures, c: TextFeatures, jaccard: float) -> str | None:
        sw = _order_swapped(q, c) if jaccard >= _ORDER_SAME else None
        return f"order: '{sw[0]}' .. '{sw[1]}' swapped" if sw else None


#: Words that make a relation symmetric when they join the two swapped words ("cats and dogs"
#: / "dogs and cats"): that swap keeps the meaning.
_SYMMETRIC_JOINS: Final = frozenset({"and", "or", "vs", "versus", "&", "plus", "nor"})


def _transposed(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, str] | None:
    """The two words whose places the texts exchange, when that is the only difference
    ("why do cats chase mice" / "why do mice chase cats"), else None. A swap across a
    symmetric join ("cats and dogs") is not one."""
    if len(a) != len(b) or a == b:
        return None
    ab, bb = [plural_base(w) for w in a], [plural_base(w) for w in b]
    diff = [i for i, (x, y) in enumerate(zip(ab, bb, strict=True)) if x != y]
    if len(diff) != 2:
        return None
    i, j = diff
    if ab[i] == ab[j] or bb[i] != ab[j] or bb[j] != ab[i]:
        return None
    if j - i == 2 and a[i + 1] in _SYMMETRIC_JOINS:
        return None
    return a[i], a[j]


class RolesGuard(Guard):
    """The texts are the same words with two of them exchanged: who does what to whom changed
    ("Why does the moon orbit the earth?" / "Why does the earth orbit the moon?"). Unlike the
    order guard this needs no list of directional words, only the exchange itself; a
    symmetric relation reworded this way ("X and Y") stays allowed."""

    __slots__ = ()
    name = "roles"

    def check(self, q: TextFeatures, c: TextFeatures, jaccard: float) -> str | None:
        sw = _transposed(q.tokens, c.tokens)  # same words by construction: no Jaccard gate
        return f"roles: '{sw[0]}' and '{sw[1]}' exchanged" if sw else None


#: The guards, cheapest first (``guard_flags(first=True)`` stops at the first that fires).
GUARD_TABLE: Final[tuple[Guard, ...]] = (
    NumbersGuard(), NegationGuard(), QuotedGuard(), CodeGuard(), EntityGuard(), OppositeGuard(),
    OrderGuard(), RolesGuard(),
)
GUARDS: Final = tuple(g.name for g in GUARD_TABLE)
#: The guards that are also features of the learned interaction verifier (models/verifier.json
#: was trained on these 7; later guards only decide, they are not features).
FEATURE_GUARDS: Final = GUARDS[:7]


def guard_flags(q: TextFeatures, c: TextFeatures, *, first: bool = False) -> dict[str, str]:
    """Guards that fire for (query, candidate), with a human-readable reason.

    ``first=True`` stops at the first guard that fires (cheapest first); the learned verifier
    needs them all.
    """
    inter = len(q.content & c.content)
    jaccard = inter / (len(q.content) + len(c.content) - inter or 1)
    flags: dict[str, str] = {}
    for guard in GUARD_TABLE:
        reason = guard.check(q, c, jaccard)
        if reason:
            flags[guard.name] = reason
            if first:
                break
    return flags




def pair_features(
    q: TextFeatures, c: TextFeatures, similarity: float, flags: dict[str, str]
) -> list[float]:
    """Numeric features of a (query, candidate) pair for the learned verifier (see FEATURES)."""
    qa, ca = q.content, c.content
    inter = len(qa & ca)
    union = len(qa | ca) or 1
    lq, lc = len(q.tokens) or 1, len(c.tokens) or 1
    return [
        similarity,
        inter / union,
        min(lq, lc) / max(lq, lc),
        len(qa - ca) / (len(qa) or 1),
        len(ca - qa) / (len(ca) or 1),
        math.log1p(min(lq, lc)),
        *(1.0 if g in flags else 0.0 for g in FEATURE_GUARDS),
    ]


FEATURES: Final = (
    "cosine",
    "jaccard",
    "len_ratio",
    "query_only",
    "cand_only",
    "log_min_len",
    *(f"guard_{g}" for g in FEATURE_GUARDS),
)


# --------------------------------------------------------------------------- verifier


class _Linear:
    """A logistic regression over the 13 :data:`FEATURES` (standardised with mean/scale)."""

    __slots__ = ("bias", "cut", "mean", "scale", "weights")

    def __init__(self, spec: dict) -> None:
        if tuple(spec["features"]) != FEATURES:
            raise ValueError(f"features {spec['features']} != {FEATURES}")
        self.weights = [float(w) for w in spec["weights"]]
        self.bias = float(spec["bias"])
        self.cut = float(spec["cut"])
        self.mean = [float(x) for x in spec["mean"]]
        self.scale = [float(x) for x in spec["scale"]]
        if not len(self.weights) == len(self.mean) == len(self.scale) == len(FEATURES):
            raise ValueError("weights, mean and scale must have one value per feature")

    def logit(self, x: list[float]) -> float:
        z = self.bias
        for xi, w, m, s in zip(x, self.weights, self.mean, self.scale, strict=True):
            z += w * (xi - m) / s
        return z


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0


def _unit(v: object) -> np.ndarray:
    """float32 unit vector (stored vectors may be float16 / int8-scaled)."""
    a = np.asarray(v, dtype=np.float32).reshape(-1)
    n2 = float(a @ a)
    if n2 > 0.0 and abs(n2 - 1.0) > 1e-3:
        a = a / np.float32(math.sqrt(n2))
    return a


class Verifier:
    """Decide whether a cached candidate may answer a query.

    ``guards=False`` reduces it to the similarity threshold. ``weights_path`` (JSON written by
    models/train_verifier.py) adds a logistic regression; its probability must reach the file's
    ``cut`` and becomes the verdict's score. Guards stay hard rejections when ``guards=True``
    (for the guards listed in the file's ``hard_guards``).

    Two kinds of weight files:

    * ``"kind": "pair"`` (or no kind): a logistic regression over the 13 :data:`FEATURES`.
    * ``"kind": "interaction"``: the 13 features plus the embedding interaction features
      ``q * c`` and ``|q - c|`` (2 x 384 weights, standardisation folded in). It needs the query
      and candidate vectors (``verify(..., query_vec=, cand_vec=)``); without them it falls back
      to the file's ``fallback`` pair model, or to the guards alone if there is none.
    """

    __slots__ = ("_abs", "_fallback", "_guards", "_hard", "_joint", "_prod")

    def __init__(self, *, guards: bool = True, weights_path: str | Path | None = None) -> None:
        self._guards = guards
        self._fallback: _Linear | None = None  # 13-feature model (used without vectors)
        self._joint: _Linear | None = None  # 13-feature part of the interaction model
        self._prod: np.ndarray | None = None
        self._abs: np.ndarray | None = None
        self._hard: frozenset[str] = frozenset(GUARDS)
        if weights_path is not None:
            spec = json.loads(Path(weights_path).read_text())
            try:
                if spec.get("kind", "pair") == "interaction":
                    vw = spec["vector_weights"]
                    self._prod = np.asarray(vw["prod"], dtype=np.float32)
                    self._abs = np.asarray(vw["abs"], dtype=np.float32)
                    if self._prod.shape != self._abs.shape or self._prod.ndim != 1:
                        raise ValueError("vector_weights prod/abs must be equal-length lists")
                    self._joint = _Linear(spec)
                    fb = spec.get("fallback")
                    self._fallback = _Linear(fb) if fb else None
                else:
                    self._fallback = _Linear(spec)
            except ValueError as exc:
                raise ValueError(f"{weights_path}: {exc}") from None
            self._hard = frozenset(spec.get("hard_guards", GUARDS))

    @property
    def uses_vectors(self) -> bool:
        """Whether ``verify`` makes use of ``query_vec`` / ``cand_vec`` (interaction weights)."""
        return self._prod is not None

    def verify(
        self,
        query: str,
        candidate: str,
        similarity: float,
        threshold: float,
        *,
        query_vec: np.ndarray | None = None,
        cand_vec: np.ndarray | None = None,
        scope: bytes = b"",
    ) -> Verdict:
        """Return whether serving ``candidate``'s answer to ``query`` is safe, and why not.

        ``scope``: the lookup's semantic scope, under which the texts' features are memoised
        (``features.extract``).

        ``query_vec`` / ``cand_vec``: the two embeddings (384 floats, L2-normalised; float16 is
        fine) for interaction weights; ignored otherwise.
        """
        if similarity < threshold:
            return Verdict(False, f"similarity {similarity:.3f} < {threshold:.3f}", similarity)
        use_vec = self._prod is not None and query_vec is not None and cand_vec is not None
        model = self._joint if use_vec else self._fallback
        if not self._guards and model is None:
            return Verdict(True, "", similarity)
        if query == candidate:
            return Verdict(True, "", 1.0 if model is not None else similarity)
        q, c = extract(query, scope), extract(candidate, scope)
        flags = guard_flags(q, c, first=model is None)
        if self._guards:
            for g in GUARDS:
                if g in flags and g in self._hard:
                    return Verdict(False, flags[g], similarity)
        if model is None:
            return Verdict(True, "", similarity)
        z = model.logit(pair_features(q, c, similarity, flags))
        if use_vec:
            prod = self._prod
            assert prod is not None  # use_vec
            qv, cv = _unit(query_vec), _unit(cand_vec)
            if qv.shape != prod.shape or cv.shape != prod.shape:
                raise ValueError(f"vectors must have {prod.shape[0]} dims")
            z += float(prod @ (qv * cv)) + float(self._abs @ np.abs(qv - cv))
        p = _sigmoid(z)
        if p < model.cut:
            return Verdict(False, f"learned: p={p:.3f} < {model.cut:.3f}", p)
        return Verdict(True, "", p)
