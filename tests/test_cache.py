"""The response cache, automatic persisted queries and HTTP caching of GET, over HTTP against the real app."""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pandas as pd
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, make_mocked_request
from support import NEVER, TODAY, ClientFactory, csv_of, gql, metric, wait_ready

from service import query as queries
from service.app import create_app
from service.cache import ENTRY_OVERHEAD, Answer, BoundedLRU, Operation, ResponseCache
from service.config import Settings
from service.local_store import LocalStore
from service.metrics import Metrics
from service.persisted import PersistedQueries, PersistedQueryError
from service.snapshot import Snapshot

STATS = "{ stats { count averageAge } }"
Client = TestClient[Any, Any]


async def start(aiohttp_client: ClientFactory, local: LocalStore, **settings: Any) -> Client:
    client = await aiohttp_client(create_app(Settings(schedule=NEVER, max_page_size=5, **settings), store=local))
    await wait_ready(client)
    return client


async def post(client: Client, query: str | None = None, **fields: Any) -> ClientResponse:
    return await client.post("/graphql", json={"query": query, **fields} if query else fields)


async def get(client: Client, headers: dict[str, str] | None = None, **params: Any) -> ClientResponse:
    encoded = {name: value if isinstance(value, str) else json.dumps(value) for name, value in params.items()}
    return await client.get("/graphql", params=encoded, headers=headers)


async def counters(client: Client) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    names = ("graphql_cache_hits_total", "graphql_cache_misses_total", "graphql_cache_entries", "graphql_cache_bytes")
    found = {name.removeprefix("graphql_cache_").removesuffix("_total"): metric(text, name) for name in names}
    executed = [line for line in text.splitlines() if line.startswith("graphql_operation_seconds_count")]
    found["executed"] = sum(float(line.rsplit(" ", 1)[1]) for line in executed)
    return found


def persisted(query: str) -> dict[str, Any]:
    return {"persistedQuery": {"version": 1, "sha256Hash": hashlib.sha256(query.encode()).hexdigest()}}


# --- the response cache -----------------------------------------------------------------------------------


async def test_a_repeated_query_is_answered_with_the_same_bytes_without_running_again(client: Client) -> None:
    before = await counters(client)
    first, second = await post(client, STATS), await post(client, STATS)
    assert (first.status, second.status) == (200, 200)
    assert await first.read() == await second.read()
    assert first.headers["Content-Type"] == second.headers["Content-Type"] == "application/json; charset=utf-8"
    after = await counters(client)
    assert after["executed"] - before["executed"] == 1
    assert (after["hits"], after["misses"], after["entries"]) == (1, 1, 1)
    assert after["bytes"] >= len(await first.read()) + len(STATS) + ENTRY_OVERHEAD


@pytest.mark.parametrize(
    "query",
    [
        "{ statsBy(groupBy: AGE) { key count averageAge } }",
        "{ usersConnection(first: 2) { totalCount edges { cursor node { userId } } } }",
    ],
)
async def test_grouped_stats_and_connection_pages_are_kept_too(client: Client, query: str) -> None:
    before = await counters(client)
    first, second = await post(client, query), await post(client, query)
    assert await first.read() == await second.read() and "errors" not in await first.json()
    after = await counters(client)
    assert (after["executed"] - before["executed"], after["hits"] - before["hits"]) == (1, 1)


async def test_the_key_holds_the_variables_the_operation_name_and_the_origin(client: Client) -> None:
    ranged = "query R($min: Int, $max: Int) { stats(filter: {minAge: $min, maxAge: $max}) { count } }"
    wide = await (await post(client, ranged, variables={"min": 0, "max": 200})).json()
    narrow = await (await post(client, ranged, variables={"min": 60, "max": 200})).json()
    assert wide["data"]["stats"]["count"] == 7 and narrow["data"]["stats"]["count"] == 1
    reordered = await post(client, ranged, variables={"max": 200, "min": 60})  # canonical JSON: the same key
    assert (await reordered.json()) == narrow
    assert (await counters(client))["hits"] == 1

    two = 'query A { stats { count } } query B { user(userId: "1000") { userId } }'
    assert (await (await post(client, two, operationName="A")).json())["data"] == {"stats": {"count": 7}}
    assert (await (await post(client, two, operationName="B")).json())["data"] == {"user": {"userId": "1000"}}

    image = '{ user(userId: "1000") { imageUrl } }'
    for host in ("a.example", "b.example:8443", "a.example"):
        response = await client.post("/graphql", json={"query": image}, headers={"Host": host})
        assert (await response.json())["data"]["user"]["imageUrl"] == f"http://{host}/images/1000"
    assert (await counters(client))["hits"] == 2


