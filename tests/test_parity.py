"""REST and GraphQL offer the same filters and answer them alike: every filter of the domain definition
(`query.FILTERS`) is a field of GraphQL's `UserFilter` and a REST query parameter, and for generated
filters `GET /data` (all pages) and `users`, `GET /stats` and `stats`, `GET /stats?group_by=` and
`statsBy`, and the two run reports agree under the names the README's table gives."""

from __future__ import annotations

import re
import threading
import typing
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import MultiDict
from support import NEVER, ClientFactory, all_pages, gql, wait_ready

from service import query, rest
from service.app import create_app
from service.config import Settings
from service.local_store import LocalStore
from service.schema import build_schema

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4  # MAX_PAGE_SIZE here: most answers take several pages
GRAPHQL_TYPES = {bool: "Boolean", int: "Int", str: "String"}
# user_id -> (first name, last name, birth date, image); names in several scripts and cases
PEOPLE = {
    "01": ("Anna", "Smith", date(1990, 5, 1), True),
    "02": ("JOHANN", "Strauß", date(1961, 12, 31), False),
    "03": ("Zoë", "O'Brien", date(2010, 2, 28), True),
    "04": ("li", "Na", date(1950, 1, 1), False),
    "05": ("Ösel", "Ångström", date(2000, 7, 15), True),
    "06": ("Mary Ann", "Lee", date(1985, 3, 3), False),
    "07": ("Sam", "Anderson", date(1975, 9, 9), True),
    "08": ("İlkay", "Işık", date(2004, 2, 29), False),
    "09": ("Nanna", "Smithson", date(1999, 1, 1), True),
}
FRAGMENTS = sorted(
    {
        name[i : i + n]
        for first, last, *_ in PEOPLE.values()
        for name in (first, last)
        for n in (1, 2, 3)
        for i in range(len(name))
    }
)


def csv_of(user_id: str) -> bytes:
    first, last, born, _ = PEOPLE[user_id]
    birthts = int(datetime(born.year, born.month, born.day, 12, tzinfo=UTC).timestamp() * 1000)
    return f"first_name,last_name,birthts\n{first},{last},{birthts}\n".encode()


@pytest.fixture
async def client(aiohttp_client: ClientFactory, tmp_path: Path) -> TestClient[Any, Any]:
    store = LocalStore(tmp_path, "datalake")
    await store.ensure_bucket()
    await store.put("src-data/broken.csv", b"first_name\nonly\n")  # a rejected file and a conflict, for the report
    await store.put("src-data/old/01.csv", csv_of("01"))
    for user_id, (*_, image) in PEOPLE.items():
        await store.put(f"src-data/{user_id}.csv", csv_of(user_id))
        if image:
            await store.put(f"src-data/img/{user_id}.png", b"png")
    client = await aiohttp_client(create_app(Settings(schedule=NEVER, max_page_size=PAGE), store=store))
    await wait_ready(client)
    return client


def values(field: query.FilterField[Any]) -> st.SearchStrategy[Any]:
    """Values of a filter's type, in its bounds mostly, and just outside them now and then."""
    low, high = field.bounds or (0, 0)
    if field.type is bool:
        return st.booleans()
    if field.type is int:
        return st.integers(low, low + 100) | st.integers(low - 1, high + 1)
    if field.type is str:
        cased = st.tuples(st.sampled_from(FRAGMENTS), st.booleans()).map(lambda f: f[0].upper() if f[1] else f[0])
        return cased | st.text(max_size=3) | st.text(min_size=high, max_size=high + 1)
    raise AssertionError(f"no values for {field.name} of type {field.type}: add them here")


filters = st.fixed_dictionaries({}, optional={field.name: values(field) for field in query.FILTERS})


def rest_params(values: dict[str, Any]) -> dict[str, str]:
    return {
        f.rest: str(v).lower() if f.type is bool else str(v)
        for f in query.FILTERS
        if (v := values.get(f.name)) is not None
    }


def graphql_filter(values: dict[str, Any]) -> dict[str, Any]:
    return {f.graphql: values[f.name] for f in query.FILTERS if f.name in values}


def named(message: str, api: query.Api) -> set[str]:
    """The filters (by domain name) a message names, as `api` spells them."""
    return {f.name for f in query.FILTERS if re.search(rf"\b{f.spelling(api)}\b", message)}


def graphql_fields(type_name: str) -> dict[str, str]:
    """A GraphQL type's fields (not the deprecated ones) or input fields, with the name of their type."""
    document = f'{{ __type(name: "{type_name}") {{ fields {{ name type {{ name ofType {{ name }} }} }} '
    document += "inputFields { name type { name ofType { name } } } } }"
    result = build_schema().execute_sync(document)
    assert result.errors is None and result.data is not None
    found = result.data["__type"]["fields"] or result.data["__type"]["inputFields"]
    return {f["name"]: f["type"]["name"] or f["type"]["ofType"]["name"] for f in found}


