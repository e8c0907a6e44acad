"""Shared fixtures: one SeaweedFS S3 server per session, stores on fresh buckets per test, and a store
with thousands of rejected files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from s3server import BucketPool, SeaweedServer
from support import NEVER, ClientFactory, seed, wait_ready

from service.app import create_app
from service.config import Settings
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


# Drops CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2) from the bounding set (PR_CAPBSET_DROP, 24),
# then execs the command: it runs as root still, so the interpreter under root's home stays usable, but
# without the capabilities that let root read and search any file whatever its mode.
_OBEY_FILE_MODES = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):
    if libc.prctl(24, capability, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
os.execv(sys.argv[1], sys.argv[1:])
"""
Command = list[str]


@pytest.fixture(scope="session")
def obeying_file_modes(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Command], Command]:
    """Wraps a command so that it runs with file modes enforced, even when the tests run as root.

    A file of mode 000 is what makes a local file unreadable, and root reads it anyway. Skips only when
    neither the current user nor the wrapper is refused such a file.
    """

    def wrap(command: Command) -> Command:
        return command if os.geteuid() != 0 else [sys.executable, "-c", _OBEY_FILE_MODES, *command]

    probe = tmp_path_factory.mktemp("modes") / "mode-000"
    probe.write_bytes(b"x")
    probe.chmod(0)
    check = wrap([sys.executable, "-c", f"open({str(probe)!r}, 'rb')"])
    result = subprocess.run(check, capture_output=True, text=True, check=False, timeout=60)
    if "PermissionError" not in result.stderr:
        pytest.skip(f"no process here is refused a file of mode 000: {result.stderr[-500:]}")
    return wrap


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


MANY_REJECTED = 3_000  # enough for per-file costs to show, few enough for a fast test
BAD_CSV = b"first_name\nonly\n"
BAD_REASON = "header lacks last_name, birthts (found: first_name)"


@dataclass(frozen=True)
class ManyRejected:
    """An embedded store (`DATA_DIR`, bucket `datalake`) with one valid user file and many bad ones."""

    data_dir: Path
    store: LocalStore
    keys: list[str]  # the bad files, ordered by key
    reason: str  # why each of them is rejected


@pytest.fixture
async def many_rejected(tmp_path: Path) -> ManyRejected:
    store = LocalStore(tmp_path, "datalake")
    await store.ensure_bucket()
    await store.put("src-data/1.csv", b"first_name,last_name,birthts\nA,B,1\n")
    keys = [f"src-data/bad/{i:05d}.csv" for i in range(MANY_REJECTED)]
    await asyncio.to_thread(_write_files, tmp_path / "datalake", keys, BAD_CSV)
    return ManyRejected(tmp_path, store, keys, BAD_REASON)


def _write_files(root: Path, keys: Iterable[str], data: bytes) -> None:
    for key in keys:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# -- the app over HTTP, on the embedded store seeded with `support.PEOPLE` ---------------------------


@pytest.fixture
async def local(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path, "datalake")
    await seed(store)
    return store


@pytest.fixture
def settings() -> Settings:
    return Settings(schedule=NEVER, max_page_size=5)


@pytest.fixture
async def client(aiohttp_client: ClientFactory, local: LocalStore, settings: Settings) -> TestClient[Any, Any]:
    client = await aiohttp_client(create_app(settings, store=local))
    await wait_ready(client)
    return client
