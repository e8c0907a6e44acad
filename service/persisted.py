"""Automatic persisted queries, Apollo's protocol: a client sends the SHA-256 of its document instead of the
document; the first time, the answer is `PersistedQueryNotFound`, and the client sends both, which
registers the document under its hash. The registry is bounded (PERSISTED_QUERY_BYTES) and forgets the
least recently used documents first: a client whose hash was forgotten just sends its document again.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from typing import Any

from aiohttp import web

from .cache import ENTRY_OVERHEAD, NO_STORE, BoundedLRU, Operation
from .metrics import Metrics

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class PersistedQueryError(Exception):
    """An answer to a persisted query that names no document this service can run, in GraphQL's error
    format, with the code clients look for (Apollo Client resends the document on a `NOT_FOUND`)."""

    def __init__(self, message: str, code: str, status: int = 200) -> None:
        super().__init__(message)
        self.code = code
        self.status = status

    def response(self) -> web.Response:
        body = {"errors": [{"message": str(self), "extensions": {"code": self.code}}]}
        return web.json_response(body, status=self.status, headers={"Cache-Control": NO_STORE})


class PersistedQueries:
    """Documents by the lowercase hex SHA-256 of their UTF-8 text; `capacity` bytes (0: not supported)."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self._documents: BoundedLRU[str, str] = BoundedLRU(capacity)
        metrics.persisted_queries.set_function(lambda: len(self._documents))

    def resolve(self, operation: Operation) -> Operation:
        """The operation with its document: looked up by its hash, or registered under it. An operation
        without `extensions.persistedQuery` is returned as it is."""
        extension = (operation.extensions or {}).get("persistedQuery")
        if extension is None:
            return operation
        if not self._documents.capacity:
            raise PersistedQueryError("PersistedQueryNotSupported", "PERSISTED_QUERY_NOT_SUPPORTED")
        digest = _digest(extension)
        if operation.query is None:
            document = self._documents.get(digest)
            if document is None:
                raise PersistedQueryError("PersistedQueryNotFound", "PERSISTED_QUERY_NOT_FOUND")
            return replace(operation, query=document)
        if hashlib.sha256(operation.query.encode(errors="surrogatepass")).hexdigest() != digest:
            raise PersistedQueryError(
                "extensions.persistedQuery.sha256Hash is not the SHA-256 of the query's UTF-8 text: "
                "the query is not registered",
                "PERSISTED_QUERY_HASH_MISMATCH",
                400,
            )
        self._documents.put(digest, operation.query, len(operation.query) + ENTRY_OVERHEAD)
        return operation


def _digest(extension: Any) -> str:
    """The hash `extensions.persistedQuery` names, checked: version 1, 64 hex digits."""
    if not isinstance(extension, dict) or extension.get("version") != 1:
        raise PersistedQueryError(
            "extensions.persistedQuery must be {version: 1, sha256Hash: ...}: only version 1 is supported",
            "BAD_REQUEST",
            400,
        )
    digest = extension.get("sha256Hash")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise PersistedQueryError(
            "extensions.persistedQuery.sha256Hash must be 64 hexadecimal digits", "BAD_REQUEST", 400
        )
    return digest.lower()
