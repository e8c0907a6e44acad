"""Several replicas on one bucket, with real parts: commits that race, apps that follow each other, and
`serve` processes (on SeaweedFS, and on one shared DATA_DIR) that are called at once and SIGKILLed.

What is checked is what README "Scaling out" promises: one run at a time, commits that cannot overwrite
each other, every replica serving the newest commit within seconds, one shared history, and an output
equal to the view of the source files (a fresh rebuild on another output key) whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from faultkit import (
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
)
from recording import Recording
from s3server import BucketPool, SeaweedServer, free_ports

from service import manifest as mf
from service.aggregator import Aggregator, RunResult, Superseded
from service.app import create_app
from service.config import Settings
from service.errors import PreconditionFailed, StorageError
from service.lease import Lease, LeaseRecord
from service.local_store import LocalStore
from service.minio_store import MinioStore
from service.storage import ObjectInfo, ObjectStore

OUTPUT = "processed_data/output.csv"
MANIFEST = OUTPUT + ".manifest"
LEASE = OUTPUT + ".lease"
NEVER = "0 0 1 1 *"  # the schedule stays out of the way: the tests trigger runs themselves
FOLLOW_WITHIN = 5.0  # seconds: how soon every replica serves another replica's commit
RUN_FIELDS = "runId replica outcome error startedAt finishedAt outputVersion"
STATS = "{ stats { count averageAge youngestAge oldestAge withImage withoutImage } }"
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


# -- what every test checks ----------------------------------------------------------------------


def assert_disjoint(runs: list[dict[str, Any]]) -> None:
    """No two runs of the history overlap in time (whichever replicas ran them)."""
    spans = sorted((_at(r["startedAt"]), _at(r["finishedAt"]), f"{r['replica']}#{r['runId']}") for r in runs)
    for (_, finished, before), (started, _, after) in itertools.pairwise(spans):
        assert started >= finished, f"run {after} started at {started} before run {before} finished at {finished}"


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def assert_output_is_the_view(store: ObjectStore, ids: set[int], rebuild_key: str) -> None:
    """The stored output equals a from-scratch rebuild (on another key), and its header names it."""
    output = await store.get(OUTPUT)
    assert output == await rebuild(store, rebuild_key)
    assert output_ids(output) == sorted(map(str, ids))
    _, header = mf.from_bytes(await store.get(MANIFEST), int(time.time() * 1000))
    assert header.output_etag == (await store.stat(OUTPUT)).etag


# -- 1. two aggregators that commit at once, without a lease -------------------------------------


@dataclass(frozen=True)
class Write:
    writer: str
    key: str
    if_match: str | None
    if_none_match: bool
    etag: str | None  # None: refused (precondition failed)


class CommitRace(Recording):
    """One aggregator's view of the store: its first commit write (output or manifest) waits at a barrier
    shared with the other aggregator, so both have loaded their state before either writes. Every write
    to the output or the manifest is logged, refused or not, in the order the store answered them."""

    def __init__(self, inner: ObjectStore, writer: str, barrier: asyncio.Barrier, log: list[Write]) -> None:
        super().__init__(inner)
        self.writer = writer
        self.barrier = barrier
        self.log = log
        self.waited = False

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        if key not in (OUTPUT, MANIFEST):
            return await super().put(key, data, content_type, if_match=if_match, if_none_match=if_none_match)
        if not self.waited:
            self.waited = True
            await asyncio.wait_for(self.barrier.wait(), 30.0)
        try:
            etag = await super().put(key, data, content_type, if_match=if_match, if_none_match=if_none_match)
        except PreconditionFailed:
            self.log.append(Write(self.writer, key, if_match, if_none_match, None))
            raise
        self.log.append(Write(self.writer, key, if_match, if_none_match, etag))
        return etag


async def _etag(store: ObjectStore, key: str) -> str | None:
    return (await store.stat(key)).etag if await store.exists(key) else None


@pytest.mark.parametrize("commit", ["first", "output", "manifest-only"])
async def test_two_aggregators_committing_at_once_exactly_one_commits(store: ObjectStore, commit: str) -> None:
    """first: nothing committed yet (both create); output: a changed user (both replace the output);
    manifest-only: a new bad file (the output stays, both replace only the manifest)."""
    ids = set(range(30))
    await put_all(store, user_objects(sorted(ids)))
    if commit != "first":
        await Aggregator(store, src_prefix=SRC, output_key=OUTPUT, concurrency=8).run()
    if commit == "output":
        await put_all(store, {f"{SRC}4.csv": numbered_csv(4, version=1), f"{SRC}30.csv": numbered_csv(30)})
        ids.add(30)
    elif commit == "manifest-only":
        await store.put(f"{SRC}bad.csv", b"first_name\nonly\n")
    before = {key: await _etag(store, key) for key in (OUTPUT, MANIFEST)}

    barrier, log = asyncio.Barrier(2), []
    racers = {
        name: Aggregator(CommitRace(store, name, barrier, log), src_prefix=SRC, output_key=OUTPUT, concurrency=8)
        for name in ("a", "b")
    }
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(racer.run() for name, racer in racers.items()), return_exceptions=True), 60.0
    )

    results = dict(zip(racers, outcomes, strict=True))
    [winner] = [name for name, result in results.items() if isinstance(result, RunResult)]
    [loser] = [name for name, result in results.items() if isinstance(result, Superseded)]
    won = results[winner]
    assert isinstance(won, RunResult)
    # The loser's one write was refused, and it wrote nothing after it.
    assert [(w.key, w.etag) for w in log if w.writer == loser] == [
        (MANIFEST if commit == "manifest-only" else OUTPUT, None)
    ]
    written = [w.key for w in log if w.writer == winner]
    assert written == ([MANIFEST] if commit == "manifest-only" else [OUTPUT, MANIFEST])
    assert all(w.etag is not None for w in log if w.writer == winner)
    assert won.report.output_written == (commit != "manifest-only")

    # No commit overwrote another's: each write that went through was conditional on the object as the
    # write before it left it (absent at first), and what is stored is what the last of them wrote.
    current = dict(before)
    for write in log:
        assert write.if_none_match or write.if_match is not None, f"an unconditional commit write: {write}"
        if write.etag is not None:
            assert (write.if_match if write.if_match is not None else None) == current[write.key], write
            assert not write.if_none_match or current[write.key] is None, write
            current[write.key] = write.etag
    assert current == {key: await _etag(store, key) for key in (OUTPUT, MANIFEST)}

    await assert_output_is_the_view(store, ids, "rebuild/output.csv")
    # One more run, by the loser: it starts from the winner's commit, which is already the view.
    again = await racers[loser].run()
    assert (again.report.output_version, again.report.output_written) == (won.report.output_version, False)
    assert (again.report.added, again.report.updated, again.report.removed) == (0, 0, 0)
    await assert_output_is_the_view(store, ids, "rebuild-2/output.csv")


class BetweenWrites(Recording):
    """Pauses after its first output write, before the manifest write: `between` is set, `resume` lets it
    go on. Every write to the output or the manifest is logged (refused ones with etag None)."""

    def __init__(self, inner: ObjectStore, writer: str, log: list[Write]) -> None:
        super().__init__(inner)
        self.writer = writer
        self.log = log
        self.between = asyncio.Event()
        self.resume = asyncio.Event()

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        try:
            etag = await super().put(key, data, content_type, if_match=if_match, if_none_match=if_none_match)
        except PreconditionFailed:
            self.log.append(Write(self.writer, key, if_match, if_none_match, None))
            raise
        if key in (OUTPUT, MANIFEST):
            self.log.append(Write(self.writer, key, if_match, if_none_match, etag))
        if key == OUTPUT and not self.between.is_set():
            self.between.set()
            await asyncio.wait_for(self.resume.wait(), 30.0)
        return etag


@pytest.mark.parametrize("finishes_first", ["earlier", "later"])
async def test_a_run_that_starts_between_anothers_two_writes(store: ObjectStore, finishes_first: str) -> None:
    """Run a stops between its output and manifest writes; run b starts then (it finds the output out of
    step with the manifest) and stops there too. Whichever writes its manifest first commits, the other
    is superseded; when that was the earlier run, the output it wrote was replaced by the later one's and
    the manifest names another ETag: the next run sees it and writes the output again."""
    ids = set(range(30))
    await put_all(store, user_objects(sorted(ids)))
    await Aggregator(store, src_prefix=SRC, output_key=OUTPUT, concurrency=8).run()
    manifest_before = await _etag(store, MANIFEST)
    await put_all(store, {f"{SRC}7.csv": numbered_csv(7, version=1), f"{SRC}30.csv": numbered_csv(30)})
    ids.add(30)
    log: list[Write] = []
    wrappers = {name: BetweenWrites(store, name, log) for name in ("earlier", "later")}
    runs = {name: Aggregator(w, src_prefix=SRC, output_key=OUTPUT, concurrency=8) for name, w in wrappers.items()}

    earlier = asyncio.create_task(runs["earlier"].run())
    await asyncio.wait_for(wrappers["earlier"].between.wait(), 30.0)
    later = asyncio.create_task(runs["later"].run())
    await asyncio.wait_for(wrappers["later"].between.wait(), 30.0)
    tasks = {"earlier": earlier, "later": later}
    loser = "later" if finishes_first == "earlier" else "earlier"
    wrappers[finishes_first].resume.set()
    won = await asyncio.wait_for(tasks[finishes_first], 30.0)
    wrappers[loser].resume.set()
    with pytest.raises(Superseded):
        await asyncio.wait_for(tasks[loser], 30.0)

    # Both output writes went through, each on the ETag the other left; of the manifest writes, both on
    # the manifest the runs started from, only the first did.
    outputs = [w for w in log if w.key == OUTPUT]
    manifests = [(w.writer, w.if_match, w.etag is not None) for w in log if w.key == MANIFEST]
    assert [w.writer for w in outputs] == ["earlier", "later"] and all(w.etag for w in outputs)
    assert outputs[1].if_match == outputs[0].etag
    assert manifests == [(finishes_first, manifest_before, True), (loser, manifest_before, False)]
    _, header = mf.from_bytes(await store.get(MANIFEST), int(time.time() * 1000))
    # (On S3 an ETag is the MD5 of the bytes: the two outputs are alike, so the output still matches.)
    in_step = header.output_etag == (await store.stat(OUTPUT)).etag
    assert in_step or finishes_first == "earlier"
    assert in_step == (finishes_first == "later") or isinstance(store, MinioStore)
    assert header.version == won.report.output_version

    again = await Aggregator(store, src_prefix=SRC, output_key=OUTPUT, concurrency=8).run()
    assert again.report.output_written == (not in_step)
    assert any("does not match the manifest" in w for w in again.report.warnings) == (not in_step)
    await assert_output_is_the_view(store, ids, "rebuild/output.csv")


# -- 2. two apps in one process, on one local store ----------------------------------------------


async def gql(client: TestClient[Any, Any], query: str) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query})
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    assert "errors" not in body, body
    data: dict[str, Any] = body["data"]
    return data


async def served_version(client: TestClient[Any, Any]) -> int | None:
    response = await client.get("/readyz")
    return int((await response.json())["version"]) if response.status == 200 else None


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Poll `check` until it holds; how long that took. The bound is what the README promises."""
    began = time.monotonic()
    while not await check():
        assert time.monotonic() - began < within, f"not within {within}s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def test_two_apps_on_one_store_follow_each_other_share_one_history_and_never_overlap(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    seeder = LocalStore(tmp_path, "datalake")
    await seeder.ensure_bucket()
    ids = set(range(40))
    await put_all(seeder, user_objects(sorted(ids)))

    def replica(name: str) -> Awaitable[TestClient[Any, Any]]:
        settings = Settings(schedule=NEVER, follow_interval=0.2, lease_ttl=3, replica_id=name, data_dir=tmp_path)
        return aiohttp_client(create_app(settings, store=LocalStore(tmp_path, "datalake")))

    a, b = await replica("a"), await replica("b")
    await eventually(lambda: _started(a, {"a", "b"}), 30.0, "both start-up runs in the history")

    # A commits a change (and a newly rejected file): B serves it within seconds, and answers alike.
    await put_all(seeder, {f"{SRC}5.csv": numbered_csv(5, version=1), f"{SRC}40.csv": numbered_csv(40)})
    await seeder.put(f"{SRC}bad.csv", b"first_name\nonly\n")
    ids.add(40)
    run = (await gql(a, f"mutation {{ reprocess {{ {RUN_FIELDS} }} }}"))["reprocess"]
    assert (run["outcome"], run["replica"]) == ("SUCCEEDED", "a")
    version = run["outputVersion"]
    took = await eventually(lambda: _serves(b, version), FOLLOW_WITHIN, f"b serving version {version}")
    print(f"\nb served a's commit {took:.2f}s after a's run returned")
    assert await gql(b, STATS) == await gql(a, STATS)
    assert (await gql(b, STATS))["stats"]["count"] == len(ids)
    rejected = "{ rejectedFiles { totalCount files { key } } }"
    assert await gql(b, rejected) == await gql(a, rejected)
    assert (await gql(b, rejected))["rejectedFiles"]["files"] == [{"key": f"{SRC}bad.csv"}]
    # B lists A's run: the history is shared.
    mine = {"replica": "a", "runId": run["runId"], "outcome": "SUCCEEDED"}

    async def b_lists_it() -> bool:
        return mine in (await gql(b, "{ runs(limit: 100) { replica runId outcome } }"))["runs"]

    await eventually(b_lists_it, FOLLOW_WITHIN, "b listing a's run")

    # A commit of the manifest alone (one more rejected file, the output as it was, the same version)
    # is news too: B lists the rejected files A does.
    await seeder.put(f"{SRC}worse.csv", b"last_name\nonly\n")
    run = (await gql(a, "mutation { reprocess { outcome outputVersion outputWritten rejectedCount } }"))["reprocess"]
    assert run == {"outcome": "SUCCEEDED", "outputVersion": version, "outputWritten": False, "rejectedCount": 2}

    async def b_lists_both() -> bool:
        return await gql(b, rejected) == await gql(a, rejected)

    await eventually(b_lists_both, FOLLOW_WITHIN, "b listing the rejected files a does")
    assert (await gql(b, rejected))["rejectedFiles"]["totalCount"] == 2

    # Both at once: each gets a run that started after its call, and the runs take turns.
    await put_all(seeder, {f"{SRC}6.csv": numbered_csv(6, version=1), f"{SRC}41.csv": numbered_csv(41)})
    ids.add(41)
    asked = datetime.now(UTC)
    both = await asyncio.gather(*(gql(c, f"mutation {{ reprocess {{ {RUN_FIELDS} }} }}") for c in (a, b)))
    reports = [body["reprocess"] for body in both]
    assert [(r["outcome"], r["replica"]) for r in reports] == [("SUCCEEDED", "a"), ("SUCCEEDED", "b")]
    assert all(_at(r["startedAt"]) >= asked for r in reports), (asked, reports)
    fields = "replica runId outcome startedAt finishedAt"

    async def history_has_both() -> bool:
        runs = (await gql(a, f"{{ runs(limit: 100) {{ {fields} }} }}"))["runs"]
        return all({k: r[k] for k in fields.split()} in runs for r in reports)

    await eventually(history_has_both, FOLLOW_WITHIN, "the shared history listing both runs")
    history = (await gql(b, f"{{ runs(limit: 100) {{ {fields} }} }}"))["runs"]
    assert {r["replica"] for r in history} == {"a", "b"}
    assert all(r["outcome"] == "SUCCEEDED" for r in history), history
    assert_disjoint(history)
    newest = max(r["outputVersion"] for r in reports)
    for client in (a, b):
        await eventually(lambda c=client: _serves(c, newest), FOLLOW_WITHIN, f"serving version {newest}")
    assert await gql(b, STATS) == await gql(a, STATS)
    await assert_output_is_the_view(seeder, ids, "rebuild/output.csv")


