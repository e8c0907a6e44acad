"""Cursor paging (`usersConnection`): pages in user_id order, forward and back, that keep their place across
snapshots; Relay's pageInfo at both ends; cursors and sizes refused with a message; the row budget."""

from __future__ import annotations

import base64
import threading
from collections.abc import Collection
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from support import NEVER, PEOPLE, ClientFactory, csv_of, gql, seed, snapshot_of, wait_ready
from support import utc_ms as ms

from service import query
from service.app import create_app
from service.config import Settings
from service.errors import BadRequest
from service.local_store import LocalStore
from service.snapshot import Snapshot

TODAY = date(2026, 11, 27)
EVERYONE = query.UserFilter()


def people(ids: list[str], with_image: Collection[str] = ()) -> Snapshot:
    return snapshot_of([(i, ms(1990, 1, 1), "img.png" if i in with_image else "") for i in ids])


def page(
    snapshot: Snapshot,
    *,
    first: int | None = None,
    after: str | None = None,
    last: int | None = None,
    before: str | None = None,
    flt: query.UserFilter = EVERYONE,
    maximum: int = 100,
) -> tuple[list[str], query.Window]:
    """The user ids of a page, and the page (cursors given as user ids, encoded here)."""
    asked = query.cursor_page(
        first,
        None if after is None else query.cursor(after),
        last,
        None if before is None else query.cursor(before),
        maximum,
    )
    found = query.window(snapshot, query.select(snapshot, flt, TODAY), asked)
    return [str(u) for u in snapshot.user_ids[found.positions]], found


ids_strategy = st.lists(st.text(alphabet="0129aZ_", min_size=1, max_size=4), unique=True, max_size=25)


@settings(deadline=None)  # results, not speed: a busy machine must not fail it
@given(
    ids=ids_strategy,
    images=st.lists(st.booleans(), min_size=25, max_size=25),
    has_image=st.none() | st.booleans(),
    size=st.integers(min_value=1, max_value=6),
)
def test_paging_forward_and_back_visits_the_users_in_users_order(
    ids: list[str], images: list[bool], has_image: bool | None, size: int
) -> None:
    snapshot = people(ids, {i for i, image in zip(ids, images, strict=False) if image})
    flt = query.UserFilter(has_image=has_image)
    expected = [r.user_id for r in query.users(snapshot, query.select(snapshot, flt, TODAY), TODAY)]

    forward: list[str] = []
    after: str | None = None
    while True:
        got, found = page(snapshot, first=size, after=after, flt=flt)
        assert found.total == len(expected)
        assert found.has_previous == bool(forward)  # every user before the page counts, as the spec permits
        forward += got
        assert len(got) == size or not found.has_next  # only the last page is short
        if not found.has_next:
            break
        after = got[-1]
    assert forward == expected

    backward: list[str] = []
    before: str | None = None
    while True:
        got, found = page(snapshot, last=size, before=before, flt=flt)
        assert found.has_next == bool(backward)
        backward = got + backward
        assert len(got) == size or not found.has_previous
        if not found.has_previous:
            break
        before = got[0]
    assert backward == expected


def test_page_info_at_the_ends_and_between_two_cursors() -> None:
    snapshot = people(["a", "b", "c", "d", "e"])
    assert page(snapshot, first=2)[0] == ["a", "b"]
    assert (page(snapshot, first=2)[1].has_previous, page(snapshot, first=2)[1].has_next) == (False, True)
    got, found = page(snapshot, first=2, after="c")  # the end: nothing follows
    assert (got, found.has_previous, found.has_next) == (["d", "e"], True, False)
    got, found = page(snapshot, first=5)  # exactly everything
    assert (got, found.has_previous, found.has_next) == (["a", "b", "c", "d", "e"], False, False)
    got, found = page(snapshot, last=2)  # the end, from the back
    assert (got, found.has_previous, found.has_next) == (["d", "e"], True, False)
    got, found = page(snapshot, last=2, before="c")  # the start, from the back
    assert (got, found.has_previous, found.has_next) == (["a", "b"], False, True)
    # Between two cursors, with first: hasNextPage tells whether the range goes on (Relay's definition).
    got, found = page(snapshot, first=2, after="a", before="e")
    assert (got, found.has_previous, found.has_next) == (["b", "c"], True, True)
    got, found = page(snapshot, first=3, after="a", before="e")
    assert (got, found.has_previous, found.has_next) == (["b", "c", "d"], True, False)
    got, found = page(snapshot, last=3, after="a", before="e")
    assert (got, found.has_previous, found.has_next) == (["b", "c", "d"], False, True)
    got, found = page(snapshot, first=2, after="d", before="b")  # crossed cursors: nothing between
    assert (got, found.has_previous, found.has_next) == ([], True, False)
    got, found = page(snapshot, first=0)
    assert (got, found.has_previous, found.has_next, found.total) == ([], False, True, 5)
    got, found = page(snapshot, maximum=3)  # neither first nor last: the first MAX_PAGE_SIZE
    assert (got, found.has_previous, found.has_next) == (["a", "b", "c"], False, True)


