"""Query throughput and latency: the service (S) against a per-request pandas baseline (a) and a ceiling (b).

Three servers run as subprocesses of this script on 127.0.0.1 (free ports); this process is the load
generator (one aiohttp ClientSession with keep-alive, `--concurrency` workers). Servers are measured one at
a time while the other two sit idle.

  (S) `python -m service serve` with DATA_DIR=<tmp>, PORT, HOST=127.0.0.1, SCHEDULE far away, after
      `python -m service demo-data --users N`; measured once /readyz is 200 and the start-up run finished.
  (a) bench/_baseline_app.py: Strawberry + aiohttp, sync resolvers doing pd.read_csv of the service's
      DATA_DIR/datalake/processed_data/output.csv and pandas filtering on every request.
  (b) bench/_ceiling_app.py: the service's own Strawberry types, schema class, extensions and config
      with constant resolvers (see that file for exactly what is shared).

Each (server, operation): warm-up, then `--duration` seconds (or `--requests` requests, capped by
`--max-seconds`); `--rounds N` cuts that budget into N slices measured in turn with the other rows. Reported:
req/s (successful requests / wall time), p50/p99 latency, server CPU per request (from /proc: capacity per
core, less sensitive than req/s to the client's share of the CPUs and to other load), the CPU used by the
server, by this client and by every other process meanwhile; then the ratios against the goals (by req/s
and by server CPU per request) and the service's RSS. The machine's CPUs are shared by client and server.

    python bench/bench_queries.py --users 100000 --concurrency 8 --duration 10

`--data-dir DIR` keeps (and reuses) the demo data; `--service-src DIR` runs (S) and (b) with the `service`
package of another directory, e.g. a scratch copy with a proposed change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
FAR_SCHEDULE = "0 0 1 1 *"  # once a year: no scheduled run during the benchmark
MARKER = ".bench-queries-users"  # in a reused --data-dir: how many demo users were written there
CLK_TCK = os.sysconf("SC_CLK_TCK")
JSON_HEADERS = {"Content-Type": "application/json"}

STATS_QUERY = "query { stats(filter: {isImageExists: true, minAge: 20, maxAge: 60}) { count averageAge } }"
USERS_QUERY = "query { users(filter: {minAge: 20}, limit: 100) { userId firstName lastName birthts age imgPath } }"
REST_STATS = "/stats?is_image_exists=true&min_age=20&max_age=60"


@dataclass(frozen=True)
class Operation:
    name: str
    method: str
    path: str
    body: bytes | None = None  # a GraphQL POST body; None for REST GET

    @property
    def is_graphql(self) -> bool:
        return self.body is not None


OPERATIONS = (
    Operation("graphql stats", "POST", "/graphql", json.dumps({"query": STATS_QUERY}).encode()),
    Operation("graphql users", "POST", "/graphql", json.dumps({"query": USERS_QUERY}).encode()),
    Operation("rest /stats", "GET", REST_STATS),
)
STATS_OP, USERS_OP, REST_OP = OPERATIONS


@dataclass
class Server:
    key: str  # "S", "a" or "b"
    label: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"({self.key}) {self.label}"


@dataclass
class Measurement:
    server: str
    operation: str
    requests: int
    errors: int
    seconds: float
    server_cpu: float  # seconds of server CPU during the measured window
    client_cpu: float  # seconds of this process's CPU during the measured window
    other_cpu: float  # seconds of CPU used by every other process on the machine meanwhile
    latencies_ms: list[float] = field(repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of successful requests' latencies, in ms (nan without any)."""
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    @property
    def server_cpu_ms_per_request(self) -> float:
        return 1000 * self.server_cpu / self.requests if self.requests else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "server": self.server, "operation": self.operation, "requests": self.requests,
            "errors": self.errors, "seconds": round(self.seconds, 3), "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile(50), 3), "p99_ms": round(self.percentile(99), 3),
            "server_cpu_ms_per_request": round(self.server_cpu_ms_per_request, 4),
            "server_cpu_percent": round(100 * self.server_cpu / self.seconds, 1),
            "client_cpu_percent": round(100 * self.client_cpu / self.seconds, 1),
            "other_cpu_percent": round(100 * self.other_cpu / self.seconds, 1),
        }  # fmt: skip