async def _started(client: TestClient[Any, Any], replicas: set[str]) -> bool:
    """Whether the start-up run of each of `replicas` is over (so runs now are the ones a test asks for)."""
    runs = (await gql(client, "{ runs(limit: 100) { replica trigger } }"))["runs"]
    return {r["replica"] for r in runs if r["trigger"] == "startup"} >= replicas


async def _serves(client: TestClient[Any, Any], version: int) -> bool:
    return await served_version(client) == version


class FailingOnce(Recording):
    """Once armed, the first read of each key in `keys` fails, as a store that stumbles once does."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.keys: set[str] = set()
        self.failed: list[str] = []

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        self._stumble(key)
        return await super().get(key, max_bytes)

    async def get_with_info(self, key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        self._stumble(key)
        return await super().get_with_info(key, max_bytes)

    def _stumble(self, key: str) -> None:
        if key in self.keys:
            self.keys.discard(key)
            self.failed.append(key)
            raise StorageError(f"injected failure reading {key}")


async def test_a_follower_whose_look_fails_looks_again(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    seeder = LocalStore(tmp_path, "datalake")
    await seeder.ensure_bucket()
    await put_all(seeder, user_objects(range(10)))
    stumbling = FailingOnce(LocalStore(tmp_path, "datalake"))
    clients = {}
    for name, store in (("a", LocalStore(tmp_path, "datalake")), ("b", stumbling)):
        settings = Settings(schedule=NEVER, follow_interval=0.2, lease_ttl=3, replica_id=name, data_dir=tmp_path)
        clients[name] = await aiohttp_client(create_app(settings, store=store))
    a, b = clients["a"], clients["b"]
    await eventually(lambda: _started(b, {"a", "b"}), 30.0, "both start-up runs in the history")

    stumbling.keys = {MANIFEST, OUTPUT + ".runs.json"}  # b's next look at a commit and at the history fail
    await seeder.put(f"{SRC}10.csv", numbered_csv(10))
    run = (await gql(a, f"mutation {{ reprocess {{ {RUN_FIELDS} }} }}"))["reprocess"]
    await eventually(lambda: _serves(b, run["outputVersion"]), FOLLOW_WITHIN, "b serving a's commit")
    assert (await gql(b, STATS))["stats"]["count"] == 11

    async def b_lists_it() -> bool:
        runs = (await gql(b, "{ runs(limit: 100) { replica runId } }"))["runs"]
        return {"replica": "a", "runId": run["runId"]} in runs

    await eventually(b_lists_it, FOLLOW_WITHIN, "b listing a's run")
    assert sorted(stumbling.failed) == sorted([MANIFEST, OUTPUT + ".runs.json"])


# -- 3. and 4. `serve` processes ------------------------------------------------------------------


@dataclass
class Replica:
    """One `python -m service serve` process, stopped by its own pid."""

    name: str
    port: int
    service: Service

    async def gql(self, http: aiohttp.ClientSession, query: str) -> dict[str, Any]:
        async with http.post(f"http://127.0.0.1:{self.port}/graphql", json={"query": query}) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
        assert "errors" not in body, (self.name, body)
        data: dict[str, Any] = body["data"]
        return data

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        async with http.get(f"http://127.0.0.1:{self.port}/metrics") as response:
            assert response.status == 200
            return await response.text()

    async def version(self, http: aiohttp.ClientSession) -> int | None:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"http://127.0.0.1:{self.port}/readyz") as response:
                if response.status == 200:
                    return int((await response.json())["version"])
        assert self.service.proc.returncode is None, self.service.output()
        return None


@contextlib.asynccontextmanager
async def replicas(envs: dict[str, dict[str, str]], logs: Path) -> AsyncIterator[dict[str, Replica]]:
    """A `serve` process per name (REPLICA_ID the name, on a free loopback port), each ready and past its
    start-up run; all SIGKILLed at the end (by pid) unless a test stopped them before."""
    ports = free_ports(len(envs))
    started: dict[str, Replica] = {}
    try:
        for (name, env), port in zip(envs.items(), ports, strict=True):
            settings = {"REPLICA_ID": name, "PORT": str(port), "HOST": "127.0.0.1", "SCHEDULE": NEVER}
            service = await Service.start(["serve"], env | settings, logs / f"{name}.log")
            started[name] = Replica(name, port, service)
        async with aiohttp.ClientSession() as http:
            first = next(iter(started.values()))

            async def all_started() -> bool:
                if any([await r.version(http) is None for r in started.values()]):
                    return False
                return await _processes_started(http, first, set(started))

            await eventually(all_started, 90.0, "every replica ready and past its start-up run")
        yield started
    finally:
        for replica in started.values():
            await replica.service.close()


async def _processes_started(http: aiohttp.ClientSession, replica: Replica, names: set[str]) -> bool:
    runs = (await replica.gql(http, "{ runs(limit: 100) { replica trigger outcome } }"))["runs"]
    return {r["replica"] for r in runs if r["trigger"] == "startup" and r["outcome"] == "SUCCEEDED"} >= names


async def reprocess_at_once(
    http: aiohttp.ClientSession, targets: list[Replica], rng: random.Random, spread: float
) -> list[dict[str, Any]]:
    """A `reprocess` to each target, all within `spread` seconds; each report must be a successful run
    of that replica that started after its call."""

    async def call(target: Replica, delay: float) -> dict[str, Any]:
        await asyncio.sleep(delay)
        asked = datetime.now(UTC)
        report = (await target.gql(http, f"mutation {{ reprocess {{ {RUN_FIELDS} }} }}"))["reprocess"]
        assert (report["outcome"], report["error"], report["replica"]) == ("SUCCEEDED", None, target.name), report
        assert _at(report["startedAt"]) >= asked, f"{target.name}'s run started before the call at {asked}: {report}"
        return report

    calls = [call(target, rng.uniform(0.0, spread)) for target in targets]
    return list(await asyncio.wait_for(asyncio.gather(*calls), 180.0))


async def assert_one_history(
    http: aiohttp.ClientSession, reader: Replica, reports: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every report is in the shared history (as `reader` reads it), no two successful runs overlap, and
    every run that did not succeed is one of `reports` (a test that makes one expects it)."""
    fields = "replica runId outcome startedAt finishedAt"
    wanted = [{k: r[k] for k in fields.split()} for r in reports]
    history: list[dict[str, Any]] = []

    async def has_them() -> bool:
        nonlocal history
        history = (await reader.gql(http, f"{{ runs(limit: 100) {{ {fields} }} }}"))["runs"]
        return all(report in history for report in wanted)

    await eventually(has_them, FOLLOW_WITHIN, "the shared history listing every run reported")
    unsuccessful = [run for run in history if run["outcome"] != "SUCCEEDED"]
    assert all(run in wanted for run in unsuccessful), unsuccessful
    assert_disjoint([run for run in history if run["outcome"] == "SUCCEEDED"])
    return history


