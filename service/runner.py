"""Exactly one aggregation at a time; triggers during a run coalesce into one follow-up run.

A request names the keys it is about (a targeted run) or none (a full run). Requests that wait for the
same follow-up run merge: targeted ones into one run over all their keys, and any full request makes
the follow-up a full run, which covers every key.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime

from .aggregator import Aggregator, Progress, ProgressCallback, RunResult, Superseded, Targets
from .errors import NotReady, ServiceError, StorageError
from .history import HistoryStore
from .lease import Lease, LeaseBusy, LeaseLost
from .report import Outcome, RejectedFiles, RunKind, RunReport

logger = logging.getLogger(__name__)

REJECTIONS_LOGGED = 20
"""New or changed rejections logged one per line in a run; the rest are counted in one line."""


class RunnerClosed(ServiceError):
    """The service is shutting down; no more runs."""


class Runner:
    """Serialises runs. `run(trigger)` returns the report of a run that started after the call."""

    def __init__(
        self,
        aggregator: Aggregator,
        on_commit: Callable[[RunResult], object],
        *,
        history: int = 50,
        on_progress: Callable[[int, Progress], None] | None = None,
        on_report: Callable[[RunReport], Awaitable[None]] | None = None,
        held: bool = False,
        lease: Lease | None = None,
        shared: HistoryStore | None = None,
        replica: str = "",
    ) -> None:
        self._aggregator = aggregator
        self._lease = lease
        self._lease_poll = min(1.0, lease.ttl.total_seconds() / 6) if lease is not None else 1.0
        self._on_commit = on_commit
        self._on_progress = on_progress
        self._on_report = on_report
        self._shared = shared
        self.replica = replica
        self._pending: asyncio.Future[RunReport | None] | None = None
        self._pending_trigger = ""
        self._pending_optional = False  # may be dropped while another replica runs (see `run_unless_busy`)
        self._pending_targets: Targets | None = None  # None: a full run
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._held = held
        self._next_id = 1
        self._started = datetime.now(UTC)  # when the run in flight began: it got the lease, or asked last
        self._rejected = RejectedFiles.empty()  # as of the last successful run, to log only changes
        self.history: deque[RunReport] = deque(maxlen=history)

    @property
    def held(self) -> bool:
        """Whether runs wait for start-up (the shared history is not loaded yet)."""
        return self._held

    @property
    def last_report(self) -> RunReport | None:
        return self.history[-1] if self.history else None

    async def run(self, trigger: str, targets: Targets | None = None) -> RunReport:
        """Request a run and wait for its report; callers during a run share the next one.

        With `targets`, a run that looks at those keys at least: a targeted run, or a full one when a
        full run was requested for the same turn (full wins).
        """
        report = await self._request(trigger, optional=False, targets=targets)
        assert report is not None  # only a run that every caller lets go is dropped
        return report

    async def run_unless_busy(self, trigger: str) -> RunReport | None:
        """Like `run`, but the run is dropped (None) when, as it is due, another replica holds the lease:
        that replica is running now. Not dropped when a `run` caller shares it."""
        return await self._request(trigger, optional=True, targets=None)

    async def _request(self, trigger: str, *, optional: bool, targets: Targets | None) -> RunReport | None:
        if self._closed:
            raise RunnerClosed("the service is shutting down")
        if self._held:
            raise NotReady("the service is starting: the object store has not been reachable yet")
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_future()
            self._pending_trigger, self._pending_optional, self._pending_targets = trigger, optional, targets
        else:
            self._pending_optional = self._pending_optional and optional
            if targets is None:
                if self._pending_targets is not None:  # the follow-up becomes a full run: named for its trigger
                    self._pending_trigger = trigger
                self._pending_targets = None
            elif self._pending_targets is not None:
                self._pending_targets |= targets
        pending = self._pending
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._loop(), name="aggregation-runner")
        return await asyncio.shield(pending)

    async def _loop(self) -> None:
        while self._pending is not None:
            pending, trigger = self._pending, self._pending_trigger
            optional, targets = self._pending_optional, self._pending_targets
            self._pending = None
            try:
                report = await self._execute(trigger, optional, targets)
            except asyncio.CancelledError:
                pending.set_exception(RunnerClosed("the run was cancelled by shutdown"))
                raise
            pending.set_result(report)

    async def _execute(self, trigger: str, optional: bool, targets: Targets | None) -> RunReport | None:
        run_id, self._next_id = self._next_id, self._next_id + 1
        kind = RunKind.FULL if targets is None else RunKind.TARGETED
        try:
            result = await self._aggregate(run_id, trigger, optional, targets)
        except LeaseBusy as busy:  # only when optional
            self._next_id = run_id  # no run: its number is not taken
            logger.info("%s run skipped: %s", trigger, busy)
            return None
        except (Superseded, LeaseLost) as exc:
            report = RunReport(
                run_id, trigger, self._started, datetime.now(UTC), Outcome.SUPERSEDED, error=str(exc), kind=kind
            )
            logger.warning("run %d (%s) superseded: %s", run_id, trigger, exc)
        except StorageError as exc:
            # The report is public: the endpoint or a file's path is only in the log.
            report = self._failed(run_id, trigger, self._started, f"object store error: {exc}", kind)
            logger.warning("run %d (%s) failed: object store error: %s", run_id, trigger, exc.for_log())
        except Exception:  # an unexpected bug: log it once with its traceback, keep serving
            logger.exception("run %d (%s) failed unexpectedly", run_id, trigger)
            report = self._failed(run_id, trigger, self._started, "internal error (see the service log)", kind)
        else:
            report = replace(result.report, run_id=run_id, trigger=trigger, replica=self.replica)
            self._on_commit(replace(result, report=report))
            _log_report(report)
            await self._log_rejections(run_id, result.rejected)
        report = replace(report, replica=self.replica)  # the failed and superseded ones too
        self.history.append(report)
        if self._shared is not None and (merged := await self._shared.record(report)) is not None:
            self.adopt(merged)
        if self._on_report is not None:
            await self._on_report(report)
        return report

    async def _aggregate(self, run_id: int, trigger: str, optional: bool, targets: Targets | None) -> RunResult:
        """One aggregation, holding the lease when there is one (waiting while another replica runs:
        the caller still gets a run that started after its call; `LeaseBusy` instead when `optional`).

        `_started` is when the run began: when it got the lease (a run that waited did not run before,
        so the shared history shows no overlap), or when it last asked for it.
        """
        progress = self._progress_for(run_id)
        self._started = datetime.now(UTC)
        if self._lease is None:
            return await self._aggregator.run(progress, targets=targets)
        while True:
            try:
                self._started = datetime.now(UTC)
                async with self._lease.hold(run_id) as holding:
                    self._started = datetime.now(UTC)
                    return await self._aggregator.run(progress, fence=holding.check, targets=targets)
            except LeaseBusy as busy:
                if optional:
                    raise
                logger.info("run %d (%s) waits: %s", run_id, trigger, busy)
                await asyncio.sleep(self._lease_poll)

    async def _log_rejections(self, run_id: int, rejected: RejectedFiles) -> None:
        """Log what changed since the previous run: a file that stays rejected for the same reason is
        logged once, not in every run (the first run of a process logs every rejection once)."""
        fresh, resolved = await asyncio.to_thread(rejected.changes_since, self._rejected)
        self._rejected = rejected
        if len(fresh) or resolved:
            _log_changes(run_id, len(rejected), fresh, resolved)

    def _progress_for(self, run_id: int) -> ProgressCallback | None:
        hook = self._on_progress
        return None if hook is None else lambda progress: hook(run_id, progress)

    def restore(self, reports: list[RunReport]) -> None:
        """Seed the history with persisted reports (oldest first) and start accepting runs; new run
        ids continue after this replica's restored ones."""
        self._held = False
        self.adopt(reports)

    def adopt(self, reports: list[RunReport]) -> None:
        """Take the shared history (the runs of every replica, oldest first) as this runner's."""
        self.history.clear()
        self.history.extend(reports)
        own = [r.run_id for r in reports if r.replica == self.replica]
        if own:
            self._next_id = max(self._next_id, max(own) + 1)

    @staticmethod
    def _failed(run_id: int, trigger: str, started: datetime, error: str, kind: RunKind) -> RunReport:
        return RunReport(run_id, trigger, started, datetime.now(UTC), Outcome.FAILED, error=error, kind=kind)

    async def close(self) -> None:
        """Stop accepting runs and cancel the one in flight (its writes are atomic: no partial output)."""
        self._closed = True
        task = self._loop_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(RunnerClosed("the service is shutting down"))
            self._pending.exception()  # retrieved: nobody may be waiting for it


def _log_report(report: RunReport) -> None:
    logger.info(
        "run %d (%s) %s in %.2fs: kind=%s listed=%d fetched=%d added=%d updated=%d removed=%d rejected=%d users=%d",
        report.run_id, report.trigger, report.outcome.value, report.duration_seconds, report.kind.value,
        report.listed, report.fetched, report.added, report.updated, report.removed, report.rejected_count,
        report.users,
    )  # fmt: skip


def _log_changes(run_id: int, total: int, fresh: RejectedFiles, resolved: int) -> None:
    logger.info(
        "run %d: %d files rejected (%d new or with a new reason), %d no longer rejected",
        run_id, total, len(fresh), resolved,
    )  # fmt: skip
    for rejected in fresh.page(slice(0, REJECTIONS_LOGGED)):
        logger.info("run %d rejected %s: %s", run_id, rejected.key, rejected.reason)
    if len(fresh) > REJECTIONS_LOGGED:
        logger.info(
            "run %d: %d more newly rejected files not logged (the rejectedFiles query lists them all)",
            run_id, len(fresh) - REJECTIONS_LOGGED,
        )  # fmt: skip