# --- processes -------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(data_dir: Path, port: int | None = None) -> dict[str, str]:
    """The environment for `python -m service`: the embedded local store under `data_dir`, defaults else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_")}
    for name in ("BUCKET", "SRC_PREFIX", "OUTPUT_KEY", "HOST", "PORT", "SCHEDULE", "API_TOKEN"):
        env.pop(name, None)
    env.update(DATA_DIR=str(data_dir), HOST="127.0.0.1", SCHEDULE=FAR_SCHEDULE, PYTHONUNBUFFERED="1")
    if port is not None:
        env["PORT"] = str(port)
    return env


def write_demo_data(data_dir: Path, users: int) -> None:
    marker = data_dir / MARKER
    if marker.exists() and marker.read_text().strip() == str(users):
        log(f"reusing {users} demo users already in {data_dir}")
        return
    if (data_dir / "datalake").exists():
        raise SystemExit(f"{data_dir} holds data not written by this benchmark for --users {users}")
    log(f"writing {users} demo users into {data_dir} ...")
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "service", "demo-data", "--users", str(users)],
        cwd=REPO, env=service_env(data_dir), check=True, timeout=3600, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    marker.write_text(f"{users}\n")
    log(f"demo data written in {time.perf_counter() - started:.0f}s")


def start_server(
    key: str, label: str, argv: Sequence[str], *, env: dict[str, str], logs: Path, port: int, cwd: Path = REPO
) -> Server:
    log_path = logs / f"server-{key}.log"
    started_at = datetime.now(UTC)
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    return Server(key, label, port, process, log_path, started_at)


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=15)


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15 of stat(5)


def machine_busy_seconds() -> float:
    """CPU seconds all processes have used since boot (every CPU), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK  # minus idle and iowait


def memory_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


async def wait_ready(session: aiohttp.ClientSession, server: Server, limit_seconds: float) -> None:
    """Until /readyz answers 200 and, for the service, a run started by this process has finished (runs
    restored from the stored history do not count: the start-up run must not overlap the measurements)."""
    deadline = time.monotonic() + limit_seconds
    while True:
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"{server.name} exited with {server.process.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name} not ready after {limit_seconds:.0f}s; see {server.log}")
        try:
            async with session.get(server.url + "/readyz") as response:
                ready = response.status == 200
            if ready and server.key == "S":
                body = json.dumps({"query": "{ lastRun { startedAt } }"}).encode()
                async with session.post(server.url + "/graphql", data=body, headers=JSON_HEADERS) as response:
                    last = (await response.json())["data"]["lastRun"]
                ready = last is not None and datetime.fromisoformat(last["startedAt"]) >= server.started_at
            if ready:
                return
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.5)


# --- load ------------------------------------------------------------------------------------------------


async def fetch(session: aiohttp.ClientSession, server: Server, op: Operation) -> Any:
    headers = JSON_HEADERS if op.is_graphql else None
    async with session.request(op.method, server.url + op.path, data=op.body, headers=headers) as response:
        if response.status != 200:
            raise SystemExit(f"{server.name} {op.name}: HTTP {response.status}: {(await response.text())[:500]}")
        answer = await response.json()
    if op.is_graphql and answer.get("errors"):
        raise SystemExit(f"{server.name} {op.name}: {answer['errors']}")
    return answer


async def check_answers(session: aiohttp.ClientSession, servers: dict[str, Server]) -> bool:
    """Every operation answers without errors on every server; S and (a) give the same data."""
    agree = True
    for op in OPERATIONS:
        answers = {key: await fetch(session, server, op) for key, server in servers.items()}
        if "S" in answers and "a" in answers and answers["S"] != answers["a"]:
            log(f"MISMATCH {op.name}: S={str(answers['S'])[:300]} a={str(answers['a'])[:300]}")
            agree = False
    return agree


