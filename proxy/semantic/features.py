"""What the verifier compares: the must-match features of one text, extracted once and memoised.

Numbers and quantities (digits, number words, ordinals, units, arithmetic operators), negation,
names (capitalised words, acronyms, a gazetteer of lower-case names), quoted strings, code
identifiers and URLs, opposite words, and word order across directional words. Each feature has
its own small extractor; the word lists are data files (proxy/semantic/data/*.txt).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Final, Generic, TypeVar

__all__ = ["OPPOSITES", "TextFeatures", "extract", "load_pairs", "load_words", "stem"]


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
OPPOSITES: Final = load_pairs("opposites.txt", "|")
_POLE: Final[dict[str, list[tuple[int, int]]]] = {}
for _g, (_a, _b) in enumerate(OPPOSITES):
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


#: The one empty frozenset of every TextFeatures: most of a text's sets are empty, and each
#: frozenset is an object the cyclic GC walks for as long as the memo keeps it (six per
#: typical question, up to 8,192 memoised texts).
_EMPTY: Final[frozenset[Any]] = frozenset()


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


def stem(w: str) -> str:
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


#: Contractions spelled out by :func:`question_form` ("what's" -> "what is").
_IS_HEADS: Final = frozenset(
    {"what", "who", "where", "how", "when", "why", "which", "that", "it", "there", "here"})
_NT_HEADS: Final = {"ca": "can", "wo": "will", "sha": "shall"}
_CONTRACTED: Final = {"re": "are", "m": "am", "ve": "have", "ll": "will", "d": "would"}
#: Words whose presence never changes what a question asks: articles and the do-support of
#: present-tense questions ("How does a refrigerator work?" / "How do refrigerators work?").
#: Tense ("did"), negation and every content word stay.
_FORM_DROP: Final = frozenset({"a", "an", "the", "do", "does"})
#: A request frame before an embedded question ("Can you explain what X is?"): words that ask
#: for the answer without being part of the question.
_FRAME_WORDS: Final = frozenset({"please", "can", "could", "would", "you", "tell", "me", "explain"})
_FRAME_HEADS: Final = frozenset({"tell", "explain"})
_WH: Final = frozenset({"what", "how", "why", "where", "when", "who", "which"})
#: "How do I / can I / does one / to X": the same request for a way to do X. Not "you": in a
#: prompt it often means the assistant ("How do you handle my data?").
_HOW_SUBJECTS: Final = frozenset({"i", "one", "we", "to"})
_PUNCT: Final = frozenset(".,;:?!'\"\u2019")


def plural_base(word: str) -> str:
    """A word without a plural or possessive "s" (tokens lose their apostrophe: "dog's" ->
    "dogs"), so "dog's food" / "dogs food" compare equal."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


#: Texts up to this many characters are memoised (per scope); longer ones are worked out each
#: time, so the memos stay small whatever clients send (a 2,048-character text of capitalised
#: words has ~190 KB of features).
MEMO_MAX_CHARS: Final = 256
#: Entries per memo. With texts of at most MEMO_MAX_CHARS: a few MB typically, tens at worst.
MEMO_ENTRIES: Final = 8192

T = TypeVar("T")


class ScopedMemo(Generic[T]):
    """``fn(text)``, memoised per ``scope`` (the semantic scope: tenant, model, context) for
    texts up to MEMO_MAX_CHARS, worked out each time for longer ones. Keyed by scope so that
    how fast a text is worked out never depends on what another tenant asked."""

    def __init__(self, fn: Callable[[str], T]) -> None:
        self.fn = fn
        self.memo = lru_cache(maxsize=MEMO_ENTRIES)(self._memo)
        self.__doc__ = fn.__doc__

    def _memo(self, scope: bytes, text: str) -> T:
        return self.fn(text)

    def __call__(self, text: str, scope: bytes = b"") -> T:
        if len(text) > MEMO_MAX_CHARS:
            return self.fn(text)
        return self.memo(scope, text)


def _question_form(text: str) -> str:
    """The question with its spelling variation taken out: lower case, no punctuation,
    contractions spelled out, articles and do/does dropped, plural "s" removed. Two texts of
    the same form ask the same question ("What's machine learning?" / "What is machine
    learning?"; "What causes earthquakes?" / "What causes an earthquake?"). Numbers, negation,
    tense and every content word are kept, so the hand guards have nothing to add."""
    out: list[str] = []
    for t in _TOKEN_RE.findall(text.lower().replace("\u2019", "'")):
        if "'" in t:
            head, _, tail = t.rpartition("'")
            if tail == "t" and head.endswith("n"):  # don't, can't, won't, isn't
                out += [_NT_HEADS.get(head[:-1], head[:-1]), "not"]
                continue
            if tail == "s":  # what's -> what is; card's -> card
                out += [head, "is"] if head in _IS_HEADS else [head]
                continue
            if tail in _CONTRACTED:
                out += [head, _CONTRACTED[tail]]
                continue
            t = t.replace("'", "")
        if t.isalnum() and t not in _FORM_DROP:
            out.append(plural_base(t))
    out = _unframe(out)
    # symbols are content ("() vs (,)", "# vs ##"): kept in their order
    symbols = "".join(ch for ch in text if not (ch.isalnum() or ch.isspace() or ch in _PUNCT))
    return " ".join(out) + ("\x1f" + symbols if symbols else "")


question_form = ScopedMemo(_question_form)


def _unframe(toks: list[str]) -> list[str]:
    """Take the request frame off a question form: "can you explain what inflation is" ->
    "what is inflation"; "how can i / how i (do dropped) / how one X" -> "how to X". Only a
    frame that ends at a question word goes, and only with at least two words after it."""
    i = 0
    while i < len(toks) and toks[i] in _FRAME_WORDS:
        i += 1
    if 0 < i < len(toks) and toks[i] in _WH and _FRAME_HEADS & set(toks[:i]):
        toks = toks[i:]
        # an embedded question keeps statement order: "what inflation is" -> "what is inflation"
        if toks[0] == "what" and len(toks) >= 3 and toks[-1] in ("is", "are"):
            toks = ["what", toks[-1], *toks[1:-1]]
    if len(toks) >= 4 and toks[0] == "how":
        rest = toks[2:] if toks[1] in _HOW_SUBJECTS else None
        if toks[1] == "can" and toks[2] in _HOW_SUBJECTS:
            rest = toks[3:]
        if rest is not None and len(rest) >= 2:
            toks = ["how", "to", *rest]
    return toks


def _extract(text: str) -> TextFeatures:
    """Extract the must-match features of one text (numbers, negation, names, ...)."""
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
        units=frozenset(units) if units else _EMPTY,
        operators=tuple(sorted(_operators(rest, plain) if numbers else ())),
        negated=_negated(text, joined),
        entities=frozenset(entities) if entities else _EMPTY,
        quoted=quoted or _EMPTY,
        code=frozenset(code) if code else _EMPTY,
        tokens=tuple(words),
        surface=_surface(plain, words, bigrams, code),
        content=frozenset(w for w in words
                          if w not in _FUNCTION_WORDS and w not in _NEGATIONS and w.isalnum()),
        poles=_poles(plain) or _EMPTY,
        joined=joined,
        ordered=(len(words) <= _ORDER_MAX_TOKENS and _ordered_triples(words)) or _EMPTY,
    )


extract = ScopedMemo(_extract)


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
    surface.update(stem(w) for w in plain if w.endswith("s"))
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
