"""Synthetic verifier training pairs from real questions (train splits only).

Negatives (serving one's answer to the other is wrong), each a one-edit change of a real question:
``swap`` (argument order around a directional word: from/to, than, into, vs-free), ``negation``
(aux + not), ``number`` (a different number), ``unit`` (Celsius/Fahrenheit, km/miles, ...),
``entity`` (a country, city, language, company or person replaced by another of its kind) and
``antonym`` (for/against, buy/sell, before/after, ...). Positives: surface rewrites that keep the
meaning (case, punctuation, contractions, "how do I" / "how can I", politeness prefixes).

The word lists here are training material only; the proxy does not use them (the verifier has to
generalise, and ``tests/data/adversarial_pairs.jsonl`` is written with other sentences).
"""

from __future__ import annotations

import random
import re
from typing import Final

UNITS: Final = [
    ("celsius", "fahrenheit"),
    ("kilometers", "miles"),
    ("km", "miles"),
    ("kilograms", "pounds"),
    ("kg", "lbs"),
    ("meters", "feet"),
    ("liters", "gallons"),
    ("centimeters", "inches"),
    ("dollars", "euros"),
    ("usd", "eur"),
    ("pounds", "dollars"),
    ("rupees", "dollars"),
    ("hours", "minutes"),
    ("days", "weeks"),
    ("months", "years"),
    ("gb", "mb"),
    ("grams", "ounces"),
    ("seconds", "minutes"),
]
ANTONYMS: Final = [
    ("arguments for", "arguments against"),
    ("vote for", "vote against"),
    ("in favor of", "against"),
    ("support", "oppose"),
    ("pros", "cons"),
    ("advantages", "disadvantages"),
    ("buy", "sell"),
    ("before", "after"),
    ("increase", "decrease"),
    ("best", "worst"),
    ("cheapest", "most expensive"),
    ("maximum", "minimum"),
    ("highest", "lowest"),
    ("men", "women"),
    ("male", "female"),
    ("boys", "girls"),
    ("start", "stop"),
    ("open", "close"),
    ("enable", "disable"),
    ("lock", "unlock"),
    ("activate", "deactivate"),
    ("deposit", "withdraw"),
    ("send", "receive"),
    ("import", "export"),
    ("positive", "negative"),
    ("hot", "cold"),
    ("love", "hate"),
    ("first", "last"),
    ("yesterday", "tomorrow"),
    ("morning", "evening"),
    ("north", "south"),
    ("east", "west"),
    ("summer", "winter"),
    ("add", "remove"),
    ("turn on", "turn off"),
    ("up", "down"),
    ("more", "less"),
    ("rich", "poor"),
    ("legal", "illegal"),
    ("true", "false"),
    ("win", "lose"),
    ("easy", "hard"),
    ("fast", "slow"),
    ("credit", "debit"),
    ("arrive", "leave"),
    ("higher", "lower"),
    ("early", "late"),
    ("accept", "reject"),
]
ENTITIES: Final = {
    "country": [
        "India",
        "Pakistan",
        "China",
        "Japan",
        "Germany",
        "France",
        "Italy",
        "Spain",
        "Canada",
        "Mexico",
        "Brazil",
        "Russia",
        "Australia",
        "England",
        "Ireland",
        "Sweden",
        "Norway",
        "Egypt",
        "Nigeria",
        "Kenya",
        "Turkey",
        "Iran",
        "Israel",
        "Korea",
        "Vietnam",
        "Thailand",
        "Indonesia",
        "Argentina",
        "Chile",
        "Greece",
        "Poland",
        "Ukraine",
    ],
    "city": [
        "London",
        "Paris",
        "Tokyo",
        "Delhi",
        "Mumbai",
        "Bangalore",
        "Chicago",
        "Boston",
        "Seattle",
        "Berlin",
        "Madrid",
        "Rome",
        "Dubai",
        "Singapore",
        "Sydney",
        "Toronto",
        "Moscow",
        "Beijing",
        "Shanghai",
        "Cairo",
        "Lagos",
        "Hyderabad",
        "Chennai",
        "Austin",
        "Denver",
        "Miami",
        "Vancouver",
        "Amsterdam",
        "Vienna",
        "Prague",
    ],
    "lang": [
        "Python",
        "Java",
        "JavaScript",
        "C++",
        "Ruby",
        "PHP",
        "Swift",
        "Kotlin",
        "Rust",
        "Go",
        "Haskell",
        "Perl",
        "Scala",
        "MATLAB",
        "English",
        "Spanish",
        "French",
        "German",
        "Hindi",
        "Chinese",
        "Japanese",
        "Arabic",
        "Russian",
        "Italian",
    ],
    "org": [
        "Google",
        "Apple",
        "Microsoft",
        "Amazon",
        "Facebook",
        "Netflix",
        "Tesla",
        "Uber",
        "Airbnb",
        "IBM",
        "Intel",
        "Samsung",
        "Twitter",
        "Quora",
        "Flipkart",
        "Infosys",
        "Oracle",
        "Adobe",
        "Nvidia",
        "Spotify",
    ],
    "person": [
        "Trump",
        "Obama",
        "Clinton",
        "Modi",
        "Gandhi",
        "Einstein",
        "Newton",
        "Hitler",
        "Lincoln",
        "Messi",
        "Ronaldo",
        "Federer",
        "Nadal",
        "Putin",
        "Musk",
        "Jobs",
        "Gates",
        "Shakespeare",
        "Darwin",
        "Tesla",
    ],
    "brand": [
        "iPhone",
        "Android",
        "Windows",
        "Linux",
        "Mac",
        "Visa",
        "Mastercard",
        "PayPal",
        "Bitcoin",
        "Ethereum",
    ],
}
AUX: Final = [
    ("can", "can't"),
    ("is", "isn't"),
    ("are", "aren't"),
    ("do", "don't"),
    ("does", "doesn't"),
    ("did", "didn't"),
    ("should", "shouldn't"),
    ("will", "won't"),
    ("would", "wouldn't"),
    ("could", "couldn't"),
    ("was", "wasn't"),
    ("have", "haven't"),
    ("has", "hasn't"),
]
DIRECTIONAL: Final = re.compile(
    r"\b(than|into|over|against|beat|beats|attack|attacks|defeat|defeats|kill|kills|marry|marries)\b",
    re.I,
)
FROM_TO: Final = re.compile(r"\bfrom (\w+(?: \w+)?) to (\w+(?: \w+)?)", re.I)
THAN: Final = re.compile(r"\b(\w+) ((?:more |less )?\w+) than (\w+)", re.I)
PREFIXES: Final = ["please tell me ", "can you tell me ", "i want to know ", "quick question: "]


