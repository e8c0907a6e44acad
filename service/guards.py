"""Refusing documents before validation: oversized fragment expansions, subscriptions over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
)
from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType

# Fields a document may select once fragments are expanded. Strawberry's depth and alias limiters
# walk every expansion without memoising, so a small document of nested fragments would keep the
# event loop busy for exponential time; this count is memoised and runs first.
MAX_EXPANDED_FIELDS = 5_000


class DocumentGuard(SchemaExtension):
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
