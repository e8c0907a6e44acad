"""Faults made to happen against a real SeaweedFS server.

The store is down at start-up, dies in the middle of a run, is slow or black-holed behind a TCP
proxy; the service process itself is SIGKILLed mid-run; many triggers race. Tests that stop a
server start their own, so the shared session server is never disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import itertools
import logging
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pandas as pd
import pytest
from aiohttp.test_utils import TestClient
from faultkit import (
    MANIFEST,
    NEVER,
    OUTPUT,
    SRC,
    FaultProxy,
    Request,
    Service,
    change_some,
    numbered_csv,
    output_ids,
    put_all,
    rebuild,
    user_objects,
)  # fmt: skip
from s3server import BucketPool, SeaweedServer, free_ports
from support import ClientFactory, put_with_customer_key

from service import manifest as mf
from service import output
from service.aggregator import UNREADABLE_PREFIX, Aggregator
from service.app import create_app
from service.config import Settings
from service.errors import StorageError
from service.minio_store import MinioStore
from service.storage import ObjectInfo

pytestmark = pytest.mark.s3

# -- the app in process ------------------------------------------------------------------------


async def gql(client: TestClient[Any, Any], query: str) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query})
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def stats_count(client: TestClient[Any, Any]) -> int:
    body = await gql(client, "{ stats { count } }")
    assert "errors" not in body, body
    count: int = body["data"]["stats"]["count"]
    return count


async def wait_ready(client: TestClient[Any, Any], within: float = 30.0) -> float:
    """Poll /readyz until 200; returns how long it took."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        if (await client.get("/readyz")).status == 200:
            return time.monotonic() - began
        await asyncio.sleep(0.05)
    raise AssertionError(f"/readyz not 200 within {within}s")


async def wait_until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def own_server() -> Iterator[SeaweedServer]:
    """A SeaweedFS server of this test only: it may be paused, killed and restarted."""
    server = SeaweedServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()  # its data is thrown away: no need to wait for a graceful exit
        server.stop()


