"""S3 object store through miniopy-async: explicit timeouts, bounded retries, project errors only."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import aiohttp
from miniopy_async.api import Minio
from miniopy_async.datatypes import Object
from miniopy_async.error import InvalidResponseError, MinioException, S3Error, ServerError
from miniopy_async.helpers import check_bucket_name

from .errors import ObjectNotFound, ObjectUnreadable, PreconditionFailed, StorageError
from .storage import ObjectInfo, ObjectStream, check_condition, check_key, check_prefix, exists_by_stat

T = TypeVar("T")

PAGE_SIZE = 1000  # objects per yielded page: the SDK's max-keys, so about one page per request
_BACKOFF_FIRST = 0.1  # seconds before the first retry; doubles each time
_BACKOFF_MAX = 5.0
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchObject"})
_BUCKET_TAKEN = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
# 4xx answers that are the store's failure, not one object's: credentials, the bucket, throttling.
_STORE_CODES = frozenset(
    {
        "AccountProblem", "AllAccessDisabled", "AuthorizationHeaderMalformed", "ExpiredToken", "InvalidAccessKeyId",
        "InvalidBucketName", "InvalidToken", "NoSuchBucket", "RequestTimeTooSkewed", "RequestTimeout",
        "SignatureDoesNotMatch", "SlowDown", "TokenRefreshRequired",
    }
)  # fmt: skip
_STORE_STATUSES = frozenset({408, 429})  # request timeout, too many requests
# A conditional write that lost: 412, or 409 when S3 saw a concurrent conditional write in progress.
_PRECONDITION_STATUS = 412
_CONDITION_CONFLICT = "ConditionalRequestConflict"
# Connection failures, timeouts and broken bodies may succeed on a new attempt; 4xx never do.
_TRANSIENT = (ConnectionError, TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
_SDK_ERRORS = (MinioException, aiohttp.ClientError, OSError)


class MinioStore:
    """An `ObjectStore` on one bucket of an S3 server (MinIO in production, SeaweedFS in tests)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        timeout: float = 30.0,
        retries: int = 3,
    ) -> None:
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be positive and retries not negative")
        self._endpoint = endpoint
        self._access_key = access_key
        self._bucket = bucket
        self._timeout = timeout
        self._retries = retries
        self._session: aiohttp.ClientSession | None = None
        try:
            check_bucket_name(bucket)
            self._minio = Minio(endpoint, access_key, secret_key, secure=secure)
        except ValueError as exc:
            raise StorageError(f"invalid S3 endpoint {endpoint!r} or bucket {bucket!r}: {exc}") from exc

    def __repr__(self) -> str:
        # Never the secret key: reprs end up in logs and tracebacks.
        where = f"endpoint={self._endpoint!r}, bucket={self._bucket!r}"
        return f"MinioStore({where}, access_key={self._access_key!r})"

    @property
    def bucket(self) -> str:
        return self._bucket

    def _client(self) -> Minio:
        # The session belongs to the running loop, so it is made on first use, not in __init__.
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._timeout, sock_connect=self._timeout, sock_read=self._timeout)
            self._session = aiohttp.ClientSession(timeout=timeout, middlewares=(_send_condition,))
            self._minio.set_session(self._session)
        return self._minio

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- operations ------------------------------------------------------------------------

    async def ensure_bucket(self) -> None:
        await self._call("create", None, self._ensure_bucket_once)

    async def _ensure_bucket_once(self) -> None:
        client = self._client()
        if await client.bucket_exists(self._bucket):
            return
        try:
            await client.make_bucket(self._bucket)
        except S3Error as exc:
            if exc.code not in _BUCKET_TAKEN:  # created meanwhile by another process: fine
                raise

    async def list(self, prefix: str) -> AsyncIterator[list[ObjectInfo]]:
        # The SDK pages internally (max-keys 1000); after a transient error mid-listing the
        # listing resumes after the last key seen instead of starting over.
        check_prefix(prefix)
        after: str | None = None
        page: list[ObjectInfo] = []
        failures = 0
        while True:
            try:
                async for obj in self._client().list_objects(
                    self._bucket, prefix=prefix, recursive=True, start_after=after
                ):
                    after, failures = obj.object_name, 0
                    if (info := _listed_info(obj)) is not None:
                        page.append(info)
                    if len(page) == PAGE_SIZE:
                        yield page
                        page = []
                break
            except _SDK_ERRORS as exc:
                failures += 1
                await self._retry_or_raise("list", prefix, exc, failures)
        if page:
            yield page

    async def get(self, key: str, max_bytes: int | None = None) -> bytes:
        check_key(key)
        found = await self._call("read", key, lambda: self._get_once(key, max_bytes))
        return b"" if found is None else found[1]

    async def get_with_info(self, key: str, max_bytes: int | None = None) -> tuple[ObjectInfo, bytes]:
        check_key(key)
        found = await self._call("read", key, lambda: self._get_once(key, max_bytes))
        if found is None:  # an empty object: a ranged GET of it says nothing
            return await self.stat(key), b""
        headers, data = found
        return _response_info(key, headers), data

    async def _get_once(self, key: str, max_bytes: int | None) -> tuple[Mapping[str, str], bytes] | None:
        """The response's headers and the content (at most `max_bytes + 1` bytes); None for an empty
        object read with a range."""
        limit = None if max_bytes is None else max_bytes + 1
        try:
            # A ranged GET: the server sends at most `limit` bytes.
            response = await self._client().get_object(self._bucket, key, length=limit or 0)
        except S3Error as exc:
            if exc.code == "InvalidRange":  # any range of an empty object is unsatisfiable
                return None
            raise
        try:
            return response.headers, await _read_at_most(response, limit)
        finally:
            response.release()

    @contextlib.asynccontextmanager
    async def open(self, key: str) -> AsyncIterator[ObjectStream]:
        check_key(key)
        response = await self._call("read", key, lambda: self._client().get_object(self._bucket, key))
        try:
            if response.content_length is None:  # S3 always sends it; a proxy in between might not
                raise StorageError(f"cannot read {key!r}: no Content-Length", where=f"at {self._endpoint}")
            yield _ResponseStream(response, response.content_length, lambda exc: self._error("read", key, exc, 1))
        finally:
            response.release()  # closes the connection when the body was not read to its end

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        check_key(key)
        check_condition(if_match, if_none_match)
        if if_match is None and not if_none_match:

            async def put_once() -> str:
                result = await self._client().put_object(
                    self._bucket, key, io.BytesIO(data), len(data), content_type=content_type
                )
                return _unquote(result.etag)

            return await self._call("write", key, put_once)
        headers = {"If-Match": f'"{_unquote(if_match)}"'} if if_match is not None else {"If-None-Match": "*"}
        return await self._put_if(key, data, content_type, _Condition(headers))

    async def _put_if(self, key: str, data: bytes, content_type: str, condition: _Condition) -> str:
        """A conditional PUT: its headers are added by `_send_condition`, for this task's request only.

        The SDK's `put_object` takes no request headers (its `metadata` turns them into `X-Amz-Meta-*`),
        so the condition travels in a context variable to the session's middleware. `part_size` equal
        to the length makes it one PUT whatever the size (S3 takes up to 5 GiB so): a multipart upload
        would send the condition with its parts, not with the completion that creates the object.
        """

        async def put_once() -> str:
            token = _CONDITION.set(condition)
            try:
                result = await self._client().put_object(
                    self._bucket, key, io.BytesIO(data), len(data), content_type=content_type, part_size=len(data)
                )
            finally:
                _CONDITION.reset(token)
            return _unquote(result.etag)

        try:
            return await self._call("write", key, put_once)
        except (PreconditionFailed, ObjectNotFound) as exc:
            # S3 answers If-Match on a missing object with 404 NoSuchKey (SeaweedFS with 412).
            failed = exc if isinstance(exc, PreconditionFailed) else PreconditionFailed(str(exc), where=exc.where)
            if condition.maybe_applied:
                return await self._lost_answer(key, data, failed)
            if failed is exc:
                raise
            raise failed from exc.__cause__

    async def _lost_answer(self, key: str, data: bytes, failed: PreconditionFailed) -> str:
        """A retry of a conditional PUT failed its precondition after an earlier attempt went unanswered.

        The earlier attempt may have been applied, and then the retry fails on our own write. When the
        object now holds our bytes (an S3 ETag of a single PUT is the MD5 of its body), it was ours:
        its ETag is returned (the same bytes from another writer count as ours). Otherwise whether the
        earlier attempt was applied (and then replaced) is unknown: a `StorageError`, not
        `PreconditionFailed`, which says that nothing was written.
        """
        try:
            current: str | None = (await self.stat(key)).etag
        except ObjectNotFound:
            current = None
        if current == hashlib.md5(data, usedforsecurity=False).hexdigest():
            return current
        message = f"cannot write {key!r}: an attempt went unanswered and its retry failed its precondition"
        raise StorageError(f"{message}; whether the write was applied is unknown", where=failed.where) from failed

    async def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        obj = await self._call("stat", key, lambda: self._client().stat_object(self._bucket, key))
        return _info(key, obj)

    async def delete(self, key: str) -> None:
        check_key(key)
        try:
            await self._call("delete", key, lambda: self._client().remove_object(self._bucket, key))
        except ObjectNotFound:
            return

    async def exists(self, key: str) -> bool:
        return await exists_by_stat(self, key)

    # -- retries and errors ----------------------------------------------------------------

    async def _call(self, op: str, key: str | None, action: Callable[[], Awaitable[T]]) -> T:
        failures = 0
        while True:
            try:
                return await action()
            except _SDK_ERRORS as exc:
                failures += 1
                await self._retry_or_raise(op, key, exc, failures)

    async def _retry_or_raise(self, op: str, key: str | None, exc: Exception, failures: int) -> None:
        """Sleep before the next attempt, or raise the project error for `exc` when done."""
        if failures > self._retries or not _is_transient(exc):
            raise self._error(op, key, exc, failures) from exc
        delay = min(_BACKOFF_FIRST * 2 ** (failures - 1), _BACKOFF_MAX)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def _error(self, op: str, key: str | None, exc: Exception, attempts: int) -> StorageError:
        """The project error for `exc`: what failed in the message, the endpoint and SDK text in `where`."""
        target = f"bucket {self._bucket!r}" if key is None else repr(key)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        message = f"cannot {op} {target}{tries}: {self._describe(exc)}"
        where = f"bucket {self._bucket!r} at {self._endpoint}: {_sdk_text(exc)}"
        if isinstance(exc, S3Error) and exc.code in _NOT_FOUND:
            return ObjectNotFound(message, where=where)
        if op == "write" and _precondition_failed(exc):
            return PreconditionFailed(message, where=where)
        if key is not None and op in ("read", "stat") and _refuses_one_object(exc):
            return ObjectUnreadable(message, where=where)
        return StorageError(message, where=where)

    def _describe(self, exc: Exception) -> str:
        """The kind of failure, in words that never name the endpoint (an SDK's own text may)."""
        if isinstance(exc, S3Error):
            return f"{exc.code}: {exc.message}"
        if isinstance(exc, ServerError):
            return f"HTTP status {exc.status_code}"
        if isinstance(exc, InvalidResponseError):
            return f"unexpected response (HTTP status {_status(exc)})"
        if isinstance(exc, TimeoutError):
            return f"timed out ({self._timeout:g}s)"
        if isinstance(exc, OSError) and exc.errno:  # a refused connection: its text holds the address
            return f"{type(exc).__name__}: {_os_reason(exc)}"
        return type(exc).__name__


