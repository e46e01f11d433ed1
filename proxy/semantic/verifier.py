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
plus a dot product; everything about a text is extracted once and memoised (candidates repeat).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import ClassVar, Final

import numpy as np

__all__ = ["TextFeatures", "Verdict", "Verifier", "extract", "pair_features"]


@dataclass(slots=True, frozen=True)
class Verdict:
    """Outcome of one check: ok, why not, and the confidence used for the decision."""

    ok: bool
    reason: str  # "" when ok; else e.g. "numbers differ: {3} vs {4}", "negation"
    score: float  # similarity, or the learned probability when weights are loaded



# --------------------------------------------------------------------------- lexicons
# The word lists are data (proxy/semantic/data/*.txt, package data); the small maps that encode
# grammar (number words, operators, directional words) stay here.


def _data_lines(name: str) -> list[str]:
    """Non-empty, non-comment lines of a word-list file of proxy/semantic/data/."""
    text = resources.files("proxy.semantic").joinpath("data", name).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def load_words(name: str) -> list[str]:
    """The whitespace-separated words of a word-list file, in file order."""
    return [w for ln in _data_lines(name) for w in ln.split()]


def load_pairs(name: str, sep: str) -> list[tuple[str, str]]:
    """The ``left SEP right`` lines of a word-list file, stripped, in file order."""
    out = []
    for ln in _data_lines(name):
        left, _, right = ln.partition(sep)
        out.append((left.strip(), right.strip()))
    return out


def _words(text: str) -> list[str]:
    """Whitespace-separated words: keeps the short word lists below readable."""
    return text.split()


_FUNCTION_WORDS: Final = frozenset(load_words("function_words.txt"))
_NEGATIONS: Final = frozenset(load_words("negations.txt"))
_NEG_IDIOMS: Final = (" or not ", " why not ", " not only ", " if not ")
# a spelling that can follow a number -> its canonical unit
_UNITS: Final = {w: unit for unit, spellings in load_pairs("units.txt", ":")
                 for w in spellings.split()}
_GAZETTEER: Final = frozenset(load_words("gazetteer.txt"))
_GAZ_BIGRAMS: Final = frozenset(load_words("gazetteer_bigrams.txt"))
_ALIASES: Final = dict(load_pairs("aliases.txt", "="))
_NOT_ACRONYMS: Final = frozenset(load_words("not_acronyms.txt"))
# Pairs of opposite words: one side in the query and the other in the candidate is unsafe.
_OPPOSITES: Final = load_pairs("opposites.txt", "|")
_POLE: Final[dict[str, list[tuple[int, int]]]] = {}
for _g, (_a, _b) in enumerate(_OPPOSITES):
    for _side, _group_words in enumerate((_a, _b)):
        for _w in _group_words.split():
            _POLE.setdefault(_w, []).append((_g, _side))
_PHRASAL_POLES: Final = {
    ("log", "in"): "login",
    ("sign", "in"): "login",
    ("log", "out"): "logout",
    ("sign", "out"): "logout",
}

_NUM_WORDS: Final = {
    **{
        w: i
        for i, w in enumerate(
            _words(
                "zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen"
            )
        )
    },
    **{
        w: 10 * i
        for i, w in enumerate(_words("twenty thirty forty fifty sixty seventy eighty ninety"), 2)
    },
    "dozen": 12,
}
_MULTIPLIERS: Final = {
    "hundred": 100,
    "thousand": 1000,
    "million": 10**6,
    "billion": 10**9,
    "trillion": 10**12,
    "lakh": 10**5,
    "crore": 10**7,
}
_ORDINAL_WORDS: Final = {
    w: i
    for i, w in enumerate(
        _words("first _ third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth"), 1
    )
    if w != "_"  # "second" is far more often the unit of time
}

_NUMBER_WORDS_ALL: Final = (
    frozenset(_NUM_WORDS) | frozenset(_ORDINAL_WORDS) | frozenset(_MULTIPLIERS)
)

_OPERATOR_WORDS: Final = {
    "plus": "+",
    "minus": "-",
    "times": "*",
    "multiplied": "*",
    "divided": "/",
    "over": "/",
    "squared": "^2",
    "cubed": "^3",
    "power": "^",
    "root": "sqrt",
    "modulo": "%",
    "mod": "%",
}


