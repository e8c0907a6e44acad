"""The object-store port: the small async protocol the rest of the service depends on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import NamedTuple, Protocol

from .errors import InvalidKey, ObjectNotFound


class ObjectInfo(NamedTuple):
    """One listed object: enough to decide whether it changed without downloading it.

    A named tuple rather than a frozen dataclass: a listing makes one per object, and building a frozen
    dataclass costs several times more.
    """

    key: str
    etag: str
    size: int
    last_modified: datetime  # timezone-aware, UTC


class ObjectStream(Protocol):
    """An object opened for reading: its size is known before any of its content is read."""

    @property
    def size(self) -> int: ...

    def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        """The content in order, in chunks of at most `chunk_size` bytes and at most `size` bytes in all."""


class ObjectStore(Protocol):
    """Bucket-scoped object storage. Every method raises `StorageError` subclasses only."""

    @property
    def bucket(self) -> str: ...

    async def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist yet."""

    def list(self, prefix: str) -> AsyncIterator[list[ObjectInfo]]:
        """Yield every object under `prefix` (recursively), in pages, ordered by key."""

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """Return the object's content; at most `max_bytes + 1` bytes are read when given."""

    async def get_with_info(self, key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        """`get`, and the object's metadata as `stat` reports it, from the same read: the content is the
        version the metadata describes."""

    def open(self, key: str) -> AbstractAsyncContextManager[ObjectStream]:
        """Open the object for streaming (`async with`); leaving the block releases it, read or not.

        For content too large to hold in memory: `get` returns it whole.
        """

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Store `data` under `key` atomically (readers see the old or the new object); return the new ETag.

        A conditional write: with `if_match` only when the object exists and its ETag (as `stat` and
        `list` report it) is `if_match`; with `if_none_match` only when no object exists under `key`.
        Otherwise nothing is written and `PreconditionFailed` is raised. Among concurrent conditional
        writes on one ETag (or on an absent key) exactly one succeeds. Both at once is a `ValueError`.
        """

    async def stat(self, key: str) -> ObjectInfo:
        """Return the object's metadata; `ObjectNotFound` when it does not exist."""

    async def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    async def exists(self, key: str) -> bool:
        """Whether the object exists."""

    async def close(self) -> None:
        """Release connections."""


def check_condition(if_match: str | None, if_none_match: bool) -> None:
    """Refuse a condition no object can meet: both at once, or an empty ETag."""
    if if_match is not None and if_none_match:
        raise ValueError("if_match and if_none_match exclude each other")
    if if_match is not None and not if_match.strip('"'):
        raise ValueError("if_match must be an ETag")


def check_prefix(prefix: str) -> str:
    """Return `prefix` when it cannot leave the bucket (no absolute path, no `.`/`..` segments)."""
    if prefix.startswith("/") or "\\" in prefix or "\x00" in prefix or any(p in (".", "..") for p in prefix.split("/")):
        raise InvalidKey(f"invalid prefix {prefix[:200]!r}")
    return prefix


def check_key(key: str) -> str:
    """Return `key` when it is a safe relative object key, else raise `InvalidKey`."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise InvalidKey(f"invalid object key {key[:200]!r}")
    return key


async def exists_by_stat(store: ObjectStore, key: str) -> bool:
    """`exists` for adapters whose `stat` raises `ObjectNotFound` for a missing object."""
    try:
        await store.stat(key)
    except ObjectNotFound:
        return False
    return True