def test_every_filter_is_a_graphql_input_field_and_a_rest_parameter() -> None:
    assert graphql_fields("UserFilter") == {f.graphql: GRAPHQL_TYPES[f.type] for f in query.FILTERS}
    assert {f.rest for f in query.FILTERS} == rest.FILTER_PARAMS
    samples: dict[type, tuple[str, object]] = {bool: ("false", False), int: ("7", 7), str: ("Ann", "Ann")}
    for field in query.FILTERS:
        spelled, value = samples[field.type]
        parsed = rest.parse_filter(MultiDict({field.rest: spelled}))
        assert parsed == query.UserFilter(**{field.name: value}), field.name


async def test_every_statistic_is_a_graphql_field_and_a_rest_key(client: TestClient[Any, Any]) -> None:
    hints = typing.get_type_hints(query.Stats)
    assert graphql_fields("Stats") == {f.graphql: graphql_scalar(hints[f.name]) for f in query.STATS_FIELDS}
    assert list(await (await client.get("/stats")).json()) == [f.rest for f in query.STATS_FIELDS]


def graphql_scalar(hint: object) -> str:
    """The GraphQL type of a Python one, optional or not."""
    (base,) = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return {int: "Int", float: "Float"}[base]


async def test_every_grouping_is_a_graphql_enum_value_and_a_rest_value(client: TestClient[Any, Any]) -> None:
    enum = build_schema().execute_sync('{ __type(name: "StatsGroupBy") { enumValues { name } } }')
    assert enum.data is not None
    assert [v["name"] for v in enum.data["__type"]["enumValues"]] == [g.graphql for g in query.GROUPINGS]
    hints = typing.get_type_hints(query.StatsGroup)
    assert graphql_fields("StatsGroup") == {
        f.graphql: "String" if f.name == "key" else graphql_scalar(hints[f.name]) for f in query.GROUP_FIELDS
    }
    for grouping in query.GROUPINGS:
        groups = await (await client.get("/stats", params={"group_by": grouping.rest})).json()
        assert groups and [list(group) for group in groups] == [[f.rest for f in query.GROUP_FIELDS]] * len(groups)


def test_the_readme_table_names_every_filter_statistic_and_grouping() -> None:
    readme = (ROOT / "README.md").read_text()
    for field in (*query.FILTERS, *query.STATS_FIELDS, *query.GROUPINGS, *query.GROUP_FIELDS):
        assert f"\n| `{field.rest}` | `{field.graphql}` |" in readme, field.name


async def gql_with(client: TestClient[Any, Any], document: str, variables: dict[str, Any]) -> dict[str, Any]:
    """The answer to a document with variables, errors included."""
    response = await client.post("/graphql", json={"query": document, "variables": variables})
    body: dict[str, Any] = await response.json()
    return body


async def graphql_users(client: TestClient[Any, Any], flt: dict[str, Any]) -> dict[str, Any]:
    """Every page of `users`, or the first error."""
    fields = "userId firstName lastName birthts imgPath"
    document = f"query($f: UserFilter, $o: Int!) {{ users(filter: $f, limit: {PAGE}, offset: $o) {{ {fields} }} }}"
    rows: list[dict[str, Any]] = []
    while True:
        body = await gql_with(client, document, {"f": flt, "o": len(rows)})
        if body.get("errors"):
            return body
        rows += body["data"]["users"]
        if len(body["data"]["users"]) < PAGE:
            return {"data": rows}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=filters)
async def test_both_apis_return_the_same_users_and_statistics(
    client: TestClient[Any, Any], chosen: dict[str, Any]
) -> None:
    flt, params = graphql_filter(chosen), rest_params(chosen)
    fields = " ".join(f.graphql for f in query.STATS_FIELDS)
    document = f"query($f: UserFilter) {{ stats(filter: $f) {{ {fields} }} }}"
    graphql_stats = await gql_with(client, document, {"f": flt})
    users = await graphql_users(client, flt)
    rest_stats = await client.get("/stats", params=params)
    first_page = await client.get("/data", params=params)

    if rest_stats.status == 400:  # refused by both, each naming the same filters in its own spelling
        message = (await rest_stats.json())["error"]
        assert (await first_page.json())["error"] == message
        refused = named(message, query.Api.REST)
        assert refused, message
        for body in (users, graphql_stats):
            assert body.get("data") is None
            assert named(body["errors"][0]["message"], query.Api.GRAPHQL) == refused, (message, body)
        return

    assert rest_stats.status == 200 and "errors" not in graphql_stats, (params, graphql_stats)
    numbers = await rest_stats.json()
    assert {f.name: numbers[f.rest] for f in query.STATS_FIELDS} == {
        f.name: graphql_stats["data"]["stats"][f.graphql] for f in query.STATS_FIELDS
    }
    rows = await all_pages(client, params)
    assert rows == [
        {"user_id": u["userId"], "first_name": u["firstName"], "last_name": u["lastName"], "birthts": u["birthts"],
         "img_path": u["imgPath"] or ""}  # no image: "" over REST, as in output.csv; null over GraphQL
        for u in users["data"]
    ]  # fmt: skip
    assert len(rows) == numbers["count"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=filters, grouping=st.sampled_from(query.GROUPINGS))
