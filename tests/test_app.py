"""The real app over HTTP: GraphQL and REST against independently computed expectations."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import statistics
import threading
import tracemalloc
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from recording import Recording
from support import (
    NEVER,
    PEOPLE,
    ClientFactory,
    SlowStore,
    age_on,
    all_pages,
    as_sent,
    csv_of,
    gql,
    ms,
    seed,
    wait_ready,
)

from service import query as queries
from service import rest
from service.app import STATE, create_app
from service.config import Settings
from service.events import SnapshotPublished
from service.local_store import LocalStore
from service.report import REJECTED_SAMPLE
from service.rest import IMAGE_CHUNK_BYTES
from service.storage import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from conftest import ManyRejected


def expected(has_image: bool | None, min_age: int | None, max_age: int | None) -> list[str]:
    return [
        uid
        for uid, (born, image) in sorted(PEOPLE.items())
        if (has_image is None or (image is not None) == has_image)
        and (min_age is None or age_on(born) >= min_age)
        and (max_age is None or age_on(born) <= max_age)
    ]


def graphql_filter(has_image: bool | None, min_age: int | None, max_age: int | None) -> str:
    parts = [
        f"{name}: {str(value).lower()}"
        for name, value in (("isImageExists", has_image), ("minAge", min_age), ("maxAge", max_age))
        if value is not None
    ]
    return "{" + ", ".join(parts) + "}"


async def test_every_filter_combination_over_graphql_and_rest(client: TestClient[Any, Any]) -> None:
    for has_image, min_age, max_age in itertools.product(
        [None, True, False], [None, 0, 29, 30, 31], [None, 29, 30, 80]
    ):
        if min_age is not None and max_age is not None and min_age > max_age:
            continue
        want = expected(has_image, min_age, max_age)
        flt = graphql_filter(has_image, min_age, max_age)
        body = await gql(
            client,
            f"{{ users(filter: {flt}, limit: 5) {{ userId age }} stats(filter: {flt}) {{ count averageAge }} }}",
        )
        assert [u["userId"] for u in body["data"]["users"]] == want[:5]
        ages = [age_on(PEOPLE[uid][0]) for uid in want]
        assert body["data"]["stats"]["count"] == len(want)
        assert body["data"]["stats"]["averageAge"] == (pytest.approx(statistics.mean(ages)) if ages else None)

        params = {
            k: str(v).lower()
            for k, v in (("is_image_exists", has_image), ("min_age", min_age), ("max_age", max_age))
            if v is not None
        }
        data = await all_pages(client, params)
        assert [r["user_id"] for r in data] == want
        stats = await (await client.get("/stats", params=params)).json()
        assert stats["count"] == len(want)
        assert stats["average_age"] == (pytest.approx(statistics.mean(ages)) if ages else None)


async def test_user_fields(client: TestClient[Any, Any]) -> None:
    body = await gql(
        client,
        '{ a: user(userId: "1000") { userId firstName lastName birthts birthDate age imgPath imageUrl } '
        'b: user(userId: "1003") { age imgPath imageUrl } c: user(userId: "nobody") { userId } }',
    )
    born = PEOPLE["1000"][0]
    assert body["data"]["a"] == {
        "userId": "1000",
        "firstName": "Name1000",
        "lastName": "Last1000",
        "birthts": ms(born),
        "birthDate": born.isoformat(),
        "age": 30,
        "imgPath": "src-data/img/1000.png",
        "imageUrl": f"http://{client.host}:{client.port}/images/1000",
    }
    assert body["data"]["b"] == {"age": age_on(date(2004, 2, 29)), "imgPath": None, "imageUrl": None}
    assert body["data"]["c"] is None


async def test_rest_records_keep_the_output_fields(client: TestClient[Any, Any]) -> None:
    data = await (await client.get("/data", params={"is_image_exists": "True", "max_age": "18"})).json()
    assert data == [
        {
            "user_id": "0042",
            "first_name": "Name0042",
            "last_name": "Last0042",
            "birthts": ms(PEOPLE["0042"][0]),
            "img_path": "src-data/img/0042.JPEG",
        }
    ]
    for value, want in (("1", True), ("0", False), ("False", False), ("true", True)):
        rows = await (await client.get("/data", params={"is_image_exists": value})).json()
        assert [r["user_id"] for r in rows] == expected(want, None, None)


async def test_images_are_served_and_nothing_else(client: TestClient[Any, Any]) -> None:
    response = await client.get("/images/1002")
    assert (response.status, response.content_type, await response.read()) == (
        200,
        "image/jpeg",
        b"image of 1002",
    )
    assert (await client.get("/images/1001")).status == 404  # no image
    assert (await client.get("/images/nobody")).status == 404
    for path in (
        "/images/..%2F..%2Fprocessed_data%2Foutput.csv",
        "/images/../processed_data/output.csv",
        "/images/%2e%2e",
    ):
        assert (await client.session.get(as_sent(client, path))).status == 404, path


def pattern(size: int) -> bytes:
    """`size` bytes that are not all alike, so that a misplaced chunk would show in a digest."""
    block = hashlib.sha256(str(size).encode()).digest() * 32768  # 1 MiB
    return (block * (size // len(block) + 1))[:size]


async def image_client(
    aiohttp_client: ClientFactory, store: ObjectStore, image: bytes, max_image_bytes: int
) -> tuple[TestClient[Any, Any], Recording]:
    """The app over `store` (seeded), with user 1004's image replaced by `image`, recording reads."""
    await seed(store)
    await store.put("src-data/img/1004.png", image)
    recording = Recording(store)
    settings = Settings(schedule=NEVER, max_image_bytes=max_image_bytes)
    client = await aiohttp_client(create_app(settings, store=recording))
    await wait_ready(client)
    return client, recording


