"""Shared fixtures: one SeaweedFS S3 server per session, and stores on fresh buckets per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from s3server import BucketPool, SeaweedServer

from service.local_store import LocalStore
from service.minio_store import MinioStore
from service.storage import ObjectStore


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedServer]:
    """A real S3 server for the whole session, started only when an `s3` test needs it."""
    server = SeaweedServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweed_buckets(seaweed: SeaweedServer) -> BucketPool:
    return BucketPool(seaweed)


@pytest.fixture
async def minio_store(seaweed: SeaweedServer, seaweed_buckets: BucketPool) -> AsyncIterator[MinioStore]:
    """A `MinioStore` on a fresh, empty bucket of its own."""
    store = seaweed.store(await seaweed_buckets.take())
    try:
        await store.ensure_bucket()
        yield store
    finally:
        await store.close()


@pytest.fixture
async def local_store(tmp_path: Path) -> AsyncIterator[LocalStore]:
    store = LocalStore(tmp_path / "data", "bucket")
    await store.ensure_bucket()
    yield store
    await store.close()


@pytest.fixture(
    params=[
        pytest.param("local_store", id="local"),
        pytest.param("minio_store", id="s3", marks=pytest.mark.s3),
    ]
)
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each storage adapter in turn, for the contract tests."""
    adapter: ObjectStore = request.getfixturevalue(request.param)
    return adapter


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever needs the server is an `s3` test, so `-m "not s3"` never starts it.
    for item in items:
        if "seaweed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)
