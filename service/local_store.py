"""Embedded object store: bucket `B`, key `K` is the file `DATA_DIR/B/K`.

Writes and deletes through the store take the bucket's lock (`DATA_DIR/.tmp/B.lock`, `flock`) for
their last step only: a conditional write checks the current ETag and renames its new file into
place under it, so it holds for every process on the machine that uses the same directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, NamedTuple

from .errors import ObjectNotFound, ObjectUnreadable, PreconditionFailed, StorageError
from .storage import ObjectInfo, ObjectStream, check_condition, check_key, check_prefix, exists_by_stat

PAGE_SIZE = 1000
# The file system refuses this one file (its mode, an ACL, a security module): other files may read fine.
_REFUSED = frozenset({errno.EACCES, errno.EPERM})
_clock = time.time_ns  # the modification times the store gives its files start from this clock


class LocalStore:
    """An `ObjectStore` on the local file system; writes are atomic (temp file + rename)."""

    def __init__(self, data_dir: Path, bucket: str) -> None:
        self._root = Path(data_dir) / bucket
        # Temporary files live beside the buckets (same file system, for atomic renames), never in
        # one: ".tmp" cannot be a bucket name.
        self._tmp = Path(data_dir) / ".tmp"
        self._lock = self._tmp / f"{bucket}.lock"
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

    async def get_with_info(self, key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        path = self._path(key)
        return await asyncio.to_thread(_read_with_info, path, key, max_bytes)

    @contextlib.asynccontextmanager
    async def open(self, key: str) -> AsyncIterator[ObjectStream]:
        path = self._path(key)
        handle, size = await asyncio.to_thread(_open_object, path, key)
        try:
            yield _FileStream(handle, size, key, path)
        finally:
            handle.close()

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        path = self._path(key)
        check_condition(if_match, if_none_match)
        condition = _Condition(if_match.strip('"') if if_match is not None else None, if_none_match)
        return await asyncio.to_thread(_write_atomic, path, key, data, self._tmp, self._lock, condition=condition)

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
            await asyncio.to_thread(_delete, path, self._tmp, self._lock)
        except (IsADirectoryError, NotADirectoryError):
            return  # not an object: nothing to delete
        except OSError as exc:
            raise _error("delete", key, path, exc) from exc

    async def exists(self, key: str) -> bool:
        return await exists_by_stat(self, key)

    async def close(self) -> None:
        return None


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    # The ETag changes whenever the file is replaced: writes are renames of new files, each with a
    # modification time of its own (`_next_stamp`).
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
    handle, status = _open_with_status(path, key)
    return handle, status.st_size


def _open_with_status(path: Path, key: str) -> tuple[BinaryIO, os.stat_result]:
    """The object's file, open for reading, and its status (of that file: writes replace files)."""
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
    return os.fdopen(fd, "rb"), status


def _read(path: Path, key: str, max_bytes: int | None) -> bytes:
    return _read_with_info(path, key, max_bytes)[1]


def _read_with_info(path: Path, key: str, max_bytes: int | None) -> tuple[ObjectInfo, bytes]:
    handle, status = _open_with_status(path, key)
    with handle:
        try:
            data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
        except OSError as exc:
            raise _error("read", key, path, exc) from exc
    return _info(key, status), data


class _Condition(NamedTuple):
    if_match: str | None  # unquoted
    if_none_match: bool


def _write_atomic(path: Path, key: str, data: bytes, tmp_dir: Path, lock: Path, *, condition: _Condition) -> str:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir.mkdir(exist_ok=True)
        tmp = tmp_dir / uuid.uuid4().hex
        # Mode 0666 less the umask, like any file the user writes (mkstemp would make it 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            with _bucket_lock(lock) as lock_fd:
                _check(path, key, condition)
                stamp = _next_stamp(lock_fd)
                os.utime(tmp, ns=(stamp, stamp))
                os.replace(tmp, path)
                return _info(key, os.stat(path)).etag
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise _error("write", key, path, exc) from exc


def _delete(path: Path, tmp_dir: Path, lock: Path) -> None:
    if not os.path.lexists(path):
        return
    tmp_dir.mkdir(exist_ok=True)
    with _bucket_lock(lock):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _bucket_lock(lock: Path) -> Iterator[int]:
    """Hold the bucket's lock (an exclusive `flock`, so among threads too); yield the lock file's descriptor."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _next_stamp(lock_fd: int) -> int:
    """A modification time (ns) later than every one given before in this bucket; the lock file keeps the last.

    The ETag is (mtime, size, inode), and file systems reuse a replaced file's inode at once: with a
    coarse clock (a tick of a few milliseconds) a new file of the same size could get a replaced
    file's ETag back, and a conditional write on that old ETag would wrongly succeed.
    """
    last = int.from_bytes(os.pread(lock_fd, 8, 0), "big")
    stamp = max(_clock(), last + 1)
    os.pwrite(lock_fd, stamp.to_bytes(8, "big"), 0)
    return stamp


def _check(path: Path, key: str, condition: _Condition) -> None:
    """Raise `PreconditionFailed` unless the object at `path` is as `condition` requires."""
    if condition.if_match is None and not condition.if_none_match:
        return
    try:
        status = os.stat(path)
        current = _info(key, status).etag if stat.S_ISREG(status.st_mode) else None
    except (FileNotFoundError, NotADirectoryError):
        current = None
    if condition.if_none_match and current is not None:
        raise PreconditionFailed(f"cannot write {key!r}: the object exists")
    if condition.if_match is not None and current != condition.if_match:
        found = "does not exist" if current is None else "has another ETag"
        raise PreconditionFailed(f"cannot write {key!r}: the object {found}")


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