def test_an_empty_selection_has_one_empty_page() -> None:
    for snapshot, flt in ((people([]), EVERYONE), (people(["a", "b"]), query.UserFilter(has_image=True))):
        for asked in ({"first": 3}, {"last": 3}, {"first": 3, "after": "a"}, {"last": 3, "before": "zz"}):
            got, found = page(snapshot, flt=flt, **asked)
            assert (got, found.total, found.has_previous, found.has_next) == ([], 0, False, False), asked


def test_a_cursor_keeps_its_place_when_users_come_and_go() -> None:
    before = people(["a", "c", "e", "g", "i"])
    first_page, _ = page(before, first=2)
    assert first_page == ["a", "c"]
    cursor = first_page[-1]
    # Users added before the cursor, and after it, in a later snapshot: the next page does not shift.
    added = people(["a", "b", "c", "d", "e", "g", "i"])
    assert page(added, first=2, after=cursor)[0] == ["d", "e"]
    assert page(people(["0", "a", "b", "c", "e", "g", "i"]), first=2, after=cursor)[0] == ["e", "g"]
    # The cursor's own user deleted: the next page starts where it was.
    assert page(people(["a", "e", "g", "i"]), first=2, after=cursor)[0] == ["e", "g"]
    assert page(people(["a", "e", "g", "i"]), last=2, before="f")[0] == ["a", "e"]  # backward too
    # Every user before the cursor gone: still the users after it, and nothing before.
    got, found = page(people(["g", "i"]), first=2, after=cursor)
    assert (got, found.has_previous) == (["g", "i"], False)


def test_a_cursor_is_opaque_versioned_text_holding_the_user_id() -> None:
    for user_id in ("1000", "0042", "Zoë Ångström", "a:b", "x" * 300):
        token = query.cursor(user_id)
        assert token.isascii() and user_id not in token
        assert base64.urlsafe_b64decode(token).decode() == f"v1:{user_id}"
        assert query.cursor_page(1, token, None, None, 5).after == user_id


def b64(payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).decode()


@pytest.mark.parametrize(
    ("argument", "value", "problem"),
    [
        ("after", "not a cursor!", "not base64 of one"),
        ("after", "djE6MTAwMA", "not base64 of one"),  # padding cut off
        ("before", "Zoë", "not base64 of one"),
        ("after", "", "not a format this service wrote"),
        ("after", b64(b"1000"), "not a format this service wrote"),  # no version
        ("before", b64(b"v2:1000"), "not a format this service wrote"),  # a later version
        ("after", b64(b"v1:"), "not a format this service wrote"),  # no user id
        ("after", b64(b"v1:\xff\xfe"), "not base64 of one"),  # not UTF-8 inside
    ],
)
def test_a_bad_cursor_is_refused_naming_the_argument_and_the_problem(argument: str, value: str, problem: str) -> None:
    cursors = {"after": None, "before": None} | {argument: value}
    with pytest.raises(BadRequest, match=rf"^{argument} must be a cursor from usersConnection, got .*: {problem}$"):
        query.cursor_page(3, cursors["after"], None, cursors["before"], 5)


