"""The project's own exception types; adapters translate SDK errors into these."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of every error the service raises on purpose."""


class ConfigError(ServiceError):
    """A setting is missing or malformed; the message names the variable."""


class StorageError(ServiceError):
    """The object store failed or could not be reached.

    The message names the operation, the key (relative to the bucket) and the kind of failure: it goes
    into run reports, which the API shows to anyone. `where` it failed (the endpoint, a file's absolute
    path, the SDK's own text) is for the service log only.
    """

    def __init__(self, message: str, *, where: str = "") -> None:
        super().__init__(message)
        self.where = where

    def for_log(self) -> str:
        """The message, with where it happened when known."""
        return f"{self} [{self.where}]" if self.where else str(self)


class ObjectNotFound(StorageError):
    """The requested object does not exist."""


class ObjectUnreadable(StorageError):
    """The store refuses this one object (no permission, encrypted with a key we lack, a 4xx on its key).

    Other objects may read fine: a run rejects this file and goes on, unlike a failure of the store.
    """


class PreconditionFailed(StorageError):
    """A conditional write found the object not as required (another ETag, present or absent): nothing
    was written. Read the object again and decide anew; retrying the same write cannot succeed."""


class InvalidKey(StorageError):
    """An object key that the store refuses (empty, absolute, or with `..` segments)."""


class BadRequest(ServiceError):
    """A client sent an invalid argument; the message names it and is safe to show."""


class NotReady(ServiceError):
    """No snapshot is loaded yet (the store has not been reachable since start-up)."""


class Unauthorized(ServiceError):
    """A protected operation was called without the right bearer token."""
