"""From a PUT to the user being served: bucket events (targeted runs) against the scheduled listing.

Starts SeaweedFS (`tests/s3server.py`) with its filer webhook pointed at the service, uploads `--users`
demo users, then runs `python -m service serve` twice on that bucket:

1. events: `EVENTS_TOKEN` set, no schedule. The filer posts the events of `src-data/live/` (only that
   folder: the bulk upload sends none) to `POST /events`; targeted runs apply them.
2. listing: a full run every minute (`SCHEDULE="* * * * *"`), for files written under
   `src-data/listed/`, of which the filer posts nothing.

In each, new users' CSVs are PUT at `--rates` files per second for a while. The time from each PUT's
answer to the service serving the user in `user(userId)` is measured: a `snapshots` subscription says
when a commit is served, and then the users still awaited are asked for, oldest first (20 aliases a
request); a user counts as visible at the answer that first shows it (an upper bound, by the query's
time). Only 127.0.0.1 is contacted; everything stops by itself.

    python bench/bench_events.py --users 50000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]

from _benchlib import machine_line, print_table  # noqa: E402
from s3server import SeaweedServer, free_ports  # noqa: E402

from service.demo import write_demo_data  # noqa: E402
from service.minio_store import MinioStore  # noqa: E402

BUCKET = "bench"
PREFIX = "src-data/"
LIVE, LISTED = "src-data/live/", "src-data/listed/"
TOKEN = secrets.token_hex(16)
ALIASES = 20  # the service's limit per request
NEVER = "0 0 1 1 *"


def csv_of(user_id: str) -> bytes:
    return f"first_name,last_name,birthts\nBench,{user_id},631152000000\n".encode()


class Service:
    """`python -m service serve` as a child process, its log in a file."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                cwd=_ROOT,
                env={**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(port)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def ready(self, http: aiohttp.ClientSession, deadline_s: float) -> None:
        """Until this process's start-up run is over (the shared run history names its replica)."""
        deadline = time.monotonic() + deadline_s
        query = {"query": "{ lastRun { trigger replica } }"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the service exited with {self.proc.returncode}; see {self.log}")
            try:
                async with http.post(self.base + "/graphql", json=query) as response:
                    last = ((await response.json()).get("data") or {}).get("lastRun") or {}
                if last.get("trigger") == "startup" and last.get("replica", "").endswith(f":{self.proc.pid}"):
                    return
            except (aiohttp.ClientError, ValueError):
                pass
            await asyncio.sleep(0.5)
        raise SystemExit(f"the service was not ready in {deadline_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class Watch:
    """Users awaited (user id -> when its PUT was answered) and how long each took to be served."""

    base: str
    awaited: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    served: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self, http: aiohttp.ClientSession) -> None:
        """Set `served` at every snapshot the service publishes (graphql-transport-ws)."""
        async with http.ws_connect(self.base + "/graphql", protocols=["graphql-transport-ws"]) as ws:
            await ws.send_json({"type": "connection_init", "payload": {}})
            await ws.receive_json()
            query = "subscription { snapshots { version users } }"
            await ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": query}})
            async for message in ws:
                if message.type is aiohttp.WSMsgType.TEXT and json.loads(message.data).get("type") == "next":
                    self.served.set()

    async def check(self, http: aiohttp.ClientSession) -> None:
        """After each served snapshot (or every second), ask for the users awaited, oldest PUT first,
        four requests of 20 at a time, until a round finds none served: commits serve users roughly in
        the order of their PUTs, and asking for thousands of users at every commit would load the
        service more than the events do."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.served.wait(), timeout=1.0)
            self.served.clear()
            waiting = list(self.awaited)
            batches = [waiting[i : i + ALIASES] for i in range(0, len(waiting), ALIASES)]
            for start in range(0, len(batches), 4):
                found = await asyncio.gather(*(self._ask(http, batch) for batch in batches[start : start + 4]))
                if not any(found):
                    break

    async def _ask(self, http: aiohttp.ClientSession, users: list[str]) -> int:
        """How many of `users` are served now; their latencies are recorded."""
        fields = " ".join(f'u{i}: user(userId: "{user}") {{ userId }}' for i, user in enumerate(users))
        async with http.post(self.base + "/graphql", json={"query": f"{{ {fields} }}"}) as response:
            body = await response.json()
        answered, found = time.monotonic(), 0
        for i, user in enumerate(users):
            if (body.get("data") or {}).get(f"u{i}") is not None and user in self.awaited:
                self.latencies.append(answered - self.awaited.pop(user))
                found += 1
        return found


@dataclass(frozen=True)
class Load:
    """New users' CSVs PUT under `folder` at `rate` a second for `seconds`; then up to `settle` seconds
    for the last of them to be served."""

    folder: str
    label: str
    rate: float
    seconds: float
    settle: float


@dataclass(frozen=True)
class Result:
    written: int
    latencies: list[float]
    missing: int  # never served within the settling time


async def write_at(store: MinioStore, watch: Watch, load: Load) -> int:
    """PUT at the load's rate, each on its own schedule (not after the previous one's answer)."""
    count = int(load.rate * load.seconds)
    began = time.monotonic()

    async def put(i: int) -> None:
        await asyncio.sleep(max(0.0, began + i / load.rate - time.monotonic()))
        user = f"{load.label}-{i:06d}"
        await store.put(f"{load.folder}{user}.csv", csv_of(user), "text/csv")
        watch.awaited[user] = time.monotonic()

    await asyncio.gather(*(put(i) for i in range(count)))
    return count


async def measure(service: Service, store: MinioStore, load: Load) -> Result:
    async with aiohttp.ClientSession() as http:
        watch = Watch(service.base)
        tasks = [asyncio.create_task(watch.follow(http)), asyncio.create_task(watch.check(http))]
        try:
            written = await write_at(store, watch, load)
            for _ in range(int(load.settle / 0.2)):
                if not watch.awaited:
                    break
                await asyncio.sleep(0.2)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return Result(written, watch.latencies, len(watch.awaited))


async def run_ids(service: Service) -> set[int]:
    return {int(str(run["runId"])) for run in await recent_runs(service)}


async def recent_runs(service: Service) -> list[dict[str, object]]:
    """This process's runs among the last 100 of the shared history."""
    query = "{ runs(limit: 100) { runId kind durationSeconds listed replica } }"
    async with (
        aiohttp.ClientSession() as http,
        http.post(service.base + "/graphql", json={"query": query}) as response,
    ):
        body = await response.json()
    suffix = f":{service.proc.pid}"
    return [run for run in body["data"]["runs"] if str(run["replica"]).endswith(suffix)]


async def runs_since(service: Service, before: set[int]) -> str:
    """The runs of a load: how many of each kind, their median duration and objects looked at."""
    runs = [run for run in await recent_runs(service) if int(str(run["runId"])) not in before]
    parts = []
    for kind in ("TARGETED", "FULL"):
        of_kind = [run for run in runs if run["kind"] == kind]
        if of_kind:
            seconds = statistics.median(float(str(run["durationSeconds"])) for run in of_kind)
            listed = statistics.median(int(str(run["listed"])) for run in of_kind)
            parts.append(f"{len(of_kind)} {kind.lower()}, median {seconds:.2f} s, {listed:,.0f} objects")
    return "; ".join(parts) or "none"


def row(path: str, load: Load, result: Result, runs: str) -> list[object]:
    seen = result.latencies or [float("nan")]
    cuts = statistics.quantiles(seen, n=100) if len(seen) > 1 else seen * 99
    return [path, load.rate, result.written, len(result.latencies), result.missing, cuts[49], cuts[98], max(seen), runs]


async def bench(args: argparse.Namespace, server: SeaweedServer, port: int, workdir: Path) -> None:
    store = server.store(BUCKET, timeout=60)
    try:
        began = time.monotonic()
        await write_demo_data(store, PREFIX, users=args.users, concurrency=args.upload_concurrency)
        print(f"uploaded {args.users:,} demo users (70% with an image) in {time.monotonic() - began:.1f} s")
        env = {
            "MINIO_ENDPOINT": server.endpoint, "MINIO_ACCESS_KEY": server.access_key,
            "MINIO_SECRET_KEY": server.secret_key, "BUCKET": BUCKET, "SRC_PREFIX": PREFIX,
        }  # fmt: skip
        rows: list[list[object]] = []
        events = Service({**env, "SCHEDULE": NEVER, "EVENTS_TOKEN": TOKEN}, port, workdir / "service-events.log")
        try:
            async with aiohttp.ClientSession() as http:
                began = time.monotonic()
                await events.ready(http, args.startup_deadline)
                print(f"service with events ready (first full run included) in {time.monotonic() - began:.1f} s")
            for rate in args.rates:
                before = await run_ids(events)
                load = Load(LIVE, f"e{rate:g}", rate, args.seconds, settle=60)
                result = await measure(events, store, load)
                rows.append(row("events (targeted runs)", load, result, await runs_since(events, before)))
        finally:
            events.stop()
        listing = Service({**env, "SCHEDULE": "* * * * *"}, port, workdir / "service-listing.log")
        try:
            async with aiohttp.ClientSession() as http:
                await listing.ready(http, args.startup_deadline)
            for rate in args.rates:
                before = await run_ids(listing)
                load = Load(LISTED, f"l{rate:g}", rate, args.listing_seconds, settle=150)
                result = await measure(listing, store, load)
                rows.append(row("listing every minute", load, result, await runs_since(listing, before)))
        finally:
            listing.stop()
        print_table(
            ["path", "files/s", "PUTs", "seen", "never seen", "p50 s", "p99 s", "max s", "runs"],
            rows,
            title=f"From a PUT's answer to user(userId) serving it, {args.users:,} users in the bucket:",
        )
    finally:
        await store.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50_000, help="demo users uploaded first")
    parser.add_argument("--rates", type=lambda s: [float(r) for r in s.split(",")], default=[50.0, 200.0])
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of writes per rate, events path")
    parser.add_argument("--listing-seconds", type=float, default=60.0, help="the same for the listing path")
    parser.add_argument("--upload-concurrency", type=int, default=64)
    parser.add_argument("--startup-deadline", type=float, default=600.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(machine_line())
    (port,) = free_ports(1)
    notification = (
        f'[notification.webhook]\nenabled = true\nendpoint = "http://127.0.0.1:{port}/events"\n'
        f'bearer_token = "{TOKEN}"\npath_prefixes = ["/buckets/{BUCKET}/{LIVE}"]\nworkers = 5\n'
    )
    with SeaweedServer(notification=notification) as server:
        asyncio.run(bench(args, server, port, server.root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
