"""The project's own exception types; adapters translate SDK errors into these."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of every error the service raises on purpose."""


class ConfigError(ServiceError):
    """A setting is missing or malformed; the message names the variable."""


class StorageError(ServiceError):
    """The object store failed or could not be reached."""


class ObjectNotFound(StorageError):
    """The requested object does not exist."""


class InvalidKey(StorageError):
    """An object key that the store refuses (empty, absolute, or with `..` segments)."""


class BadRequest(ServiceError):
    """A client sent an invalid argument; the message names it and is safe to show."""


class NotReady(ServiceError):
    """No snapshot is loaded yet (the store has not been reachable since start-up)."""


class Unauthorized(ServiceError):
    """A protected operation was called without the right bearer token."""