@pytest.fixture
async def bucket_store(seaweed: SeaweedServer, seaweed_buckets: BucketPool) -> AsyncIterator[MinioStore]:
    """A fresh bucket on the shared session server (only for tests that never stop it)."""
    store = seaweed.store(await seaweed_buckets.take())
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def proxy(seaweed: SeaweedServer) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the shared session server."""
    proxy = await FaultProxy(seaweed.endpoint).start()
    try:
        yield proxy
    finally:
        await proxy.close()


# -- 1. the store is unreachable at start-up ---------------------------------------------------


@pytest.mark.parametrize("fault", ["killed", "paused"])
async def test_store_unreachable_at_startup_then_ready_once_it_is_back(
    aiohttp_client: ClientFactory, own_server: SeaweedServer, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    seeder = own_server.store("startup")
    await seeder.ensure_bucket()
    await put_all(seeder, user_objects(range(1000, 1020)))
    await seeder.close()
    if fault == "killed":
        await asyncio.to_thread(own_server.kill)  # connection refused; ports and data stay
    else:
        own_server.pause()  # connections accepted by the kernel, never answered

    store = own_server.store("startup", timeout=0.5, retries=1)
    client = await aiohttp_client(create_app(Settings(schedule=NEVER), store=store))

    health = await client.get("/healthz")
    assert (health.status, (await health.json())["status"]) == (200, "ok")
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["status"] == "not ready"
    body = await gql(client, "{ stats { count } }")
    assert body.get("data") is None
    message = body["errors"][0]["message"]
    assert "not available yet" in message and "Internal" not in message
    for path in ("/stats", "/data"):
        response = await client.get(path)
        assert response.status == 503 and response.content_type == "application/json"
        assert "not available yet" in (await response.json())["error"]

    def failed_attempts() -> list[str]:
        return [r.getMessage() for r in caplog.records if "not available at start-up" in r.getMessage()]

    await wait_until(lambda: bool(failed_attempts()), 10.0, "a failed start-up attempt in the log")
    assert own_server.secret_key not in failed_attempts()[0]
    assert (await client.get("/readyz")).status == 503

    if fault == "killed":
        await asyncio.to_thread(own_server.restart)
    else:
        own_server.resume()
    back = time.monotonic()
    # The start-up backoff is 1, 2, 5, 10, 30, 60 s: with the server back after ~1-3 s of the app's
    # life, the next attempt is due within 5 s (10 s if it just missed one). The bound is generous.
    await wait_ready(client, within=45.0)
    took = time.monotonic() - back
    print(f"\n[{fault}] ready {took:.1f}s after the store came back; {len(failed_attempts())} failed attempts")
    assert await stats_count(client) == 20
    assert (await client.get("/stats")).status == 200


async def test_runs_while_the_store_is_down_at_startup_keep_unique_ids_and_order(
    aiohttp_client: ClientFactory, own_server: SeaweedServer
) -> None:
    seeder = own_server.store("history")
    await seeder.ensure_bucket()
    await put_all(seeder, user_objects(range(1000, 1010)))
    await seeder.close()
    fields = "id trigger outcome startedAt"
    # A previous process: runs 1 (startup), 2 and 3, persisted beside the output.
    before = await aiohttp_client(create_app(Settings(schedule=NEVER), store=own_server.store("history")))
    await wait_ready(before)
    for _ in range(2):
        assert (await gql(before, "mutation { reprocess { outcome } }"))["data"]["reprocess"]["outcome"] == "SUCCEEDED"
    await before.close()

    # This process starts while the store is down: a run requested meanwhile is refused, clearly.
    await asyncio.to_thread(own_server.kill)
    client = await aiohttp_client(
        create_app(Settings(schedule=NEVER), store=own_server.store("history", timeout=0.5, retries=1))
    )
    asked = datetime.now(UTC).isoformat()
    refused = await gql(client, f"mutation {{ reprocess {{ {fields} }} }}")
    assert refused["data"] is None and "starting" in refused["errors"][0]["message"]
    assert (await client.post("/data")).status == 503
    await asyncio.to_thread(own_server.restart)
    await wait_ready(client, within=45.0)

    async def runs() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (await gql(client, f"{{ runs(limit: 100) {{ {fields} }} }}"))["data"]["runs"]
        return found

    deadline = time.monotonic() + 30.0
    while not any(r["trigger"] == "startup" and r["startedAt"] > asked for r in await runs()):
        assert time.monotonic() < deadline, await runs()
        await asyncio.sleep(0.05)
    history = await runs()
    assert [r["trigger"] for r in history] == ["startup", "mutation", "mutation", "startup"]
    ids = [r["id"] for r in history]
    assert len(ids) == len(set(ids)), f"duplicate run ids: {ids}"
    starts = [datetime.fromisoformat(r["startedAt"]) for r in history]
    assert starts == sorted(starts, reverse=True), "runs(...) is not newest first"


# -- 2. the store dies in the middle of a run --------------------------------------------------


class GatedMinioStore(MinioStore):
    """Once armed, the `gate_after`-th source GET (and every later one) waits for `gate`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate_after: int | None = None
        self.source_gets = 0
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        if key.startswith(SRC) and self.gate_after is not None:
            self.source_gets += 1
            if self.source_gets >= self.gate_after:
                self.reached.set()
                await self.gate.wait()
        return await super().get(key, max_bytes)