async def assert_all_serve(http: aiohttp.ClientSession, group: list[Replica], version: int) -> dict[str, Any]:
    """Each replica serves `version` within FOLLOW_WITHIN seconds, and they answer `stats` alike."""
    began = time.monotonic()
    for replica in group:
        left = FOLLOW_WITHIN - (time.monotonic() - began)
        await eventually(lambda r=replica: _is(r.version(http), version), left, f"{replica.name} serving {version}")
    answers = [await replica.gql(http, STATS) for replica in group]
    assert all(answer == answers[0] for answer in answers), answers
    return answers[0]


async def _is(value: Awaitable[int | None], expected: int) -> bool:
    return await value == expected


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
async def bucket(seaweed: SeaweedServer, seaweed_buckets: BucketPool) -> AsyncIterator[MinioStore]:
    store = seaweed.store(await seaweed_buckets.take())
    try:
        yield store
    finally:
        await store.close()


async def test_three_replicas_on_seaweedfs_take_turns_follow_and_survive_a_killed_lease_holder(
    seaweed: SeaweedServer, bucket: MinioStore, tmp_path: Path
) -> None:
    ids = set(range(300))
    await put_all(bucket, user_objects(sorted(ids)))
    proxy = await FaultProxy(seaweed.endpoint).start()  # in front of r0 only: it is the one killed
    env = {
        "MINIO_ENDPOINT": seaweed.endpoint,
        "MINIO_ACCESS_KEY": seaweed.access_key,
        "MINIO_SECRET_KEY": seaweed.secret_key,
        "BUCKET": bucket.bucket,
        "FOLLOW_INTERVAL": "0.2",
        "LEASE_TTL": "3",
    }
    envs = {"r0": env | {"MINIO_ENDPOINT": proxy.endpoint, "FETCH_CONCURRENCY": "8"}, "r1": env, "r2": env}
    try:
        async with replicas(envs, tmp_path) as group, aiohttp.ClientSession() as http:
            r0, r1, r2 = group.values()
            rng = random.Random(11)

            # 30 calls at once, 10 to each replica, after a change: each gets a run of its own replica
            # that started after the call; the runs take turns; all replicas end up serving alike.
            ids = await change_some(bucket, ids, rng, 40)
            reports = await reprocess_at_once(http, [r0, r1, r2] * 10, rng, spread=1.5)
            await assert_one_history(http, r2, reports)
            newest = max(r["outputVersion"] for r in reports)
            stats = await assert_all_serve(http, [r0, r1, r2], newest)
            assert stats["stats"]["count"] == len(ids)
            print(f"\n30 calls answered by {len({(r['replica'], r['runId']) for r in reports})} runs")

            # r0 is paused (SIGSTOP) in the middle of a run until its lease has expired: r1 takes the
            # lease over and commits; r0, resumed, carries on but commits nothing (SUPERSEDED).
            source_gets = f"/{bucket.bucket}/{SRC}"
            ids = await change_some(bucket, ids, rng, 200)
            paused: list[LeaseRecord] = []

            def pause_midway(request: Request) -> None:
                fetch = request.method == "GET" and request.path.startswith(source_gets)
                if fetch and not paused and proxy.count("GET", source_gets) == 50:
                    r0.service.proc.send_signal(signal.SIGSTOP)
                    paused.append(LeaseRecord("r0", 0, datetime.now(UTC), datetime.now(UTC)))

            proxy.requests.clear()
            proxy.on_request = pause_midway
            stalled = asyncio.create_task(r0.gql(http, f"mutation {{ reprocess {{ {RUN_FIELDS} }} }}"))
            await eventually(lambda: _true(bool(paused)), 60.0, "r0 paused in the middle of a run")
            proxy.on_request = None
            held = LeaseRecord.from_bytes(await bucket.get(LEASE))
            assert held is not None and held.replica == "r0", held
            took_over = (await r1.gql(http, f"mutation {{ reprocess {{ {RUN_FIELDS} users }} }}"))["reprocess"]
            assert (took_over["outcome"], took_over["users"]) == ("SUCCEEDED", len(ids)), took_over
            assert _at(took_over["startedAt"]) >= held.expires, (took_over, held)
            committed = await bucket.get(OUTPUT)
            r0.service.proc.send_signal(signal.SIGCONT)
            late = (await asyncio.wait_for(stalled, 60.0))["reprocess"]
            assert (late["outcome"], late["replica"]) == ("SUPERSEDED", "r0"), late
            assert "lost the lease" in late["error"], late
            assert await bucket.get(OUTPUT) == committed
            await assert_one_history(http, r2, [took_over, late])
            await assert_all_serve(http, [r0, r1, r2], took_over["outputVersion"])
            metrics = await r0.metrics(http)
            assert 'lease_events_total{event="lost"} 1.0' in metrics
            assert 'aggregation_runs_total{outcome="superseded"} 1.0' in metrics
            followed = re.search(r"^follower_lag_seconds_count (\S+)$", await r2.metrics(http), re.MULTILINE)
            assert followed is not None and float(followed[1]) > 0  # r2 served the others' commits
            await assert_output_is_the_view(bucket, ids, "rebuild-paused/output.csv")

            # r0, the lease holder in the middle of a run over 2,000 new files, is SIGKILLed: the others
            # wait for its lease to expire, then r1 runs, and everyone serves the view.
            output_before = await bucket.get(OUTPUT)
            added = range(max(ids) + 1, max(ids) + 2001)
            await put_all(bucket, user_objects(added, images=False))
            ids |= set(added)
            proxy.requests.clear()
            killed_at: list[datetime] = []

            def kill_midway(request: Request) -> None:
                fetch = request.method == "GET" and request.path.startswith(source_gets)
                if fetch and not killed_at and proxy.count("GET", source_gets) == 200:
                    killed_at.append(datetime.now(UTC))
                    r0.service.kill()

            proxy.on_request = kill_midway
            doomed = asyncio.create_task(r0.gql(http, "mutation { reprocess { outcome } }"))
            assert await r0.service.wait(60.0) == -signal.SIGKILL, r0.service.output()
            proxy.on_request = None
            with pytest.raises(aiohttp.ClientError):
                await doomed
            lease = LeaseRecord.from_bytes(await bucket.get(LEASE))
            assert lease is not None and lease.replica == "r0", lease
            assert lease.expires > killed_at[0]  # it held the lease when it died
            assert await bucket.get(OUTPUT) == output_before  # and committed nothing

            run = (await r1.gql(http, f"mutation {{ reprocess {{ {RUN_FIELDS} users }} }}"))["reprocess"]
            assert (run["outcome"], run["users"]) == ("SUCCEEDED", len(ids)), run
            assert _at(run["startedAt"]) >= lease.expires, (run, lease)
            await assert_one_history(http, r2, [late, run])  # r0's paused run is the one that did not succeed
            stats = await assert_all_serve(http, [r1, r2], run["outputVersion"])
            assert stats["stats"]["count"] == len(ids)
            await assert_output_is_the_view(bucket, ids, "rebuild/output.csv")

            for survivor in (r1, r2):  # a graceful stop, lease and follower included
                survivor.service.proc.send_signal(signal.SIGTERM)
            for survivor in (r1, r2):
                assert await survivor.service.wait(15.0) == 0, survivor.service.output()
    finally:
        await proxy.close()


