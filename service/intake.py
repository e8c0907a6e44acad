"""Bucket events in, runs out: `POST /events` queues the keys a notification names, and after a short
window one targeted run applies them all.

Nothing accepted is lost silently. The queue is bounded: when it overflows, its keys are dropped and
the intake *needs a listing*, as it does when the process starts (it cannot know what happened while
it was down) and when a targeted run does not commit. While it needs one, the runs it asks for are
full runs, as the scheduled ones always are; the first full run that started after the loss and
succeeded clears it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from .aggregator import Targets
from .errors import NotReady, Unauthorized
from .metrics import Metrics
from .notifications import parse
from .report import Outcome, RunKind, RunReport
from .runner import Runner, RunnerClosed

logger = logging.getLogger(__name__)

MAX_PENDING = 10_000
"""Keys and folders the queue holds: at most a few MiB, however many events arrive."""
TRIGGER = "events"


@dataclass(frozen=True, slots=True)
class Offered:
    queued: int
    ignored: int
    overflowed: bool


class EventIntake:
    """The queue of changed keys under `src_prefix`, and the loop that turns it into runs."""

    def __init__(
        self,
        runner: Runner,
        *,
        src_prefix: str,
        window: float,
        capacity: int = MAX_PENDING,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._runner = runner
        self._prefix = src_prefix
        self._window = window
        self._capacity = capacity
        self._clock = clock
        self._keys: set[str] = set()
        self._prefixes: set[str] = set()
        self._first_at = 0.0  # monotonic time of the oldest queued event
        self._wake = asyncio.Event()
        # A process that starts has missed whatever happened while it was down.
        self._lost_since: datetime | None = clock()

    @property
    def needs_listing(self) -> bool:
        """Whether events may have been lost since the last full run."""
        return self._lost_since is not None

    @property
    def pending(self) -> int:
        return len(self._keys) + len(self._prefixes)

    def offer(self, targets: Targets) -> Offered:
        """Queue the keys and folders under the prefix (without waiting: the sender is answered at once);
        the rest is ignored, the service's own output, manifest, lease and history among them."""
        keys = {key for key in targets.keys if key.startswith(self._prefix)}
        prefixes = {p for p in targets.prefixes if p.startswith(self._prefix) or self._prefix.startswith(p)}
        queued = len(keys) + len(prefixes)
        ignored = len(targets) - queued
        if not queued:
            return Offered(0, ignored, overflowed=False)
        if not self.pending:
            self._first_at = time.monotonic()
        self._keys |= keys
        self._prefixes |= prefixes
        overflowed = self.pending > self._capacity
        if overflowed:
            self._keys, self._prefixes = set(), set()
            self._lose(f"more than {self._capacity} keys were waiting")
        self._wake.set()
        return Offered(queued, ignored, overflowed)

    def observe(self, report: RunReport) -> None:
        """Every run's report: a full run that succeeded and started after the last loss covered it."""
        lost = self._lost_since
        full = report.kind is RunKind.FULL and report.outcome is Outcome.SUCCEEDED
        if lost is not None and full and report.started_at > lost:
            self._lost_since = None
            logger.info("events: run %d listed the prefix, nothing is missed any more", report.run_id)

    async def serve(self) -> None:
        """Wait for events, let a window's worth gather, ask for one run, wait for it; again."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(max(0.0, self._first_at + self._window - time.monotonic()))
            self._wake.clear()
            try:
                await self._flush()
            except RunnerClosed:
                return

    async def _flush(self) -> None:
        """One run for what is queued: targeted, or full while a listing is needed. Runs that wait for
        this one's turn (a scheduled run, say) merge with it in the runner."""
        targets = Targets(frozenset(self._keys), frozenset(self._prefixes))
        self._keys, self._prefixes = set(), set()
        full = self.needs_listing
        if not full and not targets:
            return
        try:
            report = await self._runner.run(TRIGGER, None if full else targets)
        except NotReady:  # start-up's run, a full one, has not started yet: it will cover these keys
            return
        if report.kind is RunKind.TARGETED and report.outcome is not Outcome.SUCCEEDED:
            self._lose(f"run {report.run_id} did not commit ({report.outcome.value})")

    def _lose(self, why: str) -> None:
        self._lost_since = self._clock()
        logger.warning("events: %s; the next run lists the prefix", why)

    def authorize(self, authorization: str | None, token: str) -> None:
        """`Authorization: Bearer <EVENTS_TOKEN>` (compared in constant time), else `Unauthorized`."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("bucket events need the header 'Authorization: Bearer <EVENTS_TOKEN>'")


INTAKE = web.AppKey("intake", EventIntake)


def add_routes(app: web.Application, *, bucket: str, token: str, metrics: Metrics) -> None:
    """`POST /events`: authenticate, parse, queue, answer 202; the run comes later."""

    async def post_events(request: web.Request) -> web.Response:
        intake = request.app[INTAKE]
        intake.authorize(request.headers.get("Authorization"), token)
        notice = parse(await request.read(), bucket)
        offered = intake.offer(notice.targets)
        ignored = notice.ignored + offered.ignored
        metrics.observe_events(queued=offered.queued, ignored=ignored, overflowed=offered.overflowed)
        body = {"queued": offered.queued, "ignored": ignored, "needs_listing": intake.needs_listing}
        return web.json_response(body, status=202)

    app.router.add_post("/events", post_events)