async def test_store_dies_mid_run_previous_snapshot_and_output_survive(
    aiohttp_client: ClientFactory, own_server: SeaweedServer
) -> None:
    bucket, users = "midrun", 2000
    seeder = own_server.store(bucket)
    await seeder.ensure_bucket()
    await put_all(seeder, user_objects(range(users), images=False))
    await seeder.close()

    store = GatedMinioStore(
        own_server.endpoint, own_server.access_key, own_server.secret_key, bucket, timeout=2.0, retries=2
    )
    client = await aiohttp_client(create_app(Settings(schedule=NEVER, fetch_concurrency=16), store=store))
    await wait_ready(client, within=60.0)
    assert await stats_count(client) == users

    direct = own_server.store(bucket)
    try:
        output_before, manifest_before = await direct.get(OUTPUT), await direct.get(MANIFEST)
        ids = await change_some(direct, set(range(users)), random.Random(2), 200)
        await direct.close()

        store.source_gets, store.gate_after = 0, 100
        run = asyncio.create_task(gql(client, "mutation { reprocess { outcome error users } }"))
        await asyncio.wait_for(store.reached.wait(), 30.0)
        assert not run.done()  # 99 changed files fetched, the rest waiting: the run is mid-way
        await asyncio.to_thread(own_server.kill)
        store.gate_after = None
        store.gate.set()
        failed = (await asyncio.wait_for(run, 60.0))["data"]["reprocess"]

        assert failed["outcome"] == "FAILED"
        error = failed["error"]
        print(f"\nfailed run's error: {error}")
        assert error.startswith("object store error") and own_server.endpoint not in error
        assert own_server.secret_key not in error and "Internal" not in error
        assert await stats_count(client) == users  # the previous snapshot is still served
        assert (await client.get("/readyz")).status == 200
        last = (await gql(client, "{ lastRun { outcome error } }"))["data"]["lastRun"]
        assert last == {"outcome": "FAILED", "error": error}

        await asyncio.to_thread(own_server.restart)
        # Right after a restart SeaweedFS may stall the first writes for seconds (volume
        # re-registration); one write with the default 30 s timeout waits that out.
        await direct.put("warm-up/after-restart", b"x")
        assert await direct.get(OUTPUT) == output_before  # the failed run wrote nothing
        assert await direct.get(MANIFEST) == manifest_before

        after = (await gql(client, "mutation { reprocess { outcome error users added updated removed fullRebuild } }"))[
            "data"
        ]["reprocess"]
        assert after == {
            "outcome": "SUCCEEDED",
            "error": None,
            "users": len(ids),
            "added": 50,
            "updated": 200,
            "removed": 50,
            "fullRebuild": False,
        }
        assert await stats_count(client) == len(ids)
        output = await direct.get(OUTPUT)
        assert output == await rebuild(direct, "rebuild/output.csv")
        assert output_ids(output) == sorted(str(i) for i in ids)
    finally:
        await direct.close()


