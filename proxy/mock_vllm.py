"""A stand-in for vLLM's OpenAI server (vLLM needs a GPU): same JSON and SSE shapes, usage,
/v1/models, /health, vLLM-style error bodies, latency per token, deterministic replies, a request
counter (GET /stats) and fault injection (POST /faults) for tests, demos and benchmarks.

Replies are deterministic: the same request gets the same text, derived from a hash of its
messages/prompt and the model name. A reply has ``reply_tokens`` tokens (default 24; the mock's
tokens are words), ends with finish_reason ``stop``, or ``length`` when max_tokens cuts it.

Faults (POST /faults with a JSON object; each applies to the next ``count`` requests, -1 = all,
until reset with ``{}``):
  status:      answer with this HTTP status and a vLLM error body
  delay_ms:    sleep before the response headers
  cut_after:   streamed: close the connection after N content chunks (no [DONE])
  malformed:   streamed: send a non-JSON ``data:`` line after the first chunk
  error_event: streamed: after the first chunk, an error event with this message, then [DONE]
  tpot_ms:     time per output token for the faulty requests
  content_type: serve JSON with this content-type instead
  no_usage:    send no usage (JSON without "usage", streams without the usage chunk)
  usage:       send this object as "usage" instead of the real counts (wrong types...)
  redirect:    answer 307 with this Location
  ok_error:    answer HTTP 200 with a vLLM error body carrying this message
  long_line:   streamed: send one SSE line of this many bytes after the first chunk
  health:      GET /health answers with this status (until reset; not counted)
  reasoning:   "reasoning" (vLLM >= 0.32) or "reasoning_content" (older): add reasoning text under
               that field name, in the message and in deltas

Tool calls, as vLLM 0.32 answers them: a request with ``tools`` and a *named* ``tool_choice``
({"type": "function", "function": {"name": N}}) gets one call of N with ``finish_reason: "stop"``;
``tool_choice: "required"`` (or an explicit "auto") gets one call of the first tool with
``finish_reason: "tool_calls"``; the JSON message's content is "" beside a required or named
call, null beside a chosen (auto) one, as vLLM 0.32 answers.
Streamed, the call arrives as deltas: id, type and name first, then the arguments in pieces.

With ``api_key`` set (``--api-key``), /v1/* needs ``Authorization: Bearer <key>`` and answers
401 ``{"error": "Unauthorized"}`` otherwise, as ``vllm serve --api-key`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
import uuid
from typing import Any

import numpy as np
import orjson
from aiohttp import web

_WORDS = ("the", "answer", "is", "clear", "model", "token", "cache", "vector", "tier", "proxy",
          "stream", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "edge", "fast",
          "light", "cost", "query", "reply", "data", "value", "result", "simple", "more", "less")


def _err(status: int, message: str, etype: str = "BadRequestError") -> web.Response:
    # vLLM's ErrorResponse shape
    return web.json_response({"object": "error", "message": message, "type": etype, "param": None,
                              "code": status}, status=status, dumps=lambda o: orjson.dumps(o)
                             .decode())


def _count_tokens(obj: Any) -> int:
    if isinstance(obj, str):
        return max(1, len(obj.split()))
    if isinstance(obj, list):
        return sum(_count_tokens(m.get("content", "") if isinstance(m, dict) else m) for m in obj)
    return 1


class MockVLLM:
    """State and handlers of one mock tier."""

    def __init__(self, model: str = "mock-model", *, ttft_ms: float = 20.0, tpot_ms: float = 2.0,
                 reply_tokens: int = 24, chunk_tokens: int = 1, api_key: str = "") -> None:
        self.model = model
        self.root = model  # the checkpoint /v1/models reports (tests swap it)
        self.api_key = api_key
        self.unauthorized = 0
        self.ttft_ms = ttft_ms
        self.tpot_ms = tpot_ms
        self.reply_tokens = reply_tokens
        self.chunk_tokens = chunk_tokens
        self.requests = 0
        self.by_endpoint: dict[str, int] = {}
        self.in_flight = 0
        self.cancelled = 0
        self.completed = 0
        self.faults: dict[str, Any] = {}
        self.fault_left = 0
        self.last_body: dict[str, Any] | None = None

    # -- app --------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._auth])
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/stats/reset", self.reset)
        app.router.add_post("/faults", self.set_faults)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if (self.api_key and request.path.startswith("/v1/")
                and request.headers.get("Authorization") != f"Bearer {self.api_key}"):
            self.unauthorized += 1
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": 0, "owned_by": "vllm",
            "root": self.root, "parent": None, "max_model_len": 8192}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=int(self.faults.get("health", 200)))

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "by_endpoint": self.by_endpoint,
                                  "in_flight": self.in_flight, "cancelled": self.cancelled,
                                  "completed": self.completed, "model": self.model,
                                  "unauthorized": self.unauthorized})

    async def reset(self, request: web.Request) -> web.Response:
        self.requests = self.cancelled = self.completed = 0
        self.by_endpoint = {}
        self.faults, self.fault_left = {}, 0
        return web.json_response({"ok": True})

    async def set_faults(self, request: web.Request) -> web.Response:
        faults = await request.json()
        self.faults = dict(faults)
        self.fault_left = int(self.faults.pop("count", -1)) if faults else 0
        return web.json_response({"faults": self.faults, "count": self.fault_left})

    def _take_fault(self) -> dict[str, Any]:
        if not self.faults or self.fault_left == 0:
            return {}
        if self.fault_left > 0:
            self.fault_left -= 1
        return self.faults

    # -- generation -------------------------------------------------------------------------
    def reply_words(self, seed_obj: Any) -> list[str]:
        """Deterministic reply for a request: same messages -> same words."""
        seed = hashlib.blake2b(orjson.dumps([self.model, seed_obj],
                                            option=orjson.OPT_SORT_KEYS)).digest()
        words = [f"[{self.model}]"]
        for i in range(self.reply_tokens - 1):
            words.append(_WORDS[(seed[i % len(seed)] + i * 7) % len(_WORDS)])
        return words

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """vLLM's /v1/embeddings: a deterministic unit vector per input (``dimensions``,
        default 384). The answer is written in 16 KiB pieces, as a large one arrives from a
        real server: a relay must read to its end, not take what came first."""
        body = await request.json()
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        dims = int(body.get("dimensions") or 384)
        data = []
        for i, t in enumerate(texts):
            rng = np.random.default_rng(int.from_bytes(
                hashlib.blake2b(str(t).encode(), digest_size=8).digest(), "little"))
            v = rng.standard_normal(dims)
            data.append({"object": "embedding", "index": i,
                         "embedding": (v / np.linalg.norm(v)).round(6).tolist()})
        raw = orjson.dumps({"object": "list", "model": self.model, "data": data,
                            "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(raw)
        await resp.prepare(request)
        for i in range(0, len(raw), 16384):
            await resp.write(raw[i:i + 16384])
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions")

    async def _handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        self.requests += 1
        self.by_endpoint[endpoint] = self.by_endpoint.get(endpoint, 0) + 1
        self.in_flight += 1
        try:
            return await self._respond(request, endpoint)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def _respond(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        fault = self._take_fault()
        if fault.get("delay_ms"):
            await asyncio.sleep(fault["delay_ms"] / 1000)
        early = _fault_response(fault)
        if early is not None:
            return early
        parsed = await self._parse(request, endpoint)
        if isinstance(parsed, web.Response):
            return parsed
        body, seed_obj = parsed
        words, finish, tool = _shape(
            endpoint, body, self.reply_words([seed_obj, body.get("temperature"), body.get("seed")]))
        prompt_tokens = _count_tokens(seed_obj)
        usage = fault.get("usage") or {
            "prompt_tokens": prompt_tokens, "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words)}
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        tpot = float(fault.get("tpot_ms", self.tpot_ms)) / 1000
        await asyncio.sleep(self.ttft_ms / 1000)
        if not body.get("stream"):
            await asyncio.sleep(tpot * len(words))
            self.completed += 1
            return self._json_answer(endpoint, body, words, finish, tool, usage, rid, created,
                                     fault)
        return await self._stream(request, endpoint, body, words, finish, usage, rid, created,
                                  tpot, fault)

    async def _parse(self, request: web.Request, endpoint: str
                     ) -> tuple[dict[str, Any], Any] | web.Response:
        """The request body and what its answer is seeded from, or the error vLLM answers."""
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _err(400, "Invalid JSON body")
        if not isinstance(body, dict):
            return _err(400, "Body must be a JSON object")
        self.last_body = body
        if body.get("model") != self.model:
            return _err(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        if endpoint == "chat":
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                return _err(400, "messages: field required")
            return body, body["messages"]
        if "prompt" not in body:
            return _err(400, "prompt: field required")
        return body, body["prompt"]

    def _json_answer(self, endpoint: str, body: dict[str, Any], words: list[str], finish: str,
                     tool: str | None, usage: dict[str, int], rid: str, created: int,
                     fault: dict[str, Any]) -> web.Response:
        """The whole (non-streamed) answer."""
        text = " ".join(words)
        if endpoint == "chat":
            choice = {"index": 0, "message": _message(body, words, text, tool, fault),
                      "logprobs": None, "finish_reason": finish, "stop_reason": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                      "stop_reason": None}
            obj = "text_completion"
        return web.Response(body=orjson.dumps({
            "id": rid, "object": obj, "created": created, "model": self.model,
            "choices": [choice], **({} if fault.get("no_usage") else {"usage": usage})}),
            content_type=fault.get("content_type", "application/json"))

    async def _stream(self, request: web.Request, endpoint: str, body: dict[str, Any],
                      words: list[str], finish: str, usage: dict[str, int], rid: str,
                      created: int, tpot: float, fault: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            return await self._stream_body(request, resp, endpoint, body, words, finish, usage,
                                           rid, created, tpot, fault)
        except ConnectionResetError:  # the client left: counted, not logged as an error
            self.cancelled += 1
            return resp

    async def _stream_body(self, request: web.Request, resp: web.StreamResponse, endpoint: str,
                           body: dict[str, Any], words: list[str], finish: str,
                           usage: dict[str, int], rid: str, created: int, tpot: float,
                           fault: dict[str, Any]) -> web.StreamResponse:
        frame = _Frames(rid, created, self.model, endpoint)
        if endpoint == "chat":
            await _stream_chat_head(resp, frame, words, fault)
            tool, _ = _tool_call(body)
            if tool is not None:
                await _stream_tool_call(resp, frame, body, words, finish, usage, tool)
                self.completed += 1
                await resp.write_eof()
                return resp
        if not await self._stream_words(request, resp, frame, endpoint, words, finish, tpot,
                                        fault):
            return resp
        opts = body.get("stream_options") or {}
        if opts.get("include_usage") and not fault.get("no_usage"):
            await resp.write(frame(None, {"usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        self.completed += 1
        await resp.write_eof()
        return resp

    async def _stream_words(self, request: web.Request, resp: web.StreamResponse,
                            frame: _Frames, endpoint: str, words: list[str], finish: str,
                            tpot: float, fault: dict[str, Any]) -> bool:
        """The answer's text, ``chunk_tokens`` words a frame; False if a fault ended the stream
        here."""
        cut_after = fault.get("cut_after")
        step = max(1, self.chunk_tokens)
        for n, i in enumerate(range(0, len(words), step)):
            if cut_after is not None and n >= int(cut_after):
                # drop the connection mid-stream, as a crashed upstream would
                if request.transport is not None:
                    request.transport.close()
                return False
            if n == 1 and not await _inject(resp, fault):
                return False
            if tpot:
                await asyncio.sleep(tpot * step)
            piece = (" " if i else "") + " ".join(words[i:i + step])
            last = i + step >= len(words)
            text = {"delta": {"content": piece}} if endpoint == "chat" else {"text": piece}
            choice = {"index": 0, **text, "logprobs": None,
                      "finish_reason": finish if last else None}
            if last:
                choice["stop_reason"] = None
            await resp.write(frame(choice))
        return True


class _Frames:
    """The SSE frames of one streamed answer: ``frame(choice, extra)``."""

    def __init__(self, rid: str, created: int, model: str, endpoint: str) -> None:
        self.head = {"id": rid, "created": created, "model": model}
        self.obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"

    def __call__(self, choice: dict[str, Any] | None,
                 extra: dict[str, Any] | None = None) -> bytes:
        o = {**self.head, "object": self.obj, "choices": [choice] if choice else []}
        if extra:
            o.update(extra)
        return b"data: " + orjson.dumps(o) + b"\n\n"


def _fault_response(fault: dict[str, Any]) -> web.Response | None:
    """The answer an injected fault replaces the real one with, if any."""
    if fault.get("status"):
        return _err(int(fault["status"]), f"injected fault {fault['status']}",
                    "InternalServerError" if fault["status"] >= 500 else "BadRequestError")
    if fault.get("redirect"):
        return web.Response(status=307, headers={"Location": fault["redirect"]})
    if fault.get("ok_error"):
        return web.Response(body=orjson.dumps({"object": "error", "message": fault["ok_error"],
                                               "type": "BadRequestError", "param": None,
                                               "code": 400}),
                            content_type="application/json")
    return None


def _shape(endpoint: str, body: dict[str, Any], words: list[str]
           ) -> tuple[list[str], str, str | None]:
    """(words, finish_reason, tool) of the answer: cut at the token limit, or a tool call."""
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    finish = "stop"
    if isinstance(max_tokens, int) and max_tokens < len(words):
        words, finish = words[:max_tokens], "length"
    tool, tool_finish = _tool_call(body) if endpoint == "chat" else (None, None)
    if tool is not None and finish == "stop":
        finish = tool_finish or finish
    return words, finish, tool


def _message(body: dict[str, Any], words: list[str], text: str, tool: str | None,
             fault: dict[str, Any]) -> dict[str, Any]:
    """The assistant message of a whole chat answer."""
    msg: dict[str, Any] = {"role": "assistant", "content": text, "tool_calls": []}
    if tool is not None:
        # vLLM 0.32: "" beside calls it was made to do, null beside chosen ones
        msg["content"] = "" if body.get("tool_choice") not in (None, "auto") else None
        msg["tool_calls"] = [{"id": _tool_id(words), "type": "function",
                              "function": {"name": tool, "arguments": _arguments(words)}}]
    if fault.get("reasoning"):
        msg[fault["reasoning"]] = _reasoning(words)
    return msg


async def _stream_chat_head(resp: web.StreamResponse, frame: _Frames, words: list[str],
                            fault: dict[str, Any]) -> None:
    """A streamed chat answer's role frame, then its reasoning (if the fault asks for it)."""
    await resp.write(frame({"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}))
    if fault.get("reasoning"):
        thought = _reasoning(words)
        for k in range(0, len(thought), 8):
            await resp.write(frame({"index": 0, "delta": {
                fault["reasoning"]: thought[k:k + 8]}, "logprobs": None,
                "finish_reason": None}))


async def _stream_tool_call(resp: web.StreamResponse, frame: _Frames, body: dict[str, Any],
                            words: list[str], finish: str, usage: dict[str, int],
                            tool: str) -> None:
    """A streamed tool call, its arguments in pieces, up to [DONE]."""
    args = _arguments(words)
    await resp.write(frame({"index": 0, "delta": {"tool_calls": [{
        "index": 0, "id": _tool_id(words), "type": "function",
        "function": {"name": tool, "arguments": ""}}]}, "logprobs": None,
        "finish_reason": None}))
    for k in range(0, len(args), 10):
        await resp.write(frame({"index": 0, "delta": {"tool_calls": [{
            "index": 0, "function": {"arguments": args[k:k + 10]}}]},
            "logprobs": None, "finish_reason": None}))
    await resp.write(frame({"index": 0, "delta": {}, "logprobs": None,
                            "finish_reason": finish, "stop_reason": None}))
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(frame(None, {"usage": usage}))
    await resp.write(b"data: [DONE]\n\n")


async def _inject(resp: web.StreamResponse, fault: dict[str, Any]) -> bool:
    """The faults injected after the first text frame; False if the stream ends here."""
    if fault.get("malformed"):
        await resp.write(b"data: {not json\n\n")
    if fault.get("error_event"):  # vLLM's shape of an error mid-stream
        await resp.write(b"data: " + orjson.dumps({"error": {
            "message": str(fault["error_event"]), "type": "InternalServerError",
            "param": None, "code": 500}}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return False
    if fault.get("long_line"):
        await resp.write(b": " + b"x" * int(fault["long_line"]) + b"\n\n")
    return True


def _tool_call(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(tool name, finish_reason) vLLM 0.32 answers this request with, or (None, None)."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None, None
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return (name, "stop") if isinstance(name, str) else (None, None)
    if choice in ("required", "auto"):  # (auto: this mock always chooses to call)
        first = tools[0] if isinstance(tools[0], dict) else {}
        return str((first.get("function") or {}).get("name", "tool")), "tool_calls"
    return None, None


def _arguments(words: list[str]) -> str:
    return orjson.dumps({"query": " ".join(words[:6]), "limit": len(words)}).decode()


def _tool_id(words: list[str]) -> str:
    return "chatcmpl-tool-" + hashlib.blake2b(" ".join(words).encode(), digest_size=8).hexdigest()


def _reasoning(words: list[str]) -> str:
    return "Let me think: " + " ".join(reversed(words[:8])) + "."


async def start_mock(model: str, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
                     ) -> tuple[MockVLLM, web.AppRunner, int]:
    """Start a mock on the running loop; returns (mock, runner, bound port)."""
    mock = MockVLLM(model, **kwargs)
    runner = web.AppRunner(mock.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return mock, runner, bound


def main(argv: list[str] | None = None) -> None:
    """``edge-proxy mock-vllm``."""
    p = argparse.ArgumentParser(prog="edge-proxy mock-vllm", description=__doc__.split("\n")[0])
    add_arguments(p)
    run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--model", default="mock-model", help="served model name")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="time to first token, ms")
    p.add_argument("--tpot-ms", type=float, default=2.0, help="time per output token, ms")
    p.add_argument("--reply-tokens", type=int, default=24, help="tokens per reply")
    p.add_argument("--chunk-tokens", type=int, default=1, help="tokens per SSE chunk")
    p.add_argument("--api-key", default="", help="require this bearer token on /v1/*")


def run(args: argparse.Namespace) -> None:
    """Serve one mock tier until interrupted."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    mock = MockVLLM(args.model, ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms,
                    reply_tokens=args.reply_tokens, chunk_tokens=args.chunk_tokens,
                    api_key=args.api_key)
    print(f"mock vLLM serving {args.model!r} on http://{args.host}:{args.port}", flush=True)
    web.run_app(mock.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
