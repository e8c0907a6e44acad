"""The GraphQL schema: types mapped explicitly from query rows and run reports."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, NewType, cast, get_type_hints
from urllib.parse import quote

import numpy as np
import strawberry
from aiohttp import web
from graphql import GraphQLError
from graphql.validation import ASTValidationRule
from strawberry.extensions import (
    AddValidationRules,
    DisableIntrospection,
    MaskErrors,
    MaxTokensLimiter,
    ParserCache,
    SchemaExtension,
    ValidationCache,
)
from strawberry.extensions.max_aliases import create_validator as max_aliases_rule
from strawberry.extensions.query_depth_limiter import create_validator as max_depth_rule
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionContext, ExecutionResult
from strawberry.types.graphql import OperationType

from . import events, output, query
from .config import DEFAULT_MAX_PAGE_SIZE
from .errors import BadRequest, NotReady, Unauthorized
from .guards import DocumentGuard
from .report import REJECTED_SAMPLE, RunReport
from .runner import RunnerClosed
from .state import ServiceState

Long = NewType("Long", int)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Raised on purpose, with a message for the client. graphql-core reports the client's mistakes that it
# finds itself (a variable whose value does not coerce, a missing required variable) as a GraphQLError
# wrapping another GraphQLError.
_EXPECTED_ERRORS = (GraphQLError, BadRequest, NotReady, Unauthorized, RunnerClosed)
# The filters `stats` and `statsBy` answer by reading every row, as a document names them.
_ROW_READING_FILTERS = tuple(f.graphql for f in query.FILTERS if f.name not in query.HISTOGRAM_FILTERS)
REJECTED_PAGE = 100  # rejectedFiles without a limit: this many, or MAX_PAGE_SIZE if smaller


@dataclass
class Context:
    state: ServiceState
    request: web.Request
    response: web.StreamResponse | None = None
    connection_params: dict[str, object] | None = None  # the websocket handshake's payload
    # What `reprocess` checks: the request's Authorization header or, on a websocket, the credentials
    # its connection_init presented (one context serves every operation of a connection).
    authorization: str | None = None


Info = strawberry.Info[Context, None]


class FilterInput:
    """What resolvers read of the `UserFilter` input, whose fields `_filter_input` makes from `query.FILTERS`."""

    def to_query(self) -> query.UserFilter:
        values = {field.name: getattr(self, field.name) for field in query.FILTERS}
        return query.UserFilter(**values).validate(query.Api.GRAPHQL)


def _filter_input() -> type[FilterInput]:
    """`UserFilter`: one optional field per filter of the domain, named and described as it says."""
    fields = {
        f.name: (f.type | None, strawberry.field(default=None, name=f.graphql, description=f.description))
        for f in query.FILTERS
    }
    description = "All fields optional, combined with AND. Age bounds are inclusive."
    return strawberry.input(_class("UserFilter", FilterInput, fields), description=description)


def _stats_type() -> type:
    """`Stats`: a field per statistic of the domain, of its `query.Stats` attribute's type. Strawberry reads
    a field by its attribute name, so resolvers return the domain's `query.Stats` as it is."""
    hints = get_type_hints(query.Stats)
    fields = {f.name: (hints[f.name], strawberry.field(name=f.graphql, description=f.doc)) for f in query.STATS_FIELDS}
    return strawberry.type(_class("Stats", object, fields), description="Aggregates over the users matching a filter.")


def _stats_group_type() -> type:
    """`StatsGroup`: a field per number of `query.GROUP_FIELDS`, made as `_stats_type` makes `Stats`."""
    hints = get_type_hints(query.StatsGroup)
    fields = {f.name: (hints[f.name], strawberry.field(name=f.graphql, description=f.doc)) for f in query.GROUP_FIELDS}
    description = "The statistics of one group of the users matching a filter."
    return strawberry.type(_class("StatsGroup", object, fields), description=description)


def _group_by_enum() -> type[enum.Enum]:
    """`StatsGroupBy`: a value per grouping of `query.GROUPINGS`; a resolver receives the grouping's name."""
    values = {g.graphql: strawberry.enum_value(g.name, description=g.doc) for g in query.GROUPINGS}
    made = cast("type[enum.Enum]", enum.Enum("StatsGroupBy", values))  # mypy takes the functional API for a member
    return strawberry.enum(made, description="How statsBy groups the users.")


