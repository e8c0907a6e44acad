"""Refusing documents before they cost anything: oversized fragment expansions, subscriptions over HTTP,
and operations asking for more user rows than one response may carry, in all their paged fields together."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from aiohttp import web
from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLInt,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    Undefined,
    ValueNode,
    VariableNode,
    get_operation_ast,
    value_from_ast,
)
from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType

from .config import DEFAULT_MAX_PAGE_SIZE

# Fields a document may select once fragments are expanded. Strawberry's depth and alias limiters
# walk every expansion without memoising, so a small document of nested fragments would keep the
# event loop busy for exponential time; this count is memoised and runs first.
MAX_EXPANDED_FIELDS = 5_000
# The root fields that return a page of user rows, and the arguments that bound it: the largest one given
# counts (`usersConnection` refuses first and last together anyway); none, a page of MAX_PAGE_SIZE.
_PAGED_FIELDS = {"users": ("limit",), "usersConnection": ("first", "last")}


class DocumentGuard(SchemaExtension):
    def __init__(self, *, max_rows: int = DEFAULT_MAX_PAGE_SIZE) -> None:
        super().__init__()
        self.max_rows = max_rows

    def on_parse(self) -> Iterator[None]:
        yield
        context = self.execution_context
        document = context.graphql_document
        if document is None:
            return
        size = expanded_size(document)
        if size > MAX_EXPANDED_FIELDS:
            raise GraphQLError(
                f"the query selects {size} fields once fragments are expanded; at most {MAX_EXPANDED_FIELDS}"
            )
        try:
            operation_type = context.operation_type
        except RuntimeError:
            return  # no such operation: Strawberry answers that with a 400 of its own
        if operation_type is OperationType.SUBSCRIPTION and not _over_websocket(context.context):
            raise GraphQLError("subscriptions are served over WebSocket (graphql-transport-ws) only")

    def on_execute(self) -> Iterator[None]:
        # After validation (the arguments have their declared types), before any resolver runs: 20 aliases
        # of a full page each within every other limit would otherwise hold the event loop for seconds.
        context = self.execution_context
        if context.graphql_document is not None:
            rows = requested_rows(context.graphql_document, context.operation_name, context.variables, self.max_rows)
            if rows > self.max_rows:
                raise GraphQLError(
                    f"the query asks for up to {rows} users in all; one request returns at most {self.max_rows} "
                    f"(MAX_PAGE_SIZE; a users field without limit, or a usersConnection without first or last, "
                    f"counts as {self.max_rows}): ask for fewer or smaller pages, and fetch the following ones in "
                    "further requests, with limit and offset (users) or first and after (usersConnection)"
                )
        yield


def _over_websocket(context: object) -> bool:
    return isinstance(getattr(context, "response", None), web.WebSocketResponse)


def expanded_size(document: DocumentNode) -> int:
    """Fields selected by the document's operations with every fragment spread expanded (memoised)."""
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    sizes: dict[str, int] = {}

    def fragment_size(name: str) -> int:
        if name not in sizes:
            sizes[name] = 0  # a cycle counts as nothing here; validation reports it
            fragment = fragments.get(name)
            sizes[name] = selection_size(fragment.selection_set) if fragment else 0
        return sizes[name]

    def selection_size(selection_set: SelectionSetNode | None) -> int:
        total = 0
        for selection in selection_set.selections if selection_set else ():
            if isinstance(selection, FieldNode):
                total += 1 + selection_size(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode):
                total += fragment_size(selection.name.value)
            elif isinstance(selection, InlineFragmentNode):
                total += selection_size(selection.selection_set)
            if total > MAX_EXPANDED_FIELDS:
                break  # already too big: stop counting
        return total

    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    return sum(selection_size(operation.selection_set) for operation in operations)


def requested_rows(
    document: DocumentNode, operation_name: str | None, variables: Mapping[str, object] | None, page_size: int
) -> int:
    """Rows the paged root fields of the operation to run may return together: each one's limit, first or
    last (at most `page_size`; `page_size` without any). Execution merges the fields of one response key
    (aliases are distinct keys, a fragment spread twice adds nothing), and so does this count. A size that
    execution refuses counts as nothing: that request fails before returning any row. A field under @skip
    counts."""
    operation = get_operation_ast(document, operation_name)
    if operation is None:
        return 0  # none or ambiguous: execution answers that
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    defaults = {d.variable.name.value: d.default_value for d in operation.variable_definitions or ()}
    rows: dict[str, int] = {}  # response key -> rows
    walked: set[str] = set()

    def field_rows(field: FieldNode) -> int:
        sizes = [_argument(field, name, variables or {}, defaults) for name in _PAGED_FIELDS[field.name.value]]
        given = [size for size in sizes if size is not None]
        return max((_rows(size, page_size) for size in given), default=page_size)

    def walk(selection_set: SelectionSetNode) -> None:
        # Only the root level: paged fields are root fields, so nothing below another field returns rows.
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode) and selection.name.value in _PAGED_FIELDS:
                rows[(selection.alias or selection.name).value] = field_rows(selection)
            elif isinstance(selection, FragmentSpreadNode) and selection.name.value not in walked:
                walked.add(selection.name.value)
                fragment = fragments.get(selection.name.value)
                if fragment is not None:
                    walk(fragment.selection_set)
            elif isinstance(selection, InlineFragmentNode):
                walk(selection.selection_set)

    walk(operation.selection_set)
    return sum(rows.values())


def _rows(size: object, page_size: int) -> int:
    """The rows a page's size lets a field return; a size execution refuses (not an Int, negative) returns none."""
    return min(size, page_size) if isinstance(size, int) and size > 0 else 0


def _argument(
    field: FieldNode, name: str, variables: Mapping[str, object], defaults: Mapping[str, ValueNode | None]
) -> object:
    """An Int argument as execution will read it: None when absent or null, `Undefined` when invalid."""
    node = next((argument.value for argument in field.arguments or () if argument.name.value == name), None)
    if isinstance(node, VariableNode):
        if node.name.value in variables:
            return _parse_int(variables[node.name.value])
        node = defaults.get(node.name.value)  # not given: the variable's default, if any
    return None if node is None else value_from_ast(node, GraphQLInt)


def _parse_int(value: object) -> object:
    if value is None:
        return None
    try:
        return GraphQLInt.parse_value(value)
    except GraphQLError:
        return Undefined
