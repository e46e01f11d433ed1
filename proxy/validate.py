"""Validation of OpenAI request bodies: a clear 400 naming the bad parameter, before any work.

Hand-written checks rather than a schema library: they run on every request, including cache
hits, and cost a few microseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from proxy.config import ServerConfig
from proxy.errors import ProxyError, bad_request, payload_too_large
from proxy.keys import CHAT

_NUM: Final = (int, float)
#: Deepest accepted nesting of arrays/objects in a body. orjson, which re-encodes the body for
#: the upstream, stops at 255 levels; real requests (JSON schemas in tools, response_format)
#: stay far below this.
MAX_DEPTH: Final = 128


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or 400."""
    if not raw:
        raise bad_request("Request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object.", code="invalid_json")
    # a body with fewer brackets than MAX_DEPTH cannot nest deeper (brackets inside strings
    # only make the count larger): the walk is for the rare body with many
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:
        _check_depth(body)
    return body


def _check_depth(body: dict[str, Any]) -> None:
    """400 for a body nested deeper than MAX_DEPTH (iterative: no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"Request body is nested deeper than {MAX_DEPTH} levels.",
                              code="invalid_json")
        children = obj.values() if isinstance(obj, dict) else obj
        for v in children:
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1))


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, _NUM):
        raise bad_request(f"'{name}' must be a number, got {type(v).__name__}.", name,
                          "invalid_type")
    if not lo <= v <= hi:
        raise bad_request(f"'{name}' must be between {lo} and {hi}, got {v}.", name)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> None:
    v = body.get(name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"'{name}' must be an integer, got {type(v).__name__}.", name,
                          "invalid_type")
    if not lo <= v <= hi:
        raise bad_request(f"'{name}' must be between {lo} and {hi}, got {v}.", name)


def _content_chars(content: Any, i: int) -> int:
    if content is None or isinstance(content, str):
        return len(content or "")
    if isinstance(content, list):
        n = 0
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_request(f"'messages[{i}].content[{j}]' must be an object with a "
                                  "'type'.", f"messages[{i}].content", "invalid_type")
            text = part.get("text")
            if part["type"] == "text" and not isinstance(text, str):
                raise bad_request(f"'messages[{i}].content[{j}].text' must be a string.",
                                  f"messages[{i}].content", "invalid_type")
            if isinstance(text, str):
                n += len(text)
        return n
    raise bad_request(f"'messages[{i}].content' must be a string, an array of parts or null.",
                      f"messages[{i}].content", "invalid_type")


def validate(body: dict[str, Any], endpoint: str, cfg: ServerConfig) -> None:
    """Raise ProxyError (400) for a body vLLM would reject or this proxy must not accept."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string.", "model",
                          "missing_required_parameter" if model is None else "invalid_type")
    chars = _chat_chars(body, cfg) if endpoint == CHAT else _prompt_chars(body)
    if chars > cfg.max_prompt_chars:
        raise bad_request(f"The prompt has {chars} characters; the limit is "
                          f"{cfg.max_prompt_chars}.", "messages" if endpoint == CHAT else "prompt",
                          "prompt_too_long")
    _check_stream(body)
    # What the proxy itself reads or limits; the ranges of sampling parameters, n, stop, roles
    # and the rest are vLLM's to judge, so its own error reaches the client.
    _integer(body, "max_tokens", 1, cfg.max_tokens_limit)  # cache hits compare against it
    _integer(body, "max_completion_tokens", 1, cfg.max_tokens_limit)
    _integer(body, "n", -(2**63), 2**63 - 1)
    _integer(body, "seed", -(2**63), 2**64 - 1)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _number(body, name, float("-inf"), float("inf"))
    _check_shapes(body)


