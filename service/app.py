"""The application factory: the one place where store, aggregator, runner, schedule and routes meet."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiocron
import numpy as np
from aiohttp import web
from cross_web import AiohttpHTTPRequestAdapter, AsyncHTTPRequestAdapter, HTTPException
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.http.base import BaseRequestProtocol
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionResult
from strawberry.types.unset import UNSET, UnsetType

from . import dashboard, graphiql, intake, rest
from .aggregator import Aggregator, Committed, Progress, RunResult
from .cache import (
    CACHEABLE_OPERATION,
    NO_STORE,
    WITHOUT_ERRORS,
    Answer,
    CachePolicy,
    Key,
    Operation,
    ResponseCache,
    read_operation,
    send,
)
from .config import Settings
from .errors import BadRequest, NotReady, ObjectNotFound, StorageError, Unauthorized
from .events import Broadcaster, RunFinished, RunProgress
from .history import HistoryStore
from .lease import Lease
from .metrics import Metrics
from .persisted import PersistedQueries, PersistedQueryError
from .report import Outcome, RunReport
from .runner import Runner, RunnerClosed
from .schema import Context, build_schema
from .snapshot import Snapshot
from .state import ServiceState, SnapshotBoard
from .storage import ObjectInfo, ObjectStore
from .stores import open_store

logger = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", ObjectStore)
STATE = rest.STATE
METRICS = web.AppKey("metrics", Metrics)
HISTORY_LIMIT = 100
_ACK: UnsetType = UNSET  # a plain connection_ack
MAX_REQUEST_BYTES = 256 * 1024
OPERATION = web.RequestKey("operation", Operation)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before the response
_RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServiceGraphQLView(graphiql.OfflineGraphQLView[Context, None]):
    """Strawberry's view, with answers from the response cache and automatic persisted queries."""

    def __init__(self, *, cache: ResponseCache, persisted: PersistedQueries, **options: Any) -> None:
        super().__init__(**options)
        self._cache = cache
        self._persisted = persisted

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        """A kept answer is sent before Strawberry parses or validates anything; otherwise Strawberry
        answers, with the operation read here (a persisted query's document looked up), and a query's
        answer without errors is kept. What `read_operation` leaves alone goes to Strawberry as before."""
        operation = await read_operation(request, self.decode_json)
        if operation is None:
            return await super().__call__(request)
        try:
            operation = self._persisted.resolve(operation)
        except PersistedQueryError as exc:
            return exc.response()
        key = self._cache.key(request.app[STATE].snapshot, operation, request)
        if key is not None and (kept := self._cache.get(key)) is not None:
            return send(request, kept)
        request[OPERATION] = operation
        return self._keep(request, key, await super().__call__(request))

    def _keep(self, request: web.Request, key: Key | None, response: web.StreamResponse) -> web.StreamResponse:
        """Strawberry's response, sent with its validators; its answer kept when it is a query's without
        errors (`CachePolicy` marks the query)."""
        if not (isinstance(response, web.Response) and isinstance(response.body, bytes)):
            return response
        if response.status != 200 or not request.get(WITHOUT_ERRORS):
            if request.method == "GET":
                response.headers["Cache-Control"] = NO_STORE
            return response
        keep = key if request.get(CACHEABLE_OPERATION) else None
        if keep is None and request.method != "GET":
            return response
        answer = Answer.of(response.body)
        if keep is not None:
            self._cache.put(keep, answer)
        return send(request, answer, response)

    async def parse_http_body(self, request: AsyncHTTPRequestAdapter) -> GraphQLRequestData | list[GraphQLRequestData]:
        operation = _operation_read(request)
        return operation.request_data() if operation is not None else await super().parse_http_body(request)

    def should_render_graphql_ide(self, request: BaseRequestProtocol) -> bool:
        # A GET of a persisted query has no `query` parameter, which Strawberry takes for a visit to the IDE.
        return _operation_read(request) is None and super().should_render_graphql_ide(request)

    async def process_result(self, request: web.Request, result: ExecutionResult) -> GraphQLHTTPResponse:
        request[WITHOUT_ERRORS] = not result.errors
        return await super().process_result(request, result)

    async def get_context(self, request: web.Request, response: web.StreamResponse) -> Context:
        authorization = request.headers.get("Authorization")
        return Context(state=request.app[STATE], request=request, response=response, authorization=authorization)

    def decode_json(self, data: str | bytes) -> object:
        # json's parser recurses once per nested array or object: 100,000 "[" would be a RecursionError
        # (a 500, or a websocket torn down with a traceback). As invalid JSON it is a 400, or close 4400.
        try:
            return super().decode_json(data)
        except RecursionError:
            text = data.decode(errors="replace") if isinstance(data, bytes) else data
            raise json.JSONDecodeError("nested too deeply", text, 0) from None

    def parse_json(self, data: str | bytes) -> object:
        parsed = super().parse_json(data)
        if not isinstance(parsed, dict | list):  # Strawberry would fail on a JSON string, number or null
            raise HTTPException(400, "the request body must be a JSON object")
        return parsed

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        # A websocket authenticates once, when it opens: with API_TOKEN set, a connection without the
        # token is refused, and the accepted credentials then authorize its mutations too.
        given = _payload_authorization(context.connection_params) or context.authorization
        try:
            context.state.authorize(given)
        except Unauthorized as exc:
            raise ConnectionRejectionError({"message": str(exc)}) from exc
        context.authorization = given
        return _ACK


