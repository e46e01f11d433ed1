"""Requests to vLLM and to the proxy, and the views in which their answers must be equal.

An answer is compared without what must differ between two generations (``id``, ``created``,
tool-call ids) and without null fields (a replay need not repeat vLLM's ``"token_ids": null``).
A stream is compared by merging its chunks into one answer (content, reasoning, tool calls,
finish reasons, usage, system_fingerprint): chunk boundaries depend on vLLM's timing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

#: differ between two generations, or are checked by their own tests (system_fingerprint)
VOLATILE = {"id", "created", "system_fingerprint"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any                    # the JSON body (non-stream, or an error)
    chunks: list[Any] | None     # decoded data: objects of a stream, [DONE] excluded
    done: bool = False           # the stream ended with [DONE]


async def post(base: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None,
               timeout: float = 60) -> Reply:
    async with aiohttp.ClientSession() as s, s.post(
            base + path, data=orjson.dumps(body), timeout=aiohttp.ClientTimeout(total=timeout),
            headers={"Content-Type": "application/json", **(headers or {})}) as r:
        hdrs = {k.lower(): v for k, v in r.headers.items()}
        if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
            raw = await r.read()
            return Reply(r.status, hdrs, orjson.loads(raw) if raw else None, None)
        chunks, done = [], False
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            chunks.append(orjson.loads(data))
        return Reply(r.status, hdrs, None, chunks, done)


def strip(obj: Any) -> Any:
    """Drop nulls and volatile fields, recursively; tool-call ids become a placeholder."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if v is None or k in VOLATILE:
                continue
            if k == "tool_calls" and isinstance(v, list):
                v = [{**tc, "id": "<id>"} if isinstance(tc, dict) and "id" in tc else tc
                     for tc in v]
            out[k] = strip(v)
        return out
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def merge(chunks: list[Any]) -> dict[str, Any]:
    """One answer from a stream's chunks (the shape of a non-streamed body, roughly)."""
    out: dict[str, Any] = {"choices": {}}
    for c in chunks:
        for k in ("model", "object", "usage", "error"):
            if c.get(k) is not None:
                out[k] = c[k]
        for ch in c.get("choices") or ():
            acc = out["choices"].setdefault(ch["index"], {"content": "", "reasoning": "",
                                                           "text": "", "tool_calls": {},
                                                           "logprobs": []})
            for k in ("finish_reason", "stop_reason"):
                if ch.get(k) is not None:
                    acc[k] = ch[k]
            lp = ch.get("logprobs")
            if lp:
                acc["logprobs"].extend(lp.get("content") or lp.get("tokens") or [])
            acc["text"] += ch.get("text") or ""
            delta = ch.get("delta") or {}
            if delta.get("role"):
                acc["role"] = delta["role"]
            acc["content"] += delta.get("content") or ""
            acc["reasoning"] += delta.get("reasoning") or delta.get("reasoning_content") or ""
            for tc in delta.get("tool_calls") or ():
                t = acc["tool_calls"].setdefault(tc.get("index", 0), {"name": "", "args": ""})
                fn = tc.get("function") or {}
                t["name"] += fn.get("name") or ""
                t["args"] += fn.get("arguments") or ""
                if tc.get("type"):
                    t["type"] = tc["type"]
    return out


def view(reply: Reply) -> Any:
    """What must be equal: the stripped body, or the merged stream."""
    if reply.chunks is not None:
        return strip(merge(reply.chunks))
    return strip(reply.body)


def error_message(body: Any) -> str:
    """The message of a vLLM or OpenAI-style error body."""
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        return str(inner.get("message", ""))
    return ""


def no_repr(text: str) -> bool:
    """True when a message carries no Python dict repr (``{'key': ...}``)."""
    return re.search(r"\{'[^']+': ", text) is None