async def test_a_large_image_is_streamed_with_bounded_memory(aiohttp_client: ClientFactory, store: ObjectStore) -> None:
    size = 64 * 1024 * 1024
    image = pattern(size)
    expected = hashlib.sha256(image).hexdigest()
    client, recording = await image_client(aiohttp_client, store, image, max_image_bytes=size)
    del image
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        response = await client.get("/images/1004")
        assert (response.status, response.content_type, response.content_length) == (200, "image/png", size)
        async for chunk in response.content.iter_chunked(1024 * 1024):
            digest.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == expected
    # Server and client together: a few chunks in flight, never the whole image (64 MiB).
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    assert "src-data/img/1004.png" not in recording.gets
    chunks = recording.streamed["src-data/img/1004.png"]
    assert sum(chunks) == size and max(chunks) <= IMAGE_CHUNK_BYTES


async def test_an_image_over_the_limit_is_refused_unread(aiohttp_client: ClientFactory, local: LocalStore) -> None:
    client, recording = await image_client(aiohttp_client, local, pattern(1001), max_image_bytes=1000)
    response = await client.get("/images/1004")
    assert (response.status, response.content_type) == (413, "application/json")
    assert (await response.json())["error"] == "the image of user 1004 is larger than MAX_IMAGE_BYTES (1000 bytes)"
    assert recording.streamed["src-data/img/1004.png"] == []  # opened for its size, not one byte read
    assert "src-data/img/1004.png" not in recording.gets
    await local.put("src-data/img/1004.png", pattern(1000))  # at the limit: served
    response = await client.get("/images/1004")
    assert (response.status, await response.read()) == (200, pattern(1000))