async def load(
    session: aiohttp.ClientSession,
    server: Server,
    op: Operation,
    *,
    concurrency: int,
    seconds: float,
    requests: int | None = None,
) -> Measurement:
    """`concurrency` workers, each one request at a time, for `seconds` (or `requests` requests, at most
    `seconds`). Each request is bounded by the session's timeout, so this stops by itself."""
    url, headers = server.url + op.path, JSON_HEADERS if op.is_graphql else None
    latencies: list[float] = []
    errors = 0
    tickets = requests
    pid = server.process.pid
    deadline = math.inf

    async def worker() -> None:
        nonlocal errors, tickets
        while time.perf_counter() < deadline:
            if tickets is not None:
                if tickets <= 0:
                    return
                tickets -= 1
            sent = time.perf_counter()
            try:
                async with session.request(op.method, url, data=op.body, headers=headers) as response:
                    body = await response.read()
                ok = response.status == 200 and not (op.is_graphql and b'"errors"' in body)
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append(1000 * (time.perf_counter() - sent))
            else:
                errors += 1

    server_cpu, client_cpu, busy = cpu_seconds(pid), time.process_time(), machine_busy_seconds()
    begin = time.perf_counter()
    deadline = begin + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - begin
    server_cpu, client_cpu = cpu_seconds(pid) - server_cpu, time.process_time() - client_cpu
    other_cpu = max(0.0, machine_busy_seconds() - busy - server_cpu - client_cpu)
    return Measurement(
        server.name, op.name, len(latencies), errors, elapsed, server_cpu, client_cpu, other_cpu, latencies
    )


async def measure(args: argparse.Namespace, servers: dict[str, Server]) -> tuple[list[Measurement], bool]:
    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    # With --rounds N each row's budget (duration, request count, cap) is cut into N slices measured in turn
    # with every other row's, so that a change in the machine's other load is spread over all rows alike.
    rounds = args.rounds
    seconds = (args.duration if args.requests is None else args.max_seconds) / rounds
    requests = None if args.requests is None else math.ceil(args.requests / rounds)
    slices: dict[tuple[str, str], list[Measurement]] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        agree = await check_answers(session, servers)
        for round_ in range(rounds):
            for server in servers.values():
                for op in OPERATIONS:
                    if round_ == 0 or args.warmup_every_round:
                        await load(session, server, op, concurrency=args.concurrency, seconds=args.warmup)
                    result = await load(
                        session, server, op, concurrency=args.concurrency, seconds=seconds, requests=requests
                    )
                    prefix = f"round {round_ + 1}/{rounds} " if rounds > 1 else ""
                    log(
                        f"{prefix}{server.name:<28} {op.name:<14} {result.rps:9.1f} req/s"
                        f"  p50 {result.percentile(50):8.2f} ms  p99 {result.percentile(99):8.2f} ms"
                        f"  errors {result.errors}"
                    )
                    slices.setdefault((server.name, op.name), []).append(result)
    return [merge(parts) for parts in slices.values()], agree


def merge(parts: Sequence[Measurement]) -> Measurement:
    """One row from its slices: counts, times and CPU added up, latencies pooled."""
    return Measurement(
        parts[0].server, parts[0].operation, sum(m.requests for m in parts), sum(m.errors for m in parts),
        sum(m.seconds for m in parts), sum(m.server_cpu for m in parts), sum(m.client_cpu for m in parts),
        sum(m.other_cpu for m in parts), [latency for m in parts for latency in m.latencies_ms],
    )  # fmt: skip


# --- report ----------------------------------------------------------------------------------------------


def table(results: Sequence[Measurement]) -> str:
    header = (
        f"{'server':<30} {'operation':<14} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>8} "
        f"{'errors':>6} {'srv CPU ms/req':>14} {'srv CPU':>7} {'client CPU':>10} {'other CPU':>9}"
    )
    lines = [header, "-" * len(header)]
    for m in results:
        lines.append(
            f"{m.server:<30} {m.operation:<14} {m.rps:9.1f} {m.percentile(50):8.2f} {m.percentile(99):8.2f} "
            f"{m.requests:8d} {m.errors:6d} {m.server_cpu_ms_per_request:14.3f} "
            f"{100 * m.server_cpu / m.seconds:6.0f}% {100 * m.client_cpu / m.seconds:9.0f}% "
            f"{100 * m.other_cpu / m.seconds:8.0f}%"
        )
    return "\n".join(lines)