def _operation_read(adapter: object) -> Operation | None:
    """The operation `ServiceGraphQLView.__call__` read from this request, if it did."""
    return adapter.request.get(OPERATION) if isinstance(adapter, AiohttpHTTPRequestAdapter) else None


def _payload_authorization(payload: Mapping[str, object] | None) -> str | None:
    """`Authorization` from a connection_init payload: `{"Authorization": "Bearer <token>"}`, or under
    `"headers"` for clients that send their HTTP headers there; the key in any case, as in HTTP."""
    for scope in (payload, (payload or {}).get("headers")):
        if isinstance(scope, Mapping):
            for key, value in scope.items():
                if isinstance(key, str) and key.lower() == "authorization" and isinstance(value, str):
                    return value
    return None


def create_app(settings: Settings, store: ObjectStore | None = None) -> web.Application:
    """The aiohttp application; `store` overrides the one the settings name (the app closes it)."""
    metrics = Metrics()
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[metrics.middleware, _errors])
    app[SETTINGS] = settings
    app[STORE] = store if store is not None else open_store(settings)
    app[METRICS] = metrics
    # Cleaned up in reverse. Bucket events (only with a token: without one they have no route) are taken
    # from before the first run, which then covers whatever happened while the service was down.
    events = [_take_events] if settings.events_token is not None else []
    app.cleanup_ctx.extend([_close_store, _serve_runs, *events, _start_up, _follow, _schedule])
    if settings.events_token is not None:
        intake.add_routes(app, bucket=app[STORE].bucket, token=settings.events_token, metrics=metrics)
    schema = build_schema(
        [metrics.extension(), CachePolicy], introspection=settings.introspection, max_page_size=settings.max_page_size
    )
    view = ServiceGraphQLView(
        cache=ResponseCache(settings.response_cache_bytes, metrics),
        persisted=PersistedQueries(settings.persisted_query_bytes, metrics),
        schema=schema,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
        max_subscriptions_per_connection=10,
    )
    app.router.add_route("*", "/graphql", view)
    graphiql.add_routes(app, directory=settings.graphiql_assets_dir)
    app.router.add_get("/", dashboard.index)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", metrics.handler)
    rest.add_routes(app)
    return app


async def _close_store(app: web.Application) -> AsyncIterator[None]:
    """The object store: opened by `create_app`, closed last."""
    yield
    await app[STORE].close()


async def _serve_runs(app: web.Application) -> AsyncIterator[None]:
    """The runner and what it feeds: the served snapshot, run events, metrics and the shared history."""
    settings, store, metrics = app[SETTINGS], app[STORE], app[METRICS]
    events = Broadcaster()
    snapshots = SnapshotBoard(events, metrics)
    history = HistoryStore(store, settings.output_key + ".runs.json", limit=HISTORY_LIMIT)
    lease = Lease(store, settings.output_key + ".lease", settings.replica(), settings.lease_ttl)
    lease.on_change = metrics.observe_lease

    async def on_report(report: RunReport) -> None:
        metrics.observe_run(report)
        events.publish(RunFinished(report))
        if (taken := app.get(intake.INTAKE)) is not None:
            taken.observe(report)
            metrics.observe_backfill(report)

    aggregator = Aggregator.from_settings(store, settings)
    runner = Runner(
        aggregator,
        lambda result: snapshots.publish(_snapshot_of(result)),
        held=True,  # until the run history is restored, so run ids stay unique and ordered
        history=HISTORY_LIMIT,
        on_progress=_throttled(lambda run_id, p: events.publish(RunProgress(run_id, p))),
        on_report=on_report,
        lease=lease,
        shared=history,
        replica=lease.replica,
    )
    app[STATE] = ServiceState(settings, store, runner, snapshots, events, metrics)
    app[STARTUP] = _StartUp(aggregator, history, lease)
    yield
    await runner.close()