def test_a_long_bad_cursor_is_shown_cut_short() -> None:
    with pytest.raises(BadRequest) as refused:
        query.cursor_page(3, "!" * 10_000, None, None, 5)
    assert len(str(refused.value)) < 200 and "'...:" in str(refused.value)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"first": 2, "last": 2}, "^first and last cannot be combined: page forward with first and after, or back"),
        ({"first": -1}, r"^first must not be negative, got -1$"),
        ({"last": -3}, r"^last must not be negative, got -3$"),
        ({"first": 6}, r"^first must be at most 5 \(MAX_PAGE_SIZE\), got 6; fetch the following pages with after"),
        ({"last": 6}, r"^last must be at most 5 \(MAX_PAGE_SIZE\), got 6; fetch the preceding pages with before"),
    ],
)
def test_page_sizes_are_bounded_and_first_and_last_are_not_combined(sizes: dict[str, int], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        query.cursor_page(sizes.get("first"), None, sizes.get("last"), None, 5)
    assert query.cursor_page(5, None, None, None, 5).first == 5
    assert query.cursor_page(None, None, None, None, 5) == query.CursorPage(5, None, None, None)


def test_cursor_search_holds_for_many_users() -> None:
    # One binary search over the snapshot's user_ids, one over the selected positions.
    ids = [f"{i:06d}" for i in range(0, 200_000, 2)]
    snapshot = people(ids, set(ids[::3]))
    flt = query.UserFilter(has_image=True)
    got, found = page(snapshot, first=3, after="000013", flt=flt)  # an odd id: never a user
    assert got == ["000018", "000024", "000030"] and found.total == len(ids[::3])
    assert np.all(np.diff(query.select(snapshot, flt, TODAY)) > 0)  # positions in user_id order, as searched


# -- Over HTTP ----------------------------------------------------------------------------------------------

EDGES = "totalCount edges { cursor node { userId } } pageInfo { hasNextPage hasPreviousPage startCursor endCursor }"


@pytest.fixture
async def local(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path, "datalake")
    await seed(store)
    return store


@pytest.fixture
async def client(aiohttp_client: ClientFactory, local: LocalStore) -> TestClient[Any, Any]:
    client = await aiohttp_client(create_app(Settings(schedule=NEVER, max_page_size=5), store=local))
    await wait_ready(client)
    return client


async def connection(client: TestClient[Any, Any], arguments: str) -> dict[str, Any]:
    field = f"usersConnection({arguments})" if arguments else "usersConnection"
    body = await gql(client, f"{{ {field} {{ {EDGES} }} }}")
    assert "errors" not in body, body
    found: dict[str, Any] = body["data"]["usersConnection"]
    return found


def user_ids(found: dict[str, Any]) -> list[str]:
    return [edge["node"]["userId"] for edge in found["edges"]]


async def test_paging_through_the_api_matches_users(client: TestClient[Any, Any]) -> None:
    everyone = [u["userId"] for u in (await gql(client, "{ users(limit: 5) { userId } }"))["data"]["users"]]
    everyone += [u["userId"] for u in (await gql(client, "{ users(limit: 5, offset: 5) { userId } }"))["data"]["users"]]
    assert everyone == sorted(PEOPLE)
    first = await connection(client, "first: 3")
    assert user_ids(first) == everyone[:3] and first["totalCount"] == len(PEOPLE)
    info = first["pageInfo"]
    assert (info["hasPreviousPage"], info["hasNextPage"]) == (False, True)
    assert (info["startCursor"], info["endCursor"]) == (first["edges"][0]["cursor"], first["edges"][-1]["cursor"])
    rest = await connection(client, f'first: 5, after: "{info["endCursor"]}"')
    assert user_ids(rest) == everyone[3:] and not rest["pageInfo"]["hasNextPage"]
    back = await connection(client, f'last: 2, before: "{rest["edges"][0]["cursor"]}"')
    assert user_ids(back) == everyone[1:3] and back["pageInfo"]["hasPreviousPage"]
    default = await connection(client, "")  # neither first nor last: a page of MAX_PAGE_SIZE
    assert user_ids(default) == everyone[:5] and default["pageInfo"]["hasNextPage"]
    with_image = await connection(client, "filter: {isImageExists: true}, last: 5")
    images = [u for u, (_, image) in sorted(PEOPLE.items()) if image]
    assert user_ids(with_image) == images and with_image["totalCount"] == len(images)
    none = await connection(client, "filter: {minAge: 200}, first: 5")
    assert none == {
        "totalCount": 0,
        "edges": [],
        "pageInfo": {"hasNextPage": False, "hasPreviousPage": False, "startCursor": None, "endCursor": None},
    }


async def test_the_next_page_survives_a_new_snapshot(client: TestClient[Any, Any], local: LocalStore) -> None:
    ids = sorted(PEOPLE)  # 0042 1000 1001 1002 1003 1004 1005
    first = await connection(client, "first: 3")
    assert user_ids(first) == ids[:3]
    cursor = first["pageInfo"]["endCursor"]  # 1001
    await local.put("src-data/0999.csv", csv_of("0999", date(1990, 1, 1)))  # before the cursor
    await local.delete("src-data/1001.csv")  # the cursor's own user
    run = (await gql(client, "mutation { reprocess { outcome added removed } }"))["data"]["reprocess"]
    assert run == {"outcome": "SUCCEEDED", "added": 1, "removed": 1}
    after = await connection(client, f'first: 3, after: "{cursor}"')
    assert user_ids(after) == ["1002", "1003", "1004"]  # where the page would have started before the run
    assert after["totalCount"] == len(PEOPLE)
    assert after["pageInfo"]["hasPreviousPage"] and after["pageInfo"]["hasNextPage"]


async def test_bad_arguments_are_graphql_errors_naming_them(client: TestClient[Any, Any]) -> None:
    for arguments, message in (
        ('after: "nope!"', "after must be a cursor from usersConnection, got 'nope!': not base64 of one"),
        (f'before: "{b64(b"v9:1000")}"', "before must be a cursor from usersConnection"),
        ("first: 1, last: 1", "first and last cannot be combined"),
        ("first: 6", "first must be at most 5 (MAX_PAGE_SIZE), got 6"),
        ("last: -1", "last must not be negative, got -1"),
        ("filter: {minAge: -1}", "minAge must be between 0 and 1000, got -1"),
    ):
        body = await gql(client, f"{{ usersConnection({arguments}) {{ totalCount }} }}")
        assert body["data"] is None and message in body["errors"][0]["message"], (arguments, body)


ROW_BUDGET_REFUSED = [
    "{ a: usersConnection(first: 3) { totalCount } b: users(limit: 3) { userId } }",
    "{ a: usersConnection(last: 3) { totalCount } b: usersConnection(first: 3) { totalCount } }",
    "{ a: usersConnection { totalCount } b: users(limit: 1) { userId } }",  # neither first nor last: a page
    "{ a: usersConnection(first: null, last: 4) { totalCount } ...B } fragment B on Query { b: users(limit: 2) "
    "{ userId } }",
]
ROW_BUDGET_ALLOWED = [
    "{ a: usersConnection(first: 2) { totalCount } b: users(limit: 3) { userId } stats { count } }",
    "{ a: usersConnection(last: 4) { totalCount } b: usersConnection(first: 1) { totalCount } }",
    "{ usersConnection(first: 5) { totalCount } usersConnection(first: 5) { edges { cursor } } }",  # one key
    "{ a: usersConnection(first: 0) { totalCount } b: users(limit: 5) { userId } }",
]


@pytest.mark.parametrize("document", ROW_BUDGET_REFUSED)
async def test_connections_count_in_the_row_budget(client: TestClient[Any, Any], document: str) -> None:
    body = await gql(client, document)
    assert body["data"] is None
    message = body["errors"][0]["message"]
    assert "at most 5 (MAX_PAGE_SIZE" in message and "first and after (usersConnection)" in message, message


@pytest.mark.parametrize("document", ROW_BUDGET_ALLOWED)
async def test_connections_within_the_row_budget_are_answered(client: TestClient[Any, Any], document: str) -> None:
    assert "errors" not in await gql(client, document)


@pytest.mark.parametrize(("variables", "allowed"), [({}, False), ({"n": 2}, True), ({"n": None}, False)])
async def test_the_row_budget_reads_first_and_last_from_variables(
    client: TestClient[Any, Any], variables: dict[str, Any], allowed: bool
) -> None:
    document = "query($n: Int = 3) { a: usersConnection(first: $n) { totalCount } b: users(limit: 3) { userId } }"
    body = await (await client.post("/graphql", json={"query": document, "variables": variables})).json()
    assert ("errors" not in body) == allowed, body


async def test_pages_of_the_connection_are_built_off_the_event_loop(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Selecting and completing a page of a million users' connection must leave the event loop free.
    on_the_loop: list[bool] = []
    build = query.users

    def spy(*args: Any) -> list[query.UserRow]:
        on_the_loop.append(threading.current_thread() is threading.main_thread())
        return build(*args)

    monkeypatch.setattr(query, "users", spy)
    assert len((await connection(client, "first: 2"))["edges"]) == 2
    assert on_the_loop == [False]
