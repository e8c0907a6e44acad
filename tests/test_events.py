"""Bucket events: `POST /events` takes MinIO's and SeaweedFS's webhook payloads, queues the keys, and
targeted runs apply them with the same result as a full run; lost events are repaired by listings."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pandas as pd
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from s3server import SeaweedServer, free_ports
from support import BIRTHS, INVALID, NAMES, NEVER, ClientFactory, csv_of, encode, gql, seed, wait_ready, years_ago

from service import blocks as bl
from service import manifest as mf
from service.aggregator import Aggregator, RunResult, Targets
from service.app import create_app, scheduled_run
from service.config import Settings
from service.errors import BadRequest, ObjectUnreadable, StorageError
from service.intake import EventIntake
from service.local_store import LocalStore
from service.notifications import parse
from service.output import derive
from service.report import Outcome, RunKind, RunReport
from service.runner import Runner
from service.storage import ObjectInfo, ObjectStore

TOKEN = "events-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUCKET = "datalake"
OUTPUT = "processed_data/output.csv"


def minio_record(event: str, bucket: str, key: str, size: int = 42) -> dict[str, Any]:
    """One record as MinIO's webhook target sends it: the S3 event structure, the key URL-encoded as a
    query string (Go's url.QueryEscape: `+` for a space, `%2F` for a slash)."""
    now = datetime.now(UTC)
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": "",
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "eventName": event,
        "userIdentity": {"principalId": "datalake-admin"},
        "requestParameters": {"principalId": "datalake-admin", "region": "", "sourceIPAddress": "172.18.0.4"},
        "responseElements": {"x-amz-id-2": "dd9025bab4ad", "x-amz-request-id": "1817C7A0F6B4C5E2"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "datalake-admin"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": quote_plus(key, safe=""),
                **({"size": size, "eTag": "5d41402abc4b2a76b9719d911017c592"} if "Created" in event else {}),
                "contentType": "text/csv",
                "sequencer": f"{int(now.timestamp() * 1e9):X}",
            },
        },
        "source": {"host": "172.18.0.4", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.95"},
    }


def minio_payload(*records: tuple[str, str], bucket: str = BUCKET) -> dict[str, Any]:
    """A MinIO webhook body: `EventName` and `Key` name the first record, as MinIO writes them."""
    event, key = records[0]
    return {
        "EventName": event,
        "Key": f"{bucket}/{key}",
        "Records": [minio_record(name, bucket, record_key) for name, record_key in records],
    }


def seaweed_payload(event_type: str, path: str, *, folder: bool = False, new_path: str | None = None) -> dict[str, Any]:
    """A SeaweedFS filer webhook body (the shape `weed` 4.x posts, trimmed to the fields that matter)."""
    entry = {"name": path.rpartition("/")[2], "attributes": {"file_size": 42, "mtime": 1796168101}}
    if folder:
        entry["is_directory"] = True
    message: dict[str, Any] = {"signatures": [-601635970]}
    if event_type != "create":
        message["old_entry"] = entry
    if event_type != "delete":
        target = new_path or path
        parent, _, name = target.rpartition("/")
        message["new_entry"] = {**entry, "name": name}
        message["new_parent_path"] = parent
    return {"event_type": event_type, "key": path, "message": message}


@pytest.fixture
async def local(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path, BUCKET)
    await seed(store)
    return store


def events_settings(**overrides: Any) -> Settings:
    return Settings(schedule=NEVER, events_token=TOKEN, events_window=0.05, **overrides)


@pytest.fixture
async def client(aiohttp_client: ClientFactory, local: LocalStore) -> TestClient[Any, Any]:
    client = await aiohttp_client(create_app(events_settings(), store=local))
    await wait_ready(client)
    return client


async def user(client: TestClient[Any, Any], user_id: str) -> dict[str, Any] | None:
    body = await gql(client, f'{{ user(userId: "{user_id}") {{ userId firstName imgPath }} }}')
    found: dict[str, Any] | None = body["data"]["user"]
    return found


async def eventually(check: Callable[[], Any]) -> None:
    """Poll `check` (a coroutine function returning truth) until it holds, for 10 s at most."""
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the change never became visible")