async def test_store_unreachable_mid_life_fails_the_run_reports_no_endpoint_and_changes_nothing(
    aiohttp_client: ClientFactory,
    seaweed: SeaweedServer,
    bucket_store: MinioStore,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await put_all(bucket_store, user_objects(range(10)))
    store = MinioStore(
        proxy.endpoint, seaweed.access_key, seaweed.secret_key, bucket_store.bucket, timeout=1.0, retries=0
    )
    client = await aiohttp_client(create_app(Settings(schedule=NEVER), store=store))
    await wait_ready(client)
    output_before, manifest_before = await bucket_store.get(OUTPUT), await bucket_store.get(MANIFEST)
    await put_all(bucket_store, user_objects([3, 11], version=1))  # changes the failed run must not commit
    proxy.blackhole = True  # the store stops answering
    proxy.drop_connections()

    response = await client.post("/data")
    assert response.status == 502
    report = await response.json()
    last = (await gql(client, "{ lastRun { outcome error } }"))["data"]["lastRun"]
    assert last == {"outcome": "FAILED", "error": report["error"]}
    # The run's first request is for the lease beside the output.
    assert report["error"] == f"object store error: cannot read '{OUTPUT}.lease': timed out (1s)"
    host, _, port = proxy.endpoint.partition(":")
    assert host not in report["error"] and port not in report["error"]
    assert proxy.endpoint in caplog.text  # the log says where
    assert await stats_count(client) == 10
    assert await bucket_store.get(OUTPUT) == output_before
    assert await bucket_store.get(MANIFEST) == manifest_before


# -- 3. the service process is SIGKILLed during a run ------------------------------------------


async def test_service_killed_mid_run_converges_on_the_next_run(
    seaweed: SeaweedServer, bucket_store: MinioStore, proxy: FaultProxy, tmp_path: Path
) -> None:
    users, bucket = 500, bucket_store.bucket
    await put_all(bucket_store, user_objects(range(users)))
    ids = set(range(users))
    env = {
        "MINIO_ACCESS_KEY": seaweed.access_key,
        "MINIO_SECRET_KEY": seaweed.secret_key,
        "BUCKET": bucket,
        "FETCH_CONCURRENCY": "8",
        "SCHEDULE": NEVER,
        "HOST": "127.0.0.1",
    }
    via_proxy = env | {"MINIO_ENDPOINT": proxy.endpoint}
    direct = env | {"MINIO_ENDPOINT": seaweed.endpoint}
    source_gets = f"/{bucket}/{SRC}"
    services: list[Service] = []

    async def service(args: list[str], env: dict[str, str], name: str) -> Service:
        started = await Service.start(args, env, tmp_path / f"{name}.log")
        services.append(started)
        return started

    try:
        # a) `serve`, SIGKILLed at the 300th source GET of its start-up run (nothing committed yet).
        victim = await service(["serve"], via_proxy | {"PORT": str(free_ports(1)[0])}, "serve-killed")

        def kill_at_300(request: Request) -> None:
            started = request.method == "GET" and request.path.startswith(source_gets)
            if started and proxy.count("GET", source_gets) == 300:
                victim.kill()

        proxy.on_request = kill_at_300
        assert await victim.wait(60.0) == -signal.SIGKILL, victim.output()
        proxy.on_request = None
        assert proxy.count("GET", source_gets) < users
        assert proxy.count("PUT", f"/{bucket}/{OUTPUT}") == proxy.count("PUT", f"/{bucket}/{OUTPUT}.lease")
        for key in (OUTPUT, MANIFEST):
            assert not await bucket_store.exists(key)

        # b) the next run (here in process, to save a start-up) converges: nothing was committed.
        first = await Aggregator(bucket_store, src_prefix=SRC, output_key=OUTPUT, concurrency=32).run()
        assert (first.report.full_rebuild, first.report.users) == (True, users)
        output = await bucket_store.get(OUTPUT)
        assert output_ids(output) == sorted(map(str, ids))
        manifest_before = await bucket_store.get(MANIFEST)

        # c) change files; `process` SIGKILLed between its two writes: the output is new, the
        # manifest is held back by the proxy and never reaches the server.
        ids = await change_some(bucket_store, ids, random.Random(3), 100)
        proxy.hold = lambda r: r.method == "PUT" and r.path == f"/{bucket}/{MANIFEST}"
        victim = await service(["process"], via_proxy, "process-killed")
        await asyncio.wait_for(proxy.held.wait(), 60.0)
        victim.kill()
        assert await victim.wait(10.0) == -signal.SIGKILL
        proxy.hold = None
        assert await bucket_store.get(OUTPUT) != output  # the output was written...
        assert await bucket_store.get(MANIFEST) == manifest_before  # ...and the manifest was not

        # d) the next `process` notices, derives the output from the manifest again (an incremental run),
        # and the output equals a from-scratch rebuild.
        second = await service(["process", "--json"], direct, "process-2")
        assert await second.wait(60.0) == 0, second.output()
        report = second.output()
        assert '"full_rebuild": false' in report and "does not match the manifest" in report
        output = await bucket_store.get(OUTPUT)
        assert output == await rebuild(bucket_store, "rebuild-2/output.csv")
        rows = output_ids(output)
        assert len(rows) == len(set(rows)) == len(ids) and rows == sorted(map(str, ids))

        # e) `serve` again: ready, and /stats counts every user once.
        port = free_ports(1)[0]
        server = await service(["serve"], direct | {"PORT": str(port)}, "serve")
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                        if response.status == 200:
                            break
                assert server.proc.returncode is None, server.output()
                await asyncio.sleep(0.05)
            async with http.get(f"http://127.0.0.1:{port}/stats") as response:
                assert response.status == 200
                assert (await response.json())["count"] == len(ids)
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait(15.0) == 0, server.output()
    finally:
        for started in services:
            await started.close()


# -- 4. a slow store, a black-holed store ------------------------------------------------------


async def test_slow_store_keeps_queries_fast_and_timeouts_bound_every_call(
    aiohttp_client: ClientFactory, seaweed: SeaweedServer, bucket_store: MinioStore, proxy: FaultProxy
) -> None:
    users = 400
    await put_all(bucket_store, user_objects(range(users)))
    ids = set(range(users))
    store = MinioStore(
        proxy.endpoint, seaweed.access_key, seaweed.secret_key, bucket_store.bucket, timeout=1.0, retries=1
    )
    client = await aiohttp_client(create_app(Settings(schedule=NEVER, fetch_concurrency=8), store=store))
    await wait_ready(client)
    fast = (await gql(client, "mutation { reprocess { durationSeconds } }"))["data"]["reprocess"]

    async def run_while_querying(count: int) -> tuple[dict[str, Any], list[float]]:
        run = asyncio.create_task(gql(client, "mutation { reprocess { outcome error users durationSeconds } }"))
        latencies: list[float] = []
        while not run.done():
            began = time.perf_counter()
            assert await stats_count(client) == count  # the previous snapshot
            latencies.append(time.perf_counter() - began)
            await asyncio.sleep(0.05)
        return (await run)["data"]["reprocess"], latencies

    # Slow: every chunk in either direction waits 20 ms.
    ids = await change_some(bucket_store, ids, random.Random(4), 160)
    proxy.delay = 0.02
    slow, latencies = await run_while_querying(users)
    print(
        f"\nrun: {fast['durationSeconds']:.2f}s direct, {slow['durationSeconds']:.2f}s slow; "
        f"{len(latencies)} queries during it, slowest {max(latencies) * 1000:.0f} ms"
    )
    assert (slow["outcome"], slow["users"]) == ("SUCCEEDED", len(ids))
    assert slow["durationSeconds"] > fast["durationSeconds"]
    assert len(latencies) >= 5 and max(latencies) < 0.5

    # Dropped connections mid-run are retried: the run still succeeds.
    count, ids = len(ids), await change_some(bucket_store, ids, random.Random(5), 120)
    asyncio.get_running_loop().call_later(0.3, proxy.drop_connections)
    dropped, _ = await run_while_querying(count)
    assert (dropped["outcome"], dropped["error"], dropped["users"]) == ("SUCCEEDED", None, len(ids))

    # Black hole: each call fails after about timeout * (retries + 1), never hangs.
    proxy.delay, proxy.blackhole = 0.0, True
    proxy.drop_connections()  # pooled connections too
    probe = MinioStore(
        proxy.endpoint, seaweed.access_key, seaweed.secret_key, bucket_store.bucket, timeout=0.3, retries=2
    )
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: probe.get(f"{SRC}1.csv"),
        lambda: probe.list(SRC).__anext__(),
    ]
    try:
        for operation in operations:
            began = time.monotonic()
            with pytest.raises(StorageError, match="timed out") as caught:
                await operation()
            took = time.monotonic() - began
            assert "after 3 attempts" in str(caught.value) and seaweed.secret_key not in str(caught.value)
            assert 0.9 <= took < 0.9 + 0.3 + 1.5, took  # 3 x 0.3 s, two backoffs under 0.3 s, slack
    finally:
        await probe.close()

    # The app's run fails within its own bounds (timeout 1 s, 2 attempts), queries stay fast.
    failed, latencies = await run_while_querying(len(ids))
    assert failed["outcome"] == "FAILED" and "timed out" in failed["error"]
    assert failed["durationSeconds"] < 2 * 1.0 + 0.1 + 2.0
    assert max(latencies) < 0.5
    proxy.blackhole = False
    proxy.drop_connections()
    recovered = (await gql(client, "mutation { reprocess { outcome users } }"))["data"]["reprocess"]
    assert recovered == {"outcome": "SUCCEEDED", "users": len(ids)}