# Content-word Jaccard above which two texts "say the same words": the negation guard and the
# order guard only fire above it. Chosen on the training side (QQP train half, intent train
# leave-one-out, sim >= 0.8): negation asymmetry fired on 57 QQP pairs (25 unsafe) and 790
# banking77 pairs (76 unsafe) unconditionally; at >= 0.7 on 9 (7 unsafe) and 101 (7 unsafe).
_NEGATION_SAME: Final = 0.7
_ORDER_SAME: Final = 0.5

# Words across which order matters: "X than Y", "X to Y", "from X to Y", "X by Y", "X over Y".
# The value is the marker compared across texts ("into" and "to" are the same direction).
_DIRECTIONAL: Final = {
    "than": "than",
    ">": "than",
    "<": "than",
    "to": "to",
    "into": "to",
    "onto": "to",
    "towards": "to",
    "from": "from",
    "by": "by",
    "per": "per",
    "over": "over",
    "minus": "-",
    "-": "-",
    "divided": "/",
    "/": "/",
    "^": "^",
    "before": "before",
    "after": "after",
}
# Long texts have many harmless reorderings; the order guard only looks at short ones.
_ORDER_MAX_TOKENS: Final = 60
_ORDER_STOP: Final = (
    _FUNCTION_WORDS - {"first", "last", "new", "old", "best", "good", "better"}
) | (frozenset(_DIRECTIONAL))

# --------------------------------------------------------------------------- regexes

_QUOTED_RE: Final = re.compile(
    r'"([^"\n]{1,200})"|\u201c([^\u201d\n]{1,200})\u201d|`([^`\n]{1,200})`'
    r"|(?<![\w'])'([^'\n]{1,100})'(?![\w'])|\u2018([^\u2019\n]{1,100})\u2019"
)
_URL_RE: Final = re.compile(r"\b(?:https?://|www\.)[^\s\"'<>()]+", re.I)
# Code identifiers, one regex per shape, each behind a cheap test of the character it needs
# (most queries have no "_", "." or "()": a single alternation cost ~17 us per text).
_CODE_RES: Final = (
    ("(", re.compile(r"\b[A-Za-z_]\w*\(\)")),  # call: len()
    (".", re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w+)+\b")),  # os.path.join, Node.js, a.py
    ("_", re.compile(r"\b\w*[A-Za-z]\w*_\w+\b")),  # snake_case, __init__
    ("-", re.compile(r"(?<!\S)--?[a-z][\w-]+")),  # command-line flags, not "hip-hop"
    ("", re.compile(r"\b[a-z]+[A-Z][A-Za-z0-9]*|\b[A-Z][a-z0-9]+[A-Z][A-Za-z0-9]*")),  # camel
)
_NUMBER_RE: Final = re.compile(r"(\d+(?:,\d{3})+|\d*\.\d+|\d+)(st|nd|rd|th)?(?![\d])", re.I)
_TOKEN_RE: Final = re.compile(r"[$\u20ac\u00a3%]|[^\W_]+(?:['\u2019][^\W_]+)*|[-/^<>+*=]")
_WORD_CAP_RE: Final = re.compile(r"[A-Z][a-z]+|[A-Z]{2,}[a-z]?")
_SENT_PUNCT_RE: Final = re.compile(r"[.!?:;\n]")
_DIGIT_RE: Final = re.compile(r"\d")
_QUOTE_CHARS_RE: Final = re.compile(r"[\"\u201c`\u2018]|(?<![\w'])'")
_OP_RE: Final = re.compile(r"(?<=[\d)\s])([+\-*/^\u00d7\u00f7=<>])(?=[\s(]*[\d.])")


@dataclass(slots=True, frozen=True)
class TextFeatures:
    """Everything the verifier needs about one text; computed once per text (memoised)."""

    numbers: tuple[str, ...]  # sorted multiset of canonical values; ordinals as "#3"
    units: frozenset[tuple[str, str]]  # (value, unit) for numbers followed by a unit
    operators: tuple[str, ...]  # sorted multiset of arithmetic operators
    negated: bool
    entities: frozenset[str]  # lower-case names (capitalised words, acronyms, gazetteer)
    quoted: frozenset[str]
    code: frozenset[str]
    tokens: tuple[str, ...]  # lower-case word tokens (apostrophes removed)
    surface: frozenset[str]  # tokens + bigrams + stems, to look names up leniently
    content: frozenset[str]  # tokens minus function words
    poles: frozenset[tuple[int, int]]  # (opposite group, side)
    joined: str  # " w1 w2 ... " for phrase containment
    ordered: frozenset[tuple[str, str, str]]  # (x, "to", y): x shortly before "to", y after