async def _take_events(app: web.Application) -> AsyncIterator[None]:
    """Bucket events (EVENTS_TOKEN set): the queue `POST /events` fills, and its loop of targeted runs."""
    settings, metrics = app[SETTINGS], app[METRICS]
    taken = intake.EventIntake(app[STATE].runner, src_prefix=settings.src_prefix, window=settings.events_window)
    metrics.needs_listing.set_function(lambda: float(taken.needs_listing))
    app[intake.INTAKE] = taken
    task = asyncio.create_task(taken.serve(), name="events")
    task.add_done_callback(_log_failure)
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _start_up(app: web.Application) -> AsyncIterator[None]:
    """Load what is committed, then the first run; in the background, so the server answers meanwhile."""
    task = asyncio.create_task(_start(app[STATE], app[STARTUP]), name="startup")
    task.add_done_callback(_log_failure)
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _follow(app: web.Application) -> AsyncIterator[None]:
    """Serve what other replicas commit: a look at the manifest's ETag every FOLLOW_INTERVAL."""
    follower = Follower(app[STATE], app[STARTUP], app[SETTINGS].follow_interval)
    task = asyncio.create_task(follower.follow(), name="follower")
    task.add_done_callback(_log_failure)
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _schedule(app: web.Application) -> AsyncIterator[None]:
    """The cron: on every tick, a run, unless another replica holds the lease (it runs, this one skips)."""
    runner, lease = app[STATE].runner, app[STARTUP].lease
    cron = aiocron.crontab(app[SETTINGS].schedule, func=lambda: scheduled_run(runner, lease), start=True, tz=UTC)
    yield
    cron.stop()


@dataclass(frozen=True)
class _StartUp:
    aggregator: Aggregator
    history: HistoryStore
    lease: Lease


class Follower:
    """Loads commits other replicas make, so that every replica answers the same within seconds.

    Each look is a HEAD of the manifest (never a listing); only a new ETag leads to reading it. The
    shared run history is read at the same time, so `runs` lists the runs of every replica.
    """

    def __init__(self, state: ServiceState, startup: _StartUp, interval: float) -> None:
        self._state = state
        self._startup = startup
        self._interval = interval
        self._seen_manifest: str | None = None
        self._seen_history: str | None = None

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._state.runner.held:
                continue  # start-up has not loaded the history and the committed output yet
            try:
                await self.look()
            except StorageError as exc:
                logger.warning("could not follow the committed output: %s", exc.for_log())

    async def look(self) -> None:
        """One look: serve a newer commit, and take the shared history when it changed."""
        await self._follow_commit()
        await self._follow_history()

    async def _follow_commit(self) -> None:
        startup, state = self._startup, self._state
        info = await _stat_or_none(state.store, startup.aggregator.manifest_key)
        if info is None or info.etag == self._seen_manifest:
            return
        served = state.snapshot
        committed = await startup.aggregator.load_committed()
        if state.snapshot is not served:
            return  # a run of this replica served its commit meanwhile: look again
        self._seen_manifest = info.etag  # only now: a look that failed is made again
        if committed is None or info.etag == startup.aggregator.committed_etag:
            return  # nothing committed, or the commit this replica's last run served
        if served is not None and not _news(committed, served):
            return  # what is served already (the commit loaded at start-up), or an older commit
        snapshot = Snapshot(committed.table, committed.version, info.last_modified, rejected=committed.rejected)
        if state.snapshots.publish(snapshot):
            state.metrics.observe_follow(datetime.now(UTC) - info.last_modified)

    async def _follow_history(self) -> None:
        history = self._startup.history
        info = await _stat_or_none(self._state.store, history.key)
        if info is None or info.etag == self._seen_history:
            return
        self._state.runner.adopt(await history.load())
        self._seen_history = info.etag


def _news(committed: Committed, served: Snapshot) -> bool:
    """Whether another replica's commit serves anything `served` does not: a newer version, or the same
    version with other rejected files (a commit of the manifest alone keeps the output's version)."""
    if committed.version != served.version:
        return committed.version > served.version
    new, old = committed.rejected, served.rejected
    return len(new) != len(old) or not (np.array_equal(new.keys, old.keys) and np.array_equal(new.reasons, old.reasons))


