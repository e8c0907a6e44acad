"""Baseline server for bench_queries.py: the usual solution of the original task.

A small aiohttp + Strawberry app with the service's query shape and types (same type, field and argument
names) whose resolvers, on every request, read output.csv from the local store with `pd.read_csv`,
compute ages with pandas and filter with pandas. Plain `strawberry.Schema`, no extensions; resolvers are
ordinary (sync) functions, as such an app is usually written. REST GET /stats does the same.

Run: python bench/_baseline_app.py --port PORT --csv DATA_DIR/datalake/processed_data/output.csv
"""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NewType

import pandas as pd
import strawberry
from aiohttp import web
from strawberry.aiohttp.views import GraphQLView
from strawberry.schema.config import StrawberryConfig

CSV = web.AppKey("csv", Path)
Long = NewType("Long", int)
_DTYPES = {"user_id": "str", "first_name": "str", "last_name": "str", "birthts": "int64", "img_path": "str"}


def load(path: Path) -> pd.DataFrame:
    """output.csv with an `age` column (completed years on today's UTC date)."""
    frame = pd.read_csv(path, dtype=_DTYPES, keep_default_na=False)
    today = datetime.now(UTC).date()
    birth = pd.to_datetime(frame["birthts"], unit="ms", utc=True)
    month, day = birth.dt.month, birth.dt.day
    not_yet = (month > today.month) | ((month == today.month) & (day > today.day))
    frame["age"] = today.year - birth.dt.year - not_yet.astype("int64")
    frame["birth_date"] = birth.dt.date
    return frame


@strawberry.input
class UserFilter:
    is_image_exists: bool | None = None
    min_age: int | None = None
    max_age: int | None = None

    def apply(self, frame: pd.DataFrame) -> pd.DataFrame:
        mask = pd.Series(True, index=frame.index)
        if self.is_image_exists is not None:
            mask &= (frame["img_path"] != "") == self.is_image_exists
        if self.min_age is not None:
            mask &= frame["age"] >= self.min_age
        if self.max_age is not None:
            mask &= frame["age"] <= self.max_age
        return frame[mask]


@strawberry.type
class User:
    user_id: strawberry.ID
    first_name: str
    last_name: str
    birthts: Long
    birth_date: date
    age: int
    img_path: str | None
    image_url: str | None


@strawberry.type
class Stats:
    count: int
    average_age: float | None
    youngest_age: int | None
    oldest_age: int | None
    with_image: int
    without_image: int


def _stats(frame: pd.DataFrame) -> Stats:
    if frame.empty:
        return Stats(count=0, average_age=None, youngest_age=None, oldest_age=None, with_image=0, without_image=0)
    with_image = int((frame["img_path"] != "").sum())
    return Stats(
        count=len(frame), average_age=float(frame["age"].mean()), youngest_age=int(frame["age"].min()),
        oldest_age=int(frame["age"].max()), with_image=with_image, without_image=len(frame) - with_image,
    )  # fmt: skip


def _path(info: strawberry.Info[Any, None]) -> Path:
    return info.context["request"].app[CSV]  # type: ignore[no-any-return]


@strawberry.type
class Query:
    @strawberry.field
    def users(
        self, info: strawberry.Info[Any, None], filter: UserFilter | None = None, limit: int | None = None,
        offset: int = 0,
    ) -> list[User]:  # fmt: skip
        frame = load(_path(info))
        if filter is not None:
            frame = filter.apply(frame)
        page = frame.iloc[offset : offset + limit] if limit is not None else frame.iloc[offset:]
        origin = str(info.context["request"].url.origin())
        rows: list[dict[str, Any]] = page.to_dict("records")  # type: ignore[assignment]
        return [
            User(
                user_id=strawberry.ID(row["user_id"]),
                first_name=row["first_name"],
                last_name=row["last_name"],
                birthts=Long(int(row["birthts"])),
                birth_date=row["birth_date"],
                age=int(row["age"]),
                img_path=row["img_path"] or None,
                image_url=f"{origin}/images/{row['user_id']}" if row["img_path"] else None,
            )
            for row in rows
        ]

    @strawberry.field
    def stats(self, info: strawberry.Info[Any, None], filter: UserFilter | None = None) -> Stats:
        frame = load(_path(info))
        return _stats(filter.apply(frame) if filter is not None else frame)


schema = strawberry.Schema(
    query=Query,
    config=StrawberryConfig(scalar_map={Long: strawberry.scalar(name="Long", serialize=int, parse_value=int)}),
)


async def rest_stats(request: web.Request) -> web.Response:
    query = request.query
    flt = UserFilter(
        is_image_exists=query["is_image_exists"] == "true" if "is_image_exists" in query else None,
        min_age=int(query["min_age"]) if "min_age" in query else None,
        max_age=int(query["max_age"]) if "max_age" in query else None,
    )
    result = _stats(flt.apply(load(request.app[CSV])))
    return web.json_response(
        {
            "count": result.count,
            "average_age": result.average_age,
            "youngest_age": result.youngest_age,
            "oldest_age": result.oldest_age,
            "with_image": result.with_image,
            "without_image": result.without_image,
        }
    )


async def readyz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


def create_app(csv: Path) -> web.Application:
    app = web.Application()
    app[CSV] = csv
    app.router.add_route("*", "/graphql", GraphQLView(schema=schema))
    app.router.add_get("/stats", rest_stats)
    app.router.add_get("/readyz", readyz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--csv", type=Path, required=True)
    args = parser.parse_args()
    web.run_app(create_app(args.csv), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
