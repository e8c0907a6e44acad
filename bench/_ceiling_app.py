"""Ceiling server for bench_queries.py: the service's query shape with constant resolvers.

What it shares with the service (so that the only difference is the resolvers' work):
  * the service's own Strawberry types (`service.schema.User`, `Stats`, `UserFilter`, the `Long` scalar),
    the same `ServiceSchema` class, and the very `extensions` tuple and `StrawberryConfig` of the schema
    `service.schema.build_schema()` returns (when this was written: ParserCache(256), ValidationCache(256),
    QueryDepthLimiter(8), MaxTokensLimiter(2000), MaxAliasesLimiter(20), MaskErrors; field suggestions
    disabled);
  * Strawberry's aiohttp `GraphQLView` at /graphql (the service uses a subclass that only changes the
    GraphiQL page), the same request size limit, and a REST GET /stats answered with `web.json_response`.
What it leaves out: the service's middlewares (metrics, error mapping), its metrics extension (the
Prometheus operation timer `create_app` adds), its access log (logging is not configured here) and all data
work: `stats` returns one fixed `Stats`, `users` a fixed list of 100 prebuilt `User` objects (70% with an
image, like the demo data). Because the extensions are the service's own, a change to them (or a defect in
them) shows up in both (S) and (b).

Run: python bench/_ceiling_app.py --port PORT
"""

from __future__ import annotations

import argparse
from datetime import date

import strawberry
from aiohttp import web
from strawberry.aiohttp.views import GraphQLView

from service.schema import Long, ServiceSchema, Stats, User, UserFilter, build_schema

_STATS = Stats(count=40_000, average_age=40.1, youngest_age=20, oldest_age=60, with_image=40_000, without_image=0)
_USERS = [
    User(
        user_id=strawberry.ID(str(1000 + i)),
        first_name="Susan",
        last_name="O'Brien",
        birthts=Long(315_532_800_000 + i),
        birth_date=date(1980, 1, 1),
        age=45,
        img_path=f"src-data/{1000 + i}.png" if i % 10 < 7 else None,  # 70% with an image, like the demo
        image_url=f"http://127.0.0.1/images/{1000 + i}" if i % 10 < 7 else None,
    )
    for i in range(100)
]
_STATS_JSON = {
    "count": 40_000, "average_age": 40.1, "youngest_age": 20, "oldest_age": 60,
    "with_image": 40_000, "without_image": 0,
}  # fmt: skip


@strawberry.type
class Query:
    @strawberry.field
    def users(self, filter: UserFilter | None = None, limit: int | None = None, offset: int = 0) -> list[User]:
        return _USERS

    @strawberry.field
    def stats(self, filter: UserFilter | None = None) -> Stats:
        return _STATS


def build_ceiling_schema() -> strawberry.Schema:
    reference = build_schema()  # the service's schema: reuse its exact extensions and config
    return ServiceSchema(query=Query, config=reference.config, extensions=list(reference.extensions))


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(_STATS_JSON)


def create_app() -> web.Application:
    app = web.Application(client_max_size=256 * 1024)
    view = GraphQLView(schema=build_ceiling_schema(), subscription_protocols=("graphql-transport-ws",))
    app.router.add_route("*", "/graphql", view)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/readyz", _ready)
    return app


async def _ready(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