def _class(name: str, base: type, fields: Mapping[str, tuple[object, object]]) -> type:
    """A class with these annotated attributes, as a `class` statement makes it, for Strawberry to decorate."""
    namespace: dict[str, object] = {"__module__": __name__, "__qualname__": name}
    namespace["__annotations__"] = {attribute: hint for attribute, (hint, _) in fields.items()}
    namespace |= {attribute: default for attribute, (_, default) in fields.items()}
    return type(name, (base,), namespace)


if TYPE_CHECKING:  # mypy cannot see into a class made at run time: resolvers are checked against these
    UserFilter = FilterInput
    Stats = query.Stats
    StatsGroup = query.StatsGroup
    StatsGroupBy = enum.Enum
else:
    UserFilter = _filter_input()
    Stats = _stats_type()
    StatsGroup = _stats_group_type()
    StatsGroupBy = _group_by_enum()
_GROUPINGS = {g.name: g for g in query.GROUPINGS}


@strawberry.type(description="One row of output.csv.")
class User:
    user_id: strawberry.ID
    first_name: str
    last_name: str
    birthts: Long = strawberry.field(description="Birth time in milliseconds since 1970-01-01 UTC.")
    birth_date: date = strawberry.field(description="UTC date of birthts.")
    age: int = strawberry.field(description="Completed years on today's UTC date.")
    img_path: str | None = strawberry.field(description="Object key of the user's image, null if none.")
    image_url: str | None = strawberry.field(description="URL of the image served by this service.")

    @classmethod
    def from_row(cls, row: query.UserRow, origin: str) -> User:
        return cls(
            user_id=strawberry.ID(row.user_id),
            first_name=row.first_name,
            last_name=row.last_name,
            birthts=Long(row.birthts),
            birth_date=(_EPOCH + timedelta(milliseconds=row.birthts)).date(),
            age=row.age,
            img_path=row.img_path or None,
            image_url=f"{origin}/images/{quote(row.user_id, safe='')}" if row.img_path else None,
        )


@strawberry.type(description="A user of a usersConnection page, with the cursor of its place in userId order.")
class UserEdge:
    cursor: str = strawberry.field(
        description="Opaque. As after or before, it marks this user's place in userId order, in later snapshots too."
    )
    node: User


@strawberry.type(description="Where a usersConnection page lies among the matching users, as the Relay spec says.")
class PageInfo:
    has_next_page: bool = strawberry.field(
        description="With first: more matching users follow this page, before the before cursor if given. With "
        "last: any matching user follows this page."
    )
    has_previous_page: bool = strawberry.field(
        description="With last: more matching users precede this page, after the after cursor if given. With "
        "first: any matching user precedes this page."
    )
    start_cursor: str | None = strawberry.field(description="The first edge's cursor, null without edges.")
    end_cursor: str | None = strawberry.field(description="The last edge's cursor, null without edges.")


@strawberry.type(description="A page of the users matching a filter, in userId order, as Relay connections are.")
class UserConnection:
    edges: list[UserEdge]
    page_info: PageInfo
    total_count: int = strawberry.field(description="How many users match the filter, on every page together.")

    @classmethod
    def from_window(cls, window: query.Window, rows: list[query.UserRow], origin: str) -> UserConnection:
        edges = [UserEdge(cursor=query.cursor(row.user_id), node=User.from_row(row, origin)) for row in rows]
        page_info = PageInfo(
            has_next_page=window.has_next,
            has_previous_page=window.has_previous,
            start_cursor=edges[0].cursor if edges else None,
            end_cursor=edges[-1].cursor if edges else None,
        )
        return cls(edges=edges, page_info=page_info, total_count=window.total)


@strawberry.enum
class RunOutcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SUPERSEDED = "superseded"


@strawberry.enum(description="What a run looked at: the whole source prefix, or the keys bucket events named.")
class RunKind(enum.Enum):
    FULL = "full"
    TARGETED = "targeted"


@strawberry.type
class RejectedFile:
    key: str
    reason: str