async def test_head_of_an_image_sends_its_size_only(client: TestClient[Any, Any]) -> None:
    response = await client.head("/images/1002")
    assert (response.status, response.content_type) == (200, "image/jpeg")
    assert response.headers["Content-Length"] == str(len(b"image of 1002"))
    assert await response.read() == b""
    assert (await client.get("/images/1002")).status == 200  # the connection is still usable


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"is_image_exists": "yes"}, "is_image_exists"),
        ({"min_age": "-1"}, "min_age"),
        ({"max_age": "ten"}, "max_age"),
        ({"min_age": "1.5"}, "min_age"),
        ({"min_age": "40", "max_age": "30"}, "min_age"),
        ({"min_agee": "3"}, "min_agee"),
    ],
)
async def test_bad_rest_parameters_are_400_naming_them(
    client: TestClient[Any, Any], params: dict[str, str], name: str
) -> None:
    for path in ("/data", "/stats"):
        response = await client.get(path, params=params)
        assert response.status == 400
        assert name in (await response.json())["error"]


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("{ users(filter: {minAge: -1}, limit: 1) { userId } }", "minAge"),
        ("{ stats(filter: {maxAge: -5}) { count } }", "maxAge"),
        ("{ stats(filter: {minAge: 50, maxAge: 40}) { count } }", "minAge"),
        ("{ users(offset: -1, limit: 1) { userId } }", "offset"),
        ("{ users(limit: 6) { userId } }", "limit"),
        ("{ users(limit: -1) { userId } }", "limit"),
        ("{ users { userId } }", "limit"),  # 7 users, page size 5: paginate
        ("{ users(filter: {minAge: 2147483648}) { userId } }", "32-bit"),
        ('{ users(filter: {minAge: "x"}) { userId } }', "Int"),
        ("{ nope }", "nope"),
    ],
)
async def test_bad_graphql_arguments_are_errors_naming_them(
    client: TestClient[Any, Any], query: str, name: str
) -> None:
    body = await gql(client, query)
    assert body.get("data") is None
    message = body["errors"][0]["message"]
    assert name in message and "Internal" not in message


async def test_pagination(client: TestClient[Any, Any]) -> None:
    ids = sorted(PEOPLE)
    pages = [await gql(client, f"{{ users(limit: 3, offset: {o}) {{ userId }} }}") for o in (0, 3, 6, 9)]
    assert [[u["userId"] for u in p["data"]["users"]] for p in pages] == [ids[0:3], ids[3:6], ids[6:], []]
    body = await gql(client, "{ users(filter: {isImageExists: true}) { userId } }")  # 4 <= page size
    assert [u["userId"] for u in body["data"]["users"]] == expected(True, None, None)


ROW_BUDGET_REFUSED = [
    "{ a: users(limit: 3) { userId } b: users(limit: 3, offset: 3) { userId } }",
    "{ a: users(limit: 1) { userId } b: users(filter: {isImageExists: true}) { userId } }",  # no limit: a page
    "{ ...A ...B } fragment A on Query { a: users(limit: 3) { userId } } "
    "fragment B on Query { b: users(limit: 3) { userId } }",
    "{ a: users(limit: 3) { userId } ... on Query { b: users(limit: 3) { userId } } }",
]
ROW_BUDGET_ALLOWED = [
    "{ a: users(limit: 2) { userId } b: users(limit: 3, offset: 2) { userId } stats { count } }",
    "{ ...A ...A } fragment A on Query { users(limit: 5) { userId } }",  # one field, spread twice
    "{ users(limit: 5) { userId } users(limit: 5) { firstName } }",  # one response key: one field
    "{ a: users(limit: 5) { userId } lastRun { users } }",  # ProcessingRun.users is a number
]
ALIASED = "query($l: Int = 3) { a: users(limit: $l) { userId } b: users(limit: $l, offset: 3) { userId } }"


@pytest.mark.parametrize("query", ROW_BUDGET_REFUSED)
async def test_one_request_returns_at_most_a_page_of_users_in_all(client: TestClient[Any, Any], query: str) -> None:
    # 20 aliases of a full page each were within every other limit, and kept the event loop busy for
    # seconds: the rows of all users fields together are now bounded by the page size, before execution.
    body = await gql(client, query)
    assert body["data"] is None
    message = body["errors"][0]["message"]
    assert "at most 5 (MAX_PAGE_SIZE" in message and "limit and offset" in message, message


@pytest.mark.parametrize("query", ROW_BUDGET_ALLOWED)
async def test_requests_within_the_row_budget_are_answered(client: TestClient[Any, Any], query: str) -> None:
    assert "errors" not in await gql(client, query)


@pytest.mark.parametrize(
    ("variables", "allowed"),
    [({}, False), ({"l": 2}, True), ({"l": 2.0}, True), ({"l": 3.0}, False), ({"l": None}, False)],
)
async def test_the_row_budget_reads_limits_from_variables(
    client: TestClient[Any, Any], variables: dict[str, Any], allowed: bool
) -> None:
    response = await client.post("/graphql", json={"query": ALIASED, "variables": variables})
    body = await response.json()
    if allowed:
        assert [len(body["data"][key]) for key in "ab"] == [2, 2], body
    else:
        assert body["data"] is None and "MAX_PAGE_SIZE" in body["errors"][0]["message"], body


