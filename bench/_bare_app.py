"""Bare aiohttp server for bench_cache.py: the floor of any answer over aiohttp on this machine.

POST /graphql reads the body and answers fixed JSON bytes of the size of a `stats` answer; no GraphQL, no
middlewares, no access log, no metrics.

Run: python bench/_bare_app.py --port PORT
"""

from __future__ import annotations

import argparse

from aiohttp import web

_ANSWER = b'{"data":{"stats":{"count":40000,"averageAge":40.1}}}'


async def _graphql(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_ANSWER, content_type="application/json", charset="utf-8")


async def _ready(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_route("*", "/graphql", _graphql)
    app.router.add_get("/readyz", _ready)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