async def test_both_apis_return_the_same_groups(
    client: TestClient[Any, Any], chosen: dict[str, Any], grouping: query.Grouping
) -> None:
    fields = " ".join(f.graphql for f in query.GROUP_FIELDS)
    document = f"query($g: StatsGroupBy!, $f: UserFilter) {{ statsBy(groupBy: $g, filter: $f) {{ {fields} }} }}"
    graphql_groups = await gql_with(client, document, {"g": grouping.graphql, "f": graphql_filter(chosen)})
    rest_groups = await client.get("/stats", params={**rest_params(chosen), "group_by": grouping.rest})
    totals = await client.get("/stats", params=rest_params(chosen))

    if rest_groups.status == 400:  # refused by both, naming the same filters, as `stats` and `GET /stats` are
        message = (await rest_groups.json())["error"]
        assert message == (await totals.json())["error"]
        assert named(graphql_groups["errors"][0]["message"], query.Api.GRAPHQL) == named(message, query.Api.REST)
        return

    groups = await rest_groups.json()
    assert [{f.name: g[f.rest] for f in query.GROUP_FIELDS} for g in groups] == [
        {f.name: g[f.graphql] for f in query.GROUP_FIELDS} for g in graphql_groups["data"]["statsBy"]
    ]
    total = await totals.json()  # the groups partition the users that `stats` counts
    assert sum(g["count"] for g in groups) == total["count"]
    assert min((g["youngest_age"] for g in groups), default=None) == total["youngest_age"]
    assert max((g["oldest_age"] for g in groups), default=None) == total["oldest_age"]


async def test_rest_refuses_an_unknown_grouping_naming_the_allowed_ones(client: TestClient[Any, Any]) -> None:
    for params in ({"group_by": "Age"}, {"group_by": ""}, [("group_by", "age"), ("group_by", "age")]):
        response = await client.get("/stats", params=params)
        assert response.status == 400
        message = (await response.json())["error"]
        assert message in {
            "group_by must be one of age, birth_year, has_image, got 'Age'",
            "group_by must be one of age, birth_year, has_image, got ''",
            "group_by is given more than once",
        }, message
    assert (await client.get("/data", params={"group_by": "age"})).status == 400  # /stats only


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def camel_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {camel(k): camel_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [camel_keys(v) for v in value]
    return value


async def test_the_run_reports_differ_only_in_the_case_of_their_names(client: TestClient[Any, Any]) -> None:
    response = await client.post("/data")
    report = await response.json()
    assert report["conflicts"] and report["rejected"]  # the nested lists are compared too
    fields = graphql_fields("ProcessingRun")  # without the deprecated `id`
    assert set(fields) == {camel(key) for key in report}
    nested = {"rejected": "key reason", "conflicts": "userId kind keys winner"}
    selection = " ".join(f"{name} {{ {nested[name]} }}" if name in nested else name for name in fields)
    last = (await gql(client, f"{{ lastRun {{ {selection} }} }}"))["data"]["lastRun"]
    assert last == camel_keys(report) | {"outcome": report["outcome"].upper(), "kind": report["kind"].upper()}
    assert (await gql(client, "{ lastRun { id runId } }"))["data"]["lastRun"]["id"] == report["run_id"]


async def test_statistics_that_read_every_row_are_counted_off_the_event_loop(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A name filter searches every user: on the loop, a million of them would hold every other request.
    on_the_loop: list[bool] = []
    original = query.stats

    def spy(*args: Any) -> query.Stats:
        on_the_loop.append(threading.current_thread() is threading.main_thread())
        return original(*args)

    monkeypatch.setattr(query, "stats", spy)
    await client.get("/stats", params={"name_contains": "an"})
    await client.get("/stats", params={"min_age": "3"})
    await gql(client, '{ stats(filter: {nameContains: "an"}) { count } }')
    await gql_with(client, "query($f: UserFilter) { stats(filter: $f) { count } }", {"f": {"nameContains": "an"}})
    await gql(client, "{ stats(filter: {minAge: 3}) { count } }")
    assert on_the_loop == [False, True, False, False, True]


async def test_groups_that_read_every_row_are_counted_off_the_event_loop(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    on_the_loop: list[bool] = []
    original = query.stats_by

    def spy(*args: Any) -> list[query.StatsGroup]:
        on_the_loop.append(threading.current_thread() is threading.main_thread())
        return original(*args)

    monkeypatch.setattr(query, "stats_by", spy)
    await client.get("/stats", params={"group_by": "age", "name_contains": "an"})
    await client.get("/stats", params={"group_by": "birth_year", "min_age": "3"})
    await gql(client, '{ statsBy(groupBy: AGE, filter: {nameContains: "an"}) { key } }')
    await gql(client, "{ statsBy(groupBy: HAS_IMAGE, filter: {minAge: 3}) { key } }")
    assert on_the_loop == [False, True, False, True]
