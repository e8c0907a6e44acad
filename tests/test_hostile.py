"""Hostile input: bad source files through both stores, abusive GraphQL and REST requests, secrets.

Every bad source file must be ingested correctly or rejected with a reason, and every run must
complete. Every abusive request must be refused with a GraphQL error or a 4xx, never a 5xx, and no
response or log may show a stack trace, a file path, the S3 secret key or the API token.
"""

from __future__ import annotations

import asyncio
import csv
import inspect
import io
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, WSMsgType, web
from aiohttp.test_utils import TestClient
from miniopy_async.error import S3Error
from recording import Recording
from s3server import BucketPool, SeaweedServer, free_ports
from support import NEVER, ClientFactory, as_sent, user_csv, wait_ready

import service
from service import state as service_state
from service.aggregator import Aggregator
from service.app import CLIENT_CLOSED_REQUEST, MAX_REQUEST_BYTES, create_app
from service.config import Settings, load_settings
from service.errors import InvalidKey, StorageError
from service.local_store import LocalStore
from service.logs import AccessLogger
from service.minio_store import MinioStore
from service.parsing import MAX_CSV_BYTES
from service.report import RunReport
from service.storage import ObjectInfo, ObjectStore

SRC = "src-data/"
OUTPUT = "processed_data/output.csv"
OUTPUT_HEADER = ["user_id", "first_name", "last_name", "birthts", "img_path"]
NOW = datetime.now(UTC)
FUTURE_MS = int((NOW + timedelta(days=10)).timestamp() * 1000)
BEFORE_1800_MS = int(datetime(1799, 12, 31, tzinfo=UTC).timestamp() * 1000)
BIG_BYTES = 50 * 1024 * 1024
# What a response or a log must never show: a stack trace or where the code lives.
LEAK_MARKERS = ("Traceback (most recent call last)", 'File "', str(Path(service.__file__).parent), sys.prefix)


def aggregator(store: ObjectStore, output_key: str = OUTPUT, concurrency: int = 8) -> Aggregator:
    return Aggregator(store, src_prefix=SRC, output_key=output_key, concurrency=concurrency)


async def output_rows(store: ObjectStore, key: str = OUTPUT) -> dict[str, tuple[str, str, int, str]]:
    text = (await store.get(key)).decode("utf-8")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    assert reader.fieldnames == OUTPUT_HEADER
    rows = list(reader)
    assert [r["user_id"] for r in rows] == sorted(r["user_id"] for r in rows)
    return {r["user_id"]: (r["first_name"], r["last_name"], int(r["birthts"]), r["img_path"]) for r in rows}


def assert_accounted(report: RunReport) -> None:
    """Every listed object is a user row, an attached image, a rejected file or an ignored one."""
    assert report.outcome.value == "succeeded" and report.error is None
    assert report.conflicts == ()
    assert all(r.reason.strip() for r in report.rejected), report.rejected
    assert report.listed == report.users + report.rejected_count + report.ignored + report.images, report


def local_root(store: ObjectStore) -> Path | None:
    """The bucket directory of a LocalStore (files can be written there directly), else None."""
    root = getattr(store, "_root", None)
    return Path(root) if isinstance(store, LocalStore) and root is not None else None


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# -- a corpus of bad source files, through each store ---------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    data: bytes
    outcome: str  # "ok", "rejected" or "ignored"
    expect: tuple[str, str, int] | tuple[str, ...] = ()  # ok: the row; rejected: reason prefixes


def ok(key: str, data: bytes, first: str, last: str, birthts: int) -> Case:
    return Case(key, data, "ok", (first, last, birthts))


def bad(key: str, data: bytes, *reason_prefixes: str) -> Case:
    return Case(key, data, "rejected", reason_prefixes)


def ignored(key: str, data: bytes = b"x") -> Case:
    return Case(key, data, "ignored")


