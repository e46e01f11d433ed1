"""Canonical request -> exact key, semantic scope and query text.

- exact key: digest of everything that shapes the answer: namespace, endpoint, model, all
  messages (or the prompt), tools, response_format, n and every sampling parameter. Not
  ``stream``/``stream_options`` (a cached answer is served either way), not ``user`` or request
  ids, and not ``max_tokens``: an answer is served to a request only if its completion fits that
  request's max_tokens (checked at lookup), so one stored answer serves every budget it fits.
- scope: digest of the same minus the last user message; the semantic cache compares only
  entries of one scope (a hard partition: tenant, endpoint, model, system prompt, earlier turns,
  tools, parameters).
- query text: the last user message, what is embedded; empty when the request has none
  (then the semantic cache is skipped).

Both digests come from one canonical-encoding pass (``hashing.request_digests``, native when
built). Parameters are taken by denylist, not allowlist, so an unknown vLLM extension parameter
(guided_json, chat_template_kwargs, ...) still separates keys instead of being ignored.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

from proxy.errors import ProxyError
from proxy.hashing import request_digests

#: Body fields that do not change the answer (or are checked separately, like max_tokens).
NOT_IN_KEY: Final = frozenset(
    {"stream", "stream_options", "user", "max_tokens", "max_completion_tokens", "request_id",
     "metadata", "store", "messages", "prompt", "model"}
)

CHAT: Final = "chat"
COMPLETIONS: Final = "completions"


class RequestKeys:
    """The three identities of one request."""

    __slots__ = ("exact", "query_text", "scope")

    def __init__(self, exact: bytes, scope: bytes, query_text: str) -> None:
        self.exact = exact
        self.scope = scope
        self.query_text = query_text


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content
                 if isinstance(p, dict) and p.get("type") == "text"]
        # a list with images or audio is not a text query: no semantic lookup
        if len(parts) == len(content):
            return "\n".join(parts)
    return ""


def request_keys(namespace: str, endpoint: str, model: str, body: dict[str, Any]) -> RequestKeys:
    """Keys of a validated request body (see the module docstring)."""
    params = {k: v for k, v in body.items() if k not in NOT_IN_KEY}
    if endpoint == CHAT:
        messages = body["messages"]
        last = messages[-1]
        earlier = messages[:-1]
        query = _text_of(last.get("content")) if last.get("role") == "user" else ""
    else:
        prompt = body["prompt"]
        last = prompt
        earlier = None
        query = prompt if isinstance(prompt, str) else ""
    scope_part = (namespace, endpoint, model, params, earlier)
    scope, exact = request_digests(scope_part, last)
    return RequestKeys(exact, scope, query)


#: The namespace of callers without a credential (``cache.anonymous = "shared"``).
ANONYMOUS: Final = "anon"


def credential_namespace(authorization: str | None) -> str | None:
    """``key:<hash>`` of the caller's Authorization header; None without a credential.

    The header is hashed (SHA-256, first 64 bits; the key itself is never kept), so tenants with
    different keys never share entries and the namespace can be logged. An empty value or a
    bare scheme ("Bearer ") is no credential.
    """
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if not token.strip() and scheme.lower() in ("bearer", "basic", ""):
        return None
    return "key:" + hashlib.sha256(
        authorization.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def namespace_of(header_ns: str | None, authorization: str | None, *,
                 trust_header: bool = False, anonymous: str = "shared") -> str:
    """Cache namespace of a request: who the caller is, then an optional partition.

    - By default the tenant is the caller's credential (``key:<hash>``), and x-cache-namespace
      only partitions *within* it (``key:<hash>/ns:<header>``): a client cannot name its way
      into another tenant's entries.
    - ``trust_header`` (``cache.trust_namespace_header``: a gateway in front sets the header and
      clients cannot) lets the header name the tenant (``ns:<header>``), as before.
    - No credential: the one anonymous namespace (``anon``, partitioned the same way), or a
      401 when ``anonymous`` (``cache.anonymous``) is "refuse".
    """
    if header_ns and trust_header:
        return "ns:" + header_ns
    base = credential_namespace(authorization)
    if base is None:
        if anonymous == "refuse":
            raise ProxyError(401, "An API key is required (Authorization: Bearer ...).",
                             err_type="authentication_error", code="missing_api_key",
                             headers={"WWW-Authenticate": 'Bearer realm="edge-proxy"'})
        base = ANONYMOUS
    return base + "/ns:" + header_ns if header_ns else base


def tenant_of(namespace: str) -> str:
    """The tenant part of a namespace (its credential), without the x-cache-namespace
    partition: what metrics label, so one key cannot mint unbounded label values alone."""
    return namespace.partition("/")[0]
