"""vLLM endpoints the proxy does not cache, relayed to a tier as they are: ``/tokenize``,
``/detokenize``, ``/v1/embeddings`` (the body's ``model`` picks the tier, ``auto`` the default
one) and ``/version``; and ``/health``, which answers for the proxy itself (200 while some
tier can serve), since a client asking the sidecar for its health wants the sidecar's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp import web

from proxy.errors import ProxyError, upstream_timeout, upstream_unavailable
from proxy.upstream import UpstreamFailure, read_limited
from proxy.validate import parse_json, read_json_body

if TYPE_CHECKING:
    from proxy.handlers import Proxy

POST_PATHS = ("/tokenize", "/detokenize", "/v1/embeddings")
GET_PATHS = ("/version",)
#: Largest relayed answer (an embeddings batch is the big one).
MAX_ANSWER_BYTES = 64 * 1024 * 1024


def routes(app: web.Application, proxy: Proxy) -> None:
    async def relay(request: web.Request) -> web.Response:
        try:
            return await _relay(proxy, request)
        except ProxyError as err:
            return err.response()

    async def health(request: web.Request) -> web.Response:
        up = [n for n, t in proxy.tiers.items() if t.ready and t.up]
        return web.Response(status=200 if up else 503, content_type="application/json",
                            body=orjson.dumps({"status": "ok" if up else "unavailable",
                                               "tiers_up": up}))

    for path in POST_PATHS:
        app.router.add_post(path, relay)
    for path in GET_PATHS:
        app.router.add_get(path, relay)
    app.router.add_get("/health", health)


async def _relay(proxy: Proxy, request: web.Request) -> web.Response:
    data: bytes | None = None
    model = "auto"
    if request.method == "POST":
        cfg = proxy.config.server
        # declared JSON (a cross-site page cannot send that without a preflight), bounded in
        # bytes and in time, as on the completion endpoints
        body = parse_json(await read_json_body(request, cfg.max_body_bytes, cfg.body_timeout_s))
        if not isinstance(body, dict):
            raise ProxyError(400, "expected a JSON object", code="invalid_request")
        if isinstance(body.get("model"), str) and body["model"]:
            model = body["model"]
        tier = proxy.tiers[proxy.resolve_tier(model)]
        if tier.model:
            body["model"] = tier.model
        data = orjson.dumps(body)
    else:
        tier = proxy.tiers[proxy.resolve_tier(model)]
    ep = tier.pick()
    if ep is None or tier.session is None:
        raise upstream_unavailable(f"tier {tier.name}: no upstream available")
    headers = {"Content-Type": "application/json", **tier.auth_headers(
        request.headers.get("Authorization"))}
    timeout = aiohttp.ClientTimeout(total=tier.cfg.total_timeout_s,
                                    sock_connect=tier.cfg.connect_timeout_s)
    try:
        # a concurrency slot of the tier, as a completion takes (429 past its queue): relayed
        # answers are buffered whole, so how many are in flight must be bounded too
        async with tier.slot(), tier.session.request(
                request.method, ep.url + request.path, data=data, headers=headers,
                allow_redirects=False, timeout=timeout) as r:
            # the whole answer (content.read(n) returns what has arrived so far, which cut
            # answers larger than one network read), never more than MAX_ANSWER_BYTES
            answer = await read_limited(r, MAX_ANSWER_BYTES, tier.name)
            return web.Response(status=r.status, body=answer,
                                content_type=r.content_type or "application/json",
                                headers={"x-route-tier": tier.name})
    except UpstreamFailure as exc:
        raise exc.error from None
    except TimeoutError:
        raise upstream_timeout(f"tier {tier.name}: no answer in time") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise upstream_unavailable(f"tier {tier.name}: upstream failed "
                                   f"({type(exc).__name__})") from None
