"""Helpers the app-level tests share: the seeded people, readiness, GraphQL calls, source files."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from aiohttp.test_utils import TestClient
from hypothesis import strategies as st
from miniopy_async import Minio
from miniopy_async.sse import SseCustomerKey
from s3server import SeaweedServer
from yarl import URL

from service.local_store import LocalStore
from service.snapshot import Snapshot
from service.storage import ObjectInfo, ObjectStore

NEVER = "0 0 1 1 *"  # the schedule stays out of the way; tests trigger runs themselves
TODAY = datetime.now(UTC).date()
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp() * 1000)


def utc_ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp() * 1000)


def years_ago(years: int, days: int = 0) -> date:
    try:
        anniversary = TODAY.replace(year=TODAY.year - years)
    except ValueError:  # 29 February today, in a year without one
        anniversary = date(TODAY.year - years, 3, 1)
    return anniversary + timedelta(days=days)


def age_on(born: date, today: date = TODAY) -> int:
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


# user_id -> (birth date, image extension or None)
PEOPLE: dict[str, tuple[date, str | None]] = {
    "1000": (years_ago(30), "png"),  # 30th birthday today
    "1001": (years_ago(30, days=1), None),  # 30 tomorrow: still 29
    "1002": (years_ago(30, days=-1), "jpg"),  # 30 since yesterday
    "1003": (date(2004, 2, 29), None),  # a leapling
    "1004": (date(1950, 6, 1), "png"),
    "1005": (date(1969, 12, 31), None),
    "0042": (years_ago(18), "JPEG"),
}


def csv_of(user_id: str, born: date) -> bytes:
    return f"first_name, last_name, birthts\nName{user_id}, Last{user_id}, {ms(born)}\n".encode()


async def seed(store: ObjectStore, people: dict[str, tuple[date, str | None]] = PEOPLE) -> None:
    await store.ensure_bucket()
    for user_id, (born, image) in people.items():
        await store.put(f"src-data/{user_id}.csv", csv_of(user_id, born))
        if image:
            await store.put(f"src-data/img/{user_id}.{image}", f"image of {user_id}".encode())
    await store.put("src-data/broken.csv", b"first_name\nonly\n")


def as_sent(client: TestClient[Any, Any], path: str) -> URL:
    """`path` on the client's server exactly as written. The client would resolve `.` and `..` segments itself
    (`/images/..` to `/`, the status page), and the request would never reach the route under test."""
    return URL(str(client.make_url("/")).rstrip("/") + path, encoded=True)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def wait_ready(client: TestClient[Any, Any]) -> None:
    for _ in range(200):
        response = await client.get("/readyz")
        if response.status == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the app never became ready")


async def gql(client: TestClient[Any, Any], query: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query}, headers=headers)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def all_pages(client: TestClient[Any, Any], params: dict[str, str]) -> list[dict[str, Any]]:
    """Every row of `GET /data`, following its `Link: <...>; rel="next"` headers page by page."""
    rows: list[dict[str, Any]] = []
    response = await client.get("/data", params=params)
    while True:
        assert response.status == 200, await response.text()
        rows += await response.json()
        assert int(response.headers["X-Total-Count"]) >= len(rows)
        if "Link" not in response.headers:
            assert int(response.headers["X-Total-Count"]) == len(rows)
            return rows
        response = await client.get(URL(response.links["next"]["url"]).relative())


def user_csv(first: str, last: str, birthts: int | str, header: str = "first_name, last_name, birthts") -> bytes:
    """One user file: `header`, then the values with a space after each comma (the task's format)."""
    return f"{header}\n{first}, {last}, {birthts}\n".encode()


class SlowStore(LocalStore):
    """Holds every GET until released, to observe the service in the middle of a run."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "datalake")
        self.gate = asyncio.Event()
        self.gate.set()

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        if key.startswith("src-data/"):
            await self.gate.wait()
        return await super().get(key, max_bytes)

    async def get_with_info(self, key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        if key.startswith("src-data/"):
            await self.gate.wait()
        return await super().get_with_info(key, max_bytes)


def snapshot_of(rows: list[tuple[str, int, str]]) -> Snapshot:
    table = pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "first_name": "F",
            "last_name": "L",
            "birthts": pd.array([r[1] for r in rows], dtype="int64"),
            "img_path": [r[2] for r in rows],
        }
    ).sort_values("user_id")
    return Snapshot(table.reset_index(drop=True), version=1, committed_at=datetime.now(UTC))


async def put_with_customer_key(server: SeaweedServer, bucket: str, key: str, data: bytes) -> None:
    """Upload with SSE-C: the server keeps only a hash of the key, and refuses reads that lack it."""
    async with Minio(server.endpoint, server.access_key, server.secret_key, secure=False) as client:
        await client.put_object(bucket, key, io.BytesIO(data), len(data), sse=SseCustomerKey(b"k" * 32))


# -- random source files, for the property tests -------------------------------------------------------

NAMES = st.text(alphabet='ab ,"éZ\n', min_size=1, max_size=6).map(str.strip).filter(bool)
BIRTHS = st.integers(min_value=-5_000_000_000_000, max_value=1_700_000_000_000)
INVALID = st.sampled_from([b"", b"first_name,last_name\nA,B\n", b"first_name,last_name,birthts\nA,B,x\n", b"\xff"])


def encode(first: str, last: str, birthts: int) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows([["first_name", " last_name", " birthts"], [first, last, birthts]])
    return buffer.getvalue().encode()