def _case_like(src: str, word: str) -> str:
    if src.isupper() and len(src) > 1:
        return word.upper()
    if src[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _replace_word(text: str, a: str, b: str) -> str | None:
    pat = re.compile(rf"\b{re.escape(a)}\b", re.I)
    m = pat.search(text)
    if not m:
        return None
    return text[: m.start()] + _case_like(m.group(0), b) + text[m.end() :]


def swap(text: str, rng: random.Random) -> str | None:
    """Swap the noun phrases around a directional word: 'A beats B' -> 'B beats A'."""
    ft = FROM_TO.search(text)
    if ft and rng.random() < 0.8:
        return text[: ft.start()] + f"from {ft.group(2)} to {ft.group(1)}" + text[ft.end() :]
    th = THAN.search(text)
    if th:
        return (
            text[: th.start()]
            + f"{th.group(3)} {th.group(2)} than {th.group(1)}"
            + text[th.end() :]
        )
    m = DIRECTIONAL.search(text)
    if not m:
        return None
    left = text[: m.start()].rstrip()
    right = text[m.end() :].lstrip()
    lw, rw = left.split(), right.split()
    if not lw or not rw:
        return None
    # take up to 2 trailing words of the left side and up to 2 leading words of the right
    k1 = min(len(lw), rng.choice([1, 2]))
    k2 = min(len(rw), rng.choice([1, 2]))
    a = " ".join(lw[-k1:])
    b_words = rw[:k2]
    tail = ""
    if b_words and b_words[-1][-1:] in "?.!,":
        tail = b_words[-1][-1]
        b_words[-1] = b_words[-1][:-1]
    b = " ".join(b_words)
    if not a or not b or a.lower() == b.lower():
        return None
    out = " ".join([*lw[:-k1], b, m.group(0), a + tail, *rw[k2:]])
    return out if out != text else None


def negate(text: str, rng: random.Random) -> str | None:
    """Flip the first auxiliary: 'can I' <-> "can't I", 'is' <-> "isn't"."""
    words = text.split()
    for i, w in enumerate(words):
        lw = w.lower()
        for pos, neg in AUX:
            if lw == pos:
                words[i] = _case_like(w, neg) if rng.random() < 0.6 else w + " not"
                return " ".join(words)
            if lw == neg:
                words[i] = _case_like(w, pos)
                return " ".join(words)
        if lw == "not" and i:
            return " ".join(words[:i] + words[i + 1 :])
    return None


def change_number(text: str, rng: random.Random) -> str | None:
    """Replace one number with a different one."""
    nums = list(re.finditer(r"\d+(?:\.\d+)?", text))
    if not nums:
        return None
    m = rng.choice(nums)
    old = m.group(0)
    if "." in old:
        new = f"{float(old) * rng.choice([2, 0.5, 10, 1.5]):g}"
    else:
        v = int(old)
        new = str(rng.choice([v + 1, max(v - 1, 0), v * 2, v + 10, v * 10, rng.randint(1, 100)]))
    if new == old:
        return None
    return text[: m.start()] + new + text[m.end() :]


def change_unit(text: str, rng: random.Random) -> str | None:
    """Replace a unit with another of the same dimension (or insert one: 'in Celsius')."""
    pairs = UNITS[:]
    rng.shuffle(pairs)
    for a, b in pairs:
        if _replace_word(text, a, b) and _replace_word(text, b, a):
            # both present ("Celsius in Fahrenheit"): swap them
            tmp = _replace_word(text, a, "\x00")
            tmp = _replace_word(tmp or text, b, a)
            return (tmp or text).replace("\x00", b)
        for x, y in ((a, b), (b, a)):
            out = _replace_word(text, x, y)
            if out:
                return out
    return None


def change_entity(text: str, rng: random.Random) -> str | None:
    """Replace a named entity with another of its kind."""
    kinds = list(ENTITIES.items())
    rng.shuffle(kinds)
    for _, names in kinds:
        present = [n for n in names if re.search(rf"\b{re.escape(n)}\b", text, re.I)]
        if present:
            a = rng.choice(present)
            b = rng.choice([n for n in names if n.lower() != a.lower()])
            return _replace_word(text, a, b)
    return None


def antonym(text: str, rng: random.Random) -> str | None:
    """Replace a word with its opposite (for/against, buy/sell...)."""
    pairs = ANTONYMS[:]
    rng.shuffle(pairs)
    for a, b in pairs:
        for x, y in ((a, b), (b, a)):
            out = _replace_word(text, x, y)
            if out:
                return out
    return None


def rewrite(text: str, rng: random.Random) -> str | None:
    """A surface rewrite that keeps the meaning."""
    choice = rng.randrange(6)
    t = text
    if choice == 0:
        t = text.lower().rstrip("?.! ")
    elif choice == 1:
        t = rng.choice(PREFIXES) + text[:1].lower() + text[1:]
    elif choice == 2:
        for a, b in (
            ("what is", "what's"),
            ("how do i", "how can i"),
            ("i am", "i'm"),
            ("do not", "don't"),
            ("can not", "cannot"),
            ("it is", "it's"),
        ):
            o = _replace_word(t, a, b) or _replace_word(t, b, a)
            if o:
                t = o
                break
    elif choice == 3:
        t = text.rstrip("?.! ") + ("?" if not text.endswith("?") else "")
    elif choice == 4:
        t = text.replace("?", " ?").upper() if len(text) < 60 else text.capitalize()
    else:
        t = text + " please" if not text.endswith("?") else text[:-1] + ", please?"
    return t if t != text else None


NEGATIVE_KINDS: Final = {
    "swap": swap,
    "negation": negate,
    "number": change_number,
    "unit": change_unit,
    "entity": change_entity,
    "antonym": antonym,
}


def synth_pairs(
    texts: list[str], rng: random.Random, per_kind: int, n_pos: int
) -> list[tuple[str, str, int, str]]:
    """Up to per_kind negatives of each kind and n_pos positives, from the given texts."""
    out: list[tuple[str, str, int, str]] = []
    order = texts[:]
    rng.shuffle(order)
    for kind, fn in NEGATIVE_KINDS.items():
        got = 0
        for t in order:
            if got >= per_kind:
                break
            new = fn(t, rng)
            if new and new.strip().lower() != t.strip().lower():
                out.append((t, new, 0, f"synth-{kind}"))
                got += 1
        rng.shuffle(order)
    got = 0
    for t in order:
        if got >= n_pos:
            break
        new = rewrite(t, rng)
        if new:
            out.append((t, new, 1, "synth-pos"))
            got += 1
    return out
