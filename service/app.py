"""The application factory: the one place where store, aggregator, runner, schedule and routes meet."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import aiocron
from aiohttp import web

from . import graphiql, rest
from .aggregator import Aggregator, RunResult
from .config import Settings
from .errors import BadRequest, NotReady, ObjectNotFound, StorageError, Unauthorized
from .runner import Runner
from .schema import Context, build_schema
from .snapshot import Snapshot
from .state import ServiceState
from .storage import ObjectStore
from .stores import open_store

logger = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", ObjectStore)
STATE = rest.STATE
MAX_REQUEST_BYTES = 256 * 1024
_RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServiceGraphQLView(graphiql.OfflineGraphQLView[Context, None]):
    async def get_context(self, request: web.Request, response: web.StreamResponse) -> Context:
        return Context(state=request.app[STATE], request=request, response=response)


def create_app(settings: Settings, store: ObjectStore | None = None) -> web.Application:
    """The aiohttp application; `store` overrides the one the settings name (the app closes it)."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_errors])
    app[SETTINGS] = settings
    app[STORE] = store if store is not None else open_store(settings)
    app.cleanup_ctx.append(_lifecycle)
    view = ServiceGraphQLView(schema=build_schema(), subscription_protocols=("graphql-transport-ws",))
    app.router.add_route("*", "/graphql", view)
    graphiql.add_routes(app)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    rest.add_routes(app)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings, store = app[SETTINGS], app[STORE]
    aggregator = Aggregator(
        store, src_prefix=settings.src_prefix, output_key=settings.output_key,
        concurrency=settings.fetch_concurrency,
    )  # fmt: skip
    state = ServiceState(settings, store, Runner(aggregator, lambda result: _publish(state, result)))
    app[STATE] = state
    startup = asyncio.create_task(_start(state, aggregator), name="startup")
    cron = aiocron.crontab(settings.schedule, func=lambda: scheduled_run(state.runner), start=True, tz=UTC)
    yield
    cron.stop()
    startup.cancel()
    await asyncio.gather(startup, return_exceptions=True)
    await state.runner.close()
    await store.close()


async def scheduled_run(runner: Runner) -> None:
    """The cron callback."""
    await runner.run("schedule")


def _publish(state: ServiceState, result: RunResult) -> None:
    report = result.report
    state.snapshot = Snapshot(result.table, report.output_version, report.finished_at, report)


async def _start(state: ServiceState, aggregator: Aggregator) -> None:
    """Serve the committed output at once, then run; retry with backoff while the store is unreachable."""
    for attempt in itertools.count():
        delay = _RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)]
        try:
            await state.store.ensure_bucket()
            if state.snapshot is None:
                committed = await aggregator.load_committed()
                if committed is not None:
                    table, version = committed
                    state.snapshot = Snapshot(table, version, datetime.now(UTC))
        except StorageError as exc:
            logger.warning("object store not available at start-up (%s); retrying in %.0fs", exc, delay)
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