async def test_store_fails_between_output_and_manifest_writes_in_process(
    aiohttp_client: ClientFactory, seaweed: SeaweedServer, bucket_store: MinioStore, proxy: FaultProxy
) -> None:
    users, bucket = 200, bucket_store.bucket
    await put_all(bucket_store, user_objects(range(users)))
    store = MinioStore(proxy.endpoint, seaweed.access_key, seaweed.secret_key, bucket, timeout=0.5, retries=1)
    client = await aiohttp_client(create_app(Settings(schedule=NEVER), store=store))
    await wait_ready(client)
    output_before, manifest_before = await bucket_store.get(OUTPUT), await bucket_store.get(MANIFEST)
    ids = await change_some(bucket_store, set(range(users)), random.Random(7), 40)

    proxy.hold = lambda r: r.method == "PUT" and r.path == f"/{bucket}/{MANIFEST}"
    failed = (await gql(client, "mutation { reprocess { outcome error } }"))["data"]["reprocess"]
    assert failed["outcome"] == "FAILED" and MANIFEST in failed["error"] and "timed out" in failed["error"]
    assert await stats_count(client) == users  # the previous snapshot
    assert await bucket_store.get(OUTPUT) != output_before  # the output was written...
    assert await bucket_store.get(MANIFEST) == manifest_before  # ...the manifest never was

    proxy.hold = None
    proxy.drop_connections()
    fields = "outcome error users fullRebuild warnings"
    after = (await gql(client, f"mutation {{ reprocess {{ {fields} }} }}"))["data"]["reprocess"]
    assert (after["outcome"], after["error"], after["users"], after["fullRebuild"]) == (
        "SUCCEEDED",
        None,
        len(ids),
        False,  # the manifest is intact: the output is derived from it again, incrementally
    )
    assert any("does not match the manifest" in warning for warning in after["warnings"])
    assert await stats_count(client) == len(ids)
    output = await bucket_store.get(OUTPUT)
    assert output == await rebuild(bucket_store, "rebuild/output.csv")
    assert output_ids(output) == sorted(map(str, ids))


