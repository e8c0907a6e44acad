"""Embedded object store: bucket `B`, key `K` is the file `DATA_DIR/B/K`."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from .errors import ObjectNotFound, ObjectUnreadable, StorageError
from .storage import ObjectInfo, ObjectStream, check_key, check_prefix, exists_by_stat

PAGE_SIZE = 1000
# The file system refuses this one file (its mode, an ACL, a security module): other files may read fine.
_REFUSED = frozenset({errno.EACCES, errno.EPERM})


class LocalStore:
    """An `ObjectStore` on the local file system; writes are atomic (temp file + rename)."""

    def __init__(self, data_dir: Path, bucket: str) -> None:
        self._root = Path(data_dir) / bucket
        # Temporary files live beside the buckets (same file system, for atomic renames), never in
        # one: ".tmp" cannot be a bucket name.
        self._tmp = Path(data_dir) / ".tmp"
        self._bucket = bucket

    @property
    def bucket(self) -> str:
        return self._bucket

    async def ensure_bucket(self) -> None:
        try:
            await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(self._tmp.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create bucket {self._bucket!r}: {_reason(exc)}", where=str(self._root)) from exc

    def _path(self, key: str) -> Path:
        return self._root / check_key(key)

    async def list(self, prefix: str) -> AsyncIterator[list[ObjectInfo]]:
        # A walk is blocking I/O: run it in a thread a page at a time, keeping key order.
        keys = await asyncio.to_thread(_sorted_keys, self._root, check_prefix(prefix))
        for start in range(0, len(keys), PAGE_SIZE):
            page = await asyncio.to_thread(_stat_many, self._root, keys[start : start + PAGE_SIZE])
            if page:
                yield page

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        return await asyncio.to_thread(_read, path, key, max_bytes)

    @contextlib.asynccontextmanager
    async def open(self, key: str) -> AsyncIterator[ObjectStream]:
        path = self._path(key)
        handle, size = await asyncio.to_thread(_open_object, path, key)
        try:
            yield _FileStream(handle, size, key, path)
        finally:
            handle.close()

    async def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        path = self._path(key)
        return await asyncio.to_thread(_write_atomic, path, key, data, self._tmp)

    async def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            status = await asyncio.to_thread(os.stat, path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no object {key!r}") from exc
        except OSError as exc:
            raise _error("stat", key, path, exc) from exc
        if not stat.S_ISREG(status.st_mode):
            raise ObjectNotFound(f"no object {key!r}")  # a directory is not an object
        return _info(key, status)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except (IsADirectoryError, NotADirectoryError):
            return  # not an object: nothing to delete
        except OSError as exc:
            raise _error("delete", key, path, exc) from exc

    async def exists(self, key: str) -> bool:
        return await exists_by_stat(self, key)

    async def close(self) -> None:
        return None


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    # The ETag changes whenever the file is replaced: writes are renames of new files.
    etag = f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"
    modified = datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)
    return ObjectInfo(key=key, etag=etag, size=st.st_size, last_modified=modified)


class _FileStream:
    """An object's open file, read a chunk at a time in a worker thread."""

    def __init__(self, handle: BinaryIO, size: int, key: str, path: Path) -> None:
        self._handle = handle
        self.size = size
        self._key = key
        self._path = path

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        remaining = self.size  # a file that grows after opening is served as it was opened
        while remaining > 0 and (chunk := await asyncio.to_thread(self._read, min(chunk_size, remaining))):
            remaining -= len(chunk)
            yield chunk

    def _read(self, size: int) -> bytes:
        try:
            return self._handle.read(size)
        except OSError as exc:
            raise _error("read", self._key, self._path, exc) from exc


def _open_object(path: Path, key: str) -> tuple[BinaryIO, int]:
    """The object's file, open for reading, and its size."""
    try:
        # Objects are regular files: a symbolic link, which could point anywhere, is not one.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise ObjectNotFound(f"no object {key!r}") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ObjectNotFound(f"no object {key!r}") from exc
        raise _error("read", key, path, exc) from exc
    try:
        status = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise _error("read", key, path, exc) from exc
    if not stat.S_ISREG(status.st_mode):  # a directory, a FIFO, a device
        os.close(fd)
        raise ObjectNotFound(f"no object {key!r}")
    return os.fdopen(fd, "rb"), status.st_size


def _read(path: Path, key: str, max_bytes: int | None) -> bytes:
    handle, _ = _open_object(path, key)
    with handle:
        try:
            return handle.read() if max_bytes is None else handle.read(max_bytes + 1)
        except OSError as exc:
            raise _error("read", key, path, exc) from exc


def _write_atomic(path: Path, key: str, data: bytes, tmp_dir: Path) -> str:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir.mkdir(exist_ok=True)
        tmp = tmp_dir / uuid.uuid4().hex
        # Mode 0666 less the umask, like any file the user writes (mkstemp would make it 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _info(key, os.stat(path)).etag
    except OSError as exc:
        raise _error("write", key, path, exc) from exc


def _error(op: str, key: str, path: Path, exc: OSError) -> StorageError:
    """`ObjectUnreadable` when reading this one file is refused, else a `StorageError`; the path is logged only."""
    kind = ObjectUnreadable if op in ("read", "stat") and exc.errno in _REFUSED else StorageError
    return kind(f"cannot {op} {key!r}: {_reason(exc)}", where=str(path))


def _reason(exc: OSError) -> str:
    # `strerror` never holds the path (`filename` does): "permission denied", "no space left on device".
    return (exc.strerror or type(exc).__name__).lower()


def _sorted_keys(base: Path, prefix: str) -> list[str]:
    # Plain strings, not Path objects, and one directory entry at a time: this runs once per file, a
    # million times for a big bucket.
    top = prefix.rpartition("/")[0]
    root = str(base)
    keys: list[str] = []
    stack = [top + "/" if top else ""]  # key prefixes of the directories to walk
    while stack:
        directory = stack.pop()
        path = os.path.join(root, directory) if directory else root
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(directory + entry.name + "/")
                    elif entry.is_file(follow_symlinks=False):
                        key = directory + entry.name
                        if key.startswith(prefix):
                            keys.append(key)
        except FileNotFoundError:
            continue
        except OSError as exc:
            listed = repr(directory) if directory else "the bucket"
            raise StorageError(f"cannot list {listed}: {_reason(exc)}", where=path) from exc
    keys.sort()
    return keys


def _stat_many(root: Path, keys: list[str]) -> list[ObjectInfo]:
    page = []
    base = str(root) + "/"
    for key in keys:
        try:
            page.append(_info(key, os.stat(base + key)))
        except FileNotFoundError:
            continue  # deleted since the walk
    return page