def _canon_number(s: str) -> str:
    s = s.replace(",", "")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _sentence_starts(text: str, spans: list[tuple[int, int]]) -> frozenset[int]:
    """Indexes of tokens that begin a sentence (first token, or after . ! ? : ; or a newline)."""
    out = {0}
    if _SENT_PUNCT_RE.search(text):
        for i in range(1, len(spans)):
            if _SENT_PUNCT_RE.search(text, spans[i - 1][1], spans[i][0]):
                out.add(i)
    return frozenset(out)


def _ordered_triples(words: list[str]) -> frozenset[tuple[str, str, str]]:
    """(x, marker, y) for content words x / y among the two nearest before / after a marker."""
    out: set[tuple[str, str, str]] = set()
    for i, t in enumerate(words):
        m = _DIRECTIONAL.get(t)
        if m is None:
            continue
        before = [w for w in words[max(0, i - 6) : i] if w not in _ORDER_STOP][-2:]
        after = [w for w in words[i + 1 : i + 7] if w not in _ORDER_STOP][:2]
        out.update((x, m, y) for x in before for y in after if x != y)
    return frozenset(out)


def _strip_possessive(w: str) -> str:
    return w[:-2] if w.endswith("'s") else w


def _stem(w: str) -> str:
    w = _strip_possessive(w)
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def _words_to_numbers(tokens: list[str]) -> tuple[list[str], list[int]]:
    """Number words -> canonical values; returns values and the token index each ends at."""
    vals: list[str] = []
    ends: list[int] = []
    i, n = 0, len(tokens)
    while i < n:
        t = tokens[i]
        if t in _ORDINAL_WORDS:
            vals.append(f"#{_ORDINAL_WORDS[t]}")
            ends.append(i)
            i += 1
            continue
        if t in _NUM_WORDS or (t in _MULTIPLIERS and i > 0 and tokens[i - 1] == "a"):
            # A lone "one" is nearly always a pronoun or "a" ("how does one...", "one of the",
            # "which one"): count it only in compounds ("one hundred") or before a unit.
            if t == "one" and not (
                i + 1 < n and (tokens[i + 1] in _MULTIPLIERS or tokens[i + 1] in _UNITS)
            ):
                i += 1
                continue
            total, cur = 0, 0
            j = i
            while j < n:
                w = tokens[j]
                if w in _NUM_WORDS:
                    cur += _NUM_WORDS[w]
                elif w in _MULTIPLIERS:
                    m = _MULTIPLIERS[w]
                    cur = max(cur, 1) * m
                    if m >= 1000:
                        total, cur = total + cur, 0
                elif w == "and" and j + 1 < n and tokens[j + 1] in _NUM_WORDS and j > i:
                    pass
                else:
                    break
                j += 1
            vals.append(str(total + cur))
            ends.append(j - 1)
            i = j
            continue
        i += 1
    return vals, ends


def extract(text: str) -> TextFeatures:
    """Extract the must-match features of one text (numbers, negation, names, ...)."""
    return _extract_cached(text)


@lru_cache(maxsize=16384)
def _extract_cached(text: str) -> TextFeatures:
    # Each extractor first makes a cheap substring test and skips the regexes that cannot
    # match (most queries are plain words).
    quoted = _quoted(text)
    code, rest = _code(text)
    matches = list(_TOKEN_RE.finditer(rest))
    raw_tokens = [m.group() for m in matches]
    tokens = [t.lower().replace("\u2019", "'") for t in raw_tokens]
    plain = [_strip_possessive(t) if "'" in t else t for t in tokens]
    words = [t.replace("'", "") if "'" in t else t for t in tokens]
    numbers, units = _digit_numbers(rest)
    _word_numbers(plain, numbers, units)
    joined = " " + " ".join(words) + " "
    bigrams = {a + "_" + b for a, b in itertools.pairwise(plain)}
    entities = _entities(rest, matches, raw_tokens, plain)
    entities.update(bigrams & _GAZ_BIGRAMS)
    return TextFeatures(
        numbers=tuple(sorted(numbers)),
        units=frozenset(units),
        operators=tuple(sorted(_operators(rest, plain) if numbers else ())),
        negated=_negated(text, joined),
        entities=frozenset(entities),
        quoted=quoted,
        code=frozenset(code),
        tokens=tuple(words),
        surface=_surface(plain, words, bigrams, code),
        content=frozenset(w for w in words
                          if w not in _FUNCTION_WORDS and w not in _NEGATIONS and w.isalnum()),
        poles=_poles(plain),
        joined=joined,
        ordered=_ordered_triples(words) if len(words) <= _ORDER_MAX_TOKENS else frozenset(),
    )


