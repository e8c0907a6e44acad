"""A store wrapper for tests: records reads, injects write failures, can under-report listed sizes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from service.errors import StorageError
from service.storage import ObjectInfo, ObjectStore, ObjectStream


class Recording:
    """Delegates to a real store. `gets` lists the keys read; `reads` adds max_bytes and bytes returned;
    `streamed` maps each opened key to the sizes of the chunks read from it."""

    def __init__(self, inner: ObjectStore, listed_sizes: dict[str, int] | None = None) -> None:
        self.inner = inner
        self.listed_sizes = listed_sizes or {}
        self.gets: list[str] = []
        self.reads: list[tuple[str, int | None, int]] = []
        self.streamed: dict[str, list[int]] = {}
        self.fail_put: set[str] = set()

    @property
    def bucket(self) -> str:
        return self.inner.bucket

    async def ensure_bucket(self) -> None:
        await self.inner.ensure_bucket()

    async def list(self, prefix: str) -> AsyncIterator[list[ObjectInfo]]:
        async for page in self.inner.list(prefix):
            yield [ObjectInfo(i.key, i.etag, self.listed_sizes.get(i.key, i.size), i.last_modified) for i in page]

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        self.gets.append(key)
        data = await self.inner.get(key, max_bytes)
        self.reads.append((key, max_bytes, len(data)))
        return data

    async def get_with_info(self, key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        self.gets.append(key)
        info, data = await self.inner.get_with_info(key, max_bytes)
        self.reads.append((key, max_bytes, len(data)))
        return info, data

    @contextlib.asynccontextmanager
    async def open(self, key: str) -> AsyncIterator[ObjectStream]:
        async with self.inner.open(key) as stream:
            yield RecordedStream(stream, self.streamed.setdefault(key, []))

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        if key in self.fail_put:
            raise StorageError(f"injected failure writing {key}")
        return await self.inner.put(key, data, content_type, if_match=if_match, if_none_match=if_none_match)

    async def stat(self, key: str) -> ObjectInfo:
        return await self.inner.stat(key)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def close(self) -> None:
        return None


class RecordedStream:
    """Passes chunks through, appending the size of each to `sizes`."""

    def __init__(self, inner: ObjectStream, sizes: list[int]) -> None:
        self._inner = inner
        self.size = inner.size
        self._sizes = sizes

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        async for chunk in self._inner.chunks(chunk_size):
            self._sizes.append(len(chunk))
            yield chunk