def _chat_chars(body: dict[str, Any], cfg: ServerConfig) -> int:
    """Check ``messages``; returns the characters of their text."""
    msgs = body.get("messages")
    if msgs is None:
        raise bad_request("'messages' is required.", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("'messages' must be a non-empty array.", "messages", "invalid_type")
    if len(msgs) > cfg.max_messages:
        raise bad_request(f"'messages' has {len(msgs)} items; the limit is "
                          f"{cfg.max_messages}.", "messages", "too_many_messages")
    chars = 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"'messages[{i}]' must be an object.", f"messages[{i}]",
                              "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or not role:  # which roles exist is vLLM's call
            raise bad_request(f"'messages[{i}].role' must be a non-empty string, got "
                              f"{role!r:.80}.", f"messages[{i}].role")
        if "content" not in m and role != "assistant":
            raise bad_request(f"'messages[{i}].content' is required.",
                              f"messages[{i}].content", "missing_required_parameter")
        chars += _content_chars(m.get("content"), i)
    return chars


def _prompt_chars(body: dict[str, Any]) -> int:
    """Check ``prompt`` (completions); returns its characters (or token ids)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required.", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return sum(len(p) for p in prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return len(prompt)
    raise bad_request("'prompt' must be a string, an array of strings or of token ids.",
                      "prompt", "invalid_type")


def _check_stream(body: dict[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", "stream", "invalid_type")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or
                           not isinstance(so.get("include_usage", False), bool)):
        raise bad_request("'stream_options' must be an object like {\"include_usage\": true}.",
                          "stream_options", "invalid_type")


def _check_shapes(body: dict[str, Any]) -> None:
    """``tools``, ``response_format``, ``logit_bias``: the right JSON types (``stop`` is
    vLLM's to judge)."""
    for name in ("tools", "response_format", "logit_bias"):
        v = body.get(name)
        if v is not None and not isinstance(v, list if name == "tools" else dict):
            raise bad_request(f"'{name}' has the wrong type.", name, "invalid_type")


#: Request headers whose values reach cache keys, metric labels, logs or response headers, and
#: the longest value accepted for each (characters).
EDGE_HEADERS: Final = (("x-cache-namespace", 128), ("x-request-id", 128))


def header_ok(value: str, limit: int) -> bool:
    """A header value fit to become part of a key, a label or a log line: at most ``limit``
    characters, all printable. aiohttp decodes header bytes as UTF-8 with surrogateescape, so a
    non-UTF-8 byte arrives as a lone surrogate, which is not printable; control characters are
    not either."""
    return len(value) <= limit and value.isprintable()


def check_headers(headers: Mapping[str, str]) -> None:
    """400 naming the header whose value is not UTF-8, has control characters or is too long."""
    for name, limit in EDGE_HEADERS:
        value = headers.get(name)
        if value is not None and not header_ok(value, limit):
            raise bad_request(f"Header '{name}' must be printable UTF-8 of at most {limit} "
                              "characters.", name, "invalid_header")


def check_content_type(value: str | None) -> None:
    """415 unless the body is declared JSON. A missing Content-Type is refused too: a web page
    can POST cross-site without a CORS preflight only as text/plain, a form or with no type
    at all (a Blob or ArrayBuffer body), never as application/json, so requiring it keeps any
    page a browser opens from spending tokens through a proxy on localhost."""
    media = (value or "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise ProxyError(415, f"Content-Type must be application/json, got {value!r:.60}.",
                         param="Content-Type", code="unsupported_media_type")


def body_timeout(seconds: float) -> ProxyError:
    """408: the body did not arrive in time (a slow-body client); the connection is closed."""
    return ProxyError(408, f"Request body not received within {seconds} s.",
                      code="request_timeout", headers={"Connection": "close"})


def check_content_length(length: int | None, limit: int) -> None:
    """413 before reading a body that announces itself too large."""
    if length is not None and length > limit:
        raise payload_too_large(limit)


async def read_json_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The raw body of a JSON POST: declared JSON (415), at most ``limit`` bytes (413, also for
    a chunked body that has no Content-Length), arrived within ``timeout_s`` (408)."""
    check_content_type(request.headers.get("Content-Type"))
    check_content_length(request.content_length, limit)
    try:
        if request.content.is_eof():  # all of it arrived with the head: nothing to wait for
            raw = await request.read()
        else:
            async with asyncio.timeout(timeout_s):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise payload_too_large(limit) from None
    except TimeoutError:
        raise body_timeout(timeout_s) from None
    if len(raw) > limit:
        raise payload_too_large(limit)
    return raw


__all__ = ["ProxyError", "body_timeout", "check_content_length", "check_content_type",
           "check_headers", "header_ok", "parse_json", "read_json_body", "validate"]