async def runs(client: TestClient[Any, Any]) -> list[dict[str, Any]]:
    body = await gql(client, "{ runs(limit: 50) { runId trigger kind outcome listed fetched added removed } }")
    found: list[dict[str, Any]] = body["data"]["runs"]
    return found


# --- POST /events ---------------------------------------------------------------------------------------


async def test_a_minio_put_is_visible_after_a_targeted_run(client: TestClient[Any, Any], local: LocalStore) -> None:
    await local.put("src-data/2000.csv", csv_of("2000", years_ago(40)))
    response = await client.post(
        "/events", json=minio_payload(("s3:ObjectCreated:Put", "src-data/2000.csv")), headers=AUTH
    )
    assert response.status == 202
    assert await response.json() == {"queued": 1, "ignored": 0, "needs_listing": False}
    await eventually(lambda: user(client, "2000"))
    newest = (await runs(client))[0]
    assert newest["kind"] == "TARGETED" and newest["trigger"] == "events" and newest["outcome"] == "SUCCEEDED"
    assert newest["listed"] == 1 and newest["fetched"] == 1 and newest["added"] == 1
    report = await (await client.post("/data")).json()  # over REST, the report names its kind too
    assert report["kind"] == "full"


async def test_a_batch_with_encoded_keys_images_and_deletes(client: TestClient[Any, Any], local: LocalStore) -> None:
    await local.put("src-data/a b/Jürgen x.csv", csv_of("Jürgen x", years_ago(33)))
    await local.put("src-data/a b/Jürgen x.png", b"png")
    await local.put("src-data/sub/50%+off.csv", csv_of("50%+off", years_ago(20)))
    await local.delete("src-data/1004.csv")
    await local.delete("src-data/img/1000.png")
    payload = minio_payload(
        ("s3:ObjectCreated:Put", "src-data/a b/Jürgen x.csv"),
        ("s3:ObjectCreated:CompleteMultipartUpload", "src-data/a b/Jürgen x.png"),
        ("s3:ObjectCreated:Copy", "src-data/sub/50%+off.csv"),
        ("s3:ObjectRemoved:Delete", "src-data/1004.csv"),
        ("s3:ObjectRemoved:DeleteMarkerCreated", "src-data/img/1000.png"),
        ("s3:ObjectAccessed:Get", "src-data/1001.csv"),  # a read changes nothing
    )
    assert payload["Records"][0]["s3"]["object"]["key"] == "src-data%2Fa+b%2FJ%C3%BCrgen+x.csv"
    response = await client.post("/events", data=json.dumps(payload), headers=AUTH)
    assert response.status == 202 and (await response.json())["queued"] == 5
    await eventually(lambda: user(client, "50%+off"))
    assert await user(client, "Jürgen x") == {"userId": "Jürgen x", "firstName": "NameJürgen x",
                                              "imgPath": "src-data/a b/Jürgen x.png"}  # fmt: skip
    assert await user(client, "1004") is None
    assert (await user(client, "1000") or {})["imgPath"] is None
    targeted = [run for run in await runs(client) if run["kind"] == "TARGETED"]
    assert len(targeted) == 1 and targeted[0]["removed"] == 1, "one run for the whole batch"


async def test_duplicate_late_and_stale_events_are_harmless(client: TestClient[Any, Any], local: LocalStore) -> None:
    """The run compares with what the store says now: a 'created' for a key deleted since removes its
    row, a 'removed' for a key written again since keeps it, repeats change nothing."""
    await local.delete("src-data/1001.csv")
    await local.put("src-data/1005.csv", csv_of("1005", years_ago(70)))
    stale = minio_payload(
        ("s3:ObjectCreated:Put", "src-data/1001.csv"),  # arrives after the delete that followed it
        ("s3:ObjectRemoved:Delete", "src-data/1005.csv"),  # the put after it came first
        ("s3:ObjectCreated:Put", "src-data/1001.csv"),
    )
    for _ in range(3):
        assert (await client.post("/events", json=stale, headers=AUTH)).status == 202
    await eventually(lambda: _gone(client, "1001"))
    assert await user(client, "1005") is not None
    await client.post("/data")  # a full run finds nothing left to do
    assert (await runs(client))[0]["added"] == (await runs(client))[0]["removed"] == 0


async def _gone(client: TestClient[Any, Any], user_id: str) -> bool:
    return await user(client, user_id) is None