@strawberry.type(description="A page of the files rejected as of the latest run, ordered by key.")
class RejectedFilePage:
    total_count: int = strawberry.field(description="How many files are rejected in all.")
    run_id: int | None = strawberry.field(
        description="The run that found them; null before this process's first run (the list is then empty)."
    )
    files: list[RejectedFile]


@strawberry.type(description="Several source files claim one user; the most recently modified wins.")
class Conflict:
    user_id: strawberry.ID
    kind: str
    keys: list[str]
    winner: str

    @classmethod
    def from_domain(cls, conflict: output.Conflict) -> Conflict:
        return cls(
            user_id=strawberry.ID(conflict.user_id), kind=conflict.kind, keys=list(conflict.keys),
            winner=conflict.winner,
        )  # fmt: skip


@strawberry.type(description="The report of one aggregation run.")
class ProcessingRun:
    run_id: int = strawberry.field(description="The run's number (run_id over REST).")
    id: int = strawberry.field(deprecation_reason="Use runId, the name the other types and REST (run_id) use.")
    trigger: str
    outcome: RunOutcome
    error: str | None
    started_at: datetime
    finished_at: datetime
    duration_seconds: float = strawberry.field(description="Rounded to the millisecond, as over REST.")
    listed: int
    fetched: int
    added: int
    updated: int
    removed: int
    unchanged: int
    ignored: int
    users: int
    images: int
    output_version: int
    output_written: bool
    full_rebuild: bool
    warnings: list[str]
    rejected_count: int = strawberry.field(description="How many source files are rejected in all.")
    rejected: list[RejectedFile] = strawberry.field(
        description=f"The first {REJECTED_SAMPLE} rejected files by key (rejectedFiles lists all of the latest run)."
    )
    conflicts: list[Conflict]
    replica: str = strawberry.field(description="The replica that ran it: the history is shared by all replicas.")
    kind: RunKind = strawberry.field(description="FULL: it listed the source prefix; TARGETED: it looked only at the "
                                     "keys that bucket events named.")  # fmt: skip

    @classmethod
    def from_report(cls, report: RunReport) -> ProcessingRun:
        return cls(
            run_id=report.run_id, id=report.run_id, trigger=report.trigger, outcome=RunOutcome(report.outcome.value),
            error=report.error, started_at=report.started_at, finished_at=report.finished_at,
            duration_seconds=round(report.duration_seconds, 3), listed=report.listed, fetched=report.fetched,
            added=report.added, updated=report.updated, removed=report.removed, unchanged=report.unchanged,
            ignored=report.ignored, users=report.users, images=report.images,
            output_version=report.output_version, output_written=report.output_written,
            full_rebuild=report.full_rebuild, warnings=list(report.warnings),
            rejected_count=report.rejected_count,
            rejected=[RejectedFile(key=r.key, reason=r.reason) for r in report.rejected],
            conflicts=[Conflict.from_domain(c) for c in report.conflicts], replica=report.replica,
            kind=RunKind(report.kind.value),
        )  # fmt: skip


def _filter(flt: UserFilter | None) -> query.UserFilter:
    return flt.to_query() if flt is not None else query.UserFilter()