def _os_reason(exc: OSError) -> str:
    """What went wrong, in the words for its number: an `OSError`'s own text may hold the address."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    # A failed name lookup: getaddrinfo's own words (EAI_* numbers are negative; strerror knows none).
    return (exc.strerror or type(exc).__name__).lower()


def _sdk_text(exc: Exception) -> str:
    """The SDK's own text for `exc`, for the log, except where it is untrue: aiohttp says `ssl:default`
    of a failed connection whether or not it was to use TLS."""
    if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(exc, aiohttp.ClientSSLError):
        return f"cannot connect to {exc.host}:{exc.port} ({_os_reason(exc)})"
    return str(exc)


def _status(exc: Exception) -> int | None:
    """The HTTP status of an error answer from the server; None when there was no answer."""
    if isinstance(exc, S3Error):
        return int(exc.response.status)
    if isinstance(exc, ServerError):
        return int(exc.status_code)
    if isinstance(exc, InvalidResponseError):
        return int(getattr(exc, "_code", 0)) or None
    return None


def _precondition_failed(exc: Exception) -> bool:
    return _status(exc) == _PRECONDITION_STATUS or (isinstance(exc, S3Error) and exc.code == _CONDITION_CONFLICT)


@dataclass
class _Condition:
    """The headers of one conditional put; `maybe_applied` once one of its PUTs may have been applied
    unanswered (the answer was lost, or was a 5xx)."""

    headers: dict[str, str]
    maybe_applied: bool = False


_CONDITION: ContextVar[_Condition | None] = ContextVar("_CONDITION", default=None)


async def _send_condition(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """Session middleware: add the current task's condition to its PUT (the only PUT `_put_if` makes).

    Added after signing: SigV4 signs the headers it lists, and S3 accepts unsigned `If-*` headers.
    Every attempt passes here, aiohttp's own retry of an idempotent request on a dropped connection
    too, so an attempt that may have been applied unanswered is always noted.
    """
    condition = _CONDITION.get()
    if condition is None or request.method != "PUT":
        return await handler(request)
    request.headers.update(condition.headers)
    try:
        response = await handler(request)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
        raise  # no connection, so the request was never sent
    except BaseException:
        condition.maybe_applied = True  # sent, perhaps in full, and the answer is lost
        raise
    if response.status >= 500:
        condition.maybe_applied = True
    return response


def _refuses_one_object(exc: Exception) -> bool:
    """A 4xx answer about the object itself (permission, encryption, an invalid request for it)."""
    status = _status(exc)
    if status is None or not 400 <= status < 500 or status in _STORE_STATUSES:
        return False
    return not (isinstance(exc, S3Error) and exc.code in _STORE_CODES)


def _is_transient(exc: Exception) -> bool:
    status = _status(exc)
    if status is not None:
        return status >= 500
    return isinstance(exc, _TRANSIENT)


class _ResponseStream:
    """The body of a GET, read as it arrives; a broken body is a `StorageError`, never retried (its start
    may have been passed on already)."""

    def __init__(self, response: aiohttp.ClientResponse, size: int, error: Callable[[Exception], StorageError]) -> None:
        self._response = response
        self.size = size
        self._error = error

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        remaining = self.size  # a body decoded by the client (Content-Encoding) could be longer
        try:
            async for chunk in self._response.content.iter_chunked(chunk_size):
                yield chunk[:remaining]
                remaining -= len(chunk)
                if remaining <= 0:
                    return
        except _SDK_ERRORS as exc:
            raise self._error(exc) from exc


async def _read_at_most(response: aiohttp.ClientResponse, limit: int | None) -> bytes:
    """The body, or its first `limit` bytes (a server may ignore the Range header)."""
    if limit is None:
        return await response.read()
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0 and (chunk := await response.content.read(remaining)):
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _unquote(etag: str | None) -> str:
    return (etag or "").strip('"')


def _listed_info(obj: Object) -> ObjectInfo | None:
    """The object's info, or None for a "directory" entry (a key ending in '/')."""
    name = obj.object_name
    if obj.is_dir or name is None or name.endswith("/"):
        return None
    return _info(name, obj)


def _info(key: str, obj: Object) -> ObjectInfo:
    modified = obj.last_modified
    if modified is None or obj.size is None:
        raise StorageError(f"incomplete metadata for {key!r} (no size or last-modified)")
    return ObjectInfo(key=key, etag=_unquote(obj.etag), size=obj.size, last_modified=_utc(modified))


def _response_info(key: str, headers: Mapping[str, str]) -> ObjectInfo:
    """The object's metadata from a GET's headers, as `stat` (a HEAD) reports it."""
    total = headers.get("Content-Range", "").rpartition("/")[2]  # a ranged GET: "bytes 0-9/1234"
    size = total if total.isdigit() else headers.get("Content-Length", "")
    try:
        modified = parsedate_to_datetime(headers["Last-Modified"])
    except (KeyError, TypeError, ValueError):
        modified = None
    if modified is None or not size.isdigit():
        raise StorageError(f"incomplete metadata for {key!r} (no size or last-modified)")
    return ObjectInfo(key=key, etag=_unquote(headers.get("ETag")), size=int(size), last_modified=_utc(modified))


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
