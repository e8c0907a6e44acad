"""What the fault and replica tests share: numbered users and their objects, a fault-injecting TCP
proxy in front of the S3 server, and `python -m service` as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import random
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.aggregator import Aggregator
from service.storage import ObjectStore

ROOT = Path(__file__).resolve().parents[1]
SRC = "src-data/"
OUTPUT = "processed_data/output.csv"
MANIFEST = OUTPUT + ".manifest"
NEVER = "0 0 1 1 *"  # the schedule stays out of the way unless a test wants it
BIRTH_BASE_MS = 315_532_800_000  # 1980-01-01
DAY_MS = 86_400_000


# -- data --------------------------------------------------------------------------------------


def numbered_csv(user_id: int, version: int = 0) -> bytes:
    birthts = BIRTH_BASE_MS + (user_id % 9000) * DAY_MS + version
    return f"first_name,last_name,birthts\nFirst{user_id}v{version},Last{user_id},{birthts}\n".encode()


def user_objects(ids: range | list[int], version: int = 0, *, images: bool = True) -> dict[str, bytes]:
    """Each user's CSV and, for every third user, an image."""
    objects: dict[str, bytes] = {}
    for user_id in ids:
        objects[f"{SRC}{user_id}.csv"] = numbered_csv(user_id, version)
        if images and user_id % 3 == 0:
            objects[f"{SRC}img/{user_id}.png"] = b"\x89PNG fake " + str(user_id).encode()
    return objects


async def put_all(store: ObjectStore, objects: dict[str, bytes], concurrency: int = 64) -> None:
    semaphore = asyncio.Semaphore(concurrency)

    async def put(key: str, data: bytes) -> None:
        async with semaphore:
            await store.put(key, data)

    await asyncio.gather(*(put(key, data) for key, data in objects.items()))


async def delete_all(store: ObjectStore, keys: list[str]) -> None:
    semaphore = asyncio.Semaphore(64)

    async def delete(key: str) -> None:
        async with semaphore:
            await store.delete(key)

    await asyncio.gather(*(delete(key) for key in keys))


async def change_some(store: ObjectStore, ids: set[int], rng: random.Random, count: int) -> set[int]:
    """Overwrite `count` users, delete `count // 4` and add `count // 4` new ones; returns the new id set."""
    existing = sorted(ids)
    overwritten = rng.sample(existing, count)
    deleted = rng.sample(sorted(ids - set(overwritten)), count // 4)
    added = list(range(max(ids) + 1, max(ids) + 1 + count // 4))
    await put_all(store, {**user_objects(overwritten, version=1), **user_objects(added)})
    await delete_all(store, [f"{SRC}{user_id}.csv" for user_id in deleted])
    return (ids - set(deleted)) | set(added)


def output_ids(data: bytes) -> list[str]:
    rows = list(csv.reader(io.StringIO(data.decode())))
    assert rows[0] == ["user_id", "first_name", "last_name", "birthts", "img_path"]
    return [row[0] for row in rows[1:]]


async def rebuild(store: ObjectStore, key: str) -> bytes:
    """A from-scratch rebuild by a fresh aggregator into another output key."""
    aggregator = Aggregator(store, src_prefix=SRC, output_key=key, concurrency=64)
    result = await aggregator.run()
    assert result.report.full_rebuild
    return await store.get(key)


# -- a fault-injecting TCP proxy ---------------------------------------------------------------

_REQUEST_LINE = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) (/\S*) HTTP/1\.[01]\r\n")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string


class FaultProxy:
    """Forwards 127.0.0.1:<port> to the S3 server, chunk by chunk, with switches for faults.

    `delay`: seconds to wait before forwarding each chunk (both directions). `blackhole`: accept and
    read, never forward or answer. `drop_connections()`: reset every open connection. `hold`: a
    request it matches is never forwarded (its connection hangs) and `held` is set. Requests seen
    are recorded from their request lines; `on_request` is called before one is forwarded.
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.delay = 0.0
        self.blackhole = False
        self.hold: Callable[[Request], bool] | None = None
        self.held = asyncio.Event()
        self.on_request: Callable[[Request], None] | None = None
        self.requests: list[Request] = []
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    def count(self, method: str, path_prefix: str) -> int:
        return sum(1 for r in self.requests if r.method == method and r.path.startswith(path_prefix))

    def drop_connections(self) -> None:
        for transport in list(self._transports):
            transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._transports.add(writer.transport)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.blackhole:
                while await reader.read(65536):
                    pass
                return
            up_reader, upstream = await asyncio.open_connection(*self._target)
            self._transports.add(upstream.transport)
            pipes = [
                asyncio.ensure_future(self._pipe(reader, upstream, from_client=True)),
                asyncio.ensure_future(self._pipe(up_reader, writer, from_client=False)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except OSError:
            pass
        finally:
            for side in (writer, upstream):
                if side is not None:
                    side.transport.abort()
                    self._transports.discard(side.transport)
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                if from_client:
                    for match in _REQUEST_LINE.finditer(chunk):
                        request = Request(match[1].decode(), match[2].decode().partition("?")[0])
                        self.requests.append(request)
                        if self.on_request is not None:
                            self.on_request(request)
                        if self.hold is not None and self.hold(request):
                            self.held.set()
                            await asyncio.Event().wait()  # never forwarded; cancelled on close
                if self.blackhole:
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(chunk)
                await writer.drain()


class Service:
    """`python -m service ...` as a subprocess, with its output in files."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, args: list[str], env: dict[str, str], log: Path) -> Service:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "API_TOKEN"))}
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service", *args,
                cwd=ROOT, env=base | env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        return cls(proc, log)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def wait(self, within: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), within)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def close(self) -> None:
        self.kill()
        await self.proc.wait()