@strawberry.type
class Query:
    @strawberry.field(description="Users matching the filter, ordered by userId.")
    def users(
        self, info: Info, filter: UserFilter | None = None, limit: int | None = None, offset: int = 0
    ) -> list[User]:
        state, today = info.context.state, query.today_utc()
        snapshot, maximum = state.current(), state.settings.max_page_size
        page = query.page(query.select(snapshot, _filter(filter), today), limit, offset, maximum)
        if limit is None and page.next_offset is not None:
            raise BadRequest(
                f"{page.total - offset} users match, more than the page size {maximum}: pass limit "
                f"(at most {maximum}) and offset to paginate; stats(filter).count gives the total"
            )
        origin = _origin(info.context.request)
        return [User.from_row(row, origin) for row in query.users(snapshot, page.positions, today)]

    @strawberry.field(
        description="Users matching the filter, ordered by userId, a page at a time with cursors (Relay's "
        "connections): first users after the cursor after, or last users before the cursor before. Without "
        "either, the first MAX_PAGE_SIZE; first and last together are refused. A cursor keeps its place when "
        "users are added or removed, its own user too."
    )
    def users_connection(  # noqa: PLR0917 - the Relay connection arguments
        self,
        info: Info,
        filter: UserFilter | None = None,
        first: int | None = None,
        after: str | None = None,
        last: int | None = None,
        before: str | None = None,
    ) -> UserConnection:
        state, today, flt = info.context.state, query.today_utc(), _filter(filter)
        asked = query.cursor_page(first, after, last, before, state.settings.max_page_size)
        snapshot = state.current()
        window = query.window(snapshot, query.select(snapshot, flt, today), asked)
        rows = query.users(snapshot, window.positions, today)
        return UserConnection.from_window(window, rows, _origin(info.context.request))

    @strawberry.field(description="One user by id, null when unknown.")
    def user(self, info: Info, user_id: strawberry.ID) -> User | None:
        row = query.user(info.context.state.current(), str(user_id), query.today_utc())
        return User.from_row(row, _origin(info.context.request)) if row else None

    @strawberry.field(description="Count and age statistics of the users matching the filter.")
    def stats(self, info: Info, filter: UserFilter | None = None) -> Stats:
        return query.stats(info.context.state.current(), _filter(filter), query.today_utc())

    @strawberry.field(
        description="The statistics of each group of the users matching the filter, ordered by key (numerically "
        "for numbers); groups without users are left out."
    )
    def stats_by(self, info: Info, group_by: StatsGroupBy, filter: UserFilter | None = None) -> list[StatsGroup]:
        grouping = _GROUPINGS[group_by.value]
        return query.stats_by(info.context.state.current(), grouping, _filter(filter), query.today_utc())

    @strawberry.field(
        description=f"Files rejected as of the latest run, ordered by key: limit (default {REJECTED_PAGE}, at "
        "most MAX_PAGE_SIZE) files from offset."
    )
    def rejected_files(self, info: Info, limit: int | None = None, offset: int = 0) -> RejectedFilePage:
        state = info.context.state
        snapshot = state.current()
        rejected, maximum = snapshot.rejected, state.settings.max_page_size
        size = min(REJECTED_PAGE, maximum) if limit is None else limit
        found = query.page(np.arange(len(rejected)), size, offset, maximum)  # the paging rule of `users`
        window = slice(offset, offset + len(found.positions))
        return RejectedFilePage(
            total_count=len(rejected),
            run_id=snapshot.report.run_id if snapshot.report else None,
            files=[RejectedFile(key=f.key, reason=f.reason) for f in rejected.page(window)],
        )

    @strawberry.field(description="The report of the most recent run, null before the first one.")
    def last_run(self, info: Info) -> ProcessingRun | None:
        report = info.context.state.runner.last_report
        return ProcessingRun.from_report(report) if report else None

    @strawberry.field(description="The most recent runs, newest first.")
    def runs(self, info: Info, limit: int = 20) -> list[ProcessingRun]:
        if limit < 0:
            raise BadRequest(f"limit must not be negative, got {limit}")
        history = list(info.context.state.runner.history)[::-1][:limit]
        return [ProcessingRun.from_report(report) for report in history]


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Run the aggregation now; returns a run that started after this call.")
    async def reprocess(self, info: Info) -> ProcessingRun:
        state = info.context.state
        state.authorize(info.context.authorization)
        return ProcessingRun.from_report(await state.runner.run("mutation"))


@strawberry.type(description="Progress of a run: objects listed, CSVs to fetch and fetched so far.")
class RunProgress:
    listed: int
    to_fetch: int
    fetched: int


@strawberry.type(description="A run's progress; the last event of a run carries its report.")
class RunEvent:
    run_id: int
    progress: RunProgress | None
    report: ProcessingRun | None


@strawberry.type(description="A new snapshot is served: clients may refetch.")
class SnapshotEvent:
    version: int
    users: int