async def test_pages_of_users_are_built_off_the_event_loop(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full page takes a while to build and to complete field by field: the event loop must go on serving.
    on_the_loop: list[bool] = []
    build = queries.users

    def spy(*args: Any) -> list[queries.UserRow]:
        on_the_loop.append(threading.current_thread() is threading.main_thread())
        return build(*args)

    monkeypatch.setattr(queries, "users", spy)
    assert len((await gql(client, "{ users(limit: 5) { userId } }"))["data"]["users"]) == 5
    assert len(await (await client.get("/data")).json()) == 5
    # A document that may hold a mutation runs on the loop (its resolver is async); this one merely says so.
    assert len((await gql(client, "{ users(limit: 1) { userId } } # no mutation"))["data"]["users"]) == 1
    assert on_the_loop == [False, False, True]


async def test_rest_data_comes_in_pages_with_the_total_and_the_next_page(client: TestClient[Any, Any]) -> None:
    ids = sorted(PEOPLE)
    first = await client.get("/data")  # 7 users, page size 5
    assert [r["user_id"] for r in await first.json()] == ids[:5]
    assert (first.headers["X-Total-Count"], first.headers["Link"]) == ("7", '</data?offset=5>; rel="next"')
    assert first.headers["Content-Type"] == "application/json; charset=utf-8"  # as before paging
    last = await client.get("/data?offset=5")
    assert [r["user_id"] for r in await last.json()] == ids[5:] and "Link" not in last.headers

    with_image = expected(True, None, None)
    page = await client.get("/data", params={"is_image_exists": "true", "limit": "2", "offset": "1"})
    assert [r["user_id"] for r in await page.json()] == with_image[1:3]
    assert page.headers["X-Total-Count"] == str(len(with_image))
    assert page.headers["Link"] == '</data?is_image_exists=true&limit=2&offset=3>; rel="next"'

    empty = await client.get("/data?limit=0")
    assert (await empty.json(), empty.headers["X-Total-Count"], "Link" in empty.headers) == ([], "7", False)
    beyond = await client.get("/data?offset=100")
    assert (await beyond.json(), "Link" in beyond.headers) == ([], False)

    too_many = await client.get("/data?limit=6")
    assert too_many.status == 400
    assert (
        "limit must be at most 5 (MAX_PAGE_SIZE), got 6; fetch the following pages with offset"
        in (await too_many.json())["error"]
    )


async def test_rest_data_encoded_in_slices_is_the_json_of_the_whole_page(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rest, "_ENCODED_AT_ONCE", 2)  # 5 rows: 3 slices
    body = await (await client.get("/data")).read()
    assert body == json.dumps(json.loads(body)).encode() and len(json.loads(body)) == 5


async def test_reprocess_picks_up_changes(client: TestClient[Any, Any], local: LocalStore) -> None:
    await local.put("src-data/2000.csv", csv_of("2000", date(1990, 1, 1)))
    await local.delete("src-data/1004.csv")
    body = await gql(client, "mutation { reprocess { outcome added removed users rejected { key reason } } }")
    run = body["data"]["reprocess"]
    assert (run["outcome"], run["added"], run["removed"], run["users"]) == ("SUCCEEDED", 1, 1, 7)
    assert run["rejected"] == [
        {"key": "src-data/broken.csv", "reason": "header lacks last_name, birthts (found: first_name)"}
    ]
    ids = [u["userId"] for u in (await gql(client, "{ users(limit: 5, offset: 2) { userId } }"))["data"]["users"]]
    assert "2000" in ids and "1004" not in ids
    response = await client.post("/data")
    report = await response.json()
    assert (response.status, report["outcome"], report["unchanged"], report["trigger"]) == (
        200,
        "succeeded",
        7,
        "rest",
    )
    last = (await gql(client, "{ lastRun { id trigger outcome } runs(limit: 2) { id } }"))["data"]
    assert last["lastRun"]["trigger"] == "rest" and [r["id"] for r in last["runs"]] == [
        last["lastRun"]["id"],
        last["lastRun"]["id"] - 1,
    ]


async def test_concurrent_reprocess_calls_never_overlap(client: TestClient[Any, Any], local: LocalStore) -> None:
    async def call(i: int) -> tuple[datetime, dict[str, Any]]:
        await asyncio.sleep(i * 0.003)
        asked = datetime.now(UTC)
        if i % 3:
            body = await gql(client, "mutation { reprocess { id startedAt finishedAt } }")
            return asked, body["data"]["reprocess"]
        report = await (await client.post("/data")).json()
        return asked, {
            "id": report["run_id"],
            "startedAt": report["started_at"],
            "finishedAt": report["finished_at"],
        }

    results = await asyncio.gather(*(call(i) for i in range(30)))
    for asked, run in results:
        assert datetime.fromisoformat(run["startedAt"]) >= asked  # a run that began after the call
    runs = sorted({(r["id"], r["startedAt"], r["finishedAt"]) for _, r in results})
    assert len(runs) < 30  # coalesced
    for (_, _, finished), (_, started, _) in itertools.pairwise(runs):
        assert datetime.fromisoformat(started) >= datetime.fromisoformat(finished)  # never two at once


async def test_queries_during_a_run_answer_from_the_previous_snapshot(
    aiohttp_client: ClientFactory, tmp_path: Path, settings: Settings
) -> None:
    store = SlowStore(tmp_path)
    await seed(store)
    client = await aiohttp_client(create_app(settings, store=store))
    await wait_ready(client)
    await store.put("src-data/3000.csv", csv_of("3000", date(2000, 1, 1)))
    store.gate.clear()
    run = asyncio.create_task(gql(client, "mutation { reprocess { users } }"))
    await asyncio.sleep(0.2)
    assert not run.done()
    assert (await gql(client, "{ stats { count } }"))["data"]["stats"]["count"] == 7
    assert (await client.get("/readyz")).status == 200
    store.gate.set()
    assert (await run)["data"]["reprocess"]["users"] == 8
    assert (await gql(client, "{ stats { count } }"))["data"]["stats"]["count"] == 8


async def test_api_token_protects_runs_only(aiohttp_client: ClientFactory, local: LocalStore) -> None:
    client = await aiohttp_client(create_app(Settings(schedule=NEVER, api_token="t0ken-secret"), store=local))
    await wait_ready(client)
    denied = await gql(client, "mutation { reprocess { id } }")
    assert "Authorization: Bearer" in denied["errors"][0]["message"]
    wrong = await gql(client, "mutation { reprocess { id } }", headers={"Authorization": "Bearer nope"})
    assert "Authorization" in wrong["errors"][0]["message"]
    allowed = await gql(client, "mutation { reprocess { id } }", headers={"Authorization": "Bearer t0ken-secret"})
    assert allowed["data"]["reprocess"]["id"] >= 1
    response = await client.post("/data")
    assert response.status == 401 and "t0ken-secret" not in await response.text()
    assert (await client.post("/data", headers={"Authorization": "Bearer t0ken-secret"})).status == 200
    assert (await gql(client, "{ stats { count } }"))["data"]["stats"]["count"] == 7  # queries stay open


async def test_not_ready_until_data_is_loaded(
    aiohttp_client: ClientFactory, tmp_path: Path, settings: Settings
) -> None:
    store = SlowStore(tmp_path)
    await seed(store)
    store.gate.clear()
    client = await aiohttp_client(create_app(settings, store=store))
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503
    body = await gql(client, "{ stats { count } }")
    assert "not available yet" in body["errors"][0]["message"]
    assert (await client.get("/stats")).status == 503
    store.gate.set()
    await wait_ready(client)


async def test_startup_serves_the_committed_output_before_the_first_run(
    aiohttp_client: ClientFactory, tmp_path: Path, settings: Settings
) -> None:
    await seed(LocalStore(tmp_path, "datalake"))
    first = await aiohttp_client(create_app(settings, store=LocalStore(tmp_path, "datalake")))
    await wait_ready(first)
    await first.close()
    await LocalStore(tmp_path, "datalake").put("src-data/3000.csv", csv_of("3000", date(2000, 1, 1)))
    store = SlowStore(tmp_path)
    store.gate.clear()  # the start-up run cannot finish: the stored output is served meanwhile
    client = await aiohttp_client(create_app(settings, store=store))
    await wait_ready(client)
    assert (await gql(client, "{ stats { count } }"))["data"]["stats"]["count"] == 7
    store.gate.set()


async def test_abusive_queries_are_refused(client: TestClient[Any, Any]) -> None:
    aliases = " ".join(f"a{i}: stats {{ count }}" for i in range(100))
    deep = "{ lastRun { conflicts { keys } rejected { key } } }"
    for query in (f"{{ {aliases} }}", "{ " + "users(limit: 1) { userId } " * 3000 + "}"):
        body = await gql(client, query)
        assert body["errors"] and "Internal" not in body["errors"][0]["message"]
    assert "errors" not in await gql(client, deep)
    response = await client.post("/graphql", data=b"x" * (300 * 1024), headers={"Content-Type": "application/json"})
    assert response.status == 413


async def test_graphiql_page_is_served(client: TestClient[Any, Any]) -> None:
    response = await client.get("/graphql", headers={"Accept": "text/html"})
    assert response.status in (200, 503)
    assert "GraphiQL" in await response.text()


def test_app_is_an_aiohttp_application(settings: Settings, tmp_path: Path) -> None:
    assert isinstance(create_app(settings, store=LocalStore(tmp_path, "x-bucket")), web.Application)


async def test_the_schedule_triggers_runs(aiohttp_client: ClientFactory, local: LocalStore) -> None:
    client = await aiohttp_client(create_app(Settings(schedule="* * * * * *"), store=local))  # every second
    await wait_ready(client)
    for _ in range(100):
        runs = (await gql(client, "{ runs(limit: 5) { trigger outcome } }"))["data"]["runs"]
        if any(run["trigger"] == "schedule" for run in runs):
            break
        await asyncio.sleep(0.05)
    assert {"trigger": "schedule", "outcome": "SUCCEEDED"} in runs


async def test_the_same_flow_against_s3(
    aiohttp_client: ClientFactory, minio_store: ObjectStore, settings: Settings
) -> None:
    await seed(minio_store)
    client = await aiohttp_client(create_app(settings, store=minio_store))
    await wait_ready(client)
    body = await gql(client, "{ stats { count } users(limit: 2) { userId imgPath } }")
    assert body["data"]["stats"]["count"] == len(PEOPLE)
    assert body["data"]["users"] == [
        {"userId": "0042", "imgPath": "src-data/img/0042.JPEG"},
        {"userId": "1000", "imgPath": "src-data/img/1000.png"},
    ]
    image = await client.get("/images/0042")
    assert (image.status, image.content_type, await image.read()) == (200, "image/jpeg", b"image of 0042")
    await minio_store.put("src-data/4000.csv", csv_of("4000", date(1980, 5, 5)))
    run = (await gql(client, "mutation { reprocess { added users } }"))["data"]["reprocess"]
    assert run == {"added": 1, "users": len(PEOPLE) + 1}
    stored = (await minio_store.get("processed_data/output.csv")).decode().splitlines()
    assert stored[0] == "user_id,first_name,last_name,birthts,img_path" and len(stored) == len(PEOPLE) + 2


async def test_a_corrupt_stored_output_is_replaced_by_the_startup_run(
    aiohttp_client: ClientFactory, local: LocalStore, settings: Settings
) -> None:
    await local.put("processed_data/output.csv", b"\x00garbage")
    client = await aiohttp_client(create_app(settings, store=local))
    await wait_ready(client)
    assert (await gql(client, "{ stats { count } }"))["data"]["stats"]["count"] == len(PEOPLE)


async def test_post_data_and_the_history_stay_small_with_many_rejected_files(
    aiohttp_client: ClientFactory, many_rejected: ManyRejected, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(settings, store=many_rejected.store))
    await wait_ready(client)
    response = await client.post("/data")
    text = await response.text()
    report = await response.json()
    assert response.status == 200 and len(text) < 4_000  # not ~90 bytes per rejected file
    assert report["rejected_count"] == len(many_rejected.keys)
    assert [r["key"] for r in report["rejected"]] == many_rejected.keys[:REJECTED_SAMPLE]
    runs = (await gql(client, "{ runs { rejectedCount rejected { key } } }"))["data"]["runs"]
    assert [(r["rejectedCount"], len(r["rejected"])) for r in runs] == [(len(many_rejected.keys), REJECTED_SAMPLE)] * 2
    history = many_rejected.data_dir / "datalake" / "processed_data" / "output.csv.runs.json"
    assert history.stat().st_size < 2 * 4_000  # two runs


async def test_rejected_files_pages_through_every_rejected_file(
    aiohttp_client: ClientFactory, many_rejected: ManyRejected
) -> None:
    client = await aiohttp_client(create_app(Settings(schedule=NEVER, max_page_size=1_000), store=many_rejected.store))
    await wait_ready(client)
    total, seen = len(many_rejected.keys), []
    for offset in range(0, total + 1, 1_000):
        query = f"{{ rejectedFiles(limit: 1000, offset: {offset}) {{ totalCount runId files {{ key reason }} }} }}"
        page = (await gql(client, query))["data"]["rejectedFiles"]
        assert (page["totalCount"], page["runId"]) == (total, 1)
        seen += page["files"]
    assert seen == [{"key": key, "reason": many_rejected.reason} for key in many_rejected.keys]
    default = (await gql(client, "{ rejectedFiles { files { key } } }"))["data"]["rejectedFiles"]
    assert [f["key"] for f in default["files"]] == many_rejected.keys[:100]
    too_many = await gql(client, "{ rejectedFiles(limit: 1001) { totalCount } }")
    assert "limit must be at most 1000 (MAX_PAGE_SIZE)" in too_many["errors"][0]["message"]


class FailsOnce(LocalStore):
    """Its first `ensure_bucket` fails with an error nobody planned for."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "datalake")
        self.failures = 1

    async def ensure_bucket(self) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("an unexpected start-up bug")
        await super().ensure_bucket()


async def test_an_unexpected_start_up_failure_is_logged_and_retried(
    aiohttp_client: ClientFactory, tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailsOnce(tmp_path)
    await seed(LocalStore(tmp_path, "datalake"))
    with caplog.at_level(logging.WARNING, logger="service"):
        client = await aiohttp_client(create_app(settings, store=store))
        await wait_ready(client)  # after the retry, a second later
    failure = next(r for r in caplog.records if "start-up failed" in r.getMessage())
    assert failure.levelname == "ERROR" and failure.exc_info is not None
    assert "RuntimeError: an unexpected start-up bug" in caplog.text


class HeldManifest(LocalStore):
    """Holds its first read of the manifest (the start-up load) until released."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "datalake")
        self.gate = asyncio.Event()
        self.held = 1

    async def get_with_info(self, key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        found = await super().get_with_info(key, max_bytes)
        if key.endswith(".manifest") and self.held:
            self.held -= 1
            await self.gate.wait()  # a slow transfer: what arrives is the manifest as it was
        return found


async def test_a_run_during_the_start_up_load_is_not_replaced_by_the_older_commit(
    aiohttp_client: ClientFactory, tmp_path: Path, settings: Settings
) -> None:
    await seed(LocalStore(tmp_path, "datalake"))
    first = await aiohttp_client(create_app(settings, store=LocalStore(tmp_path, "datalake")))
    await wait_ready(first)
    await first.close()  # version 1 is committed
    await LocalStore(tmp_path, "datalake").put("src-data/3000.csv", csv_of("3000", date(2000, 1, 1)))
    store = HeldManifest(tmp_path)
    client = await aiohttp_client(create_app(settings, store=store))
    for _ in range(100):  # the start-up load is reading the manifest
        if not store.held:
            break
        await asyncio.sleep(0.02)
    served: list[int] = []

    async def watch() -> None:
        async for event in client.server.app[STATE].events.subscribe():
            if isinstance(event, SnapshotPublished):
                served.append(event.version)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)
    response = await client.post("/data")  # a run while the load waits: it commits version 2
    assert response.status == 200 and (await response.json())["output_version"] == 2
    store.gate.set()  # the load of version 1 finishes after it
    await gql(client, "mutation { reprocess { outcome } }")  # after the start-up run too
    watcher.cancel()
    assert served and set(served) == {2}, served  # the older commit was never served
    assert (await (await client.get("/readyz")).json())["version"] == 2
    assert (await gql(client, "{ stats { count } }"))["data"]["stats"]["count"] == 8  # with user 3000
