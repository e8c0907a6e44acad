"""One run at a time, coalesced triggers, failures as reports, clean shutdown, the schedule."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from s3server import free_ports

from service.aggregator import Aggregator, RunResult
from service.app import scheduled_run
from service.errors import StorageError
from service.local_store import LocalStore
from service.report import REJECTED_SAMPLE, Outcome
from service.runner import REJECTIONS_LOGGED, Runner, RunnerClosed
from service.storage import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from conftest import ManyRejected
from service.minio_store import MinioStore

OUTPUT = "processed_data/output.csv"
ROOT = Path(__file__).resolve().parents[1]


class GatedStore(LocalStore):
    """Blocks source GETs while the gate is closed; can be made to fail listings."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "datalake")
        self.gate = asyncio.Event()
        self.gate.set()
        self.broken = False

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        if key.startswith("src-data/"):
            await self.gate.wait()
        return await super().get(key, max_bytes)

    async def get_with_info(self, key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        if self.broken:
            raise StorageError("connection refused (injected)")
        if key.startswith("src-data/"):
            await self.gate.wait()
        return await super().get_with_info(key, max_bytes)

    async def stat(self, key: str):  # type: ignore[no-untyped-def]
        if self.broken:
            raise StorageError("connection refused (injected)")
        return await super().stat(key)


@pytest.fixture
async def store(tmp_path: Path) -> GatedStore:
    store = GatedStore(tmp_path)
    await store.ensure_bucket()
    await store.put("src-data/1.csv", b"first_name,last_name,birthts\nA,B,1\n")
    return store


def runner_for(store: ObjectStore, published: list[RunResult]) -> Runner:
    aggregator = Aggregator(store, src_prefix="src-data/", output_key=OUTPUT, concurrency=4)
    return Runner(aggregator, published.append)


async def test_triggers_during_a_run_coalesce_into_one_follow_up(store: GatedStore) -> None:
    published: list[RunResult] = []
    runner = runner_for(store, published)
    store.gate.clear()
    first = asyncio.create_task(runner.run("a"))
    await asyncio.sleep(0.05)
    followers = [asyncio.create_task(runner.run(f"b{i}")) for i in range(10)]
    await asyncio.sleep(0.05)
    store.gate.set()
    reports = await asyncio.gather(first, *followers)
    assert reports[0].run_id == 1
    assert {r.run_id for r in reports[1:]} == {2}  # ten callers, one follow-up run
    assert reports[1].trigger == "b0"
    assert len(published) == 2 and [r.run_id for r in runner.history] == [1, 2]
    await runner.close()


async def test_a_failed_run_is_a_report_and_the_next_one_recovers(store: GatedStore) -> None:
    published: list[RunResult] = []
    runner = runner_for(store, published)
    store.broken = True
    failed = await runner.run("startup")
    assert failed.outcome is Outcome.FAILED and failed.error is not None
    assert "injected" in failed.error and published == []
    store.broken = False
    recovered = await runner.run("schedule")
    assert recovered.outcome is Outcome.SUCCEEDED and recovered.users == 1
    assert runner.last_report is recovered
    await runner.close()


async def test_shutdown_cancels_the_run_in_flight_without_partial_output(store: GatedStore) -> None:
    published: list[RunResult] = []
    runner = runner_for(store, published)
    store.gate.clear()
    waiting = asyncio.create_task(runner.run("mutation"))
    await asyncio.sleep(0.05)
    await runner.close()
    with pytest.raises(RunnerClosed):
        await waiting
    assert not await store.exists(OUTPUT) and published == []
    with pytest.raises(RunnerClosed):
        await runner.run("late")


async def test_the_cron_callback_runs_through_the_runner(store: GatedStore) -> None:
    published: list[RunResult] = []
    runner = runner_for(store, published)
    await scheduled_run(runner)
    assert [r.trigger for r in runner.history] == ["schedule"]
    await runner.close()


async def test_a_report_stays_small_however_many_files_are_rejected(many_rejected: ManyRejected) -> None:
    published: list[RunResult] = []
    runner = runner_for(many_rejected.store, published)
    report = await runner.run("test")
    assert report.rejected_count == len(many_rejected.keys)
    assert [(r.key, r.reason) for r in report.rejected] == [
        (key, many_rejected.reason) for key in many_rejected.keys[:REJECTED_SAMPLE]
    ]
    # Every rejected file would take ~90 bytes: 3,000 of them over 250 KB, in every history entry.
    assert len(json.dumps(report.to_json())) < 4_000
    (result,) = published
    files = result.rejected.page(slice(None))  # all of them, for the snapshot
    assert [f.key for f in files] == many_rejected.keys and {f.reason for f in files} == {many_rejected.reason}
    await runner.close()


async def test_a_rejection_is_logged_when_it_appears_or_its_reason_changes(
    many_rejected: ManyRejected, caplog: pytest.LogCaptureFixture
) -> None:
    runner = runner_for(many_rejected.store, [])
    keys, total = many_rejected.keys, len(many_rejected.keys)

    async def logged_run() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="service.runner"):
            await runner.run("test")
        return [r.getMessage() for r in caplog.records if r.name == "service.runner"][1:]  # after the run line

    first = await logged_run()
    assert first == [
        f"run 1: {total} files rejected ({total} new or with a new reason), 0 no longer rejected",
        *(f"run 1 rejected {key}: {many_rejected.reason}" for key in keys[:REJECTIONS_LOGGED]),
        f"run 1: {total - REJECTIONS_LOGGED} more newly rejected files not logged "
        "(the rejectedFiles query lists them all)",
    ]
    assert await logged_run() == []  # nothing changed: nothing to log again

    await many_rejected.store.put(keys[1234], b"first_name,last_name\nA,B\n")
    await many_rejected.store.delete(keys[0])
    assert await logged_run() == [
        f"run 3: {total - 1} files rejected (1 new or with a new reason), 1 no longer rejected",
        f"run 3 rejected {keys[1234]}: header lacks birthts (found: first_name, last_name)",
    ]
    await runner.close()


