"""The storage contract, run against every adapter (`store`), plus S3-only failure behaviour."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from s3server import SeaweedServer, free_ports
from support import put_with_customer_key

from service.demo import has_objects
from service.errors import InvalidKey, ObjectNotFound, ObjectUnreadable, PreconditionFailed, StorageError
from service.local_store import LocalStore
from service.minio_store import MinioStore
from service.storage import ObjectInfo, ObjectStore

SECRET = "never-show-this-secret-0123456789"
ROOT = Path(__file__).resolve().parents[1]


async def pages_of(store: ObjectStore, prefix: str = "") -> list[list[ObjectInfo]]:
    return [page async for page in store.list(prefix)]


async def listed(store: ObjectStore, prefix: str = "") -> dict[str, ObjectInfo]:
    return {info.key: info for page in await pages_of(store, prefix) for info in page}


async def put_all(store: ObjectStore, keys: list[str], concurrency: int = 64) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def put(key: str) -> None:
        async with limit:
            await store.put(key, key.encode())

    await asyncio.gather(*(put(key) for key in keys))


async def streamed(store: ObjectStore, key: str, chunk_size: int) -> tuple[int, list[bytes]]:
    """The size `open` announces and the chunks it yields."""
    async with store.open(key) as stream:
        return stream.size, [chunk async for chunk in stream.chunks(chunk_size)]


async def opened_size(store: ObjectStore, key: str) -> int:
    async with store.open(key) as stream:
        return stream.size


# -- contract: every adapter ---------------------------------------------------------------


async def test_binary_roundtrip(store: ObjectStore) -> None:
    data = bytes(range(256)) * 64
    await store.put("users/1.bin", data)
    assert await store.get("users/1.bin") == data
    assert (await store.stat("users/1.bin")).size == len(data)


async def test_empty_object(store: ObjectStore) -> None:
    await store.put("empty.csv", b"")
    assert await store.get("empty.csv") == b""
    assert await store.get("empty.csv", max_bytes=10) == b""
    assert (await store.stat("empty.csv")).size == 0
    assert (await listed(store))["empty.csv"].size == 0


@pytest.mark.parametrize(
    "key",
    ["users/ünïcødé-日本語.csv", "with space/a b.csv", "odd/a+b %41&c=d#e?'.csv", "top.csv", "a/b/c/d/e.csv"],
)
async def test_key_roundtrip(store: ObjectStore, key: str) -> None:
    await store.put(key, key.encode())
    assert await store.get(key) == key.encode()
    assert list(await listed(store)) == [key]
    assert (await store.stat(key)).key == key


async def test_put_etag_is_the_listed_and_stat_etag(store: ObjectStore) -> None:
    etag = await store.put("a.csv", b"first_name,last_name\n")
    assert etag
    assert '"' not in etag
    assert (await store.stat("a.csv")).etag == etag
    assert (await listed(store))["a.csv"].etag == etag


async def test_overwrite_same_size_changes_etag(store: ObjectStore) -> None:
    first = await store.put("u.csv", b"aaaa")
    second = await store.put("u.csv", b"bbbb")
    assert first != second
    assert (await store.stat("u.csv")).etag == second
    assert (await listed(store))["u.csv"].etag == second
    assert await store.get("u.csv") == b"bbbb"


async def test_list_is_recursive_and_ordered_by_key(store: ObjectStore) -> None:
    keys = ["b.csv", "a/1.csv", "a/x/2.csv", "a/x/y/3.png", "c/d.png", "ab.csv", "a/ü.csv", "a/B.csv"]
    await put_all(store, keys)
    pages = await pages_of(store)
    found = [info.key for page in pages for info in page]
    assert found == sorted(keys)
    assert all(page for page in pages)
    for info in (info for page in pages for info in page):
        assert info.size == len(info.key.encode())


async def test_list_order_is_byte_order_across_directories(store: ObjectStore, request: pytest.FixtureRequest) -> None:
    if isinstance(store, MinioStore):
        # S3 (and MinIO) list in UTF-8 byte order: "d-old/x" < "d.csv" < "d/x". SeaweedFS lists a
        # directory's subtree where the directory name sorts ("d/x" first). Strict: fails once fixed.
        request.applymarker(pytest.mark.xfail(strict=True, reason="SeaweedFS lists in directory-walk order"))
    keys = ["src-data/x.csv", "src-data-old/x.csv", "src-data.csv", "src-data/y/z.csv"]
    await put_all(store, keys)
    assert [info.key for page in await pages_of(store) for info in page] == sorted(keys)


async def test_list_paginates_beyond_1000_objects(store: ObjectStore) -> None:
    keys = [f"many/{i:05d}.csv" for i in range(1100)]
    await put_all(store, keys)
    await store.put("other/outside.csv", b"x")
    pages = await pages_of(store, "many/")
    assert len(pages) >= 2
    assert all(0 < len(page) <= 1000 for page in pages)
    assert [info.key for page in pages for info in page] == keys


async def test_has_objects_answers_from_the_first_page_and_closes_the_listing(store: ObjectStore) -> None:
    """`demo-data --if-empty` asks this of a bucket that may hold a great many objects."""
    assert not await has_objects(store, "many/")
    await put_all(store, [f"many/{i:05d}.csv" for i in range(1100)])
    assert await has_objects(store, "many/")  # closed after the first of two pages
    assert await has_objects(store, "many/0109")
    assert not await has_objects(store, "man/")


async def test_prefix_filtering(store: ObjectStore) -> None:
    keys = ["src-data/a.csv", "src-data/sub/b.csv", "src-data-old/x.csv", "src-data.csv", "other/src-data/c"]
    await put_all(store, keys)
    assert sorted(await listed(store, "src-data/")) == ["src-data/a.csv", "src-data/sub/b.csv"]
    assert sorted(await listed(store, "src-data")) == sorted(k for k in keys if k.startswith("src-data"))
    assert sorted(await listed(store, "src-data/s")) == ["src-data/sub/b.csv"]
    assert await pages_of(store, "nothing/") == []


@pytest.mark.parametrize(("max_bytes", "expected"), [(0, 1), (10, 11), (99, 100), (100, 100), (5000, 100)])
async def test_get_reads_at_most_max_bytes_plus_one(store: ObjectStore, max_bytes: int, expected: int) -> None:
    data = bytes(range(100))
    await store.put("big.csv", data)
    assert await store.get("big.csv", max_bytes=max_bytes) == data[:expected]


@pytest.mark.parametrize(("size", "max_bytes"), [(100, None), (100, 10), (100, 5000), (0, 10), (0, None)])
async def test_get_with_info_reads_the_content_and_what_stat_says(
    store: ObjectStore, size: int, max_bytes: int | None
) -> None:
    """One request for what a stat and a get give: the same metadata, the same bytes."""
    data = bytes(range(size))
    etag = await store.put("one.csv", data)
    info, content = await store.get_with_info("one.csv", max_bytes)
    assert info == await store.stat("one.csv") and info.etag == etag and info.size == size
    assert content == await store.get("one.csv", max_bytes) == data[: None if max_bytes is None else max_bytes + 1]
    with pytest.raises(ObjectNotFound):
        await store.get_with_info("missing.csv", max_bytes)


async def test_open_streams_the_object_in_chunks_of_at_most_the_size_asked(store: ObjectStore) -> None:
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and 4 bytes
    await store.put("img/1.png", data)
    size, chunks = await streamed(store, "img/1.png", 64 * 1024)
    assert size == len(data)
    assert b"".join(chunks) == data
    assert all(0 < len(chunk) <= 64 * 1024 for chunk in chunks)


async def test_open_an_empty_object(store: ObjectStore) -> None:
    await store.put("empty.png", b"")
    assert await streamed(store, "empty.png", 1024) == (0, [])


async def test_an_object_opened_and_left_unread_is_released(store: ObjectStore) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB: more than any socket or read buffer holds
    await store.put("big.png", data)
    for _ in range(20):  # a leak of connections or file handles would show as warnings or a stall
        assert await opened_size(store, "big.png") == len(data)
    async with store.open("big.png") as stream:
        first = await anext(aiter(stream.chunks(1000)))
    assert first == data[:1000]
    assert await store.get("big.png") == data  # the store is still fine


async def test_missing_object(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound, match=r"nope\.csv"):
        await store.get("dir/nope.csv")
    with pytest.raises(ObjectNotFound, match=r"nope\.csv"):
        await store.get("dir/nope.csv", max_bytes=10)
    with pytest.raises(ObjectNotFound, match=r"nope\.csv"):
        await store.stat("dir/nope.csv")
    with pytest.raises(ObjectNotFound, match=r"nope\.csv"):
        await opened_size(store, "dir/nope.csv")
    assert not await store.exists("dir/nope.csv")
    await store.delete("dir/nope.csv")


async def test_delete_and_exists(store: ObjectStore) -> None:
    await store.put("d/x.csv", b"1")
    assert await store.exists("d/x.csv")
    await store.delete("d/x.csv")
    assert not await store.exists("d/x.csv")
    assert await listed(store) == {}
    await store.delete("d/x.csv")


async def test_a_prefix_is_not_an_object(store: ObjectStore) -> None:
    await store.put("dir/x.csv", b"1")
    await store.delete("dir")
    assert not await store.exists("dir")
    with pytest.raises(ObjectNotFound):
        await store.get("dir")
    with pytest.raises(ObjectNotFound):
        await store.stat("dir")
    with pytest.raises(ObjectNotFound):
        await opened_size(store, "dir")


@pytest.mark.parametrize("prefix", ["../", "a/../../", "/", "./"])
async def test_a_listing_never_leaves_the_bucket(store: ObjectStore, prefix: str) -> None:
    await store.put("a.csv", b"1")
    with pytest.raises(InvalidKey):
        await pages_of(store, prefix)


@pytest.mark.parametrize("key", ["../x.csv", "a/../../b", "/etc/passwd", "", "a//b", "./a", "a/.", "a\\b"])
async def test_invalid_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        await store.get(key)
    with pytest.raises(InvalidKey):
        await opened_size(store, key)
    with pytest.raises(InvalidKey):
        await store.put(key, b"x")
    with pytest.raises(InvalidKey):
        await store.stat(key)
    with pytest.raises(InvalidKey):
        await store.delete(key)


async def test_ensure_bucket_is_idempotent(store: ObjectStore) -> None:
    await store.put("keep.csv", b"kept")
    await store.ensure_bucket()
    await asyncio.gather(store.ensure_bucket(), store.ensure_bucket())
    assert await store.get("keep.csv") == b"kept"


async def test_last_modified_is_utc_and_recent(store: ObjectStore) -> None:
    before = datetime.now(UTC)
    await store.put("t.csv", b"x")
    after = datetime.now(UTC)
    for info in [await store.stat("t.csv"), (await listed(store))["t.csv"]]:
        assert info.last_modified.utcoffset() == timedelta(0)
        # S3 reports whole seconds (truncated), so allow a little slack below `before`.
        assert before - timedelta(seconds=2) <= info.last_modified <= after + timedelta(seconds=1)


# -- contract: conditional writes --------------------------------------------------------------

RACERS = 30


async def race(puts: list[Awaitable[str]]) -> list[str | BaseException]:
    """Run the puts at once: each one's ETag or what it raised."""
    return await asyncio.gather(*puts, return_exceptions=True)


