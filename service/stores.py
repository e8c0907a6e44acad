"""Choosing the object-store adapter from the settings."""

from __future__ import annotations

from .config import Settings
from .local_store import LocalStore
from .storage import ObjectStore


def open_store(settings: Settings) -> ObjectStore:
    """MinIO when `MINIO_ENDPOINT` is set, else the embedded local store under `DATA_DIR`."""
    if settings.minio_endpoint is None:
        return LocalStore(settings.data_dir, settings.bucket)
    from .minio_store import MinioStore  # imported only when configured

    return MinioStore(
        settings.minio_endpoint,
        settings.minio_access_key or "",
        settings.minio_secret_key or "",
        settings.bucket,
        secure=settings.minio_secure,
        timeout=settings.minio_timeout,
        retries=settings.minio_retries,
    )