H = "first_name,last_name,birthts\n"
GARBAGE = random.Random(20240601).randbytes(4096)
OK_IMAGE = "src-data/img/ok1.png"
ADA = -4_714_560_000_000
CORPUS = [
    ok("src-data/ok1.csv", user_csv("Ada", "Lovelace", ADA), "Ada", "Lovelace", ADA),
    Case(OK_IMAGE, b"\x89PNG\r\n\x1a\n", "image"),
    bad("src-data/empty.csv", b"", "file is empty"),
    bad("src-data/blank-lines.csv", b"\n\r\n  \n", "file is empty"),
    bad("src-data/header-only.csv", H.encode(), "no data row"),
    bad("src-data/several.csv", f"{H}a,b,1\nc,d,2\ne,f,3\n".encode(), "3 data rows"),
    bad("src-data/missing-column.csv", b"first_name,birthts\nA,1\n", "header lacks last_name"),
    bad("src-data/wrong-columns.csv", b"name,surname,born\nA,B,1\n", "header lacks first_name, last_name, birthts"),
    bad("src-data/repeated-column.csv", b"first_name,last_name,birthts,birthts\nA,B,1,2\n", "header repeats"),
    bad("src-data/short-row.csv", f"{H}A,B\n".encode(), "the data row has 2 fields"),
    bad("src-data/empty-name.csv", f"{H} ,B,1\n".encode(), "first_name is empty"),
    bad("src-data/float.csv", user_csv("A", "B", "12.5"), "birthts is not an integer"),
    bad("src-data/exponent.csv", user_csv("A", "B", "1e9"), "birthts is not an integer"),
    bad("src-data/hex.csv", user_csv("A", "B", "0x10"), "birthts is not an integer"),
    bad("src-data/arabic-digits.csv", user_csv("A", "B", "١٢٣"), "birthts is not an integer"),
    bad("src-data/huge-number.csv", user_csv("A", "B", "9" * 40), "birthts is not an integer"),
    bad("src-data/future.csv", user_csv("A", "B", FUTURE_MS), f"birthts {FUTURE_MS} is in the future"),
    bad("src-data/before-1800.csv", user_csv("A", "B", BEFORE_1800_MS), f"birthts {BEFORE_1800_MS} is before 1800"),
    bad("src-data/garbage.csv", GARBAGE, "not valid UTF-8", "contains NUL", "malformed CSV", "header lacks"),
    bad("src-data/latin1.csv", f"{H}José,Núñez,0\n".encode("latin-1"), "not valid UTF-8 (byte 32)"),
    bad("src-data/utf16.csv", f"{H}A,B,0\n".encode("utf-16"), "not valid UTF-8", "contains NUL"),
    bad("src-data/nul.csv", f"{H}A\x00,B,0\n".encode(), "contains NUL"),
    bad("src-data/unterminated.csv", f'{H}"Ann,B,0\n'.encode(), "malformed CSV"),
    ok(
        "src-data/bom-crlf-quoted.csv",
        '\ufefffirst_name,last_name,birthts\r\n"Smith, Jr.","O""Brien",-86400000\r\n'.encode(),
        *("Smith, Jr.", 'O"Brien', -86_400_000),
    ),
    ok("src-data/reordered.csv", b" birthts , extra, LAST_NAME ,First_Name\n 42 ,x, Doe , Jane \n", "Jane", "Doe", 42),
    ok("src-data/UPPER.CSV", user_csv("Up", "Per", 7), "Up", "Per", 7),
    ok("src-data/with space.csv", user_csv("Space", "Y", 1), "Space", "Y", 1),
    ok("src-data/ünïcødé 名前.csv", user_csv("名", "前", 2), "名", "前", 2),
    ok('src-data/a,b "q".csv', user_csv("Comma", "Quote", 3), "Comma", "Quote", 3),
    ok("src-data/%2e%2e.csv", user_csv("Percent", "Dots", 4), "Percent", "Dots", 4),
    ok("src-data/nested/deeper/n1.csv", user_csv("Nested", "N", 5), "Nested", "N", 5),
    bad("src-data/...csv", user_csv("Dot", "Dot", 6), "hidden file"),  # the stem ".." starts with a dot
    bad("src-data/.hidden.csv", user_csv("Hid", "Den", 6), "hidden file"),
    bad("src-data/tab\there.csv", user_csv("Tab", "T", 6), "the key contains control characters"),
    bad("src-data/.png", b"\x89PNG", "no user id before the extension"),
    ignored("src-data/README.txt"),
    ignored("src-data/.DS_Store", GARBAGE[:64]),
    ignored("src-data/noext"),
    ignored("src-data/img/ghost.png"),  # an image whose user has no CSV
]


async def test_a_corpus_of_bad_files_is_ingested_or_rejected_with_reasons(store: ObjectStore) -> None:
    for case in CORPUS:
        await store.put(case.key, case.data)
    result = await aggregator(store).run()
    report = result.report
    assert_accounted(report)
    assert report.listed == len(CORPUS)

    want_rejected = {c.key: c.expect for c in CORPUS if c.outcome == "rejected"}
    got_rejected = {r.key: r.reason for r in result.rejected.page(slice(None))}  # the report names 20
    assert set(got_rejected) == set(want_rejected)
    for key, prefixes in want_rejected.items():
        reason = got_rejected[key]
        assert reason.startswith(prefixes), (key, reason)
        assert len(reason) < 300, reason  # a reason, not a dump of the file
    assert report.ignored == sum(c.outcome == "ignored" for c in CORPUS)

    def user_id(key: str) -> str:
        return key.rpartition("/")[2].rpartition(".")[0]

    want_rows = {
        user_id(c.key): (*c.expect, OK_IMAGE if c.key == "src-data/ok1.csv" else "")
        for c in CORPUS
        if c.outcome == "ok"
    }
    assert await output_rows(store) == want_rows
    assert (report.users, report.images) == (len(want_rows), 1)
    raw = (await store.get(OUTPUT)).decode()
    assert '\n"a,b ""q""",Comma,Quote,3,\n' in raw  # standard CSV quoting of an odd user id

    # Nothing changed: only the file that may become valid with time is fetched again; same verdicts.
    recording = Recording(store)
    again = await aggregator(recording).run()
    assert [key for key, _, _ in recording.reads if key.startswith(SRC)] == ["src-data/future.csv"]
    assert (again.report.fetched, again.report.output_written) == (1, False)
    assert {r.key: r.reason for r in again.rejected.page(slice(None))} == got_rejected


@pytest.fixture(scope="session")
def big_csv() -> bytes:
    """50 MiB that starts like a valid user file, so only its size can be the reason to refuse it."""
    head = b"first_name,last_name,birthts\nBig,File,0\n"
    return head + b"#" * (BIG_BYTES - len(head))


async def test_a_50_mib_file_is_rejected_without_being_downloaded(store: ObjectStore, big_csv: bytes) -> None:
    key = "src-data/big.csv"
    root = local_root(store)
    if root is not None:
        await asyncio.to_thread(write_file, root / key, big_csv)  # the local store: the file itself
    else:
        await store.put(key, big_csv)  # S3: uploaded once
    await store.put("src-data/small.csv", user_csv("S", "M", 1))

    recording = Recording(store)
    tracemalloc.start()
    try:
        report = (await aggregator(recording).run()).report
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_accounted(report)
    assert {r.key: r.reason for r in report.rejected} == {
        key: f"file is larger than {MAX_CSV_BYTES} bytes (not downloaded)"
    }
    assert [g[0] for g in recording.reads if g[0].startswith(SRC)] == ["src-data/small.csv"]
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB: the 50 MiB file was read"

    # A listing that under-reports the size (the file grew after it was listed): the GET is bounded.
    lying = Recording(store, listed_sizes={key: 100})
    report = (await aggregator(lying, output_key="processed_data/other.csv").run()).report
    assert {r.key: r.reason for r in report.rejected} == {key: f"file is larger than {MAX_CSV_BYTES} bytes"}
    big_gets = [g for g in lying.reads if g[0] == key]
    assert big_gets == [(key, MAX_CSV_BYTES, MAX_CSV_BYTES + 1)]