def one_winner(bodies: list[bytes], outcomes: list[str | BaseException]) -> tuple[bytes, str]:
    """The body and ETag of the only put that succeeded; every other one failed its precondition."""
    winners = [(body, etag) for body, etag in zip(bodies, outcomes, strict=True) if isinstance(etag, str)]
    assert len(winners) == 1, outcomes
    lost = [outcome for outcome in outcomes if not isinstance(outcome, str)]
    assert len(lost) == len(bodies) - 1
    assert all(isinstance(exc, PreconditionFailed) for exc in lost), lost
    return winners[0]


async def test_create_if_absent(store: ObjectStore) -> None:
    etag = await store.put("lease.json", b"first", if_none_match=True)
    assert etag == (await store.stat("lease.json")).etag
    assert (await listed(store))["lease.json"].etag == etag
    with pytest.raises(PreconditionFailed, match=r"lease\.json"):
        await store.put("lease.json", b"second", if_none_match=True)
    assert await store.get("lease.json") == b"first"
    assert (await store.stat("lease.json")).etag == etag
    # The condition belongs to that one call: a plain put still overwrites.
    assert await store.put("lease.json", b"third") != etag
    await store.delete("lease.json")
    assert await store.put("lease.json", b"fourth", if_none_match=True) == (await store.stat("lease.json")).etag