def verdicts(results: Sequence[Measurement], servers: dict[str, Server]) -> tuple[list[str], bool]:
    by = {(m.server, m.operation): m for m in results}
    name = {key: server.name for key, server in servers.items()}

    def ratio(op: Operation, top: str, bottom: str) -> float:
        low = by[(name[bottom], op.name)].rps
        return by[(name[top], op.name)].rps / low if low else math.inf

    def cpu_ratio(op: Operation, top: str, bottom: str) -> float:
        """The same ratio from server CPU per request (capacity per core): less sensitive to other load."""
        return (
            by[(name[bottom], op.name)].server_cpu_ms_per_request / by[(name[top], op.name)].server_cpu_ms_per_request
        )

    lines: list[str] = []
    met = True
    for op in OPERATIONS:
        s_a, s_b = ratio(op, "S", "a"), ratio(op, "S", "b")
        stats = op is STATS_OP
        goal_a = f"goal >= 100x: {'MET' if s_a >= 100 else 'NOT MET'}" if stats else "(info)"
        goal_b = f"goal >= 0.7x: {'MET' if s_b >= 0.7 else 'NOT MET'}" if stats else "(info)"
        cpu_a, cpu_b = cpu_ratio(op, "S", "a"), cpu_ratio(op, "S", "b")
        lines.append(f"{op.name:<14} req/s S/(a) = {s_a:8.1f}x  {goal_a:<24} by server CPU/request: {cpu_a:7.1f}x")
        lines.append(f"{op.name:<14} req/s S/(b) = {s_b:8.2f}x  {goal_b:<24} by server CPU/request: {cpu_b:7.2f}x")
        if stats:
            met = met and s_a >= 100 and s_b >= 0.7
    p99 = by[(name["S"], STATS_OP.name)].percentile(99)
    lines.append(f"graphql stats  p99 of S    = {p99:8.2f} ms  goal < 20 ms: {'MET' if p99 < 20 else 'NOT MET'}")
    rest_p99 = by[(name["S"], REST_OP.name)].percentile(99)
    lines.append(f"rest /stats    p99 of S    = {rest_p99:8.2f} ms  (info)")
    met = met and p99 < 20
    if any(m.errors for m in results):
        lines.append("WARNING: some requests failed (see the errors column)")
        met = False
    other = sum(m.other_cpu for m in results) / sum(m.seconds for m in results)
    if other > 0.2:
        lines.append(
            f"NOTE: other processes used {100 * other:.0f}% of a CPU on average while measuring (column other CPU):"
            " req/s and latencies are contended; the server-CPU ratios are the steadier comparison"
        )
    return lines, met


# --- main ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000, help="demo users to write (default 100000)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent client workers (default 8)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    parser.add_argument("--requests", type=int, help="fixed request count per measurement instead of --duration")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="cap on a --requests measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each (default 2)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each row in this many interleaved "
        "slices of its --duration/--requests (default 1): evens out a changing machine load",
    )
    parser.add_argument("--warmup-every-round", action="store_true", help="warm up before every slice, not "
                        "only the first")  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=30.0, help="per-request timeout, seconds")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for /readyz")
    parser.add_argument("--data-dir", type=Path, help="use (and keep) this DATA_DIR; reused when it holds "
                        "demo data this script wrote for the same --users")  # fmt: skip
    parser.add_argument("--service-src", type=Path, help="import `service` for (S) and (b) from this directory "
                        "(e.g. a scratch copy with a proposed change) instead of this checkout")  # fmt: skip
    parser.add_argument("--pin", action="store_true", help="pin the servers to CPU 1 and this client to CPU 0")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.users < 1 or args.concurrency < 1 or args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--users, --concurrency and --rounds must be >= 1, --duration > 0, --warmup >= 0")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be >= 1")
    if args.service_src is not None:
        args.service_src = args.service_src.resolve()
        if not (args.service_src / "service" / "__init__.py").is_file():
            parser.error(f"--service-src {args.service_src} has no service/ package")
    return args


def with_service_src(env: dict[str, str], source: Path | None) -> dict[str, str]:
    """`env` importing the `service` package from `source` (a checkout or scratch copy) when given."""
    if source is None:
        return env
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))}


