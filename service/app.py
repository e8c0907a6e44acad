"""The application factory: the one place where store, aggregator, runner, schedule and routes meet."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import aiocron
from aiohttp import web
from cross_web import HTTPException
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types.unset import UNSET, UnsetType

from . import graphiql, rest
from .aggregator import Aggregator, Progress, RunResult
from .config import Settings
from .errors import BadRequest, NotReady, ObjectNotFound, StorageError, Unauthorized
from .events import Broadcaster, RunFinished, RunProgress
from .history import HistoryStore
from .metrics import Metrics
from .report import Outcome, RunReport
from .runner import Runner, RunnerClosed
from .schema import Context, build_schema
from .snapshot import Snapshot
from .state import ServiceState
from .storage import ObjectStore
from .stores import open_store

logger = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", ObjectStore)
STATE = rest.STATE
METRICS = web.AppKey("metrics", Metrics)
HISTORY_LIMIT = 100
_ACK: UnsetType = UNSET  # a plain connection_ack
MAX_REQUEST_BYTES = 256 * 1024
_RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServiceGraphQLView(graphiql.OfflineGraphQLView[Context, None]):
    async def get_context(self, request: web.Request, response: web.StreamResponse) -> Context:
        return Context(state=request.app[STATE], request=request, response=response)

    def parse_json(self, data: str | bytes) -> object:
        parsed = super().parse_json(data)
        if not isinstance(parsed, dict | list):  # Strawberry would fail on a JSON string, number or null
            raise HTTPException(400, "the request body must be a JSON object")
        return parsed

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        # With API_TOKEN set, subscriptions need {"Authorization": "Bearer <token>"} in connection_init.
        given = (context.connection_params or {}).get("Authorization")
        try:
            context.state.authorize(given if isinstance(given, str) else None)
        except Unauthorized as exc:
            raise ConnectionRejectionError({"message": str(exc)}) from exc
        return _ACK


def create_app(settings: Settings, store: ObjectStore | None = None) -> web.Application:
    """The aiohttp application; `store` overrides the one the settings name (the app closes it)."""
    metrics = Metrics()
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[metrics.middleware, _errors])
    app[SETTINGS] = settings
    app[STORE] = store if store is not None else open_store(settings)
    app[METRICS] = metrics
    app.cleanup_ctx.append(_lifecycle)
    schema = build_schema([metrics.extension()], introspection=settings.introspection)
    view = ServiceGraphQLView(
        schema=schema,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
        max_subscriptions_per_connection=10,
    )
    app.router.add_route("*", "/graphql", view)
    graphiql.add_routes(app, directory=settings.graphiql_assets_dir)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", metrics.handler)
    rest.add_routes(app)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings, store, metrics = app[SETTINGS], app[STORE], app[METRICS]
    aggregator = Aggregator.from_settings(store, settings)
    history = HistoryStore(store, settings.output_key + ".runs.json", limit=HISTORY_LIMIT)
    broadcaster = Broadcaster()

    async def on_report(report: RunReport) -> None:
        metrics.observe_run(report)
        broadcaster.publish(RunFinished(report))
        if report.outcome is Outcome.SUCCEEDED:
            await history.save(list(state.runner.history))

    runner = Runner(
        aggregator,
        lambda result: state.publish(_snapshot_of(result)),
        held=True,  # until the run history is restored, so run ids stay unique and ordered
        history=HISTORY_LIMIT,
        on_progress=_throttled(lambda run_id, p: broadcaster.publish(RunProgress(run_id, p))),
        on_report=on_report,
    )
    state = ServiceState(settings, store, runner, broadcaster, metrics)
    app[STATE] = state
    startup = asyncio.create_task(_start(state, aggregator, history), name="startup")
    cron = aiocron.crontab(settings.schedule, func=lambda: scheduled_run(state.runner), start=True, tz=UTC)
    yield
    cron.stop()
    startup.cancel()
    await asyncio.gather(startup, return_exceptions=True)
    await state.runner.close()
    await store.close()


async def scheduled_run(runner: Runner) -> None:
    """The cron callback (a tick during start-up or shutdown has nothing to do)."""
    with contextlib.suppress(RunnerClosed, NotReady):
        await runner.run("schedule")


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


async def _start(state: ServiceState, aggregator: Aggregator, history: HistoryStore) -> None:
    """Serve the committed output at once, then run; retry with backoff while the store is unreachable."""
    restored = False
    for attempt in itertools.count():
        delay = _RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)]
        try:
            await state.store.ensure_bucket()
            if not restored:
                state.runner.restore(await history.load())
                restored = True
            if state.snapshot is None:
                committed = await aggregator.load_committed()
                if committed is not None:
                    table, version = committed
                    state.publish(Snapshot(table, version, datetime.now(UTC)))
        except StorageError as exc:
            logger.warning("object store not available at start-up (%s); retrying in %.0fs", exc.for_log(), delay)
        else:
            report = await state.runner.run("startup")
            if report.error is None:
                return
        await asyncio.sleep(delay)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    snapshot = request.app[STATE].snapshot
    if snapshot is None:
        return web.json_response({"status": "not ready", "reason": "no data loaded yet"}, status=503)
    return web.json_response({"status": "ready", "version": snapshot.version, "users": len(snapshot)})


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