async def test_a_failed_run_reports_no_endpoint_the_log_has_it(caplog: pytest.LogCaptureFixture) -> None:
    endpoint = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    store = MinioStore(endpoint, "access", "secret-key-value", "bucket", timeout=1.0, retries=0)
    runner = runner_for(store, [])
    try:
        report = await runner.run("mutation")
    finally:
        await runner.close()
        await store.close()
    assert report.outcome is Outcome.FAILED
    assert report.error == (
        "object store error: cannot stat 'processed_data/output.csv.manifest': ClientConnectorError: connection refused"
    )
    assert endpoint in caplog.text and "secret-key-value" not in caplog.text


# A run over a bucket with a directory the process may not list, in a child process that obeys file
# modes; prints the failed run's error (the log goes to stderr).
_RUN_OVER_A_CLOSED_DIRECTORY = """
import asyncio, logging, sys
from pathlib import Path
from service.aggregator import Aggregator
from service.local_store import LocalStore
from service.runner import Runner

async def main(data_dir):
    store = LocalStore(Path(data_dir), "datalake")
    aggregator = Aggregator(store, src_prefix="src-data/", output_key="processed_data/output.csv", concurrency=4)
    print((await Runner(aggregator, lambda result: None).run("mutation")).error)

logging.basicConfig(level=logging.WARNING)
asyncio.run(main(sys.argv[1]))
"""


async def test_a_failed_run_reports_no_data_dir_the_log_has_it(
    tmp_path: Path, obeying_file_modes: Callable[[list[str]], list[str]]
) -> None:
    store = LocalStore(tmp_path, "datalake")
    await store.ensure_bucket()
    await store.put("src-data/1.csv", b"first_name,last_name,birthts\nA,B,1\n")
    await store.put("src-data/closed/2.csv", b"first_name,last_name,birthts\nC,D,2\n")
    (tmp_path / "datalake" / "src-data" / "closed").chmod(0)
    command = obeying_file_modes([sys.executable, "-c", _RUN_OVER_A_CLOSED_DIRECTORY, str(tmp_path)])
    result = await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # The listing cannot see who is in there: the run fails rather than drop those users.
    assert result.stdout.strip() == "object store error: cannot list 'src-data/closed/': permission denied"
    assert f"{tmp_path}/datalake/src-data/closed" in result.stderr
    assert not await store.exists(OUTPUT)