def describe_source(source: Path | None) -> str:
    root = source or REPO
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "service"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"service/ from {root} (not a git checkout)"
    return f"service/ from {root} at {commit}{' with uncommitted changes' if dirty else ''}"


async def start_all(args: argparse.Namespace, data_dir: Path, logs: Path) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    python = sys.executable
    source = args.service_src
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        port = free_port()
        servers["S"] = start_server(
            "S", "service", [python, "-m", "service", "serve"], logs=logs, port=port, cwd=source or REPO,
            env=with_service_src(service_env(data_dir, port), source),
        )  # fmt: skip
        log(f"(S) started on port {port}, waiting for /readyz and the start-up run ...")
        started = time.perf_counter()
        await wait_ready(session, servers["S"], args.ready_timeout)
        log(f"(S) ready after {time.perf_counter() - started:.0f}s")
        csv = data_dir / "datalake" / "processed_data" / "output.csv"
        for key, label, argv, env in (
            ("a", "baseline pandas/request", [python, str(BENCH_DIR / "_baseline_app.py"), "--csv", str(csv)],
             dict(os.environ)),
            ("b", "ceiling constant", [python, str(BENCH_DIR / "_ceiling_app.py")],
             with_service_src(dict(os.environ), source)),  # its types and extensions come from `service`
        ):  # fmt: skip
            port = free_port()
            servers[key] = start_server(key, label, [*argv, "--port", str(port)], env=env, logs=logs, port=port)
        for key in ("a", "b"):
            await wait_ready(session, servers[key], 120)
    return servers


def pin(servers: dict[str, Server]) -> None:
    """Every thread of the servers on CPU 1, this process on CPU 0."""
    for server in servers.values():
        for task in Path(f"/proc/{server.process.pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), {1})
    os.sched_setaffinity(0, {0})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    own_dir = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="bench-queries-")) if own_dir else args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-queries-logs-"))
    log(f"server logs in {logs}")
    servers: dict[str, Server] = {}
    try:
        write_demo_data(data_dir, args.users)
        servers = asyncio.run(start_all(args, data_dir, logs))
        if args.pin:
            pin(servers)
        service_pid = servers["S"].process.pid
        rss_ready = memory_mib(service_pid)
        results, agree = asyncio.run(measure(args, servers))
        rss_after, rss_peak = memory_mib(service_pid), memory_mib(service_pid, "VmHWM")
        other_rss = {key: memory_mib(servers[key].process.pid) for key in ("a", "b")}
    finally:
        for server in servers.values():
            stop_server(server)
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    mode = f"{args.duration:g} s" if args.requests is None else f"{args.requests} requests"
    if args.rounds > 1:
        mode += f" in {args.rounds} interleaved slices"
    print(
        f"\n{args.users:,} users, {args.concurrency} concurrent keep-alive clients (one aiohttp process), "
        f"warm-up {args.warmup:g} s, then {mode} per row; {os.cpu_count()} CPUs shared by client and server"
        f"{' (pinned: servers CPU 1, client CPU 0)' if args.pin else ''}; Python {platform.python_version()}\n"
    )
    print(describe_source(args.service_src))
    print(table(results))
    lines, met = verdicts(results, servers)
    print()
    print("\n".join(lines))
    print(f"answers of S and (a) agree: {'yes' if agree else 'NO'}")
    print(
        f"RSS of S: {rss_ready:.0f} MiB when ready, {rss_after:.0f} MiB after the load, peak {rss_peak:.0f} MiB "
        f"(VmHWM, includes the start-up aggregation); (a) {other_rss['a']:.0f} MiB, (b) {other_rss['b']:.0f} MiB"
    )
    print(f"all goals met: {'yes' if met and agree else 'NO'}   (server logs: {logs})")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "users": args.users,
                    "concurrency": args.concurrency,
                    "duration": args.duration,
                    "requests": args.requests,
                    "warmup": args.warmup,
                    "rounds": args.rounds,
                    "pinned": args.pin,
                    "results": [m.summary() for m in results],
                    "goals_met": met,
                    "answers_agree": agree,
                    "rss_mib": {"ready": rss_ready, "after": rss_after, "peak": rss_peak, **other_rss},
                },
                indent=2,
            )
        )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
