"""A complete answer as the cache keeps it, and the two ways it is served (JSON or SSE replay).

The cache stores the exact JSON body a non-streaming request would get (bytes, served as they
are) and builds the SSE replay once per entry, lazily, so a hit costs no re-encoding.
Answers to streamed requests are assembled from the upstream's chunks by ``StreamAssembler``.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Final

import orjson

from proxy.keys import CHAT

_MAGIC: Final = b"EPA1\n"
_DONE: Final = b"data: [DONE]\n\n"


class CachedAnswer:
    """One complete, successful upstream answer."""

    __slots__ = ("_sse", "_sse_usage", "_tokens", "body", "completion_tokens", "created",
                 "endpoint", "prompt_tokens", "tier")

    def __init__(self, endpoint: str, body: bytes, tier: str, prompt_tokens: int,
                 completion_tokens: int, created: float | None = None) -> None:
        self.endpoint = endpoint
        self.body = body
        self.tier = tier
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.created = time.time() if created is None else created
        self._sse: bytes | None = None
        self._sse_usage: bytes | None = None
        # per replay form (0 JSON, 1 SSE, 2 SSE with usage): where its id and created are
        self._tokens: list[_Tokens | None] | None = None

    @property
    def size(self) -> int:
        """Bytes this entry holds (body and built SSE replays), for the L1 byte bound."""
        # body + both SSE variants once built + where their ids are (``replay``), once found
        return 600 + len(self.body) * 3

    def fits(self, max_tokens: int | None) -> bool:
        """True if this answer is what a request with ``max_tokens`` would also get."""
        return max_tokens is None or self.completion_tokens <= max_tokens

    def sse(self, include_usage: bool) -> bytes:
        """The whole answer as an SSE stream the openai SDK parses like a live one."""
        if include_usage:
            if self._sse_usage is None:
                self._sse_usage = _build_sse(self.endpoint, orjson.loads(self.body), True)
            return self._sse_usage
        if self._sse is None:
            self._sse = _build_sse(self.endpoint, orjson.loads(self.body), False)
        return self._sse

    def replay(self, stream: bool, include_usage: bool = False) -> bytes:
        """The bytes a hit is served: the body or its SSE form with its own ``id`` and
        ``created`` (now), as a new generation would have: two responses never share an id, and
        a day-old entry does not say it was made a day ago. The first id/created of the body
        (or of every SSE frame) is rewritten, the rest kept; where they are is found once per
        form, so a hit pays two replaces, not two searches."""
        form = 0 if not stream else (2 if include_usage else 1)
        data = self.sse(include_usage) if stream else self.body
        found = self._tokens
        if found is None:
            found = self._tokens = [None, None, None]
        tokens = found[form]
        if tokens is None:
            tokens = found[form] = _find_tokens(data)
        return _fresh(data, tokens)

    def dumps(self) -> bytes:
        """Serialized form for Redis: a magic line, a JSON header line, the body bytes."""
        header = orjson.dumps({"e": self.endpoint, "t": self.tier, "p": self.prompt_tokens,
                               "c": self.completion_tokens, "ts": self.created})
        return b"".join((_MAGIC, header, b"\n", self.body))

    @classmethod
    def loads(cls, raw: bytes) -> CachedAnswer | None:
        """Parse ``dumps`` output; None for anything else (an old format, a foreign key)."""
        if not raw.startswith(_MAGIC):
            return None
        nl = raw.find(b"\n", len(_MAGIC))
        if nl < 0:
            return None
        try:
            h = orjson.loads(raw[len(_MAGIC):nl])
            return cls(h["e"], raw[nl + 1:], h["t"], int(h["p"]), int(h["c"]), float(h["ts"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


_ID_RE: Final = re.compile(rb'"id":"((?:chatcmpl-|cmpl-)?)([^"\\]*)"')
_CREATED_RE: Final = re.compile(rb'"created":(\d+)')


#: (the id token, its prefix "chatcmpl-"/"cmpl-"), the created token; None where absent
_Tokens = tuple[tuple[bytes, bytes] | None, bytes | None]


def _find_tokens(data: bytes) -> _Tokens:
    head = data[:512]
    m = _ID_RE.search(head)
    c = _CREATED_RE.search(head)
    return (None if m is None else (m.group(0), m.group(1)),
            None if c is None else c.group(0))


def _fresh(data: bytes, tokens: _Tokens) -> bytes:
    id_tok, created_tok = tokens
    if id_tok is not None:
        data = data.replace(id_tok[0], b'"id":"' + id_tok[1] + os.urandom(8).hex().encode()
                            + b'"')
    if created_tok is not None:
        data = data.replace(created_tok, b'"created":%d' % int(time.time()))
    return data


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _build_sse(endpoint: str, body: dict[str, Any], include_usage: bool) -> bytes:
    head = {"id": body.get("id", ""), "created": body.get("created", 0),
            "model": body.get("model", "")}
    if body.get("system_fingerprint"):  # vLLM's, on every replayed chunk
        head["system_fingerprint"] = body["system_fingerprint"]
    frames: list[bytes] = []
    if endpoint == CHAT:
        obj = "chat.completion.chunk"
        for ch in body["choices"]:
            i = ch.get("index", 0)
            msg = ch.get("message") or {}

            def chunk(delta: dict[str, Any], finish: str | None, i: int = i) -> dict[str, Any]:
                return {**head, "object": obj, "choices": [
                    {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            frames.append(_frame(chunk({"role": msg.get("role", "assistant"), "content": ""},
                                       None)))
            for name in REASONING_FIELDS:  # under the name the upstream used (vLLM renamed it)
                if msg.get(name):
                    frames.append(_frame(chunk({name: msg[name]}, None)))
            if msg.get("content"):
                frames.append(_frame(chunk({"content": msg["content"]}, None)))
            for j, call in enumerate(msg.get("tool_calls") or ()):
                # one delta per call, whole: what a client accumulating deltas rebuilds
                frames.append(_frame(chunk({"tool_calls": [{"index": j, **call}]}, None)))
            frames.append(_frame(chunk({}, ch.get("finish_reason", "stop"))))
    else:
        obj = "text_completion"
        for ch in body["choices"]:
            i = ch.get("index", 0)
            frames.append(_frame({**head, "object": obj, "choices": [
                {"index": i, "text": ch.get("text", ""), "logprobs": None,
                 "finish_reason": None}]}))
            frames.append(_frame({**head, "object": obj, "choices": [
                {"index": i, "text": "", "logprobs": None,
                 "finish_reason": ch.get("finish_reason", "stop")}]}))
    if include_usage and body.get("usage"):
        frames.append(_frame({**head, "object": obj, "choices": [], "usage": body["usage"]}))
    frames.append(_DONE)
    return b"".join(frames)


def usage_of(body: dict[str, Any]) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a response body; (0, 0) when absent."""
    u = body.get("usage")
    if not isinstance(u, dict):
        return 0, 0  # absent, or of the wrong type: the caller counts with the tokenizer
    return _count(u.get("prompt_tokens")), _count(u.get("completion_tokens"))


