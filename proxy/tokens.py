"""Token counts when an upstream reports no usage (a vLLM without usage, a broken stream).

The count comes from the embedder's WordPiece tokenizer (proxy/data/tokenizer.json): not the served
model's own tokenizer, but within ~15 % of typical BPE counts for English, which is what a cost
estimate needs. Without the tokenizer file, 4 characters per token.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def _tokenizer() -> Any:
    try:
        from tokenizers import Tokenizer

        from proxy import data_path

        tok = Tokenizer.from_file(str(data_path("tokenizer.json")))
        tok.no_truncation()
        tok.no_padding()
        return tok
    except Exception as exc:
        log.info("token estimates by length (no tokenizer: %s)", exc)
        return None


def count_tokens(text: str) -> int:
    """Tokens in ``text`` (estimate; see the module docstring)."""
    if not text:
        return 0
    tok = _tokenizer()
    if tok is None:
        return max(1, len(text) // 4)
    return len(tok.encode(text, add_special_tokens=False).ids)


def prompt_text(endpoint: str, payload: dict[str, Any]) -> str:
    """All text of a request's prompt (chat messages or completion prompt)."""
    if endpoint == "chat":
        parts = []
        for m in payload.get("messages") or ():
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p.get("text", "") for p in c if isinstance(p, dict))
        return "\n".join(parts)
    p = payload.get("prompt")
    return p if isinstance(p, str) else " ".join(x for x in p or () if isinstance(x, str))


def completion_text(endpoint: str, body: dict[str, Any]) -> str:
    """All generated text of a response body."""
    out = []
    for ch in body.get("choices") or ():
        if endpoint == "chat":
            out.append(((ch.get("message") or {}).get("content")) or "")
        else:
            out.append(ch.get("text") or "")
    return "".join(out)