async def test_put_if_match(store: ObjectStore) -> None:
    first = await store.put("state.json", b"v1")
    second = await store.put("state.json", b"v2", if_match=first)
    assert second != first
    assert second == (await store.stat("state.json")).etag
    assert await store.get("state.json") == b"v2"
    with pytest.raises(PreconditionFailed, match=r"state\.json"):
        await store.put("state.json", b"stale", if_match=first)
    assert await store.get("state.json") == b"v2"
    third = await store.put("state.json", b"v3", if_match=second)
    assert third == (await store.stat("state.json")).etag == (await listed(store))["state.json"].etag
    assert await store.get("state.json") == b"v3"


async def test_put_if_match_on_a_missing_object_fails(store: ObjectStore) -> None:
    etag = await store.put("gone.json", b"v1")
    await store.delete("gone.json")
    with pytest.raises(PreconditionFailed, match=r"gone\.json"):
        await store.put("gone.json", b"v2", if_match=etag)
    with pytest.raises(PreconditionFailed, match=r"never\.json"):
        await store.put("never.json", b"v1", if_match=etag)
    assert not await store.exists("gone.json")
    assert not await store.exists("never.json")


async def test_an_etag_replaced_by_objects_of_the_same_size_no_longer_matches(store: ObjectStore) -> None:
    old = await store.put("s.json", b"aaaa")
    for body in (b"bbbb", b"cccc", b"dddd"):  # same size; a file system reuses the freed inode at once
        await store.put("s.json", body)
    with pytest.raises(PreconditionFailed):
        await store.put("s.json", b"late", if_match=old)
    assert await store.get("s.json") == b"dddd"