@strawberry.type
class Subscription:
    @strawberry.subscription(description="Progress events of every run, and a final event with its report.")
    async def run_events(self, info: Info) -> AsyncIterator[RunEvent]:
        async for event in info.context.state.events.subscribe():
            if isinstance(event, events.RunProgress):
                p = event.progress
                progress = RunProgress(listed=p.listed, to_fetch=p.to_fetch, fetched=p.fetched)
                yield RunEvent(run_id=event.run_id, progress=progress, report=None)
            elif isinstance(event, events.RunFinished):
                report = ProcessingRun.from_report(event.report)
                yield RunEvent(run_id=event.report.run_id, progress=None, report=report)

    @strawberry.subscription(description="Fires whenever a new snapshot of the data is published.")
    async def snapshots(self, info: Info) -> AsyncIterator[SnapshotEvent]:
        async for event in info.context.state.events.subscribe():
            if isinstance(event, events.SnapshotPublished):
                yield SnapshotEvent(version=event.version, users=event.users)


def _may_read_rows(document: str, variables: dict[str, Any] | None) -> bool:
    """Whether the document may select `users` or `usersConnection`, or `stats` or `statsBy` with a filter
    that reads rows: one named in the document or, as far as one knows before parsing, in the variables.
    Each longer name contains the shorter one."""
    if "users" in document:
        return True
    return "stats" in document and (bool(variables) or any(name in document for name in _ROW_READING_FILTERS))


def _origin(request: web.Request) -> str:
    return str(request.url.origin())


def _should_mask(error: GraphQLError) -> bool:
    """Only an exception nobody raised on purpose is hidden from the client (and logged)."""
    original = error.original_error
    return original is not None and not isinstance(original, _EXPECTED_ERRORS)


class ServiceSchema(strawberry.Schema):
    async def execute(  # noqa: PLR0917 - Strawberry's signature
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
        operation_extensions: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        """Queries that may read every row run in a worker thread. graphql-core completes every field of
        every row of `users` in Python, ~0.3 s for a full page, and `stats` with a filter its age histogram
        cannot answer searches all users: on the event loop, every other request (`/healthz` too) would
        wait. The rest stays on the loop, which answers small queries sooner than a thread, and so does a
        document that may hold a mutation (whose resolver is async) or a subscription. The words looked for
        may also be names, strings or comments: such a document merely runs where it did before."""
        arguments = (
            query, variable_values, context_value, root_value, operation_name, allowed_operation_types,
            operation_extensions,
        )  # fmt: skip
        if (
            query is None
            or not _may_read_rows(query, variable_values)
            or "mutation" in query
            or "subscription" in query
        ):
            return await super().execute(*arguments)
        return await asyncio.to_thread(self.execute_sync, *arguments)

    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        # Client mistakes are answered, not logged; only unexpected errors reach the log (once).
        unexpected = [error for error in errors if _should_mask(error)]
        if unexpected:
            super().process_errors(unexpected, execution_context)


# Built once: QueryDepthLimiter and MaxAliasesLimiter create a new rule class per instance, i.e. per
# request when passed as factories, which makes every ValidationCache key unique (strawberry#4635):
# every request would be validated again. Stable rule classes keep the cache effective.
_VALIDATION_RULES: list[type[ASTValidationRule]] = [max_depth_rule(8, None, None), max_aliases_rule(20)]


def build_schema(
    extensions: Iterable[Callable[[], SchemaExtension]] = (),
    *,
    introspection: bool = True,
    max_page_size: int = DEFAULT_MAX_PAGE_SIZE,
) -> strawberry.Schema:
    """The schema with its safety limits; `extensions` are added (e.g. metrics). `max_page_size` also
    bounds the user rows of one operation, all its `users` fields together."""
    limits: list[Callable[[], SchemaExtension]] = [] if introspection else [DisableIntrospection]
    return ServiceSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        config=StrawberryConfig(
            disable_field_suggestions=True,
            scalar_map={
                Long: strawberry.scalar(
                    name="Long",
                    description="A 64-bit integer, serialized as a JSON number (GraphQL Int is 32-bit).",
                    serialize=int,
                    parse_value=int,
                )
            },
        ),
        extensions=[  # factories: a fresh extension per operation, caches shared at module level
            partial(DocumentGuard, max_rows=max_page_size),  # before the validation-time limiters
            partial(ParserCache, maxsize=4096),
            partial(ValidationCache, maxsize=4096),
            partial(AddValidationRules, _VALIDATION_RULES),
            partial(MaxTokensLimiter, max_token_count=2000),
            partial(MaskErrors, should_mask_error=_should_mask, error_message="Internal error."),
            *limits,
            *extensions,
        ],
    )
