"""Prometheus metrics: runs, snapshot freshness, query latency, the response cache, HTTP responses."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from aiohttp import web
from graphql import DocumentNode, FieldNode, OperationDefinitionNode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from strawberry.extensions import SchemaExtension
from strawberry.schema.base import BaseSchema

from .report import Outcome, RunKind, RunReport

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SLOW = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """One registry per application, so several apps in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs = Counter("aggregation_runs", "Aggregation runs by outcome", ["outcome"], registry=r)
        self.run_seconds = Histogram("aggregation_run_seconds", "Run duration", buckets=_SLOW, registry=r)
        self.objects = Gauge("aggregation_last_run_objects", "Objects in the last run", ["stage"], registry=r)
        self.snapshot_users = Gauge("snapshot_users", "Users in the served snapshot", registry=r)
        self.snapshot_version = Gauge("snapshot_output_version", "Output version of the snapshot", registry=r)
        self._committed_at: float | None = None
        Gauge("snapshot_age_seconds", "Seconds since the last successful commit", registry=r).set_function(
            self._snapshot_age
        )
        self.queries = Histogram(
            "graphql_operation_seconds", "GraphQL operation latency", ["operation"], buckets=_FAST, registry=r
        )
        self.cache_hits = Counter("graphql_cache_hits", "GraphQL answers sent from the response cache", registry=r)
        self.cache_misses = Counter(
            "graphql_cache_misses", "GraphQL requests the response cache was asked for and did not hold", registry=r
        )
        self.cache_bytes = Gauge("graphql_cache_bytes", "Bytes the response cache holds, as it counts them", registry=r)
        self.cache_entries = Gauge("graphql_cache_entries", "Answers the response cache holds", registry=r)
        self.persisted_queries = Gauge(
            "graphql_persisted_queries", "Documents registered as automatic persisted queries", registry=r
        )
        self.responses = Counter("http_responses", "HTTP responses", ["method", "route", "status"], registry=r)
        self.lease_held = Gauge("lease_held", "1 while this replica holds the aggregation lease", registry=r)
        self.lease_events = Counter(
            "lease_events", "Lease acquisitions, releases and losses of this replica", ["event"], registry=r
        )
        self.follower_lag = Histogram(
            "follower_lag_seconds", "From a commit by another replica to this replica serving it",
            buckets=(0.5, 1, 2, 3, 5, 10, 30, 60, 300), registry=r,
        )  # fmt: skip
        self.events = Counter(
            "bucket_events", "Keys named by bucket events: queued, ignored, or dropped when the queue overflowed",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.needs_listing = Gauge(
            "events_needs_listing", "1 while bucket events may have been lost since the last full run", registry=r
        )
        self.backfill = Counter(
            "events_backfill_changes",
            "Output rows a full run changed while bucket events were on: changes the events did not deliver",
            ["change"], registry=r,
        )  # fmt: skip

    def _snapshot_age(self) -> float:
        return float("nan") if self._committed_at is None else time.time() - self._committed_at

    def observe_run(self, report: RunReport) -> None:
        self.runs.labels(report.outcome.value).inc()
        self.run_seconds.observe(report.duration_seconds)
        for stage, value in (("listed", report.listed), ("fetched", report.fetched)):
            self.objects.labels(stage).set(value)
        self.objects.labels("rejected").set(report.rejected_count)

    def observe_events(self, *, queued: int, ignored: int, overflowed: bool) -> None:
        self.events.labels("dropped" if overflowed else "queued").inc(queued)
        self.events.labels("ignored").inc(ignored)

    def observe_backfill(self, report: RunReport) -> None:
        """A full run's changes, with events on: each is one an event should have delivered first (or
        one whose targeted run had not started yet). A run without a manifest, which adds every row,
        says nothing about events."""
        if report.kind is RunKind.FULL and report.outcome is Outcome.SUCCEEDED and not report.full_rebuild:
            for change in ("added", "updated", "removed"):
                self.backfill.labels(change).inc(getattr(report, change))

    def observe_lease(self, event: str) -> None:
        self.lease_events.labels(event=event).inc()
        self.lease_held.set(1 if event == "acquired" else 0)

    def observe_follow(self, lag: timedelta) -> None:
        self.follower_lag.observe(max(lag.total_seconds(), 0.0))

    def observe_snapshot(self, users: int, version: int, committed_at: datetime) -> None:
        self.snapshot_users.set(users)
        self.snapshot_version.set(version)
        self._committed_at = committed_at.astimezone(UTC).timestamp()

    def extension(self) -> type[SchemaExtension]:
        """A Strawberry extension class timing every operation into this registry."""
        histogram = self.queries

        class OperationTimer(SchemaExtension):
            def on_operation(self) -> Iterator[None]:
                started = time.perf_counter()
                yield
                elapsed = time.perf_counter() - started
                context = self.execution_context
                root = _root_field(context.graphql_document, _root_fields(context.schema))
                histogram.labels(f"{context.operation_type.value}:{root}").observe(elapsed)

        return OperationTimer

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self.responses.labels(request.method, name, str(exc.status)).inc()
            raise
        except Exception:
            self.responses.labels(request.method, name, "500").inc()
            raise
        self.responses.labels(request.method, name, str(response.status)).inc()
        return response

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


@lru_cache(maxsize=8)
def _root_fields(schema: BaseSchema) -> frozenset[str]:
    """The GraphQL names of the schema's query, mutation and subscription fields, read from the schema
    itself so that a field added there is labelled without a change here."""
    roots = (schema.query, schema.mutation, schema.subscription)
    definitions = [root.__strawberry_definition__ for root in roots if root is not None]
    name = schema.config.name_converter.get_graphql_name
    return frozenset(name(field) for definition in definitions for field in definition.fields)


def _root_field(document: DocumentNode | None, root_fields: frozenset[str]) -> str:
    """The operation's first root field when it is one of the schema's (a bounded label), else 'other'."""
    for definition in document.definitions if document else ():
        if isinstance(definition, OperationDefinitionNode):
            first = definition.selection_set.selections[0] if definition.selection_set.selections else None
            if isinstance(first, FieldNode) and first.name.value in root_fields:
                return first.name.value
            break
    return "other"