async def test_two_processes_sharing_one_data_dir_take_turns(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "data", "datalake")
    await store.ensure_bucket()
    ids = set(range(200))
    await put_all(store, user_objects(sorted(ids)))
    env = {"DATA_DIR": str(tmp_path / "data"), "BUCKET": "datalake", "FOLLOW_INTERVAL": "0.2", "LEASE_TTL": "3"}
    async with replicas({"p0": env, "p1": env}, tmp_path) as group, aiohttp.ClientSession() as http:
        p0, p1 = group.values()
        rng = random.Random(12)
        ids = await change_some(store, ids, rng, 20)
        reports = await reprocess_at_once(http, [p0, p1] * 5, rng, spread=1.0)
        assert {r["replica"] for r in reports} == {"p0", "p1"}
        await assert_one_history(http, p1, reports)
        stats = await assert_all_serve(http, [p0, p1], max(r["outputVersion"] for r in reports))
        assert stats["stats"]["count"] == len(ids)
        await assert_output_is_the_view(store, ids, "rebuild/output.csv")


# -- the lease, released while a renewal is answered ------------------------------------------------


class SlowLeaseAnswers(Recording):
    """Writes of the lease are applied at once, but their answers take `delay` seconds to arrive."""

    def __init__(self, inner: ObjectStore, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay
        self.applied = 0
        self.renewal_applied = asyncio.Event()

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        etag = await super().put(key, data, content_type, if_match=if_match, if_none_match=if_none_match)
        if key == LEASE:
            self.applied += 1
            if self.applied == 2:  # the first renewal (the first write took the lease)
                self.renewal_applied.set()
            await asyncio.sleep(self.delay)
        return etag


async def test_a_run_that_ends_while_its_lease_is_renewed_still_releases_it(store: ObjectStore) -> None:
    slow = SlowLeaseAnswers(store, delay=0.5)
    async with Lease(slow, LEASE, "a", ttl=1.5).hold(1):  # renewed every 0.5 s
        await asyncio.wait_for(slow.renewal_applied.wait(), 10.0)
    # The run ended with the renewal's answer on its way: the release must still be applied, so that
    # other replicas need not wait for the lease to expire.
    assert await Lease(store, LEASE, "b", ttl=1.5).holder() is None
    record = LeaseRecord.from_bytes(await store.get(LEASE))
    assert record is not None and record.replica == "a"


# -- the schedule fires on every replica: one of them runs -----------------------------------------


class SlowListing(Recording):
    """Each listing starts `delay` seconds late: a run holds the lease while the other replicas' ticks fire."""

    def __init__(self, inner: ObjectStore, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    async def list(self, prefix: str) -> AsyncIterator[list[ObjectInfo]]:
        await asyncio.sleep(self.delay)
        async for page in super().list(prefix):
            yield page


async def test_each_scheduled_tick_runs_on_one_replica_only(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    seeder = LocalStore(tmp_path, "datalake")
    await seeder.ensure_bucket()
    await put_all(seeder, user_objects(range(10)))
    clients = []
    for name in ("a", "b", "c"):
        settings = Settings(schedule="* * * * * *", follow_interval=0.2, lease_ttl=3, replica_id=name)
        store = SlowListing(LocalStore(tmp_path, "datalake"), delay=0.3)
        clients.append(await aiohttp_client(create_app(settings, store=store)))
    await eventually(lambda: _started(clients[0], {"a", "b", "c"}), 30.0, "every start-up run in the history")
    since = datetime.now(UTC)
    fields = "replica trigger startedAt"
    history: list[dict[str, Any]] = []

    async def ticks_seen(count: int) -> bool:
        nonlocal history
        runs = (await gql(clients[0], f"{{ runs(limit: 100) {{ {fields} }} }}"))["runs"]
        history = [r for r in runs if r["trigger"] == "schedule" and _at(r["startedAt"]) > since]
        return len({_at(r["startedAt"]).replace(microsecond=0) for r in history}) >= count

    await eventually(lambda: ticks_seen(3), 15.0, "runs of three scheduled ticks")
    await asyncio.sleep(1.0)  # the replicas that would run a tick late have done so by now
    await ticks_seen(3)
    per_tick: dict[datetime, list[str]] = {}
    for run in history:
        per_tick.setdefault(_at(run["startedAt"]).replace(microsecond=0), []).append(run["replica"])
    assert all(len(replicas) == 1 for replicas in per_tick.values()), per_tick


# -- a run that waited for the lease and then failed ------------------------------------------------


class Stalling(Recording):
    """`gate` closed: source reads wait for it (`reached` says one does). `fail_list`: listings fail."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.gate.set()
        self.reached = asyncio.Event()
        self.fail_list = False

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        if key.startswith(SRC) and not self.gate.is_set():
            self.reached.set()
            await self.gate.wait()
        return await super().get(key, max_bytes)

    async def get_with_info(self, key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        if key.startswith(SRC) and not self.gate.is_set():
            self.reached.set()
            await self.gate.wait()
        return await super().get_with_info(key, max_bytes)

    async def list(self, prefix: str) -> AsyncIterator[list[ObjectInfo]]:
        if self.fail_list:
            raise StorageError(f"injected failure listing {prefix}")
        async for page in super().list(prefix):
            yield page


async def test_a_run_that_waited_for_the_lease_starts_when_it_got_it(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    seeder = LocalStore(tmp_path, "datalake")
    await seeder.ensure_bucket()
    await put_all(seeder, user_objects(range(10)))
    stores = {name: Stalling(LocalStore(tmp_path, "datalake")) for name in ("a", "b")}
    clients = {}
    for name, store in stores.items():
        settings = Settings(schedule=NEVER, follow_interval=0.2, lease_ttl=3, replica_id=name)
        clients[name] = await aiohttp_client(create_app(settings, store=store))
    a, b = clients["a"], clients["b"]
    await eventually(lambda: _started(a, {"a", "b"}), 30.0, "both start-up runs in the history")

    await seeder.put(f"{SRC}3.csv", numbered_csv(3, version=1))
    stores["a"].gate.clear()
    running = asyncio.create_task(gql(a, f"mutation {{ reprocess {{ {RUN_FIELDS} }} }}"))
    await asyncio.wait_for(stores["a"].reached.wait(), 10.0)  # a holds the lease, mid-run
    stores["b"].fail_list = True
    waiting = asyncio.create_task(gql(b, f"mutation {{ reprocess {{ {RUN_FIELDS} }} }}"))
    await asyncio.sleep(0.7)  # b asks for the lease (and is told to wait) at least once
    stores["a"].gate.set()
    ran, failed = (await running)["reprocess"], (await waiting)["reprocess"]
    assert (ran["outcome"], failed["outcome"]) == ("SUCCEEDED", "FAILED"), (ran, failed)
    assert "injected failure listing" in failed["error"]
    # b's run began when it got the lease, after a's ended: its report says so, in the shared history too.
    assert _at(failed["startedAt"]) >= _at(ran["finishedAt"]), (ran, failed)
    await eventually(lambda: _lists(a, [ran, failed]), FOLLOW_WITHIN, "the shared history listing both runs")
    assert_disjoint((await gql(a, "{ runs(limit: 100) { replica runId startedAt finishedAt } }"))["runs"])


async def _lists(client: TestClient[Any, Any], reports: list[dict[str, Any]]) -> bool:
    runs = (await gql(client, "{ runs(limit: 100) { replica runId startedAt } }"))["runs"]
    return all({k: r[k] for k in ("replica", "runId", "startedAt")} in runs for r in reports)


async def test_a_replica_does_not_follow_the_commit_it_loaded_at_start_up(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path, "datalake")
    await store.ensure_bucket()
    await put_all(store, user_objects(range(10)))
    await Aggregator(store, src_prefix=SRC, output_key=OUTPUT, concurrency=8).run()
    # The start-up run lists slowly: the follower looks many times while the loaded commit is served.
    settings = Settings(schedule=NEVER, follow_interval=0.05, replica_id="a")
    client = await aiohttp_client(create_app(settings, store=SlowListing(LocalStore(tmp_path, "datalake"), 1.0)))
    await eventually(lambda: _started(client, {"a"}), 30.0, "the start-up run in the history")
    metrics = await (await client.get("/metrics")).text()
    assert "\nfollower_lag_seconds_count 0.0\n" in metrics  # nothing of another replica's was served