async def _stat_or_none(store: ObjectStore, key: str) -> ObjectInfo | None:
    try:
        return await store.stat(key)
    except ObjectNotFound:
        return None


STARTUP = web.AppKey("startup", _StartUp)


_WHAT_STOPS = {
    "startup": "the service will not become ready",
    "events": "bucket events are no longer applied; scheduled runs still list the prefix",
    "follower": "commits by other replicas are no longer served until this process makes one",
}


def _log_failure(task: asyncio.Task[None]) -> None:
    """A background task that ended with an error: say which, and what no longer happens."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        name = task.get_name()
        logger.error("the %s task failed; %s", name, _WHAT_STOPS.get(name, "it does not run again"), exc_info=exc)


async def scheduled_run(runner: Runner, lease: Lease | None = None) -> None:
    """The cron callback (a tick during start-up or shutdown has nothing to do). The cron fires on every
    replica: while another one holds the lease, it is running, and this one skips its tick (also when
    that replica took the lease after the look below: the ticks of all replicas fire at once)."""
    if lease is not None:
        try:
            holder = await lease.holder()
        except StorageError as exc:
            logger.warning("scheduled run skipped: the lease cannot be read (%s)", exc.for_log())
            return
        if holder is not None and holder.replica != lease.replica:
            logger.info("scheduled run skipped: replica %s is running (run %d)", holder.replica, holder.run)
            return
    with contextlib.suppress(RunnerClosed, NotReady):
        await runner.run_unless_busy("schedule")


def _snapshot_of(result: RunResult) -> Snapshot:
    report = result.report
    return Snapshot(result.table, report.output_version, report.finished_at, report, result.rejected)


def _throttled(hook: Callable[[int, Progress], None], interval: float = 0.1) -> Callable[[int, Progress], None]:
    """Pass progress on at most every `interval` seconds, and always when a run's fetching is done."""
    last = [0.0]

    def throttled(run_id: int, progress: Progress) -> None:
        now = time.monotonic()
        if now - last[0] >= interval or progress.fetched == progress.to_fetch:
            last[0] = now
            hook(run_id, progress)

    return throttled


async def _start(state: ServiceState, startup: _StartUp) -> None:
    """Serve the committed output at once, then run; retry with backoff until a run succeeds.

    Every failure is logged: a store that cannot be reached as a warning, anything else with its
    traceback (and retried too: `/readyz` says 503 meanwhile, and the log says why).
    """
    restored = False
    for attempt in itertools.count():
        delay = _RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)]
        try:
            await state.store.ensure_bucket()
            if not restored:
                state.runner.restore(await startup.history.load())
                restored = True
            if state.snapshot is None:
                committed = await startup.aggregator.load_committed()
                if committed is not None:
                    state.snapshots.publish_first(Snapshot(committed.table, committed.version, datetime.now(UTC),
                                                           rejected=committed.rejected))  # fmt: skip
            report = await state.runner.run("startup")
            if report.outcome is Outcome.SUCCEEDED:
                return
        except StorageError as exc:
            logger.warning("object store not available at start-up (%s); retrying in %.0fs", exc.for_log(), delay)
        except RunnerClosed:
            raise
        except Exception:
            logger.exception("start-up failed unexpectedly; retrying in %.0fs", delay)
        await asyncio.sleep(delay)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """Whether data is served, and by which replica: behind a load balancer, or with WORKERS, the replicas
    take turns answering."""
    state = request.app[STATE]
    replica, snapshot = state.runner.replica, state.snapshot
    if snapshot is None:
        return web.json_response(
            {"status": "not ready", "reason": "no data loaded yet", "replica": replica}, status=503
        )
    return web.json_response(
        {"status": "ready", "version": snapshot.version, "users": len(snapshot), "replica": replica}
    )


_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (BadRequest, 400), (Unauthorized, 401), (ObjectNotFound, 404), (NotReady, 503), (StorageError, 502),
)  # fmt: skip


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Expected failures become JSON errors with a status; nothing else is caught here."""
    try:
        return await handler(request)
    except (BadRequest, Unauthorized, ObjectNotFound, NotReady, StorageError) as exc:
        status = next(code for kind, code in _STATUS if isinstance(exc, kind))
        message = "object store error" if status == 502 else str(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return web.json_response({"error": message}, status=status, headers=headers)
    except ConnectionError:
        if request.transport is not None:
            raise
        # The client hung up before its body was read: its mistake, not the server's. Nobody will read
        # this response; its status is what the access log and the metrics record.
        return web.Response(status=CLIENT_CLOSED_REQUEST, reason="Client Closed Request")