@pytest.mark.parametrize(
    ("if_match", "if_none_match"), [("abc", True), ("", False), ('""', False)], ids=["both", "empty", "quotes"]
)
async def test_impossible_conditions_are_refused(store: ObjectStore, if_match: str, if_none_match: bool) -> None:
    with pytest.raises(ValueError, match="if_match"):
        await store.put("x.json", b"x", if_match=if_match, if_none_match=if_none_match)
    assert not await store.exists("x.json")


async def test_racing_creators_one_wins(store: ObjectStore) -> None:
    bodies = [f"racer {i}".encode() for i in range(RACERS)]
    body, etag = one_winner(bodies, await race([store.put("lease.json", b, if_none_match=True) for b in bodies]))
    assert await store.get("lease.json") == body
    assert (await store.stat("lease.json")).etag == etag


async def test_racing_updaters_on_one_etag_one_wins(store: ObjectStore) -> None:
    base = await store.put("state.json", b"base")
    bodies = [f"update {i}".encode() for i in range(RACERS)]
    body, etag = one_winner(bodies, await race([store.put("state.json", b, if_match=base) for b in bodies]))
    assert await store.get("state.json") == body
    assert (await store.stat("state.json")).etag == etag


# -- local adapter only ----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
async def test_written_files_follow_the_umask(local_store: LocalStore, tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        await local_store.put("src-data/1.csv", b"x")
        await local_store.put("src-data/1.csv", b"y")  # a replaced file too
        await local_store.put("processed_data/output.csv", b"z")
    finally:
        os.umask(previous)
    root = tmp_path / "data" / "bucket"
    for key in ("src-data/1.csv", "processed_data/output.csv"):
        assert stat.S_IMODE((root / key).stat().st_mode) == 0o666 & ~umask, key


async def test_etags_differ_even_when_the_clock_stands_still(
    local_store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A coarse file-system clock gives files written within one tick the same modification time, and
    # a replaced file's inode is reused at once: the ETag (mtime, size, inode) would come back.
    still = 1_700_000_000_000_000_000
    monkeypatch.setattr("service.local_store._clock", lambda: still)
    etags = [await local_store.put("s.json", b"same") for _ in range(50)]
    assert len(set(etags)) == len(etags)
    assert (tmp_path / "data" / "bucket" / "s.json").stat().st_mtime_ns == still + 49  # one nanosecond apart
    with pytest.raises(PreconditionFailed):
        await local_store.put("s.json", b"late", if_match=etags[0])
    assert await local_store.put("s.json", b"next", if_match=etags[-1]) == (await local_store.stat("s.json")).etag


# Conditional racers in a child process: prints "ready", waits for a line on stdin, then for each key
# in turn makes its puts at once; prints {key: [[body, ETag or null], ...]}. `bases` maps each key to
# the ETag to update ("" to create the key).
_RACERS = """
import asyncio, json, sys
from pathlib import Path
from service.errors import PreconditionFailed
from service.local_store import LocalStore

async def main(data_dir, name, count, bases):
    store = LocalStore(Path(data_dir), "bucket")
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)

    async def put(key, body):
        try:
            etag = await store.put(key, body.encode(), if_match=bases[key] or None, if_none_match=not bases[key])
        except PreconditionFailed:
            etag = None
        return [body, etag]

    outcomes = {}
    for key in bases:
        outcomes[key] = await asyncio.gather(*(put(key, f"{name}-{i}") for i in range(count)))
    print(json.dumps(outcomes), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])))
"""
RACING_PROCESSES = 6


async def race_in_processes(data_dir: Path, bases: dict[str, str]) -> dict[str, list[tuple[str, str | None]]]:
    """RACERS conditional puts of each key, from RACING_PROCESSES processes started together."""
    each = str(RACERS // RACING_PROCESSES)
    children = [
        await asyncio.create_subprocess_exec(
            *[sys.executable, "-c", _RACERS, str(data_dir), f"p{n}", each, json.dumps(bases)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for n in range(RACING_PROCESSES)
    ]
    try:
        async with asyncio.timeout(60):
            for child in children:
                assert child.stdout is not None
                assert await child.stdout.readline() == b"ready\n"
            for child in children:  # every one is waiting: let them all go
                assert child.stdin is not None
                child.stdin.write(b"go\n")
                await child.stdin.drain()
            outputs = [await child.communicate() for child in children]
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
    assert [child.returncode for child in children] == [0] * RACING_PROCESSES
    outcomes: dict[str, list[tuple[str, str | None]]] = {key: [] for key in bases}
    for stdout, _ in outputs:
        for key, results in json.loads(stdout).items():
            outcomes[key] += [(body, etag) for body, etag in results]
    return outcomes


@pytest.mark.parametrize("condition", ["create", "update"])
async def test_racers_in_several_processes_one_wins(local_store: LocalStore, tmp_path: Path, condition: str) -> None:
    keys = [f"leases/{i:02d}.json" for i in range(20)]
    bases = {key: await local_store.put(key, b"base") if condition == "update" else "" for key in keys}
    outcomes = await race_in_processes(tmp_path / "data", bases)
    for key in keys:
        assert len(outcomes[key]) == RACERS
        winners = [(body, etag) for body, etag in outcomes[key] if etag is not None]
        assert len(winners) == 1, (key, outcomes[key])
        body, etag = winners[0]
        assert await local_store.get(key) == body.encode()
        assert (await local_store.stat(key)).etag == etag


# Run in a child process that obeys file modes: every way to read a file of mode 000, and one
# readable file beside it. Prints {call: [exception type or "ok", message or content]}.
_READ_MODE_000 = """
import asyncio, json, sys
from pathlib import Path
from service.local_store import LocalStore

async def outcome(call):
    try:
        return ["ok", (await call()).decode()]
    except Exception as exc:
        return [type(exc).__name__, str(exc)]

async def main(data_dir):
    store = LocalStore(Path(data_dir), "bucket")

    async def streamed(key):
        async with store.open(key) as stream:
            return b"".join([chunk async for chunk in stream.chunks(4)])

    async def stat(key):
        return (await store.stat(key)).key.encode()

    calls = {
        "get": lambda: store.get("src-data/2.csv"),
        "get at most": lambda: store.get("src-data/2.csv", max_bytes=10),
        "open": lambda: streamed("src-data/2.csv"),
        "stat in a closed directory": lambda: stat("closed/3.csv"),
        "readable": lambda: streamed("src-data/1.csv"),
    }
    print(json.dumps({name: await outcome(call) for name, call in calls.items()}))

asyncio.run(main(sys.argv[1]))
"""


async def test_a_file_without_read_permission_is_unreadable_not_a_store_failure(
    local_store: LocalStore, tmp_path: Path, obeying_file_modes: Callable[[list[str]], list[str]]
) -> None:
    await local_store.put("src-data/1.csv", b"one")
    await local_store.put("src-data/2.csv", b"two")
    await local_store.put("closed/3.csv", b"three")
    data_dir = tmp_path / "data"
    (data_dir / "bucket" / "src-data" / "2.csv").chmod(0)
    (data_dir / "bucket" / "closed").chmod(0o600)  # no search permission: its files cannot even be stat'ed
    command = obeying_file_modes([sys.executable, "-c", _READ_MODE_000, str(data_dir)])
    result = await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    refused = ["ObjectUnreadable", "cannot read 'src-data/2.csv': permission denied"]
    assert json.loads(result.stdout) == {
        "get": refused,
        "get at most": refused,
        "open": refused,
        "stat in a closed directory": ["ObjectUnreadable", "cannot stat 'closed/3.csv': permission denied"],
        "readable": ["ok", "one"],
    }
    assert str(tmp_path) not in result.stdout


# -- S3 adapter only -------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    return free_ports(1)[0]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener never accepts: connects succeed, requests are never answered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def test_unreachable_endpoint_fails_quickly(closed_port: int) -> None:
    store = MinioStore(f"127.0.0.1:{closed_port}", "access", SECRET, "bucket", timeout=1.0, retries=2)
    try:
        began = time.monotonic()
        with pytest.raises(StorageError) as caught:
            await store.get("users/1.csv")
        assert time.monotonic() - began < 3.0
    finally:
        await store.close()
    message = str(caught.value)
    assert "'users/1.csv'" in message
    assert "after 3 attempts" in message
    assert SECRET not in message
    assert caught.value.__cause__ is not None
    assert not isinstance(caught.value, ObjectUnreadable)  # the store failed, not this object


async def test_errors_name_the_endpoint_in_the_log_text_only(closed_port: int) -> None:
    endpoint = f"127.0.0.1:{closed_port}"
    store = MinioStore(endpoint, "access", SECRET, "bucket", timeout=1.0, retries=0)
    try:
        with pytest.raises(StorageError) as caught:
            await store.get("users/1.csv")
    finally:
        await store.close()
    assert str(caught.value) == "cannot read 'users/1.csv': ClientConnectorError: connection refused"
    assert endpoint in caught.value.for_log()
    assert str(closed_port) not in str(caught.value)


async def test_every_operation_raises_storage_errors(closed_port: int) -> None:
    store = MinioStore(f"127.0.0.1:{closed_port}", "access", SECRET, "bucket", timeout=1.0, retries=0)
    operations: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("users/1.csv", lambda: store.get("users/1.csv", max_bytes=10)),
        ("users/1.csv", lambda: store.stat("users/1.csv")),
        ("users/1.csv", lambda: store.exists("users/1.csv")),
        ("users/1.csv", lambda: store.put("users/1.csv", b"x")),
        ("users/1.csv", lambda: store.put("users/1.csv", b"x", if_none_match=True)),
        ("users/1.csv", lambda: store.put("users/1.csv", b"x", if_match="abc")),
        ("users/1.csv", lambda: store.delete("users/1.csv")),
        ("users/", lambda: pages_of(store, "users/")),
        ("bucket", store.ensure_bucket),
    ]
    try:
        for name, operation in operations:
            with pytest.raises(StorageError) as caught:
                await operation()
            assert not isinstance(caught.value, ObjectNotFound)
            assert name in str(caught.value)
            assert SECRET not in str(caught.value)
            assert caught.value.__cause__ is not None
    finally:
        await store.close()


async def test_unanswered_requests_time_out(silent_port: int) -> None:
    store = MinioStore(f"127.0.0.1:{silent_port}", "access", SECRET, "bucket", timeout=0.2, retries=1)
    try:
        began = time.monotonic()
        with pytest.raises(StorageError, match="timed out") as caught:
            await store.get("users/1.csv")
        with pytest.raises(StorageError, match="timed out"):
            await pages_of(store, "users/")
        assert time.monotonic() - began < 3.0
    finally:
        await store.close()
    assert "'users/1.csv'" in str(caught.value)
    assert "after 2 attempts" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.s3
async def test_wrong_secret_is_not_retried(seaweed: SeaweedServer) -> None:
    store = MinioStore(seaweed.endpoint, seaweed.access_key, SECRET, "bucket", retries=5)
    try:
        began = time.monotonic()
        with pytest.raises(StorageError) as caught:
            await store.get("users/1.csv")
        assert time.monotonic() - began < 1.0
    finally:
        await store.close()
    assert "SignatureDoesNotMatch" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert "attempts" not in str(caught.value)
    assert not isinstance(caught.value, ObjectUnreadable)  # bad credentials fail every object: the store's fault


@pytest.mark.s3
async def test_missing_bucket_is_not_a_missing_object(seaweed: SeaweedServer) -> None:
    store = MinioStore(seaweed.endpoint, seaweed.access_key, seaweed.secret_key, "no-such-bucket-here")
    try:
        with pytest.raises(StorageError, match="NoSuchBucket") as caught:
            await store.get("users/1.csv")
    finally:
        await store.close()
    assert not isinstance(caught.value, ObjectNotFound | ObjectUnreadable)


@pytest.mark.s3
async def test_an_object_encrypted_with_a_customer_key_is_unreadable(
    seaweed: SeaweedServer, minio_store: MinioStore
) -> None:
    await minio_store.put("src-data/1.csv", b"plain")
    await put_with_customer_key(seaweed, minio_store.bucket, "src-data/2.csv", b"sealed")
    assert sorted(await listed(minio_store)) == ["src-data/1.csv", "src-data/2.csv"]
    reads: list[Callable[[], Awaitable[object]]] = [
        lambda: minio_store.get("src-data/2.csv"),
        lambda: minio_store.get("src-data/2.csv", max_bytes=10),
        lambda: opened_size(minio_store, "src-data/2.csv"),
        lambda: minio_store.stat("src-data/2.csv"),
    ]
    for read in reads:
        began = time.monotonic()
        with pytest.raises(ObjectUnreadable, match=r"^cannot (read|stat) 'src-data/2\.csv': ") as caught:
            await read()
        assert time.monotonic() - began < 1.0  # a 4xx: not retried
        assert seaweed.endpoint not in str(caught.value) and seaweed.endpoint in caught.value.for_log()
    assert await minio_store.get("src-data/1.csv") == b"plain"


@pytest.mark.s3
async def test_stalled_server_is_retried(seaweed: SeaweedServer, minio_store: MinioStore) -> None:
    store = seaweed.store(minio_store.bucket, timeout=0.5, retries=4)
    try:
        await store.put("users/1.csv", b"data")
        seaweed.pause()
        resuming = asyncio.get_running_loop().call_later(0.8, seaweed.resume)
        try:
            # Whether the first attempt times out (the usual case) or not, the call must succeed.
            assert await store.get("users/1.csv") == b"data"
        finally:
            resuming.cancel()
            seaweed.resume()
    finally:
        await store.close()


@pytest.mark.s3
async def test_ensure_bucket_creates_a_missing_bucket_once(seaweed: SeaweedServer) -> None:
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    stores = [seaweed.store(bucket) for _ in range(4)]
    try:
        await asyncio.gather(*(store.ensure_bucket() for store in stores))  # racing creators
        await stores[0].put("a.csv", b"a")
        assert await stores[1].get("a.csv") == b"a"
    finally:
        await asyncio.gather(*(store.close() for store in stores))


# -- S3 adapter: conditional writes ----------------------------------------------------------------

_REQUEST_LINE = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) (/\S*) HTTP/1\.1\r\n")


class LosingProxy:
    """A TCP proxy to the S3 server that loses the answers to the next `lose` PUTs: each is forwarded and
    answered (so applied), then the connection is cut before the answer reaches the client, after
    awaiting `on_loss`. `requests` records (method, path) of every request."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.lose = 0
        self.on_loss: Callable[[], Awaitable[None]] | None = None
        self.requests: list[tuple[str, str]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def puts(self, key: str) -> int:
        return sum(1 for method, path in self.requests if method == "PUT" and path.endswith("/" + key))

    async def start(self) -> LosingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        losing = asyncio.Event()  # the request in flight on this connection is to lose its answer
        up_reader, up_writer = await asyncio.open_connection(*self._target)

        async def requests() -> None:
            while chunk := await reader.read(65536):
                for match in _REQUEST_LINE.finditer(chunk):
                    self.requests.append((match[1].decode(), match[2].decode().partition("?")[0]))
                    if match[1] == b"PUT" and self.lose > 0:
                        self.lose -= 1
                        losing.set()
                up_writer.write(chunk)
                await up_writer.drain()

        async def answers() -> None:
            while chunk := await up_reader.read(65536):
                if losing.is_set():
                    if self.on_loss is not None:
                        await self.on_loss()
                    return  # the answer is dropped with the connection
                writer.write(chunk)
                await writer.drain()

        pipes = [asyncio.ensure_future(requests()), asyncio.ensure_future(answers())]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            writer.transport.abort()
            up_writer.transport.abort()
            self._tasks.discard(task)


def endpoint_in_the_log_only(exc: StorageError, endpoint: str) -> bool:
    return endpoint not in str(exc) and endpoint in exc.for_log()


@pytest.fixture
async def losing(seaweed: SeaweedServer, minio_store: MinioStore) -> AsyncIterator[tuple[LosingProxy, MinioStore]]:
    """A losing proxy to the server, and a store on `minio_store`'s bucket through it."""
    proxy = await LosingProxy(seaweed.endpoint).start()
    store = MinioStore(proxy.endpoint, seaweed.access_key, seaweed.secret_key, minio_store.bucket, timeout=5.0)
    try:
        yield proxy, store
    finally:
        await store.close()
        await proxy.close()


@pytest.mark.s3
@pytest.mark.parametrize("condition", ["create", "update"])
@pytest.mark.parametrize("lost", [1, 2], ids=["retried-by-aiohttp", "retried-by-the-store"])
async def test_a_conditional_put_whose_answer_was_lost_is_ours(
    losing: tuple[LosingProxy, MinioStore], minio_store: MinioStore, condition: str, lost: int
) -> None:
    # The PUT is applied but its answer lost; a retry fails its precondition on our own write. aiohttp
    # resends an idempotent request once by itself when the connection drops; a second loss is the
    # store's to retry. The object holds our bytes (its ETag is their MD5): the put succeeded.
    proxy, store = losing
    base = await minio_store.put("lease.json", b"base") if condition == "update" else None
    proxy.lose = lost
    etag = await store.put("lease.json", b"ours", if_match=base, if_none_match=base is None)
    assert etag == hashlib.md5(b"ours").hexdigest() == (await minio_store.stat("lease.json")).etag
    assert await minio_store.get("lease.json") == b"ours"
    assert proxy.puts("lease.json") == lost + 1


@pytest.mark.s3
async def test_a_lost_answer_then_another_write_is_an_unknown_outcome(
    losing: tuple[LosingProxy, MinioStore], minio_store: MinioStore
) -> None:
    # Applied, answer lost, then replaced by another writer before the retry: the retry's 412 cannot
    # tell "never applied" from "applied, then replaced". Not PreconditionFailed (nothing written).
    proxy, store = losing

    async def another_writer() -> None:
        await minio_store.put("lease.json", b"theirs")

    proxy.lose, proxy.on_loss = 1, another_writer
    with pytest.raises(StorageError, match=r"^cannot write 'lease\.json': .*unknown") as caught:
        await store.put("lease.json", b"ours", if_none_match=True)
    assert not isinstance(caught.value, PreconditionFailed)
    assert endpoint_in_the_log_only(caught.value, proxy.endpoint)
    assert await minio_store.get("lease.json") == b"theirs"


@pytest.mark.s3
async def test_a_failed_precondition_is_not_retried(losing: tuple[LosingProxy, MinioStore]) -> None:
    proxy, store = losing
    etag = await store.put("lease.json", b"base", if_none_match=True)
    began = time.monotonic()
    with pytest.raises(PreconditionFailed, match=r"^cannot write 'lease\.json': PreconditionFailed: ") as caught:
        await store.put("lease.json", b"again", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put("lease.json", b"stale", if_match="0" * 32)
    assert time.monotonic() - began < 1.0
    assert proxy.puts("lease.json") == 3
    assert "attempts" not in str(caught.value)
    assert endpoint_in_the_log_only(caught.value, proxy.endpoint)
    assert (await store.stat("lease.json")).etag == etag


@pytest.mark.s3
async def test_a_large_conditional_put_is_one_put(losing: tuple[LosingProxy, MinioStore]) -> None:
    # Above 5 MiB the SDK would upload in parts, and the condition would go with the parts, not with
    # the completion that creates the object.
    proxy, store = losing
    data = bytes(range(256)) * (24 * 1024 + 1)  # 6 MiB and 256 bytes
    etag = await store.put("big.bin", data, if_none_match=True)
    assert etag == hashlib.md5(data).hexdigest()  # a multipart ETag would end in "-<parts>"
    assert [method for method, path in proxy.requests if path.endswith("/big.bin")] == ["PUT"]
    with pytest.raises(PreconditionFailed):
        await store.put("big.bin", data, if_none_match=True)
    assert await store.put("big.bin", data[:-1], if_match=etag) == (await store.stat("big.bin")).etag


class FakeS3:
    """Answers every PUT with `answer` (status, XML body or none), counting them; and the bucket's region."""

    def __init__(self) -> None:
        self.answer: tuple[int, str | None] = (200, None)
        self.puts = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "GET" and "location" in request.query:
            return web.Response(
                text="<LocationConstraint>us-east-1</LocationConstraint>", content_type="application/xml"
            )
        await request.read()
        self.puts += request.method == "PUT"
        status, body = self.answer
        if body is None:
            return web.Response(status=status, headers={"ETag": '"abc"'} if status == 200 else {})
        return web.Response(status=status, text=body, content_type="application/xml")


def s3_error(code: str) -> str:
    return f"<Error><Code>{code}</Code><Message>{code} here</Message><Key>k.json</Key></Error>"


@pytest.mark.parametrize(
    "answer",
    [
        (412, s3_error("PreconditionFailed")),
        (412, None),  # no XML body (a proxy in between)
        (409, s3_error("ConditionalRequestConflict")),  # S3: a concurrent conditional write in progress
        (404, s3_error("NoSuchKey")),  # S3's answer to If-Match on a missing object
    ],
    ids=["412", "412-no-body", "409-conflict", "404-no-such-key"],
)
async def test_answers_of_a_lost_condition_are_precondition_failures(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]], answer: tuple[int, str | None]
) -> None:
    fake = FakeS3()
    server = await aiohttp_server(fake.app())
    store = MinioStore(f"127.0.0.1:{server.port}", "access", SECRET, "bucket", retries=3)
    fake.answer = answer
    try:
        with pytest.raises(PreconditionFailed, match=r"^cannot write 'k\.json'"):
            await store.put("k.json", b"x", if_match="abc")
    finally:
        await store.close()
    assert fake.puts == 1  # not retried


@pytest.mark.parametrize("answer", [(409, s3_error("OperationAborted")), (404, s3_error("NoSuchBucket"))])
async def test_other_failed_conditional_puts_are_store_errors(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]], answer: tuple[int, str | None]
) -> None:
    fake = FakeS3()
    server = await aiohttp_server(fake.app())
    store = MinioStore(f"127.0.0.1:{server.port}", "access", SECRET, "bucket", retries=3)
    fake.answer = answer
    try:
        with pytest.raises(StorageError) as caught:
            await store.put("k.json", b"x", if_none_match=True)
    finally:
        await store.close()
    assert not isinstance(caught.value, PreconditionFailed | ObjectNotFound)


def test_repr_hides_the_secret() -> None:
    store = MinioStore("127.0.0.1:9000", "access", SECRET, "bucket")
    assert SECRET not in repr(store)
    assert SECRET not in str(store)
    assert "bucket" in repr(store)


def test_invalid_bucket_name_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="bucket"):
        MinioStore("127.0.0.1:9000", "access", SECRET, "x")
