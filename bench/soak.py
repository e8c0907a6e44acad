"""Soak test: the real service under steady mixed load while its source files keep changing.

1. `python -m service demo-data --users N` into a temporary DATA_DIR (the embedded local store).
2. `python -m service serve` as a subprocess on 127.0.0.1 (a free port), SCHEDULE="*/5 * * * * *":
   a run every 5 seconds (cronsim reads a 6-field expression as seconds first).
3. Once the start-up run has finished, this process is the client: it sends a mix of GraphQL and REST
   queries at a steady rate (open loop: request k is sent at start + k / rate, whatever the answers
   do) for `--duration` seconds, while a background task changes source files every second
   (overwrites, adds and deletes a few CSVs and images, with atomic writes).
4. Reported per `--window` seconds: requests, errors (non-2xx or a GraphQL `errors` entry), latency
   p50/p99/max, aggregation runs that finished in the window and the server's RSS
   (/proc/<pid>/status VmRSS); then RSS at the start and the end, the runs, a final consistency check
   (after the changes stop, one more run: /stats count equals the users the script knows exist), the
   server log's warnings/errors and the server's exit code after SIGTERM.

Bounded: the whole script stops by itself (start-up has its own deadline) and always stops the server.

    python bench/soak.py                      # 200 req/s for 180 s, 20,000 users
    python bench/soak.py --rate 50 --duration 30 --window 10 --users 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from service.demo import demo_objects, tiny_png
from service.local_store import LocalStore

REPO = Path(__file__).resolve().parent.parent
BUCKET = "datalake"
PREFIX = "src-data/"
SCHEDULE = "*/5 * * * * *"
FIRST_ID = 1000  # service.demo numbers users from here
MAX_IN_FLIGHT = 400  # the client never holds more requests than this; beyond, a send is skipped
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the server process ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int, field_name: str = "VmRSS") -> int | None:
    """A memory figure of /proc/<pid>/status in KiB (VmRSS now, VmHWM the peak), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of the process so far (/proc/<pid>/stat), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.0f} MiB"