async def test_events_outside_the_source_are_ignored(client: TestClient[Any, Any], local: LocalStore) -> None:
    """Other buckets, other prefixes, and the service's own output, manifest, lease and history."""
    before = len(await runs(client))
    own = [OUTPUT, OUTPUT + ".manifest", OUTPUT + ".lease", OUTPUT + ".runs.json", "elsewhere/1.csv"]
    payload = minio_payload(*(("s3:ObjectCreated:Put", key) for key in own))
    other_bucket = minio_payload(("s3:ObjectCreated:Put", "src-data/1000.csv"), bucket="another")
    for body in (payload, other_bucket, seaweed_payload("create", "/buckets/another/src-data/1.csv")):
        response = await client.post("/events", json=body, headers=AUTH)
        assert response.status == 202 and (await response.json())["queued"] == 0
    await asyncio.sleep(0.3)
    assert len(await runs(client)) == before, "no run for them"
    metrics = await (await client.get("/metrics")).text()
    assert 'bucket_events_total{outcome="ignored"} 7.0' in metrics


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": TOKEN}, 401), (AUTH, 202)],
)
async def test_the_events_token_is_required(client: TestClient[Any, Any], headers: dict[str, str], status: int) -> None:
    response = await client.post(
        "/events", json=minio_payload(("s3:ObjectCreated:Put", "src-data/1.csv")), headers=headers
    )
    assert response.status == status, await response.text()
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_without_a_token_there_is_no_route(aiohttp_client: ClientFactory, local: LocalStore) -> None:
    client = await aiohttp_client(create_app(Settings(schedule=NEVER), store=local))
    response = await client.post(
        "/events", json=minio_payload(("s3:ObjectCreated:Put", "src-data/1.csv")), headers=AUTH
    )
    assert response.status == 404