def long_key(total: int, name: str) -> str:
    """A key of exactly `total` bytes under SRC: directories of at most 255 bytes, then `name`."""
    room, parts = total - len(SRC) - len(name), []
    while room > 0:
        take = min(255, room - 1) if room != 257 else 200  # never leave room for an empty segment
        parts.append("d" * take + "/")
        room -= take + 1
    key = SRC + "".join(parts) + name
    assert len(key.encode()) == total and "//" not in key
    return key


async def test_long_keys_are_ingested_or_refused_by_the_store(store: ObjectStore) -> None:
    is_local = local_root(store) is not None
    # Neither store takes a 100 KB name: the local file system allows 255 bytes per name (and 4096
    # per path), S3 1024 bytes per key (SeaweedFS also 255 per segment). A refusal is a StorageError.
    too_long = [SRC + "n" * 100_000 + ".csv", SRC + "n" * 252 + ".csv"]
    too_long.append(long_key(5000, "x.csv") if is_local else long_key(1025, "x.csv"))
    for key in too_long:
        with pytest.raises(StorageError):
            await store.put(key, user_csv("Too", "Long", 1))
    # The longest each store allows is ingested like any other key.
    longest = long_key(3000 if is_local else 1024, "u-long.csv")
    longest_name = SRC + "u" * 251 + ".csv"
    await store.put(longest, user_csv("Long", "Key", 1))
    await store.put(longest_name, user_csv("Long", "Name", 2))
    report = (await aggregator(store).run()).report
    assert_accounted(report)
    assert (report.listed, report.users, report.rejected) == (2, 2, ())
    assert await output_rows(store) == {"u-long": ("Long", "Key", 1, ""), "u" * 251: ("Long", "Name", 2, "")}


async def test_dot_segments_are_refused_before_they_reach_a_store(store: ObjectStore) -> None:
    for key in ("src-data/../x.csv", "src-data/a/../1.csv", "src-data/./2.csv", "src-data//3.csv", "/abs.csv"):
        with pytest.raises(InvalidKey):
            await store.put(key, user_csv("A", "B", 1))
        with pytest.raises(InvalidKey):
            await store.get(key)


@pytest.mark.s3
async def test_s3_refuses_dot_segments_and_normalizes_what_it_accepts(minio_store: MinioStore) -> None:
    # Past the store's own check, with the SDK's lowest-level PUT: what the server does with them.
    client = minio_store._client()
    data = user_csv("Raw", "Put", 1)
    for key in ("src-data/../x.csv", "src-data/a/../1.csv", "src-data/./2.csv"):
        with pytest.raises(S3Error, match="InvalidRequest"):  # SeaweedFS refuses, nothing is stored
            await client._put_object(minio_store.bucket, key, data, None)
    await client._put_object(minio_store.bucket, "src-data//3.csv", data, None)  # stored as src-data/3.csv
    await client._put_object(minio_store.bucket, "src-data/a\\b.csv", data, None)  # stored as src-data/a/b.csv
    listed = sorted([i.key async for page in minio_store.list("") for i in page])
    assert listed == ["src-data/3.csv", "src-data/a/b.csv"]
    report = (await aggregator(minio_store).run()).report
    assert_accounted(report)
    assert await output_rows(minio_store) == {"3": ("Raw", "Put", 1, ""), "b": ("Raw", "Put", 1, "")}


def write_odd_local_files(tmp_path: Path) -> None:
    root = tmp_path / "data" / "bucket"
    secret = tmp_path / "outside" / "secret.csv"
    write_file(secret, user_csv("Secret", "Outside", 1))
    src = root / "src-data"
    write_file(src / "ok.csv", user_csv("Ok", "Ok", 1))
    write_file(src / "back\\slash.csv", user_csv("Back", "Slash", 1))  # a legal file name on Linux
    (src / "link.csv").symlink_to(secret)
    (src / "linked-dir").symlink_to(secret.parent, target_is_directory=True)
    os.mkfifo(src / "fifo.csv")  # not a regular file: never opened (opening it would block)
    with open(os.fsencode(src) + b"/bad-\xff.csv", "wb") as handle:  # a name that is not UTF-8
        handle.write(user_csv("Bad", "Name", 1))


async def test_local_store_odd_names_and_links_never_escape_the_bucket(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "data", "bucket")
    await store.ensure_bucket()
    write_odd_local_files(tmp_path)
    recording = Recording(store)
    report = (await aggregator(recording).run()).report
    assert_accounted(report)
    assert {r.key: r.reason for r in report.rejected} == {
        "src-data/back\\slash.csv": "invalid object key 'src-data/back\\\\slash.csv'",
        "src-data/bad-\udcff.csv": "the key contains control characters, invisible format characters or "
        "undecodable bytes",
    }
    assert (report.listed, report.ignored) == (3, 0)  # links and the FIFO are not listed; the bad name is refused
    assert await output_rows(store) == {"ok": ("Ok", "Ok", 1, "")}
    read = {key for key, _, _ in recording.reads}
    assert not any("link" in key or "fifo" in key for key in read), read