class Server:
    """`python -m service serve` with its log in a file."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "API_TOKEN"))}
        env |= {"DATA_DIR": str(data_dir), "PORT": str(port), "HOST": "127.0.0.1", "SCHEDULE": SCHEDULE}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the script only; the script stops the server
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 15.0) -> str:
        """SIGTERM, then SIGKILL after `grace` seconds; returns how it ended."""
        if self.proc.poll() is not None:
            return f"had already exited with {self.proc.returncode}"
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"did not exit {grace:.0f}s after SIGTERM: killed"
        return f"exited with {code} {time.monotonic() - began:.1f}s after SIGTERM"


async def wait_started(http: aiohttp.ClientSession, server: Server, users: int, deadline: float) -> None:
    """Until /readyz is 200 with every demo user loaded by a finished run."""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"the server exited with {server.proc.returncode}; see {server.log}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(server.base + "/readyz") as response:
                if response.status == 200 and (await response.json())["users"] == users:
                    return
        await asyncio.sleep(0.2)
    raise SystemExit(f"the server was not ready with {users} users in time; see {server.log}")


# -- the changing source -----------------------------------------------------------------------


@dataclass
class Source:
    """What the script knows is in the bucket, and the changes it made."""

    store: LocalStore
    users: set[int]  # ids with a (valid) CSV
    images: set[int]  # ids with an image
    churn: list[int]  # the ids the changer may touch (queries never ask for these by id)
    next_id: int
    rng: random.Random
    changes: Counter[str] = field(default_factory=Counter)

    @staticmethod
    def csv_for(user_id: int, version: int) -> bytes:
        birthts = 315_532_800_000 + (user_id * 7_919 % 10_000) * 86_400_000  # 1980 + up to 27 years
        return f"first_name, last_name, birthts\nSoak{version}, User{user_id}, {birthts}\n".encode()

    async def tick(self, tick: int) -> None:
        """Overwrite 3 CSVs and 1 image, add 2 users (with images), delete 2 users."""
        present = sorted(set(self.churn) & self.users)
        for user_id in self.rng.sample(present, min(3, len(present))):
            await self.store.put(f"{PREFIX}{user_id}.csv", self.csv_for(user_id, tick))
            self.changes["csv overwritten"] += 1
        with_image = sorted(set(self.churn) & self.images)
        for user_id in self.rng.sample(with_image, min(1, len(with_image))):
            await self.store.put(f"{PREFIX}{user_id}.png", tiny_png(user_id + tick))
            self.changes["image overwritten"] += 1
        for _ in range(2):
            user_id, self.next_id = self.next_id, self.next_id + 1
            await self.store.put(f"{PREFIX}{user_id}.csv", self.csv_for(user_id, tick))
            await self.store.put(f"{PREFIX}{user_id}.png", tiny_png(user_id))
            self.users.add(user_id)
            self.images.add(user_id)
            self.churn.append(user_id)
            self.changes["user added"] += 1
        present = sorted(set(self.churn) & self.users)
        for user_id in self.rng.sample(present, min(2, len(present))):
            await self.store.delete(f"{PREFIX}{user_id}.csv")
            await self.store.delete(f"{PREFIX}{user_id}.png")
            self.users.discard(user_id)
            self.images.discard(user_id)
            self.changes["user deleted"] += 1


async def keep_changing(source: Source, stop: asyncio.Event) -> None:
    for tick in itertools.count(1):
        await source.tick(tick)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        if stop.is_set():
            return


# -- the load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    name: str
    method: str
    path: str
    body: dict[str, Any] | None = None  # a GraphQL request


def ages(rng: random.Random) -> tuple[int, int]:
    low = rng.randrange(10, 80)
    return low, low + rng.randrange(0, 3)


def make_calls(rng: random.Random, stable_ids: list[int], image_ids: list[int]) -> Callable[[], Call]:
    """A weighted mix of operations with random arguments."""

    def gql(name: str, query: str) -> Call:
        return Call(name, "POST", "/graphql", {"query": query})

    def gql_stats() -> Call:
        low, high = ages(rng)
        image = rng.choice(["", "isImageExists: true, ", "isImageExists: false, "])
        return gql("gql stats", f"{{ stats(filter: {{{image}minAge: {low}, maxAge: {high}}}) {{ count averageAge }} }}")

    def gql_users() -> Call:
        low, high = ages(rng)
        query = f"{{ users(filter: {{minAge: {low}, maxAge: {high}}}, limit: 20, offset: {rng.randrange(50)}) "
        return gql("gql users", query + "{ userId firstName age imgPath imageUrl } }")

    def gql_user() -> Call:
        return gql("gql user", f'{{ user(userId: "{rng.choice(stable_ids)}") {{ userId lastName birthDate age }} }}')

    def gql_last_run() -> Call:
        return gql("gql lastRun", "{ lastRun { id outcome durationSeconds users rejected { key } } }")

    def rest_stats() -> Call:
        low, high = ages(rng)
        return Call("rest stats", "GET", f"/stats?min_age={low}&max_age={high}&is_image_exists={rng.choice('01')}")

    def rest_data() -> Call:
        low = rng.randrange(10, 80)
        return Call("rest data", "GET", f"/data?min_age={low}&max_age={low}")

    def rest_image() -> Call:
        return Call("rest image", "GET", f"/images/{rng.choice(image_ids)}")

    def readyz() -> Call:
        return Call("readyz", "GET", "/readyz")

    mix: list[tuple[Callable[[], Call], int]] = [
        (gql_stats, 25), (gql_users, 20), (gql_user, 15), (gql_last_run, 5),
        (rest_stats, 15), (rest_data, 10), (rest_image, 8), (readyz, 2),
    ]  # fmt: skip
    makers = [maker for maker, _ in mix]
    weights = [weight for _, weight in mix]

    def next_call() -> Call:
        return rng.choices(makers, weights)[0]()

    return next_call


@dataclass
class Window:
    latencies: list[float] = field(default_factory=list)  # seconds, successful or not
    errors: Counter[str] = field(default_factory=Counter)
    by_call: dict[str, list[float]] = field(default_factory=dict)
    skipped: int = 0
    rss_end: int | None = None
    cpu_end: float | None = None  # the server's CPU seconds when the window closed
    client_cpu_end: float = 0.0  # this process's CPU seconds when the window closed

    def close(self, pid: int) -> None:
        self.rss_end, self.cpu_end = rss_kib(pid), cpu_seconds(pid)
        self.client_cpu_end = time.process_time()

    @property
    def requests(self) -> int:
        return len(self.latencies)


async def send(http: aiohttp.ClientSession, base: str, call: Call, window: Window) -> None:
    began = time.perf_counter()
    error: str | None = None
    try:
        async with http.request(call.method, base + call.path, json=call.body) as response:
            data = await response.read()
            if not 200 <= response.status < 300:
                error = f"{call.name}: HTTP {response.status}"
            elif call.body is not None:
                errors = json.loads(data).get("errors")
                if errors:
                    error = f"{call.name}: GraphQL {errors[0].get('message', '')[:80]}"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        error = f"{call.name}: {type(exc).__name__}"
    took = time.perf_counter() - began
    window.latencies.append(took)
    window.by_call.setdefault(call.name, []).append(took)
    if error is not None:
        window.errors[error] += 1


async def load(
    http: aiohttp.ClientSession,
    server: Server,
    next_call: Callable[[], Call],
    *,
    rate: float,
    duration: float,
    window_seconds: float,
) -> tuple[tuple[float | None, float], list[Window]]:
    """Send request k at start + k / rate until `duration`; group results by the window they were sent in."""
    loop = asyncio.get_running_loop()
    count = max(1, int(duration / window_seconds + 0.999))
    windows = [Window() for _ in range(count)]
    in_flight: set[asyncio.Task[None]] = set()
    start = loop.time()
    closed = 0
    cpu_start = cpu_seconds(server.pid)
    client_cpu_start = time.process_time()

    for k in itertools.count():
        due = start + k / rate
        if due - start >= duration:
            break
        index = int((due - start) // window_seconds)
        while closed < index:  # a window ended: note the server's RSS and CPU time
            windows[closed].close(server.pid)
            closed += 1
        if (wait := due - loop.time()) > 0:
            await asyncio.sleep(wait)
        if len(in_flight) >= MAX_IN_FLIGHT:
            windows[index].skipped += 1
            continue
        task = asyncio.create_task(send(http, server.base, next_call(), windows[index]))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=30.0)
    for task in in_flight:
        task.cancel()
    while closed < count:
        windows[closed].close(server.pid)
        closed += 1
    return (cpu_start, client_cpu_start), windows


# -- the report --------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def report(
    windows: list[Window],
    runs: list[dict[str, Any]],
    *,
    window_seconds: float,
    wall_start: float,
    cpu_start: float | None,
    client_cpu_start: float,
    rss_start: int | None,
    rss_end: int | None,
    rss_peak: int | None,
) -> None:
    """The per-window table, the per-operation latencies, RSS and runs."""
    print()
    header = (
        f"{'window':>11} {'requests':>8} {'req/s':>6} {'errors':>6} {'skipped':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'CPU':>5} {'client':>6} {'runs':>4} {'run p50 s':>9} {'run max s':>9} {'RSS':>8}"
    )
    print(header)
    print("-" * len(header))
    totals = Window()
    cpu_before, client_before = cpu_start, client_cpu_start
    for i, window in enumerate(windows):
        low, high = i * window_seconds, (i + 1) * window_seconds
        finished = [r for r in runs if low <= parse_time(r["finishedAt"]) - wall_start < high]
        durations = [float(r["durationSeconds"]) for r in finished]
        cpu = "?"
        if cpu_before is not None and window.cpu_end is not None:
            cpu = f"{(window.cpu_end - cpu_before) / window_seconds * 100:.0f}%"
        cpu_before = window.cpu_end
        client = f"{(window.client_cpu_end - client_before) / window_seconds * 100:.0f}%"
        client_before = window.client_cpu_end
        lat = window.latencies
        print(
            f"{f'{low:.0f}-{high:.0f}s':>11} {window.requests:>8} {window.requests / window_seconds:>6.1f} "
            f"{sum(window.errors.values()):>6} {window.skipped:>7} {percentile(lat, 0.5) * 1000:>7.1f} "
            f"{percentile(lat, 0.99) * 1000:>7.1f} {max(lat, default=float('nan')) * 1000:>7.1f} {cpu:>5} {client:>6} "
            f"{len(finished):>4} {percentile(durations, 0.5):>9.2f} {max(durations, default=float('nan')):>9.2f} "
            f"{mib(window.rss_end):>8}"
        )
        totals.latencies += lat
        totals.errors += window.errors
        totals.skipped += window.skipped
        for name, values in window.by_call.items():
            totals.by_call.setdefault(name, []).extend(values)
    lat = totals.latencies
    print("-" * len(header))
    print(
        f"{'all':>11} {totals.requests:>8} {totals.requests / (window_seconds * len(windows)):>6.1f} "
        f"{sum(totals.errors.values()):>6} {totals.skipped:>7} {percentile(lat, 0.5) * 1000:>7.1f} "
        f"{percentile(lat, 0.99) * 1000:>7.1f} {max(lat, default=float('nan')) * 1000:>7.1f}"
    )
    print(f"(CPU: the server's, client: this script's, in % of one core; skipped: sends not made because "
          f"the client already had {MAX_IN_FLIGHT} requests in flight)")  # fmt: skip
    for error, count in totals.errors.most_common(10):
        print(f"  error x{count}: {error}")
    print("\nper operation:        count  p50 ms  p99 ms  max ms")
    for name, values in sorted(totals.by_call.items()):
        print(
            f"  {name:<18} {len(values):>7} {percentile(values, 0.5) * 1000:>7.1f} "
            f"{percentile(values, 0.99) * 1000:>7.1f} {max(values) * 1000:>7.1f}"
        )
    print(f"\nserver RSS: {mib(rss_start)} at the start, {mib(rss_end)} at the end (peak VmHWM {mib(rss_peak)})")
    outcomes = Counter(r["outcome"] for r in runs)
    durations = [float(r["durationSeconds"]) for r in runs]
    print(
        f"runs during the load: {len(runs)} ({', '.join(f'{k.lower()} {v}' for k, v in sorted(outcomes.items()))}); "
        f"duration p50 {percentile(durations, 0.5):.2f}s, max {max(durations, default=float('nan')):.2f}s"
    )
    for failed in [r for r in runs if r["outcome"] != "SUCCEEDED"][:5]:
        print(f"  failed run {failed['id']}: {failed['error']}")


def log_summary(log: Path) -> None:
    text = log.read_text(errors="replace")
    levels = Counter(m[1] for m in re.finditer(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ", text, re.MULTILINE))
    tracebacks = text.count("Traceback (most recent call last)")
    print(f"server log: {dict(levels) or 'no warnings or errors'}, {tracebacks} tracebacks")
    # The access log's own timing: from the handler's start to the response, without the time a request
    # waited for the event loop (the client's latency minus this is queueing).
    handled = [float(m[1]) / 1000 for m in re.finditer(r"aiohttp\.access: \S+ \S+ \d+ ([\d.]+)ms$", text, re.MULTILINE)]
    if handled:
        print(
            f"server-side handler time ({len(handled)} requests): p50 {percentile(handled, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(handled, 0.99) * 1000:.1f} ms, max {max(handled) * 1000:.1f} ms"
        )
    for line in [ln for ln in text.splitlines() if re.match(r"^\S+ \S+ (ERROR|CRITICAL) ", ln)][:5]:
        print(f"  {line[:200]}")


# -- main --------------------------------------------------------------------------------------


async def graphql(http: aiohttp.ClientSession, base: str, query: str) -> dict[str, Any]:
    async with http.post(base + "/graphql", json={"query": query}) as response:
        body: dict[str, Any] = await response.json()
    if body.get("errors"):
        raise RuntimeError(f"GraphQL error: {body['errors']}")
    data: dict[str, Any] = body["data"]
    return data


def write_demo_data(args: argparse.Namespace, data_dir: Path) -> None:
    began = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "API_TOKEN"))}
    demo = [sys.executable, "-m", "service", "demo-data", "--users", str(args.users), "--seed", str(args.seed)]
    subprocess.run(demo, cwd=REPO, env=env | {"DATA_DIR": str(data_dir)}, check=True, timeout=600)
    print(f"demo data: {args.users} users written in {time.monotonic() - began:.1f}s", flush=True)


async def soak(args: argparse.Namespace, data_dir: Path, began: float) -> None:
    names = [name for name, _ in demo_objects(args.users, 0.7, args.seed)]
    all_ids = list(range(FIRST_ID, FIRST_ID + args.users))
    images = {int(name.split(".")[0]) for name in names if name.endswith(".png")}
    churn = all_ids[-max(50, args.users // 10) :]  # the changer's ids; queries by id use the others
    stable = [i for i in all_ids if i not in set(churn)]
    rng = random.Random(args.seed)
    source = Source(
        LocalStore(data_dir, BUCKET), set(all_ids), images, list(churn), FIRST_ID + args.users, random.Random(1)
    )
    next_call = make_calls(rng, stable, sorted(images - set(churn)))

    server = Server(data_dir, free_port(), data_dir / "serve.log")
    stop = asyncio.Event()
    changer: asyncio.Task[None] | None = None
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=200)) as http:
            await wait_started(http, server, args.users, time.monotonic() + args.startup_timeout)
            print(f"server pid {server.pid} ready on {server.base} after {time.monotonic() - began:.1f}s")
            rss_start = rss_kib(server.pid)
            wall_start = time.time()
            changer = asyncio.create_task(keep_changing(source, stop))
            print(
                f"load: {args.rate:g} req/s for {args.duration:g}s, windows of {args.window:g}s; "
                f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} ...",
                flush=True,
            )
            (cpu_start, client_cpu_start), windows = await load(
                http, server, next_call, rate=args.rate, duration=args.duration, window_seconds=args.window
            )
            rss_end, rss_peak = rss_kib(server.pid), rss_kib(server.pid, "VmHWM")
            stop.set()
            await changer
            fields = "id trigger outcome error startedAt finishedAt durationSeconds users"
            runs = [
                r
                for r in (await graphql(http, server.base, f"{{ runs(limit: 100) {{ {fields} }} }}"))["runs"]
                if parse_time(r["startedAt"]) >= wall_start
            ]
            report(
                windows, runs, window_seconds=args.window, wall_start=wall_start,
                cpu_start=cpu_start, client_cpu_start=client_cpu_start,
                rss_start=rss_start, rss_end=rss_end, rss_peak=rss_peak,
            )  # fmt: skip
            print(f"source changes: {dict(source.changes)}")
            # With the changes stopped, one more run must show exactly the users the script knows of.
            final = await graphql(http, server.base, "mutation { reprocess { outcome users } }")
            count = (await graphql(http, server.base, "{ stats { count } }"))["stats"]["count"]
            verdict = "OK" if count == len(source.users) == final["reprocess"]["users"] else "MISMATCH"
            print(f"final check: run {final['reprocess']['outcome']}, /stats count {count}, expected "
                  f"{len(source.users)}: {verdict}")  # fmt: skip
    finally:
        stop.set()
        if changer is not None and not changer.done():
            changer.cancel()
            await asyncio.gather(changer, return_exceptions=True)
        print(f"server {server.stop()}")
        log_summary(server.log)
    print(f"total {time.monotonic() - began:.0f}s; load average now {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    parser.add_argument("--window", type=float, default=60.0, help="report window in seconds (default 60)")
    parser.add_argument("--users", type=int, default=20_000, help="demo users (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and the server log")
    args = parser.parse_args()
    if args.rate <= 0 or args.duration <= 0 or args.window <= 0 or args.users < 1:
        parser.error("--rate, --duration, --window and --users must be positive")
    began = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="soak-")
    try:
        write_demo_data(args, Path(tmp))
        asyncio.run(soak(args, Path(tmp), began))
    finally:
        if args.keep:
            print(f"kept {tmp} (the server log is serve.log there)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