def _quoted(text: str) -> frozenset[str]:
    """Quoted strings ("...", `...`, '...', curly quotes), as lower-case word sequences."""
    if not _QUOTE_CHARS_RE.search(text):
        return frozenset()
    return frozenset(
        " ".join(
            t.replace("'", "").replace("\u2019", "")
            for t in _TOKEN_RE.findall(next(g for g in m.groups() if g is not None).lower())
        )
        for m in _QUOTED_RE.finditer(text)
    )


def _code(text: str) -> tuple[set[str], str]:
    """URLs and code identifiers (lower case), and the text with the URLs blanked out."""
    code: set[str] = set()
    rest = text
    if "http" in text or "www." in text or "WWW." in text:
        code.update(u.rstrip(".,;:!?").lower() for u in _URL_RE.findall(text))
        rest = _URL_RE.sub(" ", text)
    for c in (c for need, rx in _CODE_RES if need in rest for c in rx.findall(rest)):
        if "." not in c or not _abbreviation_or_typo(c):
            code.add(c.lower())
    return code, rest


def _abbreviation_or_typo(c: str) -> bool:
    # "e.g", "i.e", "U.S" are abbreviations; "girlfriend.What should I do" is a missing space
    return c.count(".") * 2 >= len(c) - 1 or any(
        seg[:1].isupper() and seg.lower() in _FUNCTION_WORDS for seg in c.split("."))


def _digit_numbers(rest: str) -> tuple[list[str], set[tuple[str, str]]]:
    """Numbers in digits (ordinals as "#3"), scaled by a multiplier word right after them, and
    (value, unit) for those with a unit right after (or a currency sign right before)."""
    numbers: list[str] = []
    units: set[tuple[str, str]] = set()
    if not _DIGIT_RE.search(rest):
        return numbers, units
    for m in _NUMBER_RE.finditer(rest):
        val = _canon_number(m.group(1))
        if m.group(2):
            val = "#" + val
        tw = _TOKEN_RE.findall(rest[m.end() : m.end() + 16].lower())
        if tw and tw[0] in _MULTIPLIERS and not val.startswith("#"):
            val = _canon_number(str(float(val) * _MULTIPLIERS[tw[0]]))
        elif tw and tw[0] in _UNITS:
            units.add((val, _UNITS[tw[0]]))
        before = rest[max(0, m.start() - 1) : m.start()]
        if before in "$\u20ac\u00a3" and before:
            units.add((val, _UNITS[before]))
        numbers.append(val)
    return numbers, units


def _word_numbers(plain: list[str], numbers: list[str], units: set[tuple[str, str]]) -> None:
    """Add the numbers written in words (and their units) to ``numbers`` / ``units``."""
    if _NUMBER_WORDS_ALL.isdisjoint(plain):
        return
    wvals, wends = _words_to_numbers(plain)
    for v, e in zip(wvals, wends, strict=True):
        numbers.append(v)
        if e + 1 < len(plain) and plain[e + 1] in _UNITS:
            units.add((v, _UNITS[plain[e + 1]]))


def _operators(rest: str, plain: list[str]) -> list[str]:
    """Arithmetic operators, as symbols or words (only looked for when there are numbers)."""
    ops = [m.group(1) for m in _OP_RE.finditer(rest)]
    ops += [_OPERATOR_WORDS[t] for t in plain if t in _OPERATOR_WORDS]
    return [{"\u00d7": "*", "\u00f7": "/"}.get(o, o) for o in ops]


def _negated(text: str, joined: str) -> bool:
    """Whether the text is negated ("why or why not", "or not?", "not only" do not count)."""
    low_text = text.lower()
    if "n't" in low_text or "n\u2019t" in low_text:
        return True
    for idiom in _NEG_IDIOMS:
        if idiom in joined:
            joined = joined.replace(idiom, " ")
    return not _NEGATIONS.isdisjoint(joined.split())