async def test_a_new_snapshot_ends_the_kept_answers(client: Client, local: LocalStore) -> None:
    assert (await gql(client, STATS))["data"]["stats"]["count"] == 7
    run_id = (await gql(client, "{ rejectedFiles { runId } }"))["data"]["rejectedFiles"]["runId"]
    await local.put("src-data/2000.csv", csv_of("2000", date(1990, 1, 1)))
    await gql(client, "mutation { reprocess { runId } }")
    assert (await gql(client, STATS))["data"]["stats"]["count"] == 8
    # A run with nothing changed serves the same version again, with its own report: news as well.
    version = (await (await client.get("/readyz")).json())["version"]
    await gql(client, "mutation { reprocess { runId } }")
    assert (await (await client.get("/readyz")).json())["version"] == version
    assert (await gql(client, "{ rejectedFiles { runId } }"))["data"]["rejectedFiles"]["runId"] == run_id + 2
    assert (await counters(client))["hits"] == 0


async def test_the_next_utc_day_ends_the_kept_answers(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    today = [TODAY - timedelta(days=1)]
    monkeypatch.setattr(queries, "today_utc", lambda: today[0])
    birthday = '{ user(userId: "1000") { age } }'  # 30 today, so 29 yesterday
    assert (await gql(client, birthday))["data"]["user"]["age"] == 29
    assert (await gql(client, birthday))["data"]["user"]["age"] == 29
    today[0] = TODAY
    assert (await gql(client, birthday))["data"]["user"]["age"] == 30
    assert (await counters(client))["hits"] == 1


@pytest.mark.parametrize(
    "query",
    [
        "{ users { userId } }",  # 7 users: more than MAX_PAGE_SIZE (5)
        "{ a: users(limit: 5) { userId } b: users(limit: 5) { userId } }",  # over the row budget
        "{ stats { count } users(limit: -1) { userId } }",  # an error beside an answer
        "{ users { userId nope } }",  # does not validate
        "{ lastRun { runId } }",  # the run history
        "{ stats { count } runs { runId } }",
        "mutation { reprocess { runId } }",
    ],
)
async def test_errors_runs_and_mutations_are_worked_out_every_time(client: Client, query: str) -> None:
    before = await counters(client)
    first, second = await gql(client, query), await gql(client, query)
    after = await counters(client)
    assert (after["entries"], after["hits"], after["misses"] - before["misses"]) == (0, before["hits"], 2)
    if "errors" not in first:
        assert after["executed"] - before["executed"] == 2
    if "reprocess" in query:
        assert second["data"]["reprocess"]["runId"] == first["data"]["reprocess"]["runId"] + 1


async def test_a_cache_of_zero_bytes_keeps_nothing(aiohttp_client: ClientFactory, local: LocalStore) -> None:
    client = await start(aiohttp_client, local, response_cache_bytes=0)
    before = await counters(client)
    for _ in range(3):
        assert (await gql(client, STATS))["data"]["stats"]["count"] == 7
    after = await counters(client)
    assert (after["hits"], after["misses"], after["entries"], after["executed"] - before["executed"]) == (0, 0, 0, 3)


async def test_the_cache_holds_at_most_its_bytes(aiohttp_client: ClientFactory, local: LocalStore) -> None:
    capacity = 3 * (ENTRY_OVERHEAD + 200)
    client = await start(aiohttp_client, local, response_cache_bytes=capacity)
    for low in range(20):
        await post(client, "query($low: Int) { stats(filter: {minAge: $low}) { count } }", variables={"low": low})
        found = await counters(client)
        assert 0 < found["bytes"] <= capacity
    assert found["entries"] < 20


def test_bounded_lru_drops_the_least_recently_used() -> None:
    lru: BoundedLRU[str, int] = BoundedLRU(100)
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    assert lru.get("a") == 1  # "b" is now the least recently used
    lru.put("c", 3, 40)
    assert (lru.get("a"), lru.get("b"), lru.get("c"), lru.size, len(lru)) == (1, None, 3, 80, 2)
    lru.put("c", 4, 60)  # replaced, counted once
    assert (lru.get("c"), lru.size, len(lru)) == (4, 100, 2)
    lru.put("big", 5, 101)  # larger than the whole capacity: not kept, nothing dropped for it
    assert (lru.get("big"), lru.size, len(lru)) == (None, 100, 2)


def snapshot(version: int) -> Snapshot:
    table = pd.DataFrame({"user_id": ["1"], "first_name": ["A"], "last_name": ["B"], "birthts": [0], "img_path": [""]})
    return Snapshot(table, version, datetime.now(UTC))


def test_an_answer_worked_out_across_a_new_snapshot_is_not_kept() -> None:
    cache, request = ResponseCache(1 << 20, Metrics()), make_mocked_request("POST", "/graphql")
    operation = Operation(STATS, None, None, None)
    old, new = snapshot(1), snapshot(1)
    started = cache.key(old, operation, request)
    assert started is not None
    ended = cache.key(new, operation, request)  # served meanwhile (the same version: still news)
    assert ended is not None and ended != started
    cache.put(started, Answer.of(b"{}"))
    assert cache.get(ended) is None


def test_the_cache_does_not_keep_an_old_snapshot_alive() -> None:
    cache, request = ResponseCache(1 << 20, Metrics()), make_mocked_request("POST", "/graphql")
    old = snapshot(1)
    cache.key(old, Operation(STATS, None, None, None), request)
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None


# --- automatic persisted queries --------------------------------------------------------------------------


async def test_a_persisted_query_is_not_found_then_registered_then_run_by_its_hash(client: Client) -> None:
    query = "query Ranged($min: Int) { stats(filter: {minAge: $min}) { count } }"
    variables, extensions = {"min": 60}, persisted(query)
    unknown = await post(client, variables=variables, extensions=extensions)
    assert unknown.status == 200
    assert await unknown.json() == {
        "errors": [{"message": "PersistedQueryNotFound", "extensions": {"code": "PERSISTED_QUERY_NOT_FOUND"}}]
    }
    registered = await post(client, query, variables=variables, extensions=extensions)
    expected = {"data": {"stats": {"count": 1}}}
    assert await registered.json() == expected
    by_post = await post(client, variables=variables, extensions=extensions)
    assert await by_post.json() == expected
    by_get = await get(client, variables=variables, extensions=extensions, operationName="Ranged")
    assert by_get.status == 200 and await by_get.json() == expected
    by_browser = await get(client, headers={"Accept": "text/html,*/*"}, extensions=extensions, variables={"min": 0})
    assert await by_browser.json() == {"data": {"stats": {"count": 7}}}  # an answer, not the GraphiQL page
    assert (await counters(client))["hits"] == 1  # by_post: the hash stands for the document, the key is the same
    text = await (await client.get("/metrics")).text()
    assert metric(text, "graphql_persisted_queries") == 1


async def test_a_hash_that_is_not_the_querys_is_refused_and_registers_nothing(client: Client) -> None:
    extensions = persisted(STATS)
    refused = await post(client, "{ stats { count } }", extensions=extensions)
    body = await refused.json()
    assert refused.status == 400 and body["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_HASH_MISMATCH"
    assert "not the SHA-256 of the query" in body["errors"][0]["message"]
    still_unknown = await (await post(client, extensions=extensions)).json()
    assert still_unknown["errors"][0]["message"] == "PersistedQueryNotFound"


@pytest.mark.parametrize(
    "extension",
    [
        {"version": 2, "sha256Hash": "0" * 64},
        {"sha256Hash": "0" * 64},
        {"version": 1, "sha256Hash": "not a hash"},
        {"version": 1},
        "v1",
    ],
)
async def test_a_malformed_persisted_query_is_a_bad_request(client: Client, extension: object) -> None:
    response = await post(client, STATS, extensions={"persistedQuery": extension})
    body = await response.json()
    assert response.status == 400 and body["errors"][0]["extensions"]["code"] == "BAD_REQUEST"


async def test_persisted_queries_can_be_turned_off(aiohttp_client: ClientFactory, local: LocalStore) -> None:
    client = await start(aiohttp_client, local, persisted_query_bytes=0)
    for response in (
        await post(client, STATS, extensions=persisted(STATS)),
        await post(client, extensions=persisted(STATS)),
    ):
        body = await response.json()
        assert body["errors"][0] == {
            "message": "PersistedQueryNotSupported",
            "extensions": {"code": "PERSISTED_QUERY_NOT_SUPPORTED"},
        }
    assert (await gql(client, STATS))["data"]["stats"]["count"] == 7  # plain queries as ever


def test_the_registry_is_bounded() -> None:
    metrics = Metrics()
    registry = PersistedQueries(3 * (ENTRY_OVERHEAD + 40), metrics)
    documents = [f"{{ stats {{ count }} }} # {i:04}" for i in range(10)]
    for document in documents:
        registry.resolve(Operation(document, None, None, persisted(document)))
    assert metrics.registry.get_sample_value("graphql_persisted_queries") == 3
    assert registry.resolve(Operation(None, None, None, persisted(documents[-1]))).query == documents[-1]
    with pytest.raises(PersistedQueryError, match="PersistedQueryNotFound"):
        registry.resolve(Operation(None, None, None, persisted(documents[0])))


# --- HTTP caching of GET ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_bytes", [64 << 20, 0])
async def test_a_get_answer_has_an_etag_and_is_not_modified_when_it_matches(
    aiohttp_client: ClientFactory, local: LocalStore, cache_bytes: int
) -> None:
    client = await start(aiohttp_client, local, response_cache_bytes=cache_bytes)
    first = await get(client, query=STATS)
    etag = first.headers["ETag"]
    assert first.status == 200 and first.headers["Cache-Control"] == "no-cache" and etag.startswith('"')
    for condition in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = await get(client, query=STATS, headers={"If-None-Match": condition})
        assert again.status == 304 and await again.read() == b""
        assert again.headers["ETag"] == etag and again.headers["Cache-Control"] == "no-cache"
    other = await get(client, query=STATS, headers={"If-None-Match": '"other"'})
    assert other.status == 200 and await other.read() == await first.read() and other.headers["ETag"] == etag
    assert "ETag" not in (await post(client, STATS)).headers  # POST answers are not HTTP-cacheable


async def test_the_etag_follows_the_answer(client: Client, local: LocalStore) -> None:
    etag = (await get(client, query=STATS)).headers["ETag"]
    await gql(client, "mutation { reprocess { runId } }")  # a new snapshot, the same data
    assert (await get(client, query=STATS, headers={"If-None-Match": etag})).status == 304
    await local.put("src-data/2000.csv", csv_of("2000", date(1990, 1, 1)))
    await gql(client, "mutation { reprocess { runId } }")
    changed = await get(client, query=STATS, headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag
    assert (await changed.json())["data"]["stats"]["count"] == 8


async def test_a_get_answer_with_errors_is_not_stored(client: Client) -> None:
    for response in (await get(client, query="{ users { userId } }"), await get(client, extensions=persisted(STATS))):
        assert response.status == 200 and (await response.json())["errors"]
        assert response.headers["Cache-Control"] == "no-store" and "ETag" not in response.headers


async def test_mutations_are_refused_over_get_even_when_persisted(client: Client) -> None:
    mutation = "mutation { reprocess { runId } }"
    runs = len((await gql(client, "{ runs { runId } }"))["data"]["runs"])
    refused = await get(client, query=mutation)
    assert refused.status == 400 and "mutations are not allowed when using GET" in await refused.text()
    registered = await (await post(client, mutation, extensions=persisted(mutation))).json()  # POST runs it
    assert registered["data"]["reprocess"]["runId"] == runs + 1
    by_hash = await get(client, extensions=persisted(mutation))
    assert by_hash.status == 400 and "mutations are not allowed when using GET" in await by_hash.text()
    assert len((await gql(client, "{ runs { runId } }"))["data"]["runs"]) == runs + 1