def write_non_utf8_directory(src: Path) -> None:
    os.makedirs(os.fsencode(src) + b"/dir-\xff")
    with open(os.fsencode(src) + b"/dir-\xff/1.csv", "wb") as handle:
        handle.write(user_csv("In", "BadDir", 1))
    write_file(src / "2.csv", user_csv("Ok", "Ok", 2))


async def test_a_non_utf8_directory_name_does_not_stop_runs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "data", "bucket")
    await store.ensure_bucket()
    write_non_utf8_directory(tmp_path / "data" / "bucket" / "src-data")
    report = (await aggregator(store).run()).report  # today: UnicodeEncodeError writing the manifest
    assert_accounted(report)
    assert (await output_rows(store))["2"] == ("Ok", "Ok", 2, "")


def write_many(src: Path, count: int) -> dict[str, tuple[str, str, int, str]]:
    """`count` user files (4 KiB each, padded by an ignored column) with bad files, images and noise."""
    pad = "p" * 4000
    want: dict[str, tuple[str, str, int, str]] = {}
    (src / "img").mkdir(parents=True)
    files: dict[str, bytes] = {}
    for i in range(count):
        uid = f"{i:05d}"
        if i % 25 == 0:
            data = f"first_name,last_name,birthts,notes\nF{i},L{i},soon,{pad}\n"  # rejected
        elif i % 25 == 1:
            data = f"first_name,notes\nF{i},{pad}\n"  # rejected
        else:
            data = f"first_name,last_name,birthts,notes\nF{i},L{i},{i * 1000},{pad}\n"
            image = f"src-data/img/{uid}.png" if i % 4 == 2 else ""
            want[uid] = (f"F{i}", f"L{i}", i * 1000, image)
            if image:
                files[f"img/{uid}.png"] = b"png"
        files[f"{uid}.csv"] = data.encode()
        if i % 100 == 3:
            files[f"notes-{uid}.txt"] = b"ignored"
    directory = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, data in files.items():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=directory)
            os.write(fd, data)
            os.close(fd)
    finally:
        os.close(directory)
    return want


async def test_ten_thousand_files_in_one_run_with_bounded_memory(tmp_path: Path) -> None:
    count = 10_000
    store = LocalStore(tmp_path / "data", "bucket")
    await store.ensure_bucket()
    want = await asyncio.to_thread(write_many, tmp_path / "data" / "bucket" / "src-data", count)
    tracemalloc.start()
    try:
        result = await aggregator(store, concurrency=64).run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    report = result.report
    assert_accounted(report)
    reasons = {r.key: r.reason for r in result.rejected.page(slice(None))}
    assert set(reasons) == {f"src-data/{i:05d}.csv" for i in range(count) if i % 25 in (0, 1)}
    assert all(r.startswith(("birthts is not an integer", "header lacks last_name")) for r in reasons.values())
    assert report.ignored == count // 100
    assert (report.users, report.images) == (len(want), sum(1 for row in want.values() if row[3]))
    assert await output_rows(store) == want
    # The bound. The 10,000 files hold 40 MB; what legitimately grows with their number is the
    # listing, the manifest and the output (about 1 KiB per file: ~10 MiB; ~13 MiB measured in all).
    # Holding every file's content at once (>= 38 MiB), or keeping a read buffer per file (the store
    # reads up to 1 MiB + 1 per GET), would pass 32 MiB.
    assert peak < 32 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


# -- GraphQL abuse ----------------------------------------------------------------------------------

PEOPLE = {"1000": (1990, True), "1001": (1985, False), "1002": (2001, True), "0042": (1970, False)}
TOKEN = "api-token-Zq8vX1c9-never-log-me"


async def seed(store: ObjectStore) -> None:
    await store.ensure_bucket()
    for uid, (year, image) in PEOPLE.items():
        await store.put(f"src-data/{uid}.csv", user_csv(f"N{uid}", f"L{uid}", _ms(year)))
        if image:
            await store.put(f"src-data/img/{uid}.png", f"image of {uid}".encode())
    await store.put("src-data/broken.csv", b"first_name\nonly\n")