MALFORMED = [
    b"not json",
    b"[1, 2]",
    b'"Records"',
    b"{}",
    b'{"Records": {}}',
    b'{"Records": [1]}',
    b'{"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "datalake"}}}]}',
    b'{"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": 1}, "object": {"key": "k"}}}]}',
    b'{"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "d"}, "object": {"key": "%ff"}}}]}',
    b'{"event_type": "created", "key": "/buckets/datalake/src-data/1.csv", "message": {}}',
    b'{"event_type": "create", "key": "buckets/datalake/1.csv", "message": {}}',
    b'{"event_type": "create", "key": "/buckets/datalake/1.csv", "message": []}',
    b'{"event_type": "create", "key": "/buckets/datalake/1.csv", "message": {"new_entry": "x"}}',
    b'{"event_type": "rename", "key": "/a", "message": {"new_entry": {"name": "a/b"}, "new_parent_path": "/"}}',
    b"[" * 100_000,
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
async def test_a_malformed_notification_is_a_400(client: TestClient[Any, Any], body: bytes) -> None:
    response = await client.post("/events", data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]


def test_seaweedfs_payloads_name_keys_and_folders() -> None:
    root = f"/buckets/{BUCKET}"
    assert parse(json.dumps(seaweed_payload("create", f"{root}/src-data/1.csv")).encode(), BUCKET).targets == Targets(
        frozenset({"src-data/1.csv"})
    )
    renamed = parse(
        json.dumps(seaweed_payload("rename", f"{root}/src-data/a.csv", new_path=f"{root}/src-data/b/a.csv")).encode(),
        BUCKET,
    )
    assert renamed.targets.keys == {"src-data/a.csv", "src-data/b/a.csv"}
    folder = parse(json.dumps(seaweed_payload("delete", f"{root}/src-data/old", folder=True)).encode(), BUCKET)
    assert folder.targets == Targets(frozenset(), frozenset({"src-data/old/"}))
    created = parse(json.dumps(seaweed_payload("create", f"{root}/src-data/new", folder=True)).encode(), BUCKET)
    assert not created.targets and created.ignored == 1, "a new folder holds no file yet"
    system = parse(json.dumps(seaweed_payload("create", "/buckets/.system/owners/x")).encode(), BUCKET)
    assert not system.targets and system.ignored == 1
    with pytest.raises(BadRequest, match="event_type"):
        parse(b'{"event_type": 1, "key": "/", "message": {}}', BUCKET)


async def test_a_targeted_run_lists_when_it_must(local: LocalStore) -> None:
    """A process's first run, a folder that holds the whole prefix, a key the store will not stat."""
    aggregator = Aggregator(local, src_prefix="src-data/", output_key=OUTPUT, concurrency=4)
    one = Targets(frozenset({"src-data/1000.csv"}))
    assert (await aggregator.run(targets=one)).report.kind is RunKind.FULL, "nothing to start from"
    assert (await aggregator.run(targets=one)).report.kind is RunKind.TARGETED
    whole = Targets(frozenset(), frozenset({"src-data/"}))
    assert (await aggregator.run(targets=whole)).report.kind is RunKind.FULL
    locked = "src-data/locked.csv"
    await local.put(locked, csv_of("locked", years_ago(20)))
    stat, get = local.stat, local.get

    async def refusing_stat(key: str) -> Any:
        if key == locked:
            raise ObjectUnreadable(f"cannot read {key!r}: permission denied")
        return await stat(key)

    async def refusing_get(key: str, max_bytes: int | None = None) -> bytes:
        if key == locked:
            raise ObjectUnreadable(f"cannot read {key!r}: permission denied")
        return await get(key, max_bytes)

    async def refusing_read(key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        return await local.stat(key), await local.get(key, max_bytes)

    # The store lets the file be stat'ed but not read: the targeted run rejects it with the reason.
    local.get, local.get_with_info = refusing_get, refusing_read  # type: ignore[method-assign]
    result = await aggregator.run(targets=Targets(frozenset({locked})))
    assert result.report.kind is RunKind.TARGETED
    assert [(f.key, f.reason.startswith("unreadable")) for f in result.rejected.page(slice(None))] == [
        ("src-data/broken.csv", False), (locked, True),
    ]  # fmt: skip
    # Nor stat'ed: only a listing shows it.
    local.stat = refusing_stat  # type: ignore[method-assign]
    await local.put(locked, csv_of("locked", years_ago(21)))
    result = await aggregator.run(targets=Targets(frozenset({locked})))
    assert result.report.kind is RunKind.FULL, "a listing shows it, and the run rejects it"
    assert [(f.key, f.reason.startswith("unreadable")) for f in result.rejected.page(slice(None))] == [
        ("src-data/broken.csv", False), (locked, True),
    ]  # fmt: skip


# --- the queue: bounded, and a listing when anything was lost ------------------------------------------------


class Gate:
    """Holds source GETs of a `LocalStore` while closed."""

    def __init__(self, store: LocalStore) -> None:
        self.open = asyncio.Event()
        self.open.set()
        original = store.get

        original_with_info = store.get_with_info

        async def get(key: str, max_bytes: int | None = None) -> bytes:
            if key.startswith("src-data/"):
                await self.open.wait()
            return await original(key, max_bytes)

        async def get_with_info(key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
            if key.startswith("src-data/"):
                await self.open.wait()
            return await original_with_info(key, max_bytes)

        store.get = get  # type: ignore[method-assign]
        store.get_with_info = get_with_info  # type: ignore[method-assign]


def wired(store: LocalStore, *, capacity: int = 100) -> tuple[Runner, EventIntake, list[RunResult]]:
    """A runner and an intake as the app wires them: the intake sees every run's report."""
    aggregator = Aggregator(store, src_prefix="src-data/", output_key=OUTPUT, concurrency=4)
    published: list[RunResult] = []
    intake: list[EventIntake] = []

    async def on_report(report: RunReport) -> None:
        intake[0].observe(report)

    runner = Runner(aggregator, published.append, on_report=on_report)
    intake.append(EventIntake(runner, src_prefix="src-data/", window=0.01, capacity=capacity))
    return runner, intake[0], published


async def test_a_flood_stays_bounded_and_the_next_scheduled_run_lists(local: LocalStore) -> None:
    runner, intake, _ = wired(local, capacity=100)
    await runner.run("startup")
    assert not intake.needs_listing, "the first full run covered the time before the start"
    for batch in range(200):  # 20,000 keys, never more than the capacity held
        offered = intake.offer(Targets(frozenset(f"src-data/{batch}-{i}.csv" for i in range(100))))
        assert intake.pending <= 100
    assert offered.overflowed and intake.needs_listing
    await local.put("src-data/9999.csv", csv_of("9999", years_ago(25)))
    report = await _scheduled(runner)
    assert report.kind is RunKind.FULL and report.added == 1
    assert not intake.needs_listing, "a full run that started after the overflow covers it"
    await runner.close()


async def _scheduled(runner: Runner) -> RunReport:
    await scheduled_run(runner)
    report = runner.last_report
    assert report is not None and report.trigger == "schedule"
    return report


async def test_after_an_overflow_the_runs_events_ask_for_are_full(local: LocalStore) -> None:
    runner, intake, _ = wired(local, capacity=3)
    await runner.run("startup")
    serving = asyncio.create_task(intake.serve())
    intake.offer(Targets(frozenset(f"src-data/{i}.csv" for i in range(4))))
    await _until(lambda: not intake.needs_listing)
    assert [r.kind for r in runner.history] == [RunKind.FULL, RunKind.FULL]
    await local.put("src-data/7777.csv", csv_of("7777", years_ago(25)))
    intake.offer(Targets(frozenset({"src-data/7777.csv"})))
    await _until(lambda: len(runner.history) == 3)
    assert runner.history[-1].kind is RunKind.TARGETED and runner.history[-1].added == 1
    serving.cancel()
    await runner.close()


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def test_a_failed_targeted_run_needs_a_listing(local: LocalStore) -> None:
    runner, intake, _ = wired(local)
    await runner.run("startup")
    serving = asyncio.create_task(intake.serve())
    original = local.get_with_info

    async def broken(key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        if key.startswith("src-data/"):
            raise StorageError("connection refused (injected)")
        return await original(key, max_bytes)

    local.get_with_info = broken  # type: ignore[method-assign]
    intake.offer(Targets(frozenset({"src-data/1000.csv"})))
    await _until(lambda: intake.needs_listing)
    assert runner.history[-1].kind is RunKind.TARGETED and runner.history[-1].outcome is Outcome.FAILED
    local.get_with_info = original  # type: ignore[method-assign]
    report = await _scheduled(runner)
    assert report.kind is RunKind.FULL and report.outcome is Outcome.SUCCEEDED and not intake.needs_listing
    serving.cancel()
    await runner.close()


async def test_a_targeted_request_joins_a_pending_full_run(local: LocalStore) -> None:
    gate = Gate(local)
    runner, _, _ = wired(local)
    await runner.run("startup")
    gate.open.clear()
    await local.put("src-data/1000.csv", csv_of("1000", years_ago(31)))
    first = asyncio.create_task(runner.run("events", Targets(frozenset({"src-data/1000.csv"}))))
    await asyncio.sleep(0.05)
    joined = [
        asyncio.create_task(runner.run("events", Targets(frozenset({"src-data/1001.csv"})))),
        asyncio.create_task(runner.run("schedule")),
        asyncio.create_task(runner.run("events", Targets(frozenset({"src-data/1002.csv"})))),
    ]
    await asyncio.sleep(0.05)
    gate.open.set()
    reports = await asyncio.gather(first, *joined)
    assert reports[0].kind is RunKind.TARGETED
    assert {r.run_id for r in reports[1:]} == {reports[0].run_id + 1}, "one follow-up run for all three"
    assert reports[1].kind is RunKind.FULL and reports[1].trigger == "schedule", "the full run wins"
    await runner.close()


async def test_targeted_requests_merge_their_keys(local: LocalStore) -> None:
    gate = Gate(local)
    runner, _, _ = wired(local)
    await runner.run("startup")
    gate.open.clear()
    first = asyncio.create_task(runner.run("mutation"))
    await asyncio.sleep(0.05)
    for user_id in ("3000", "3001"):
        await local.put(f"src-data/{user_id}.csv", csv_of(user_id, years_ago(22)))
    joined = [
        asyncio.create_task(runner.run("events", Targets(frozenset({f"src-data/{u}.csv"})))) for u in ("3000", "3001")
    ]
    await asyncio.sleep(0.05)
    gate.open.set()
    _, second, third = await asyncio.gather(first, *joined)
    assert second is third and second.kind is RunKind.TARGETED and second.added == 2 and second.listed == 2
    await runner.close()


# --- lost while down: the next full run repairs, and the backfill counts it --------------------------------


async def test_events_lost_while_the_service_was_down_are_repaired(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path, BUCKET)
    await seed(store)
    first = await aiohttp_client(create_app(events_settings(), store=store))
    await wait_ready(first)
    await first.close()  # down: whatever happens now is never posted
    changes = LocalStore(tmp_path, BUCKET)
    await changes.put("src-data/4000.csv", csv_of("4000", years_ago(45)))
    await changes.put("src-data/1001.csv", csv_of("1001", years_ago(46)))
    await changes.delete("src-data/1003.csv")
    await changes.close()
    second = await aiohttp_client(create_app(events_settings(), store=LocalStore(tmp_path, BUCKET)))
    await wait_ready(second)
    await eventually(lambda: user(second, "4000"))
    assert await user(second, "1003") is None
    startup = (await runs(second))[0]
    assert startup["trigger"] == "startup" and startup["kind"] == "FULL"

    async def counted() -> bool:  # the report reaches the metrics just after the commit is served
        metrics = await (await second.get("/metrics")).text()
        return "events_needs_listing 0.0" in metrics and all(
            f'events_backfill_changes_total{{change="{change}"}} 1.0' in metrics
            for change in ("added", "updated", "removed")
        )

    await eventually(counted)


async def test_an_events_task_that_fails_says_what_stops(
    aiohttp_client: ClientFactory, local: LocalStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: EventIntake) -> None:
        raise RuntimeError("an unexpected bug in the intake")

    monkeypatch.setattr(EventIntake, "serve", broken)
    client = await aiohttp_client(create_app(events_settings(), store=local))
    await wait_ready(client)
    failure = next(r for r in caplog.records if r.getMessage().startswith("the events task failed"))
    assert "no longer applied; scheduled runs still list" in failure.getMessage() and failure.exc_info is not None


async def test_a_restarted_intake_needs_a_listing_until_a_full_run(local: LocalStore) -> None:
    runner, intake, _ = wired(local)
    assert intake.needs_listing, "it cannot know what happened while the process was down"
    intake.offer(Targets(frozenset({"src-data/1000.csv"})))
    serving = asyncio.create_task(intake.serve())
    await _until(lambda: len(runner.history) == 1)
    assert runner.history[0].kind is RunKind.FULL and not intake.needs_listing
    serving.cancel()
    await runner.close()


# --- property: events applied one batch at a time give what full runs give ----------------------------------

USERS = st.sampled_from(["1", "2", "01", "x y", "ü"])
FOLDERS = st.sampled_from(["src-data/", "src-data/sub/", "src-data/sub/deep/"])


class EventsAgainstListings(RuleBasedStateMachine):
    """Random changes to the source; each batch is applied by a targeted run from its events (shuffled,
    repeated, mixed with stale and foreign keys) and by a full run of another aggregator. Both keep
    their own output, manifest and rejected files, and they must always be the same."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.root = Path(tempfile.mkdtemp())
        self.store = LocalStore(self.root, "lake")
        self.targeted = Aggregator(
            self.store, src_prefix="src-data/", output_key="t/output.csv", concurrency=4, keep_blocks=True
        )
        # Another replica on the same output: the two take turns, each starting from the other's commit.
        self.other = Aggregator(
            self.store, src_prefix="src-data/", output_key="t/output.csv", concurrency=4, keep_blocks=True
        )
        self.full = Aggregator(self.store, src_prefix="src-data/", output_key="f/output.csv", concurrency=4)
        # Reads every commit of the targeted one, as a follower does: block by block after the first.
        self.follower = Aggregator(self.store, src_prefix="src-data/", output_key="t/output.csv", concurrency=4)
        self.keys: set[str] = set()
        self.touched: set[str] = set()
        self.folders: set[str] = set()
        self.seen: set[str] = set()
        self.random = random.Random(0)
        self.shared = False  # whether the other replica applied a batch yet
        self.block_rows = bl.BLOCK_ROWS
        bl.BLOCK_ROWS = 2  # blocks of a few rows: commits and reads reuse some and redo others

    def teardown(self) -> None:
        bl.BLOCK_ROWS = self.block_rows
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _do(self, coroutine):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coroutine)

    @initialize()
    def first_runs(self) -> None:
        """A process's first run lists; from then on, the targeted aggregator gets events only."""
        self._do(self.targeted.run())
        self._do(self.other.run())
        self._do(self.full.run())

    def _put(self, key: str, data: bytes) -> None:
        self._do(self.store.put(key, data))
        self.keys.add(key)
        self.touched.add(key)

    @rule(user=USERS, folder=FOLDERS, first=NAMES, last=NAMES, birthts=BIRTHS)
    def write_valid_csv(self, user: str, folder: str, first: str, last: str, birthts: int) -> None:
        self._put(f"{folder}{user}.csv", encode(first, last, birthts))

    @rule(user=USERS, folder=FOLDERS, content=INVALID)
    def write_invalid_csv(self, user: str, folder: str, content: bytes) -> None:
        self._put(f"{folder}{user}.csv", content)

    @rule(user=USERS, folder=FOLDERS, ext=st.sampled_from(["png", "JPG", "txt"]), hidden=st.booleans())
    def write_other(self, user: str, folder: str, ext: str, hidden: bool) -> None:
        self._put(f"{folder}{'.' if hidden else ''}{user}.{ext}", b"img")

    @precondition(lambda self: self.keys)
    @rule(data=st.data())
    def delete_one(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.keys)))
        self._do(self.store.delete(key))
        self.keys.discard(key)
        self.touched.add(key)

    @precondition(lambda self: any(k.startswith("src-data/sub/") for k in self.keys))
    @rule()
    def delete_a_folder(self) -> None:
        """A folder removed whole: its event names the folder, not the files."""
        for key in [k for k in self.keys if k.startswith("src-data/sub/")]:
            self._do(self.store.delete(key))
            self.keys.discard(key)
        self.folders.add("src-data/sub/")

    @rule(on_other=st.booleans())
    def apply(self, on_other: bool) -> None:
        named = sorted(self.touched)
        stale = self.random.sample(sorted(self.seen), min(3, len(self.seen)))
        events = [*named, *named[: len(named) // 2], *stale, "t/output.csv", "f/output.csv.manifest", "other/1.csv"]
        self.random.shuffle(events)
        replica = self.other if on_other else self.targeted
        targeted = self._do(replica.run(targets=Targets(frozenset(events), frozenset(self.folders))))
        full = self._do(self.full.run())
        assert targeted.report.kind is RunKind.TARGETED and full.report.kind is RunKind.FULL
        assert self._do(self.store.get("t/output.csv")) == self._do(self.store.get("f/output.csv"))
        assert self._manifest("t/output.csv").equals(self._manifest("f/output.csv"))
        # Misnamed keys are known to the process that saw them (listed, or named by an event), and the
        # manifest does not record them: once both replicas applied batches, each knows only its own.
        self.shared |= on_other
        recorded = set(self._manifest("t/output.csv")["key"]) if self.shared else None
        assert _rejected(targeted, recorded) == _rejected(full, recorded)
        assert targeted.report.conflicts == full.report.conflicts
        followed = self._do(self.follower.load_committed())
        assert followed is not None and followed.version == targeted.report.output_version
        pd.testing.assert_frame_equal(followed.table, targeted.table)
        manifest = self._manifest("t/output.csv")
        pd.testing.assert_frame_equal(followed.table, derive(manifest))
        assert list(followed.rejected.keys) == sorted(manifest.loc[manifest["status"] == mf.REJECTED, "key"])
        assert (targeted.report.added, targeted.report.updated, targeted.report.removed) == (
            full.report.added, full.report.updated, full.report.removed,
        )  # fmt: skip
        self.seen |= self.touched
        self.touched, self.folders = set(), set()

    def _manifest(self, output: str) -> Any:
        frame, _ = mf.from_bytes(self._do(self.store.get(output + ".manifest")), 2**62)
        return frame


def _rejected(result: RunResult, among: set[str] | None) -> list[tuple[str, str]]:
    pairs = zip(result.rejected.keys, result.rejected.reasons, strict=True)
    return [(str(key), str(reason)) for key, reason in pairs if among is None or key in among]


EventsAgainstListings.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestEventsAgainstListings = EventsAgainstListings.TestCase


# --- end to end: SeaweedFS's filer posts its events to the service ------------------------------------------


async def test_seaweedfs_filer_webhook_end_to_end(aiohttp_client: ClientFactory) -> None:
    """Every kind of change reaches the service by events alone; changes made while it was down are
    repaired by its start-up listing; and the output is always the one a full run computes afresh."""
    (port,) = free_ports(1)
    notification = (
        "[notification.webhook]\nenabled = true\n"
        f'endpoint = "http://127.0.0.1:{port}/events"\nbearer_token = "{TOKEN}"\ntimeout_seconds = 5\n'
    )
    server = SeaweedServer(notification=notification)
    await asyncio.to_thread(server.start)
    store = server.store("events-e2e")
    writer = server.store("events-e2e")
    try:
        await seed(store)
        settings = events_settings(bucket="events-e2e")
        client = await aiohttp_client(TestServer(create_app(settings, store=store), host="127.0.0.1", port=port))
        await wait_ready(client)
        before = max(run["runId"] for run in await runs(client))
        await writer.put("src-data/new/5000.csv", csv_of("5000", years_ago(52)))
        await writer.put("src-data/new/5000.png", b"png")
        await eventually(lambda: _has_image(client, "5000"))
        await writer.put("src-data/1000.csv", b"first_name, last_name, birthts\nRenamed, Last1000, 0\n")
        await eventually(lambda: _first_name_is(client, "1000", "Renamed"))
        await writer.delete("src-data/new/5000.png")
        await eventually(lambda: _has_no_image(client, "5000"))
        await writer.delete("src-data/1002.csv")
        await eventually(lambda: _gone(client, "1002"))
        streamed = [str(7000 + i) for i in range(40)]
        for user_id in streamed:  # a steady stream: 20 files a second
            await writer.put(f"src-data/stream/{user_id}.csv", csv_of(user_id, years_ago(20)))
            await asyncio.sleep(0.05)
        await eventually(lambda: _all_served(client, streamed))
        kinds = {run["kind"] for run in await runs(client) if run["trigger"] == "events" and run["runId"] > before}
        assert kinds == {"TARGETED"}, await runs(client)
        metrics = await (await client.get("/metrics")).text()
        assert re.search(r'bucket_events_total\{outcome="queued"\} [1-9]', metrics)
        assert await _output(store) == await _view(store, "check/1/output.csv"), "events kept the output exact"

        last = max(run["runId"] for run in await runs(client))
        await client.close()  # down: what the filer posts meanwhile is lost
        await writer.put("src-data/down/6000.csv", csv_of("6000", years_ago(40)))
        await writer.delete("src-data/1001.csv")
        client = await aiohttp_client(TestServer(create_app(settings, store=store), host="127.0.0.1", port=port))
        await wait_ready(client)
        await eventually(lambda: _started_up(client, after=last))
        start_up = next(run for run in await runs(client) if run["trigger"] == "startup" and run["runId"] > last)
        assert (start_up["kind"], start_up["added"], start_up["removed"]) == ("FULL", 1, 1), start_up
        assert await user(client, "6000") is not None and await user(client, "1001") is None
        assert await _output(store) == await _view(store, "check/2/output.csv"), "the listing repaired it"
    finally:
        await writer.close()
        await asyncio.to_thread(server.stop)


async def _first_name_is(client: TestClient[Any, Any], user_id: str, name: str) -> bool:
    found = await user(client, user_id)
    return found is not None and found["firstName"] == name


async def _has_no_image(client: TestClient[Any, Any], user_id: str) -> bool:
    found = await user(client, user_id)
    return found is not None and found["imgPath"] is None


async def _all_served(client: TestClient[Any, Any], user_ids: list[str]) -> bool:
    body = await gql(client, "{ users(limit: 1000) { userId } }")
    return set(user_ids) <= {row["userId"] for row in body["data"]["users"]}


async def _started_up(client: TestClient[Any, Any], after: int) -> bool:
    return any(run["trigger"] == "startup" and run["runId"] > after for run in await runs(client))


async def _output(store: ObjectStore) -> bytes:
    return await store.get(OUTPUT)


async def _view(store: ObjectStore, output_key: str) -> bytes:
    """The output a full run computes from the source as it is now, written under `output_key`."""
    await Aggregator(store, src_prefix="src-data/", output_key=output_key, concurrency=8).run()
    return await store.get(output_key)


async def _has_image(client: TestClient[Any, Any], user_id: str) -> bool:
    found = await user(client, user_id)
    return found is not None and found["imgPath"] is not None
