"""Answers at cache speed: the serialized answers of repeated GraphQL queries, served from memory before
Strawberry parses anything, and the HTTP validators that let browsers and CDNs revalidate them.

An answer is a function of the served snapshot, today's UTC date, the request's origin (`imageUrl` is
built from it), the document, the operation name and the variables. The cache holds the answers of one
snapshot and one date, an *era*: the first request that sees another snapshot or another date drops
them all. Only queries that read nothing else are kept (`CACHEABLE_FIELDS`), and only answers without
errors, so a refusal by a limit, `NotReady` or a bad argument is worked out again every time.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any, Generic, NamedTuple, TypeVar

from aiohttp import web
from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    OperationType,
    SelectionSetNode,
    get_operation_ast,
)
from strawberry.extensions import SchemaExtension
from strawberry.http import GraphQLRequestData

from . import query
from .metrics import Metrics
from .snapshot import Snapshot

K = TypeVar("K")
V = TypeVar("V")

CACHEABLE_FIELDS = frozenset(
    {"users", "user", "usersConnection", "stats", "statsBy", "rejectedFiles", "__typename", "__schema", "__type"}
)
"""Root fields whose answers depend on the snapshot, the date, the origin and the request alone. Not `runs`
or `lastRun`: the run history changes without a new snapshot (a failed run, another replica's report).
None of these depends on the caller's rights (only the `reprocess` mutation checks them), so the key
leaves `Authorization` out; a field that did depend on them would stay out of this set."""
ENTRY_OVERHEAD = 800
"""Bytes an entry is counted for besides its answer and its key's texts: the Python objects around them
(measured: 35,000 answers kept of a `stats` query with variables, ~190 bytes of texts each, grew the RSS by
~860 bytes each, counted as ~990)."""
REVALIDATE = "no-cache"
"""Browsers and CDNs may keep a GET answer, and ask with its ETag before every use."""
NO_STORE = "no-store"
"""For a GET answer with errors: the error may be gone a moment later (data loaded, a document registered)."""
CACHEABLE_OPERATION = web.RequestKey("cacheable_operation", bool)
"""Set by `CachePolicy`: the request's operation may be kept."""
WITHOUT_ERRORS = web.RequestKey("without_errors", bool)
"""Set by the view once Strawberry has answered: whether the answer has no errors."""


@dataclass(frozen=True)
class Operation:
    """A GraphQL request as its body or its URL carries it, before its document is parsed."""

    query: str | None
    operation_name: str | None
    variables: dict[str, Any] | None
    extensions: dict[str, Any] | None

    def request_data(self) -> GraphQLRequestData:
        return GraphQLRequestData(self.query, self.variables, self.operation_name, self.extensions)


async def read_operation(request: web.Request, decode: Callable[[str | bytes], object]) -> Operation | None:
    """The operation of a plain GET or JSON POST; None for anything else (a WebSocket, the GraphiQL page, a
    batch, a malformed request), which Strawberry reads and answers as it always has."""
    if request.method == "GET" and "Upgrade" not in request.headers:
        params = request.query
        if "query" not in params and "extensions" not in params:
            return None  # the GraphiQL page
        try:
            decoded = {name: decode(params[name]) for name in ("variables", "extensions") if name in params}
        except ValueError:
            return None
        return _operation({"query": params.get("query"), "operationName": params.get("operationName"), **decoded})
    if request.method == "POST" and request.content_type == "application/json":
        try:
            data = decode(await request.read())
        except ValueError:
            return None
        return _operation(data) if isinstance(data, dict) else None
    return None


def _operation(data: dict[str, Any]) -> Operation | None:
    query, name, variables, extensions = (data.get(k) for k in ("query", "operationName", "variables", "extensions"))
    if (
        isinstance(query, str | None)
        and isinstance(name, str | None)
        and isinstance(variables, dict | None)
        and isinstance(extensions, dict | None)
    ):
        return Operation(query, name, variables, extensions)
    return None


Stored = tuple[int, str, str, str, str | None, str]
"""A `Key` as stored: the garbage collector stops tracking a plain tuple of strings, numbers and bytes (a
named tuple it tracks for ever), so that many answers kept do not make its full collections longer."""


class Key(NamedTuple):
    """What an answer depends on. The era stands for the snapshot and the date; (scheme, host) for the
    origin, which decides it as they decide `request.url`."""

    era: int
    scheme: str
    host: str
    query: str
    operation_name: str | None
    variables: str  # canonical JSON: equal variables, equal text

    def cost(self, body: bytes) -> int:
        return len(body) + len(self.query) + len(self.variables) + len(self.host) + ENTRY_OVERHEAD

    def plain(self) -> Stored:
        return (self.era, self.scheme, self.host, self.query, self.operation_name, self.variables)


class Answer(NamedTuple):
    """The bytes Strawberry sent for a query, and their digest as the ETag."""

    body: bytes
    etag: str

    @classmethod
    def of(cls, body: bytes) -> Answer:
        return cls(body, hashlib.blake2b(body, digest_size=16).hexdigest())


class BoundedLRU(Generic[K, V]):
    """A mapping that holds at most `capacity` bytes, as its callers count them, dropping the least
    recently used entries to make room; an entry larger than the whole capacity is not kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, cost: int) -> None:
        if cost > self.capacity:
            return
        if (old := self._items.pop(key, None)) is not None:
            self.size -= old[1]
        self._items[key] = (value, cost)
        self.size += cost
        while self.size > self.capacity:
            _, (_, dropped) = self._items.popitem(last=False)
            self.size -= dropped

    def clear(self) -> None:
        self._items.clear()
        self.size = 0


class ResponseCache:
    """The answers of the current era, bounded to `capacity` bytes (RESPONSE_CACHE_BYTES; 0: none). Keys
    and answers are stored as plain tuples (see `Stored`); a `Key` finds its plain tuple, as they are equal."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self._answers: BoundedLRU[Stored, tuple[bytes, str]] = BoundedLRU(capacity)
        self._metrics = metrics
        metrics.cache_bytes.set_function(lambda: self._answers.size)  # read when scraped, not on every change
        metrics.cache_entries.set_function(lambda: len(self._answers))
        self._era = 0
        self._snapshot: weakref.ref[Snapshot] | None = None  # weak: an old snapshot is not kept alive
        self._day: date | None = None

    def key(self, snapshot: Snapshot | None, operation: Operation, request: web.Request) -> Key | None:
        """The key of the request's answer, in the era of `snapshot` and today (`query.today_utc`, the
        resolvers' clock); None when nothing may be kept: no cache, no snapshot served, no document."""
        if not self._answers.capacity or snapshot is None or operation.query is None:
            return None
        self._enter(snapshot, query.today_utc())
        variables = _canonical(operation.variables) if operation.variables else ""
        return Key(self._era, request.scheme, request.host, operation.query, operation.operation_name, variables)

    def _enter(self, snapshot: Snapshot, day: date) -> None:
        """Start a new era, without the old one's answers, when the snapshot or the date changed."""
        if self._snapshot is not None and self._snapshot() is snapshot and self._day == day:
            return
        self._era += 1
        self._snapshot, self._day = weakref.ref(snapshot), day
        self._answers.clear()

    def get(self, key: Key) -> Answer | None:
        stored = self._answers.get(key)
        (self._metrics.cache_hits if stored is not None else self._metrics.cache_misses).inc()
        return Answer(*stored) if stored is not None else None

    def put(self, key: Key, answer: Answer) -> None:
        """Keep `answer` unless its era has ended meanwhile: it may have read the old snapshot (or date)
        or the new one, so it belongs to no era for sure."""
        if key.era == self._era:
            self._answers.put(key.plain(), (answer.body, answer.etag), key.cost(answer.body))


def _canonical(variables: dict[str, Any]) -> str:
    return json.dumps(variables, sort_keys=True, separators=(",", ":"))


class CachePolicy(SchemaExtension):
    """Marks the requests whose answer may be kept: queries of `CACHEABLE_FIELDS` only. It runs when the
    operation is about to execute, after validation and every limit (depth, aliases, tokens, fields,
    `DocumentGuard`'s row budget): an answer the view keeps was worked out with all of them on."""

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        request = getattr(context.context, "request", None)
        document = context.graphql_document
        if isinstance(request, web.Request) and document is not None and cacheable(document, context.operation_name):
            request[CACHEABLE_OPERATION] = True
        yield


def cacheable(document: DocumentNode, operation_name: str | None) -> bool:
    """Whether the operation to run is a query whose root fields, fragments expanded, are all cacheable."""
    operation = get_operation_ast(document, operation_name)
    if operation is None or operation.operation is not OperationType.QUERY:
        return False
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    return _root_fields(operation.selection_set, fragments, set()) <= CACHEABLE_FIELDS


def _root_fields(
    selection_set: SelectionSetNode, fragments: dict[str, FragmentDefinitionNode], seen: set[str]
) -> set[str]:
    names: set[str] = set()
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            names.add(selection.name.value)
        elif isinstance(selection, InlineFragmentNode):
            names |= _root_fields(selection.selection_set, fragments, seen)
        elif isinstance(selection, FragmentSpreadNode) and selection.name.value not in seen:
            seen.add(selection.name.value)
            fragment = fragments.get(selection.name.value)
            if fragment is not None:
                names |= _root_fields(fragment.selection_set, fragments, seen)
    return names


def send(request: web.Request, answer: Answer, response: web.Response | None = None) -> web.Response:
    """`answer` as sent: in `response` (Strawberry's) or a new one with the same headers; over GET with
    its ETag and `Cache-Control: no-cache`, or as 304 Not Modified when `If-None-Match` names it."""
    if response is None:
        response = web.Response(body=answer.body, content_type="application/json", charset="utf-8")
    if request.method != "GET":
        return response
    if any(tag.value in (answer.etag, "*") for tag in request.if_none_match or ()):
        response = web.Response(status=304)
    response.etag = answer.etag
    response.headers["Cache-Control"] = REVALIDATE
    return response