def _entities(rest: str, matches: list[re.Match[str]], raw_tokens: list[str],
              plain: list[str]) -> set[str]:
    """Names as chunks of consecutive name words ("donald trump"), aliases resolved: a chunk is
    matched when the other text mentions any part of it ("trump", "Dhoni" for "Mahendra Singh
    Dhoni")."""
    # Capitalised words carry no signal in Title Case or ALL CAPS text, or at sentence starts.
    alpha = [t for t in raw_tokens if t[:1].isalpha()]
    caps = sum(1 for t in alpha if t[0].isupper())
    use_caps = len(alpha) < 3 or caps / max(len(alpha), 1) <= 0.5
    starts = _sentence_starts(rest, [m.span() for m in matches]) if use_caps else frozenset()
    entities: set[str] = set()
    chunk: list[str] = []
    for i, (raw, low) in enumerate(zip(raw_tokens, plain, strict=True)):
        if _is_name(raw, low, use_caps and i not in starts, use_caps):
            chunk.append(low)
        elif chunk:
            entities.add(" ".join(chunk))
            chunk = []
    if chunk:
        entities.add(" ".join(chunk))
    return {_ALIASES.get(e, e) for e in entities}


def _is_name(raw: str, low: str, caps_mean_name: bool, use_caps: bool) -> bool:
    if low in _GAZETTEER:
        return True
    if use_caps and raw.isupper() and len(raw) >= 2 and raw.isalpha() and raw not in _NOT_ACRONYMS:
        return True  # acronyms anywhere ("US" too, though "us" is a stopword)
    if low in _FUNCTION_WORDS or low in _UNITS:
        return False
    # a sentence's first word is capitalised by grammar, not because it is a name
    return caps_mean_name and _WORD_CAP_RE.fullmatch(raw) is not None


def _surface(plain: list[str], words: list[str], bigrams: set[str],
             code: set[str]) -> frozenset[str]:
    """Tokens, bigrams, stems, code and aliases: to look names up leniently."""
    surface = set(plain) | bigrams | set(words)
    surface.update(_stem(w) for w in plain if w.endswith("s"))
    surface.update(code)
    surface.update(_ALIASES[b] for b in surface & _ALIASES.keys())
    return frozenset(surface)


def _poles(plain: list[str]) -> frozenset[tuple[int, int]]:
    """(opposite group, side) of every opposite word or phrasal verb ("log in") in the text."""
    poles: set[tuple[int, int]] = set()
    for w in _POLE.keys() & set(plain):
        poles.update(_POLE[w])
    for a, b in itertools.pairwise(plain):
        ph = _PHRASAL_POLES.get((a, b))
        if ph:
            poles.update(_POLE[ph])
    return frozenset(poles)



# --------------------------------------------------------------------------- guards
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
    if e in other.surface or _stem(e) in other.surface:
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


class OppositeGuard(Guard):
    """One side of an opposite pair in one text, the other side (only) in the other."""

    __slots__ = ()
    name = "opposite"

    def check(self, q: TextFeatures, c: TextFeatures, jaccard: float) -> str | None:
        if q.poles == c.poles:
            return None
        qg = {g: s for g, s in q.poles}
        for g, s in c.poles:
            if g in qg and qg[g] != s and (g, s) not in q.poles and (g, qg[g]) not in c.poles:
                a, b = _OPPOSITES[g]
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


#: The guards, cheapest first (``guard_flags(first=True)`` stops at the first that fires).
GUARD_TABLE: Final[tuple[Guard, ...]] = (
    NumbersGuard(), NegationGuard(), QuotedGuard(), CodeGuard(), EntityGuard(), OppositeGuard(),
    OrderGuard(),
)
GUARDS: Final = tuple(g.name for g in GUARD_TABLE)


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
        *(1.0 if g in flags else 0.0 for g in GUARDS),
    ]


FEATURES: Final = (
    "cosine",
    "jaccard",
    "len_ratio",
    "query_only",
    "cand_only",
    "log_min_len",
    *(f"guard_{g}" for g in GUARDS),
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
    ) -> Verdict:
        """Return whether serving ``candidate``'s answer to ``query`` is safe, and why not.

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
        q, c = extract(query), extract(candidate)
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
