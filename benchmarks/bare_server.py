"""The floor: a bare aiohttp handler on uvloop that reads the request and returns fixed bytes.

Load tests measure it with the same load generator in the same run as the proxy, so the proxy's
figures can be stated as ratios to what this machine does with no work at all.

    python benchmarks/bare_server.py --port 8090 --body answer.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvloop
from aiohttp import web


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--body", help="file whose bytes every response carries")
    args = p.parse_args()
    body = Path(args.body).read_bytes() if args.body else b'{"ok":true}'

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json",
                            headers={"x-cache": "bare"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    app.router.add_get("/healthz", lambda r: web.Response(text="ok"))  # type: ignore[arg-type,return-value]
    uvloop.install()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
