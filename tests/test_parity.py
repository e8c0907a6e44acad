"""REST and GraphQL answer alike under the names the README's table gives: the run report of `POST /data`
and GraphQL's `ProcessingRun` differ in the case of their names only."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from test_app import NEVER, ClientFactory, gql, wait_ready

from service.app import create_app
from service.config import Settings
from service.local_store import LocalStore
from service.schema import build_schema

PAGE = 4  # MAX_PAGE_SIZE here: most answers take several pages
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


def graphql_fields(type_name: str) -> dict[str, str]:
    """A GraphQL type's fields (not the deprecated ones) or input fields, with the name of their type."""
    document = f'{{ __type(name: "{type_name}") {{ fields {{ name type {{ name ofType {{ name }} }} }} '
    document += "inputFields { name type { name ofType { name } } } } }"
    result = build_schema().execute_sync(document)
    assert result.errors is None and result.data is not None
    found = result.data["__type"]["fields"] or result.data["__type"]["inputFields"]
    return {f["name"]: f["type"]["name"] or f["type"]["ofType"]["name"] for f in found}


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
    assert last == camel_keys(report) | {"outcome": report["outcome"].upper()}
    assert (await gql(client, "{ lastRun { id runId } }"))["data"]["lastRun"]["id"] == report["run_id"]