async def test_shutdown_during_a_scheduled_run_logs_no_error(
    aiohttp_client: ClientFactory, seaweed: SeaweedServer, bucket_store: MinioStore, caplog: pytest.LogCaptureFixture
) -> None:
    await put_all(bucket_store, user_objects(range(20)))
    store = GatedMinioStore(seaweed.endpoint, seaweed.access_key, seaweed.secret_key, bucket_store.bucket)
    client = await aiohttp_client(create_app(Settings(schedule="* * * * * *"), store=store))
    await wait_ready(client)
    store.gate_after = 1  # the next run, a scheduled one, blocks on its first fetch
    await bucket_store.put(f"{SRC}5.csv", numbered_csv(5, version=1))
    await asyncio.wait_for(store.reached.wait(), 5.0)
    caplog.clear()
    await client.close()  # shutdown with the scheduled run in flight
    store.gate.set()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(f"{r.name}: {r.getMessage()}" for r in errors)


def manifest_of(users: int) -> pd.DataFrame:
    """The manifest of `users` valid CSVs, 70% of them with an image, and no conflict at all."""
    moment = datetime(2024, 1, 1, tzinfo=UTC)
    page = [ObjectInfo(f"{SRC}{i}.csv", f"e{i}", 60, moment) for i in range(users)]
    page += [ObjectInfo(f"{SRC}img/{i}.png", f"i{i}", 90, moment) for i in range(users) if i % 10 < 7]
    frame, _ = mf.listing_frame(sorted(page, key=lambda info: info.key))
    is_csv = frame["kind"] == "csv"
    frame["status"] = is_csv.map({True: mf.OK, False: ""})
    frame["reason"] = ""
    frame["has_row"] = is_csv
    frame["first_name"] = frame["last_name"] = is_csv.map({True: "A", False: ""})
    frame["birthts"] = 0
    return frame[mf.COLUMNS].astype(mf.DTYPES)


def test_conflict_detection_costs_nothing_when_there_are_no_conflicts() -> None:
    manifest = manifest_of(8_000)
    began = time.perf_counter()
    found = output.conflicts(manifest)
    took = time.perf_counter() - began
    assert found == []
    # A vectorised check (duplicated on user_id AND kind) takes ~15 ms here; the bound has a wide margin.
    assert took < 0.15, f"{took:.2f}s to find no conflicts among 8,000 users"


# -- 5. many concurrent triggers ---------------------------------------------------------------


async def test_schedule_mutations_and_posts_at_once_never_overlap(
    aiohttp_client: ClientFactory, bucket_store: MinioStore
) -> None:
    await put_all(bucket_store, user_objects(range(300)))
    settings = Settings(schedule="* * * * * *", fetch_concurrency=16)  # every second
    client = await aiohttp_client(create_app(settings, store=bucket_store))
    await wait_ready(client)
    rng = random.Random(6)
    offsets = [rng.uniform(0.0, 3.0) for _ in range(70)]
    fields = "id trigger outcome startedAt finishedAt"

    async def keep_changing() -> None:
        for version in itertools.count(2):
            user_id = rng.randrange(300)
            await bucket_store.put(f"{SRC}{user_id}.csv", numbered_csv(user_id, version))
            await asyncio.sleep(0.05)

    async def call(i: int) -> tuple[datetime, dict[str, Any]]:
        await asyncio.sleep(offsets[i])
        asked = datetime.now(UTC)
        if i < 50:
            body = await gql(client, f"mutation {{ reprocess {{ {fields} }} }}")
            return asked, body["data"]["reprocess"]
        response = await client.post("/data")
        report = await response.json()
        assert response.status == 200, report
        return asked, {
            "id": report["run_id"],
            "trigger": report["trigger"],
            "outcome": report["outcome"].upper(),
            "startedAt": report["started_at"],
            "finishedAt": report["finished_at"],
        }

    changer = asyncio.create_task(keep_changing())
    try:
        results = await asyncio.gather(*(call(i) for i in range(70)))
    finally:
        changer.cancel()
        await asyncio.gather(changer, return_exceptions=True)
    # Triggers that arrive while a run is pending share it (and its trigger name): wait for a run
    # the schedule started on its own.
    for _ in range(100):
        history = (await gql(client, f"{{ runs(limit: 100) {{ {fields} }} }}"))["data"]["runs"]
        if any(run["trigger"] == "schedule" for run in history):
            break
        await asyncio.sleep(0.05)

    for asked, run in results:
        assert run["outcome"] == "SUCCEEDED"
        assert datetime.fromisoformat(run["startedAt"]) >= asked  # a run that began after the call
    seen: dict[int, tuple[str, str]] = {}
    for run in [r for _, r in results] + history:
        times = (run["startedAt"], run["finishedAt"])
        assert seen.setdefault(run["id"], times) == times  # one run, one report
    runs = sorted((datetime.fromisoformat(s), datetime.fromisoformat(f), i) for i, (s, f) in seen.items())
    for (_, finished, before), (started, _, after) in itertools.pairwise(runs):
        assert started >= finished, f"run {after} started before run {before} finished"
        assert after > before
    triggers = {run["trigger"] for run in history}
    print(f"\n70 calls answered by {len({r['id'] for _, r in results})} runs; {len(runs)} runs in all; {triggers}")
    assert "schedule" in triggers and len({r["id"] for _, r in results}) < 70