def _count(x: Any) -> int:
    """A token count from an upstream's usage; 0 for anything but a non-negative integer."""
    return x if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 40 else 0


#: Reasoning text fields of a message or delta: vLLM < 0.32 ``reasoning_content``, >= 0.32
#: ``reasoning``. Both are stored and replayed under the name the upstream sent.
REASONING_FIELDS: Final = ("reasoning_content", "reasoning")
#: finish_reason values of a complete answer. vLLM answers a named tool_choice with its tool
#: calls and "stop", an automatic or required one with "tool_calls": both are whole answers.
COMPLETE: Final = frozenset({"stop", "tool_calls"})


def is_complete(body: dict[str, Any]) -> bool:
    """True when every choice finished (``stop``, or ``tool_calls``) without logprobs: the only
    answers worth storing. Tool calls and reasoning are stored with the answer and replayed
    faithfully (JSON as received; SSE with reasoning and tool-call deltas)."""
    choices = body.get("choices")
    if not choices:
        return False
    return all(
        isinstance(c, dict) and c.get("finish_reason") in COMPLETE and c.get("logprobs") is None
        and not (c.get("message") or {}).get("function_call")
        for c in choices)


class StreamAssembler:
    """Rebuilds the non-streaming response body from a stream of SSE chunk objects.

    ``cacheable`` turns False at the first sign that the stream is not a plain, complete answer
    (tool calls, logprobs, an error event, an unexpected shape).
    """

    __slots__ = ("cacheable", "choices", "endpoint", "head", "null_content", "usage")

    def __init__(self, endpoint: str, tool_choice: Any = None) -> None:
        self.endpoint = endpoint
        # vLLM's JSON answer with tool calls and no text has content null when the model chose
        # to call (tool_choice auto or unset), "" when it was made to (required or named)
        self.null_content = tool_choice is None or tool_choice == "auto"
        self.head: dict[str, Any] | None = None
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.cacheable = True

    def feed(self, chunk: Any) -> None:
        """Take one decoded ``data:`` object."""
        if not isinstance(chunk, dict) or "error" in chunk:
            self.cacheable = False
            return
        if self.head is None:
            self.head = {"id": chunk.get("id", ""), "created": chunk.get("created", 0),
                         "model": chunk.get("model", "")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("system_fingerprint"):
            self.head["system_fingerprint"] = chunk["system_fingerprint"]
        for ch in chunk.get("choices") or ():
            try:
                self._choice(ch)
            except (AttributeError, TypeError):
                self.cacheable = False

    def _choice(self, ch: Any) -> None:
        """Merge one choice of a chunk into its accumulator (raises on a malformed shape)."""
        i = ch.get("index", 0)
        acc = self.choices.get(i)
        if acc is None:
            acc = self.choices[i] = {"parts": [], "role": "assistant", "tools": {},
                                     "finish_reason": None,
                                     **{name: [] for name in REASONING_FIELDS}}
        if ch.get("logprobs") is not None:
            self.cacheable = False
        if self.endpoint == CHAT:
            self._chat_delta(acc, ch.get("delta") or {})
        else:
            if ch.get("text"):
                acc["parts"].append(ch["text"])
        if ch.get("finish_reason"):
            acc["finish_reason"] = ch["finish_reason"]

    def _chat_delta(self, acc: dict[str, Any], delta: Any) -> None:
        """Merge one chat delta: role, content, reasoning and tool-call pieces."""
        if delta.get("function_call"):  # the legacy form: not stored
            self.cacheable = False
        for call in delta.get("tool_calls") or ():
            self._tool_delta(acc["tools"], call)
        if delta.get("role"):
            acc["role"] = delta["role"]
        if delta.get("content"):
            acc["parts"].append(delta["content"])
        for name in REASONING_FIELDS:
            if delta.get(name):
                acc[name].append(delta[name])

    def _tool_delta(self, tools: dict[int, dict[str, Any]], call: Any) -> None:
        """Merge one tool-call delta: id, type and name arrive once, arguments in pieces."""
        if not isinstance(call, dict) or not isinstance(call.get("index", 0), int):
            self.cacheable = False
            return
        acc = tools.setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                      "name": "", "arguments": []})
        if isinstance(call.get("id"), str):
            acc["id"] = call["id"]
        if isinstance(call.get("type"), str):
            acc["type"] = call["type"]
        fn = call.get("function") or {}
        if not isinstance(fn, dict):
            self.cacheable = False
            return
        if isinstance(fn.get("name"), str):
            acc["name"] += fn["name"]
        if isinstance(fn.get("arguments"), str):
            acc["arguments"].append(fn["arguments"])

    def body(self) -> dict[str, Any]:
        """The assembled non-streaming response body."""
        head = self.head or {"id": "", "created": 0, "model": ""}
        choices = []
        for i in sorted(self.choices):
            acc = self.choices[i]
            text = "".join(acc["parts"])
            if self.endpoint == CHAT:
                msg: dict[str, Any] = {"role": acc["role"], "content": text}
                for name in REASONING_FIELDS:
                    if acc[name]:
                        msg[name] = "".join(acc[name])
                if acc["tools"]:
                    if not text and self.null_content:
                        msg["content"] = None
                    msg["tool_calls"] = [
                        {"id": t["id"], "type": t["type"],
                         "function": {"name": t["name"], "arguments": "".join(t["arguments"])}}
                        for _, t in sorted(acc["tools"].items())]
                choices.append({"index": i, "message": msg, "logprobs": None,
                                "finish_reason": acc["finish_reason"]})
            else:
                choices.append({"index": i, "text": text, "logprobs": None,
                                "finish_reason": acc["finish_reason"]})
        obj = "chat.completion" if self.endpoint == CHAT else "text_completion"
        return {**head, "object": obj, "choices": choices, "usage": self.usage}