def _ms(year: int) -> int:
    return int(datetime(year, 6, 15, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
async def local(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "data", "datalake")
    await seed(store)
    return store


@pytest.fixture
def settings() -> Settings:
    """For conftest's `client`: runs need the token here."""
    return Settings(schedule=NEVER, api_token=TOKEN)


def assert_no_leak(text: str, *secrets: str) -> None:
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{marker!r} in {text[:500]!r}"
    for number, secret in enumerate(secrets):  # the failure message must not repeat the secret
        assert secret not in text, f"secret #{number} at offset {text.find(secret)} of a {len(text)}-char response"


async def refused(response: Any) -> str:
    """A refusal: a 4xx, or a 200 whose GraphQL body has errors and no data. Never a 5xx."""
    text: str = await response.text()
    assert response.status < 500, (response.status, text[:300])
    assert_no_leak(text, TOKEN)
    if response.status == 200:
        body = json.loads(text)
        assert body.get("data") is None and body["errors"], text[:300]
        messages = " ".join(e["message"] for e in body["errors"])
        assert "Internal error." not in messages, messages
        return messages
    assert 400 <= response.status < 500
    return text


def aliases(count: int) -> str:
    return "{ " + " ".join(f"a{i}: stats {{ count }}" for i in range(count)) + " }"


DEEP_INTROSPECTION = "{ __schema { types { " + "fields { type { " * 6 + "name" + " } }" * 6 + " } } }"
ABUSIVE_QUERIES = {
    "deep": (DEEP_INTROSPECTION, "depth"),
    "21 aliases": (aliases(21), "alias"),
    "1000 aliases": (aliases(1000), "2000 tokens"),
    "wide": ("{ users(limit: 1) { " + "userId firstName " * 1500 + "} }", "2000 tokens"),
    "200 KB": ("{ stats { " + "count " * 34_000 + "} }", "2000 tokens"),
    "unknown field": ("{ nope { x } }", "Cannot query field 'nope'"),
    "unknown argument": ("{ users(where: 1) { userId } }", "Unknown argument 'where'"),
    "syntax": ("{ users(", "Syntax Error"),
    "fragment cycle": ("{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }", "Cannot spread"),
    "subscription over POST": ("subscription { nope }", ""),
}


@pytest.mark.parametrize("name", list(ABUSIVE_QUERIES))
async def test_abusive_graphql_is_refused(client: TestClient[Any, Any], name: str) -> None:
    query, expected = ABUSIVE_QUERIES[name]
    messages = await refused(await client.post("/graphql", json={"query": query}))
    assert expected in messages


async def test_a_200_kb_comment_is_answered_quickly_and_many_comments_are_refused(
    client: TestClient[Any, Any],
) -> None:
    # One comment is one token: the 256 KiB body limit is what bounds it, and it costs nothing.
    query = "{ stats { count } }\n# " + "c" * 200_000
    assert 200_000 < len(query) < MAX_REQUEST_BYTES
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.post("/graphql", json={"query": query})
    assert (response.status, await response.json()) == (200, {"data": {"stats": {"count": len(PEOPLE)}}})
    assert loop.time() - started < 2
    many = "{ stats { count } }\n" + ("# " + "c" * 98 + "\n") * 2000  # 2,000 comments: 2,000 tokens
    assert "2000 tokens" in await refused(await client.post("/graphql", json={"query": many}))


JSON = {"Content-Type": "application/json"}
STATS = b'{"query": "{ stats { count } }"}'
BAD_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "batch": ("post", {"json": [{"query": "{ stats { count } }"}, {"query": "{ stats { count } }"}]}),
    "invalid JSON": ("post", {"data": b"{nope", "headers": JSON}),
    "text/plain": ("post", {"data": STATS, "headers": {"Content-Type": "text/plain"}}),
    "no content type": ("post", {"data": STATS, "headers": {"Content-Type": ""}}),
    "form": ("post", {"data": b"query=%7B", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
    "query not a string": ("post", {"json": {"query": 5}}),
    "no query": ("post", {"json": {"variables": {}}}),
    "variables not an object": ("post", {"json": {"query": "{ stats { count } }", "variables": [1]}}),
    "unknown operation name": ("post", {"json": {"query": "query A { stats { count } }", "operationName": "B"}}),
    "over the body limit": ("post", {"data": STATS + b" " * MAX_REQUEST_BYTES, "headers": JSON}),
    "JSON nested 100,000 deep": ("post", {"data": b"[" * 100_000, "headers": JSON}),  # was a RecursionError: 500
    "PUT": ("put", {"json": {"query": "{ stats { count } }"}}),
    "DELETE": ("delete", {}),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
async def test_malformed_graphql_requests_are_4xx(client: TestClient[Any, Any], name: str) -> None:
    method, kwargs = BAD_REQUESTS[name]
    response = await getattr(client, method)("/graphql", **kwargs)
    await refused(response)
    assert response.status != 200
    if name == "over the body limit":
        assert response.status == 413


@pytest.mark.parametrize("body", [b'"hello"', b"null", b"5", b"true"])
async def test_a_json_body_that_is_not_an_object_is_a_400(client: TestClient[Any, Any], body: bytes) -> None:
    response = await client.post("/graphql", data=body, headers={"Content-Type": "application/json"})
    await refused(response)


async def test_get_cannot_run_a_mutation(client: TestClient[Any, Any]) -> None:
    before = await client.post("/graphql", json={"query": "{ runs(limit: 50) { id } }"})
    runs_before = len((await before.json())["data"]["runs"])
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
        response = await client.get("/graphql", params={"query": "mutation { reprocess { id } }"}, headers=headers)
        await refused(response)
        assert response.status in (400, 405)
    after = await client.post("/graphql", json={"query": "{ runs(limit: 50) { id } }"})
    assert len((await after.json())["data"]["runs"]) == runs_before  # nothing ran


BAD_VARIABLES = {
    "a string for an Int": ("query($l: Int) { users(limit: $l) { userId } }", {"l": "5"}, "non-integer value: '5'"),
    "1e20 for an Int": ("query($l: Int) { users(limit: $l) { userId } }", {"l": 1e20}, "32-bit"),
    "a nested list for an Int": ("query($l: Int) { users(limit: $l) { userId } }", {"l": [[1]]}, "[[1]]"),
    "a required variable missing": ("query($u: ID!) { user(userId: $u) { userId } }", {}, "'ID!'"),
    "a bad input field": (
        "query($f: UserFilter) { stats(filter: $f) { count } }",
        {"f": {"minAge": "x"}},
        "minAge",
    ),
}


@pytest.mark.parametrize("name", list(BAD_VARIABLES))
async def test_bad_variables_are_answered_as_request_errors(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, name: str
) -> None:
    # Before: "Internal error." and an ERROR traceback for each such request.
    caplog.set_level(logging.DEBUG)
    query, variables, expected = BAD_VARIABLES[name]
    messages = await refused(await client.post("/graphql", json={"query": query, "variables": variables}))
    variable = query.partition("$")[2][0]
    assert f"Variable '${variable}'" in messages and expected in messages, messages
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_a_websocket_message_nested_too_deeply_closes_the_connection_cleanly(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    ws = await client.ws_connect("/graphql", protocols=("graphql-transport-ws",))
    await ws.send_str("[" * 100_000)  # was a RecursionError: a traceback and a dropped connection
    closing = await ws.receive(timeout=5)
    assert (closing.type, ws.close_code) == (WSMsgType.CLOSE, 4400)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.fixture
async def production_server(local: LocalStore) -> AsyncIterator[tuple[str, int]]:
    """The app served as `python -m service serve` serves it: the aiohttp test server cancels the
    handler of a request whose client hung up; production lets it run into the lost connection."""
    app = create_app(Settings(schedule=NEVER, api_token=TOKEN), store=local)
    runner = web.AppRunner(app, access_log_class=AccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield host, port
    finally:
        await runner.cleanup()


async def test_a_client_hanging_up_mid_body_is_not_a_server_error(
    production_server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    host, port = production_server
    for framing, first in ((b"Content-Length: 1000\r\n", b""), (b"Transfer-Encoding: chunked\r\n", b"400\r\n")):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing)
        writer.write(b"\r\n" + first + b'{"query": "{ stats')
        await writer.drain()
        await asyncio.sleep(0.1)  # the handler is waiting for the rest of the body
        writer.close()
        await writer.wait_closed()
    statuses = []
    for _ in range(100):
        statuses = [getattr(r, "status", None) for r in caplog.records if r.name == "aiohttp.access"]
        if len(statuses) == 2:
            break
        await asyncio.sleep(0.05)
    assert statuses == [CLIENT_CLOSED_REQUEST] * 2  # was 500, with an ERROR traceback each
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    async with ClientSession() as http, http.get(f"http://{host}:{port}/metrics") as response:
        metrics = await response.text()
    assert 'http_responses_total{method="POST",route="/graphql",status="499"} 2.0' in metrics
    assert 'status="500"' not in metrics


@pytest.mark.parametrize("method", ["post", "get"])
async def test_a_subscription_over_http_is_refused_clearly(
    client: TestClient[Any, Any], method: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Subscriptions are served over WebSocket (graphql-transport-ws) only.
    query = "subscription { snapshots { version } }"
    if method == "post":
        response = await client.post("/graphql", json={"query": query})
    else:
        response = await client.get("/graphql", params={"query": query})
    await refused(response)  # today: 200 {"data": null, "errors": [{"message": "Internal error.", ...}]}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


FRAGMENT_BOMB = textwrap.dedent(
    """
    import sys
    from service.schema import build_schema
    levels = int(sys.argv[1])
    fragments = ["fragment F0 on Query { stats { count } }"] + [
        f"fragment F{i} on Query {{ ...F{i - 1} ...F{i - 1} }}" for i in range(1, levels + 1)
    ]
    query = "{ ...F%d } " % levels + " ".join(fragments)
    result = build_schema().execute_sync(query)
    print(len(query), [error.message for error in result.errors or []])
    """
)


def test_a_fragment_bomb_is_refused_quickly() -> None:
    # 30 fragments, each spreading the previous one twice: ~1.2 KB, 2**30 paths when expanded naively.
    # Run in a child process: the naive expansion cannot be interrupted from inside.
    try:
        done = subprocess.run(
            [sys.executable, "-c", FRAGMENT_BOMB, "30"], capture_output=True, text=True, timeout=6, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a 1.2 KB query kept the GraphQL validation busy for more than 6 s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Internal error." not in done.stdout and "[]" not in done.stdout, done.stdout


async def test_introspection_is_on_by_default_and_can_be_disabled(
    aiohttp_client: ClientFactory, local: LocalStore, tmp_path: Path
) -> None:
    query = {"query": "{ __schema { queryType { name } } }"}
    default = await aiohttp_client(create_app(Settings(schedule=NEVER), store=local))
    await wait_ready(default)
    body = await (await default.post("/graphql", json=query)).json()
    assert body == {"data": {"__schema": {"queryType": {"name": "Query"}}}}

    settings = load_settings({"GRAPHQL_INTROSPECTION": "false", "SCHEDULE": NEVER})
    closed = await aiohttp_client(create_app(settings, store=LocalStore(tmp_path / "data", "datalake")))
    await wait_ready(closed)
    messages = await refused(await closed.post("/graphql", json=query))
    assert "introspection" in messages.lower()
    for typename in ('{ __type(name: "User") { name } }', "{ __typename }"):
        response = await closed.post("/graphql", json={"query": typename})
        if typename.startswith("{ __type("):
            assert "introspection" in (await refused(response)).lower()
        else:  # __typename is not introspection: clients rely on it
            assert (await response.json()) == {"data": {"__typename": "Query"}}
    ordinary = await (await closed.post("/graphql", json={"query": "{ stats { count } }"})).json()
    assert ordinary == {"data": {"stats": {"count": len(PEOPLE)}}}


# -- REST parameters --------------------------------------------------------------------------------

BAD_PARAMS = [
    ("min_age=", "min_age"),
    ("min_age", "min_age"),
    ("max_age=", "max_age"),
    ("is_image_exists=", "is_image_exists"),
    ("min_age=%D9%A3", "min_age"),  # Arabic-Indic three
    ("min_age=%EF%BC%93", "min_age"),  # fullwidth three
    ("max_age=%C2%B2", "max_age"),  # superscript two: str.isdigit() says yes
    ("min_age=99999", "min_age"),
    ("max_age=" + "9" * 5000, "max_age"),
    ("min_age=1001", "min_age"),
    ("min_age=-0", "min_age"),
    ("min_age=+5", "min_age"),  # '+' is a space in a query string
    ("min_age=5%20", "min_age"),
    ("min_age=1.0", "min_age"),
    ("min_age=0x10", "min_age"),
    ("min_age=%00", "min_age"),
    ("min_age=%FF", "min_age"),
    ("is_image_exists=yes", "is_image_exists"),
    ("is_image_exists=TRUE", "is_image_exists"),
    ("is_image_exists=%00", "is_image_exists"),
    ("min_age=30&max_age=20", "min_age"),
    ("MIN_AGE=3", "MIN_AGE"),
    ("min_age[]=3", "min_age[]"),
    ("limit=-1", "limit"),  # /stats has no pages: there, limit and offset are unknown parameters
    ("limit=" + "9" * 5000, "limit"),
    ("limit=2&limit=3", "limit"),
    ("offset=1.5", "offset"),
    ("offset=99999999999", "offset"),
]


@pytest.mark.parametrize(("query", "name"), BAD_PARAMS)
async def test_malformed_rest_parameters_are_400_naming_them(
    client: TestClient[Any, Any], query: str, name: str
) -> None:
    for path in ("/data", "/stats"):
        response = await client.get(f"{path}?{query}")
        text = await response.text()
        assert response.status == 400, (path, query, text[:200])
        assert_no_leak(text)
        assert len(text) < 400  # the value is echoed shortened, not whole
        assert name in json.loads(text)["error"]


async def test_well_formed_rest_parameters(client: TestClient[Any, Any]) -> None:
    async def ids(query: str) -> list[str]:
        response = await client.get(f"/data?{query}")
        assert response.status == 200, await response.text()
        return [row["user_id"] for row in await response.json()]

    assert await ids("min_age=0030") == await ids("min_age=30")  # leading zeros are still 30
    assert await ids("min_age=0&max_age=1000") == sorted(PEOPLE)
    assert await ids("is_image_exists=1") == await ids("is_image_exists=true") == ["1000", "1002"]
    assert await ids("is_image_exists=False") == ["0042", "1001"]


@pytest.mark.parametrize("query", ["min_age=1&min_age=80", "is_image_exists=true&is_image_exists=false"])
async def test_a_repeated_rest_parameter_is_a_400(client: TestClient[Any, Any], query: str) -> None:
    # ?min_age=1&min_age=80 is ambiguous: answering with either value silently misleads the caller.
    response = await client.get(f"/data?{query}")
    assert response.status == 400
    assert query.partition("=")[0] in (await response.json())["error"]


async def test_a_huge_age_is_refused_with_the_allowed_range(client: TestClient[Any, Any]) -> None:
    small, huge = (await client.get("/stats?min_age=1001")), (await client.get("/stats?min_age=99999"))
    assert (small.status, huge.status) == (400, 400)
    assert "between 0 and 1000" in (await small.json())["error"]
    assert "between 0 and 1000" in (await huge.json())["error"]  # today: "must be a non-negative integer"


# -- images: nothing outside the source prefix --------------------------------------------------------

TRAVERSALS = [
    "/images/..%2F..%2Fprocessed_data%2Foutput.csv",
    "/images/%2e%2e%2f%2e%2e%2fsecret%2fleak.png",
    "/images/..%252F..%252Fsecret%252Fleak.png",
    "/images/processed_data%2Foutput.csv",
    "/images/processed_data%2Foutput.csv.manifest",
    "/images/output",
    "/images/secret%2Fleak.png",
    "/images/..",
    "/images/.",
    "/images/%00",
    "/images/1000%00",
    "/images/1000%2F..%2F..%2Fsecret%2Fleak",
    "/images/img%2F1000.png",
    "/images/%5C..%5Csecret%5Cleak.png",
]


async def test_the_image_route_reads_nothing_outside_the_prefix(
    client: TestClient[Any, Any], local: LocalStore
) -> None:
    await local.put("secret/leak.png", b"SECRET-IMAGE")
    await local.put("src-data/output.csv", user_csv("Out", "Put", 1))  # a user named like the output
    assert (await client.post("/data", headers={"Authorization": f"Bearer {TOKEN}"})).status == 200
    for path in TRAVERSALS:
        response = await client.session.get(as_sent(client, path))
        body = await response.read()
        assert response.status in (400, 404), (path, response.status)
        assert b"SECRET-IMAGE" not in body and b"user_id,first_name" not in body
        assert_no_leak(body.decode(errors="replace"))
    assert (await client.get("/images/1000")).status == 200


@pytest.mark.parametrize("user_id", ['a"b', "back\\slash", 'x","admin":true,"y":"', "nul\x00"])
async def test_image_404_bodies_are_json(client: TestClient[Any, Any], user_id: str) -> None:
    from urllib.parse import quote

    response = await client.get("/images/" + quote(user_id, safe=""))
    assert response.status == 404
    assert json.loads(await response.text()) == {"error": f"no image for user {user_id}"}


class Gated(LocalStore):
    """A local store whose listing waits for `gate`: the start-up run never finishes meanwhile."""

    def __init__(self, data_dir: Path, bucket: str) -> None:
        super().__init__(data_dir, bucket)
        self.gate = asyncio.Event()

    async def list(self, prefix: str) -> AsyncIterator[list[ObjectInfo]]:
        await self.gate.wait()
        async for page in super().list(prefix):
            yield page


@pytest.mark.parametrize(
    "img_path",
    [
        "secret/leak.png",
        "processed_data/output.csv",
        "/etc/passwd.png",
        "src-data/../secret/leak.png",
    ],
)
async def test_an_edited_output_cannot_point_the_image_route_outside_the_prefix(
    aiohttp_client: ClientFactory, tmp_path: Path, img_path: str
) -> None:
    # Before the first run finishes, the committed output is served as it is in the bucket, even when
    # edited by hand: its img_path must not open anything outside the prefix.
    store = Gated(tmp_path / "data", "datalake")
    await store.ensure_bucket()
    await store.put("secret/leak.png", b"SECRET-IMAGE")
    await store.put("src-data/ok.png", b"fine")
    rows = [("u1", img_path), ("u2", "src-data/ok.png")]
    text = "user_id,first_name,last_name,birthts,img_path\n" + "".join(f"{u},F,L,0,{p}\n" for u, p in rows)
    await store.put(OUTPUT, text.encode())
    client = await aiohttp_client(create_app(Settings(schedule=NEVER), store=store))
    await wait_ready(client)
    response = await client.get("/images/u1")
    body = await response.read()
    assert b"SECRET-IMAGE" not in body and b"user_id" not in body
    assert response.status == 404, (response.status, body[:200])
    assert await (await client.get("/images/u2")).read() == b"fine"
    store.gate.set()


def swap_for_symlink(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


async def test_an_image_swapped_for_a_symlink_is_not_served(
    client: TestClient[Any, Any], local: LocalStore, tmp_path: Path
) -> None:
    # A producer who can write under src-data replaces a listed image by a link to a file outside the
    # bucket (here a file beside DATA_DIR; it could be any file the service can read).
    outside = tmp_path / "outside-the-bucket.txt"
    await asyncio.to_thread(outside.write_bytes, b"SECRET-OUTSIDE-THE-BUCKET")
    image = tmp_path / "data" / "datalake" / "src-data" / "img" / "1000.png"
    assert (await client.get("/images/1000")).status == 200
    await asyncio.to_thread(swap_for_symlink, image, outside)
    response = await client.get("/images/1000")  # the snapshot still names src-data/img/1000.png
    body = await response.read()
    assert b"SECRET-OUTSIDE-THE-BUCKET" not in body
    assert response.status == 404


# -- secrets: never in logs, reports or responses -----------------------------------------------------


def test_the_token_is_compared_in_constant_time() -> None:
    source = inspect.getsource(service_state)
    assert "hmac.compare_digest(" in source
    authorize = inspect.getsource(service_state.ServiceState.authorize)
    assert "compare_digest" in authorize
    assert "== token" not in authorize and "token ==" not in authorize and "!= token" not in authorize


async def test_secrets_never_reach_logs_reports_or_responses(
    aiohttp_client: ClientFactory,
    seaweed: SeaweedServer,
    seaweed_buckets: BucketPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    secret = seaweed.secret_key
    bucket = await seaweed_buckets.take()
    seeder = seaweed.store(bucket)
    try:
        await seed(seeder)
    finally:
        await seeder.close()

    def settings(endpoint: str) -> Settings:
        return Settings(
            minio_endpoint=endpoint, minio_access_key=seaweed.access_key, minio_secret_key=secret,
            bucket=bucket, schedule=NEVER, api_token=TOKEN,
        )  # fmt: skip

    texts: list[str] = [repr(settings(seaweed.endpoint))]
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def call(client: TestClient[Any, Any], method: str, path: str, **kwargs: Any) -> Any:
        response = await getattr(client, method)(path, **kwargs)
        texts.append(await response.text())
        return response

    client = await aiohttp_client(create_app(settings(seaweed.endpoint)))  # start-up and its run
    await wait_ready(client)
    assert (await call(client, "post", "/data", headers=auth)).status == 200
    for wrong in ("Bearer nope", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Basic " + TOKEN, TOKEN):
        assert (await call(client, "post", "/data", headers={"Authorization": wrong})).status == 401
        await call(
            client,
            "post",
            "/graphql",
            json={"query": "mutation { reprocess { id } }"},
            headers={"Authorization": wrong},
        )
    await call(client, "post", "/graphql", json={"query": "mutation { reprocess { id error } }"}, headers=auth)
    await call(
        client,
        "post",
        "/graphql",
        json={"query": "{ lastRun { outcome error warnings rejected { key reason } } runs { id error } }"},
    )
    for path in (
        "/images/1000",
        "/images/nobody",
        "/images/..%2Fx",
        "/stats?min_age=x",
        "/data?x=1",
        "/readyz",
        "/healthz",
    ):
        await call(client, "get", path)
    await call(client, "post", "/graphql", data=b"{", headers={"Content-Type": "application/json"})

    # The same secret against a closed port: failing start-up attempts (logged with the endpoint), and
    # runs refused until the store has been reached once (the run history must be restored first).
    (closed_port,) = free_ports(1)
    failing = await aiohttp_client(create_app(settings(f"127.0.0.1:{closed_port}")))
    response = await call(failing, "post", "/data", headers=auth)
    assert response.status == 503
    assert "starting" in json.loads(texts[-1])["error"]
    for _ in range(100):
        if any(str(closed_port) in record.getMessage() for record in caplog.records):
            break
        await asyncio.sleep(0.05)
    assert any(str(closed_port) in record.getMessage() for record in caplog.records)
    await call(failing, "post", "/graphql", json={"query": "{ lastRun { outcome error } runs { error } }"})
    await call(failing, "get", "/stats")
    await call(failing, "get", "/readyz")

    logged = caplog.text
    assert "run 1 (startup) succeeded" in logged and "not available at start-up" in logged  # the capture saw both
    assert secret not in logged, "the S3 secret key is in the log"
    assert TOKEN not in logged, "the API token is in the log"
    for record in caplog.records:
        assert secret not in str(record.args) and TOKEN not in str(record.args), record.msg
    for text in texts[1:]:
        assert_no_leak(text, secret, TOKEN)
    assert secret not in texts[0] and TOKEN not in texts[0], "repr(Settings) shows a secret"