# -- 6. one object the store refuses; an image cut off mid-stream -----------------------------


async def test_an_object_the_store_refuses_is_rejected_and_the_run_goes_on(
    aiohttp_client: ClientFactory, seaweed: SeaweedServer, bucket_store: MinioStore
) -> None:
    await put_all(bucket_store, user_objects(range(1, 6)))
    client = await aiohttp_client(create_app(Settings(schedule=NEVER), store=bucket_store))
    await wait_ready(client)
    # User 2's file is replaced by one encrypted with a customer key (SSE-C) the service does not have.
    await put_with_customer_key(seaweed, bucket_store.bucket, f"{SRC}2.csv", numbered_csv(2, version=1))
    await put_all(bucket_store, {f"{SRC}6.csv": numbered_csv(6), f"{SRC}4.csv": numbered_csv(4, version=1)})

    fields = "outcome error added updated users rejected { key reason }"
    run = (await gql(client, f"mutation {{ reprocess {{ {fields} }} }}"))["data"]["reprocess"]

    assert (run["outcome"], run["error"], run["added"], run["updated"], run["users"]) == ("SUCCEEDED", None, 1, 1, 6)
    [rejected] = run["rejected"]
    assert rejected["key"] == f"{SRC}2.csv"
    assert rejected["reason"].startswith(f"{UNREADABLE_PREFIX}cannot read '{SRC}2.csv': InvalidArgument: "), rejected
    assert "Customer" in rejected["reason"] and seaweed.endpoint not in rejected["reason"]
    rows = list(csv.reader(io.StringIO((await bucket_store.get(OUTPUT)).decode())))
    assert [row[:2] for row in rows[1:]] == [
        ["1", "First1v0"], ["2", "First2v0"], ["3", "First3v0"], ["4", "First4v1"], ["5", "First5v0"], ["6", "First6v0"]
    ]  # fmt: skip
    # The next run reports it again, and still commits nothing new.
    again = (await gql(client, f"mutation {{ reprocess {{ {fields} }} }}"))["data"]["reprocess"]
    assert (again["outcome"], again["rejected"]) == ("SUCCEEDED", run["rejected"])


async def test_an_image_cut_off_by_the_store_mid_stream_ends_the_connection(
    aiohttp_client: ClientFactory,
    seaweed: SeaweedServer,
    bucket_store: MinioStore,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await put_all(bucket_store, user_objects([3]))
    image = os.urandom(8 * 1024 * 1024)
    await bucket_store.put(f"{SRC}img/3.png", image)
    store = MinioStore(proxy.endpoint, seaweed.access_key, seaweed.secret_key, bucket_store.bucket, retries=0)
    client = await aiohttp_client(create_app(Settings(schedule=NEVER), store=store))
    await wait_ready(client)
    proxy.delay = 0.01  # 64 KiB per 10 ms: the image is still on its way when the store goes

    response = await client.get("/images/3")
    assert (response.status, response.content_length) == (200, len(image))
    assert await response.content.readexactly(1024) == image[:1024]
    proxy.drop_connections()
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()

    assert any(f"image {SRC}img/3.png cut short" in record.getMessage() for record in caplog.records)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    proxy.delay = 0.0
    assert await (await client.get("/images/3")).read() == image
