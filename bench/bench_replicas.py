"""Replicas on one bucket: `stats` throughput with WORKERS=1 and 2, follower lag, and lease takeover.

Everything runs on 127.0.0.1, on the embedded store in one DATA_DIR holding `--users` demo users (written
once by `python -m service demo-data`). Every server is `python -m service serve` of this repository,
started here with PORT=0 (it prints the port it bound) and a SCHEDULE that never fires, and stopped by
its process id: SIGTERM, and SIGKILL if it is still there 30 s later.

(a) Throughput. A server with WORKERS=1 and one with WORKERS=2, started together; once every worker
    answers /readyz and has finished its start-up run, each is loaded with wrk in turn (the other
    idles; which goes first alternates by round): `GET /stats` and the GraphQL `stats` query,
    `--connections` keep-alive connections for `--duration` s after a 1 s warm-up. The baseline is
    WORKERS=1 in the same round; the figure is the ratio of requests per second, and its median over
    the rounds. CPU columns are cores busy on average (CPU s / wall s): the server's processes (and
    each worker's), wrk, and everything else on the machine.
(b) Follower lag. Two servers, A and B (WORKERS=1 each), on the DATA_DIR, with FOLLOW_INTERVAL =
    `--follow-interval`. `--commits` times: one user's CSV is rewritten, POST /data on A runs and
    commits, and from A's answer on, B's /readyz is asked every 10 ms until it reports the new version.
(c) Takeover. A and B with LEASE_TTL = `--lease-ttl`. `--takeovers` times: `--changed` CSVs are
    rewritten and a POST /data on A starts a run; once the lease object (read from DATA_DIR) names A, A
    is killed (SIGKILL) `--kill-after` s later, and a POST /data on B waits for the lease. Measured from
    the kill: until the lease names B, and until B's run has committed. A round in which A committed
    before it died does not count (B's run must be the one that fetches the changed files).

    python bench/bench_replicas.py                          # 20,000 users: ~8 min
    python bench/bench_replicas.py --users 2000 --rounds 1 --duration 3 --commits 5 --takeovers 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _benchlib import machine_line, print_table, verdict

REPO = Path(__file__).resolve().parent.parent
BUCKET = "datalake"
LEASE_KEY = "processed_data/output.csv.lease"
NEVER = "0 0 1 1 *"  # 1 January: no scheduled run during the benchmark
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_RATIO = 1.4
STOP_WAIT = 30.0
REST_STATS = "/stats?is_image_exists=true&min_age=20&max_age=60"
GRAPHQL_STATS = "{ stats(filter: {isImageExists: true, minAge: 20, maxAge: 60}) { count averageAge } }"
RUNS_QUERY = "{ runs(limit: 50) { trigger replica outcome } }"
BIRTHTS = 631_152_000_000  # 1990-01-01


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- HTTP -----------------------------------------------------------------------------------------------


def request_json(url: str, body: object = None, timeout: float = 600.0) -> tuple[int, Any]:
    """One request on a new connection: (status, decoded JSON). A POST when there is a body (`{}` for an
    empty one)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


def graphql(url: str, query: str) -> dict[str, Any]:
    status, body = request_json(f"{url}/graphql", {"query": query}, timeout=30)
    if status != 200 or body.get("errors"):
        raise RuntimeError(f"GraphQL {query!r}: {status} {body}")
    data: dict[str, Any] = body["data"]
    return data


def readyz(url: str) -> dict[str, Any] | None:
    """/readyz's answer when ready, None while not (or not listening yet)."""
    try:
        status, body = request_json(f"{url}/readyz", timeout=10)
    except OSError:
        return None
    return body if status == 200 else None


def reprocess(url: str) -> tuple[float, dict[str, Any]]:
    """POST /data: (when the answer came, perf_counter; the run report)."""
    status, report = request_json(f"{url}/data", {}, timeout=600)
    answered = time.perf_counter()
    if status != 200:
        raise RuntimeError(f"POST /data: {status} {report}")
    return answered, report


# --- servers --------------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    url: str
    replicas: dict[str, int] = field(default_factory=dict)  # replica name -> its process id

    @property
    def pids(self) -> list[int]:
        return sorted({self.process.pid, *self.replicas.values()})


def service_env(data_dir: Path, **settings: object) -> dict[str, str]:
    """This repository's `service` on the embedded store in `data_dir`, with `settings` (NAME=value)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_")}
    for name in ("BUCKET", "SRC_PREFIX", "OUTPUT_KEY", "API_TOKEN", "REPLICA_ID", "LOG_FORMAT"):
        env.pop(name, None)
    env.update(PYTHONPATH=str(REPO), DATA_DIR=str(data_dir), HOST="127.0.0.1", PORT="0", SCHEDULE=NEVER)
    env.update({name.upper(): str(value) for name, value in settings.items()})
    return env


def start_server(name: str, data_dir: Path, logs: Path, **settings: object) -> Server:
    """`serve`, once it has printed where it listens (its log goes to a file: a pipe could fill up)."""
    with (logs / f"{name}.log").open("a") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"], cwd=REPO, env=service_env(data_dir, **settings),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, text=True,
        )  # fmt: skip
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 120)
    banner = process.stdout.readline() if ready else ""
    match = re.search(r"http://(\S+)/graphql", banner)
    if match is None:
        stop(process)
        raise RuntimeError(f"{name}: no banner within 120 s (see {logs / f'{name}.log'}): {banner!r}")
    return Server(name, process, f"http://{match[1]}")


def stop(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_WAIT)
    if process.stdout is not None:
        process.stdout.close()


def wait_ready(server: Server, workers: int, within: float = 300.0) -> None:
    """Until `workers` replicas answer /readyz (new connections: each goes to whichever worker takes it)
    and each has finished its start-up run: the shared history lists it."""
    deadline = time.monotonic() + within
    for _ in range(100_000):
        if time.monotonic() > deadline:
            break
        if (body := readyz(server.url)) is not None:
            server.replicas[body["replica"]] = int(body["replica"].rpartition(":")[2])
        if len(server.replicas) >= workers and started_up(server) >= set(server.replicas):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{server.name}: {len(server.replicas)} of {workers} workers ready after {within:.0f} s")


def started_up(server: Server) -> set[str]:
    """The replicas whose start-up run the shared history lists as succeeded."""
    runs = graphql(server.url, RUNS_QUERY)["runs"]
    return {run["replica"] for run in runs if run["trigger"] == "startup" and run["outcome"] == "SUCCEEDED"}


@contextmanager
def serving(name: str, data_dir: Path, logs: Path, workers: int = 1, **settings: object) -> Iterator[Server]:
    server = start_server(name, data_dir, logs, workers=workers, **settings)
    try:
        wait_ready(server, workers)
        yield server
    finally:
        stop(server.process)


# --- CPU accounting -------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds every process has used since boot (all CPUs), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK  # without idle and iowait


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- (a) throughput with wrk ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    name: str
    path: str
    script: Path | None = None  # wrk's Lua script for a POST


@dataclass
class Measured:
    load: str
    workers: int
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int
    wall: float
    server_cpu: float
    wrk_cpu: float
    machine_cpu: float
    worker_cpu: list[float]

    def cores(self, cpu: float) -> float:
        return cpu / self.wall if self.wall else 0.0


def loads(work: Path) -> list[Load]:
    script = work / "graphql-stats.lua"
    body = json.dumps({"query": GRAPHQL_STATS})
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = [==[{body}]==]\nwrk.headers["Content-Type"] = "application/json"\n'
    )
    return [Load("rest /stats", REST_STATS), Load("graphql stats", "/graphql", script)]


def check_answers(server: Server) -> None:
    """Both loads answer with data before they are timed (wrk counts a GraphQL error as a success)."""
    status, body = request_json(server.url + REST_STATS, timeout=30)
    assert status == 200 and body["count"] > 0, body
    assert graphql(server.url, GRAPHQL_STATS)["stats"]["count"] == body["count"]


def wrk(url: str, load: Load, seconds: float, connections: int, threads: int) -> str:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    if load.script is not None:
        command += ["-s", str(load.script)]
    done = subprocess.run([*command, url + load.path], capture_output=True, text=True, timeout=seconds + 60, check=True)
    return done.stdout


def _found(pattern: str, output: str) -> str:
    match = re.search(pattern, output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk's output has no {pattern!r}:\n{output}")
    return match[1]


def _milliseconds(text: str) -> float:
    unit = text.lstrip("0123456789.")
    return float(text.removesuffix(unit)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def parse_wrk(output: str) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, failed): non-2xx/3xx answers plus socket errors."""
    rps = float(_found(r"Requests/sec:\s+([\d.]+)", output))
    p50 = _milliseconds(_found(r"^\s+50%\s+(\S+)", output))
    p99 = _milliseconds(_found(r"^\s+99%\s+(\S+)", output))
    failed = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", output))
    if errors := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        failed += sum(int(n) for n in errors.groups())
    return rps, p50, p99, failed


def measure(server: Server, load: Load, workers: int, args: argparse.Namespace) -> Measured:
    wrk(server.url, load, 1, args.connections, args.threads)  # warm-up: connections open, caches warm
    pids = server.pids
    cpu0 = [cpu_seconds(pid) for pid in pids]
    machine0, wrk0, began = machine_busy_seconds(), children_cpu(), time.perf_counter()
    output = wrk(server.url, load, args.duration, args.connections, args.threads)
    wall = time.perf_counter() - began
    used = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu0, strict=True)]
    rps, p50, p99, failed = parse_wrk(output)
    workers_cpu = [used[pids.index(pid)] for pid in sorted(server.replicas.values())]
    return Measured(
        load.name, workers, rps, p50, p99, failed, wall, sum(used), children_cpu() - wrk0,
        machine_busy_seconds() - machine0, workers_cpu,
    )  # fmt: skip


def throughput(data_dir: Path, work: Path, args: argparse.Namespace) -> list[list[Measured]]:
    """Per round, each load against WORKERS=1 and WORKERS=2 in turn (alternating which goes first). Both
    servers run throughout, and the one not measured idles: short turns spread the other processes of
    the machine over both alike."""
    rounds = []
    with serving("throughput-w1", data_dir, work) as one, serving("throughput-w2", data_dir, work, workers=2) as two:
        for server in (one, two):
            check_answers(server)
        for number in range(args.rounds):
            order = [(1, one), (2, two)] if number % 2 == 0 else [(2, two), (1, one)]
            results: list[Measured] = []
            for load in loads(work):
                for workers, server in order:
                    results.append(measure(server, load, workers, args))
                    log(f"round {number + 1}: {load.name}, WORKERS={workers}: {results[-1].rps:,.0f} req/s")
            rounds.append(results)
    return rounds


def report_throughput(rounds: list[list[Measured]], args: argparse.Namespace) -> None:
    headers = ["round / load", "WORKERS", "req/s", "x WORKERS=1", "p50 ms", "p99 ms", "failed",
               "server cores", "per worker", "wrk cores", "other cores"]  # fmt: skip
    rows: list[list[object]] = []
    ratios: dict[str, list[float]] = {}
    for number, results in enumerate(rounds, 1):
        for m in sorted(results, key=lambda m: (m.load, m.workers)):
            base = next(b for b in results if b.load == m.load and b.workers == 1)
            ratio = m.rps / base.rps if base.rps else 0.0
            if m.workers != 1:
                ratios.setdefault(m.load, []).append(ratio)
            other = m.machine_cpu - m.server_cpu - m.wrk_cpu
            split = " / ".join(f"{m.cores(c):.2f}" for c in m.worker_cpu)
            rows.append([f"{number}: {m.load}", m.workers, round(m.rps), f"{ratio:.2f}", m.p50_ms, m.p99_ms,
                         m.failed, m.cores(m.server_cpu), split, m.cores(m.wrk_cpu), m.cores(other)])  # fmt: skip
    title = (f"(a) throughput: wrk -t{args.threads} -c{args.connections}, {args.duration:g} s per row, "
             f"{args.users:,} users; baseline WORKERS=1 in the same round")  # fmt: skip
    print_table(headers, rows, title)
    summary = [[load, len(r), f"{statistics.median(r):.2f}", f"{min(r):.2f}", f"{max(r):.2f}",
                verdict(statistics.median(r) >= TARGET_RATIO)] for load, r in ratios.items()]  # fmt: skip
    print_table(["load", "rounds", "median x", "min x", "max x", f">= {TARGET_RATIO}x"], summary,
                "WORKERS=2 / WORKERS=1, requests per second")  # fmt: skip


# --- (b) follower lag -----------------------------------------------------------------------------------


def user_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / BUCKET / "src-data").glob("*.csv"))


def rewrite(path: Path, first_name: str) -> None:
    """A changed CSV, written as the store writes: a whole new file renamed into place."""
    temporary = path.with_name(f".{path.name}.bench")
    temporary.write_text(f"first_name,last_name,birthts\n{first_name},Bench,{BIRTHTS}\n")
    temporary.replace(path)


def wait_version(url: str, version: int, within: float, every: float = 0.01) -> float | None:
    """perf_counter when `url`'s /readyz first reports `version` or newer; None when it did not in time."""
    deadline = time.perf_counter() + within
    for _ in range(int(within / every) + 1):
        body = readyz(url)
        if body is not None and body["version"] >= version:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(every)
    return None


def follower_lag(data_dir: Path, logs: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """(lags, A's run durations) over `--commits` commits by A."""
    files = user_files(data_dir)
    lags: list[float] = []
    runs: list[float] = []
    settings = {"follow_interval": args.follow_interval}
    with serving("lag-a", data_dir, logs, **settings) as a, serving("lag-b", data_dir, logs, **settings) as b:
        for number in range(args.commits):
            rewrite(files[number % len(files)], f"Lag{number}")
            answered, report = reprocess(a.url)
            assert report["outcome"] == "succeeded" and report["output_written"], report
            seen = wait_version(b.url, report["output_version"], within=10 * args.follow_interval + 30)
            if seen is None:
                raise RuntimeError(f"B did not serve version {report['output_version']} in time")
            lags.append(seen - answered)
            runs.append(report["duration_seconds"])
    return lags, runs


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def report_lag(lags: list[float], runs: list[float], args: argparse.Namespace) -> None:
    rows = [[f"{len(lags)} commits", args.follow_interval, percentile(lags, 50), percentile(lags, 90),
             percentile(lags, 99), max(lags), statistics.mean(lags), statistics.median(runs)]]  # fmt: skip
    print_table(
        ["follower lag (s)", "FOLLOW_INTERVAL", "p50", "p90", "p99", "max", "mean", "A's run (median s)"],
        rows, "(b) from A's POST /data answering to B's /readyz reporting the new version (asked every 10 ms)",
    )  # fmt: skip


# --- (c) takeover ---------------------------------------------------------------------------------------


@dataclass
class Takeover:
    lease_taken: float  # s from the kill until the lease names B
    committed: float  # s from the kill until B's POST /data answered
    expiry: float  # s from the kill until A's last lease record expired
    fetched: int


def lease_record(data_dir: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads((data_dir / BUCKET / LEASE_KEY).read_bytes())
    except (OSError, ValueError):
        return None
    return record


def wait_lease(data_dir: Path, replica: str, within: float, every: float = 0.002) -> dict[str, Any] | None:
    """The lease record once it names `replica` with an unexpired lease."""
    deadline = time.monotonic() + within
    for _ in range(int(within / every) + 1):
        record = lease_record(data_dir)
        now = datetime.now(UTC)
        if record and record["replica"] == replica and datetime.fromisoformat(record["expires"]) > now:
            return record
        if time.monotonic() > deadline:
            return None
        time.sleep(every)
    return None


def one_takeover(
    number: int, b: Server, pool: ThreadPoolExecutor, *, data_dir: Path, logs: Path, args: argparse.Namespace
) -> Takeover | None:
    """One round: A runs, dies with SIGKILL while it holds the lease, and B takes over."""
    a = start_server(f"takeover-a{number}", data_dir, logs, lease_ttl=args.lease_ttl)
    try:
        wait_ready(a, 1)  # its start-up run is over: the changes below are for the run killed
        (replica_a,) = a.replicas
        for path in user_files(data_dir)[: args.changed]:
            rewrite(path, f"Takeover{number}")
        doomed: Future[tuple[float, dict[str, Any]]] = pool.submit(reprocess, a.url)
        held = wait_lease(data_dir, replica_a, within=60)
        if held is None:
            raise RuntimeError("A never held the lease")
        time.sleep(args.kill_after)
        a.process.kill()
        killed, killed_wall = time.perf_counter(), datetime.now(UTC)
    finally:
        stop(a.process, signal.SIGKILL)
    last = lease_record(data_dir) or held
    answer = pool.submit(reprocess, b.url)
    (replica_b,) = b.replicas
    taken = wait_lease(data_dir, replica_b, within=10 * args.lease_ttl + 30)
    taken_at = time.perf_counter()
    answered, report = answer.result(timeout=600)
    if taken is None or doomed.exception(timeout=60) is None or report["fetched"] < args.changed:
        return None  # A finished its run before it was killed: nothing was taken over
    expiry = (datetime.fromisoformat(last["expires"]) - killed_wall).total_seconds()
    return Takeover(taken_at - killed, answered - killed, expiry, report["fetched"])


def takeovers(data_dir: Path, logs: Path, args: argparse.Namespace) -> tuple[list[Takeover], int]:
    """(the rounds that count, the rounds tried)."""
    done: list[Takeover] = []
    tried = 0
    with serving("takeover-b", data_dir, logs, lease_ttl=args.lease_ttl) as b, ThreadPoolExecutor(2) as pool:
        while len(done) < args.takeovers and tried < 2 * args.takeovers + 2:
            tried += 1
            result = one_takeover(tried, b, pool, data_dir=data_dir, logs=logs, args=args)
            log(f"takeover {tried}: {result}")
            if result is not None:
                done.append(result)
    return done, tried


def report_takeovers(done: list[Takeover], tried: int, args: argparse.Namespace) -> None:
    rows: list[list[object]] = [
        [f"round {n}", t.expiry, t.lease_taken, t.committed, t.fetched] for n, t in enumerate(done, 1)
    ]
    if done:
        rows.append(["median", *(statistics.median(getattr(t, f) for t in done)
                                 for f in ("expiry", "lease_taken", "committed", "fetched"))])  # fmt: skip
    poll = min(1.0, args.lease_ttl / 6)
    title = (f"(c) takeover after SIGKILL, LEASE_TTL={args.lease_ttl:g} s (renewed every {args.lease_ttl / 3:g} s; "
             f"a waiting replica tries every {poll:g} s); {len(done)} of {tried} rounds counted")  # fmt: skip
    print_table(["s after the kill", "A's lease expired", "B holds the lease", "B committed", "B fetched"],
                rows, title)  # fmt: skip


# --- main -----------------------------------------------------------------------------------------------


def write_demo_data(data_dir: Path, users: int) -> None:
    marker = data_dir / ".bench-replicas-users"
    if marker.exists() and marker.read_text().strip() == str(users):
        log(f"reusing {users:,} demo users in {data_dir}")
        return
    if (data_dir / BUCKET).exists():
        raise SystemExit(f"{data_dir} holds data this benchmark did not write for --users {users}")
    log(f"writing {users:,} demo users into {data_dir} ...")
    command = [sys.executable, "-m", "service", "demo-data", "--users", str(users), "--seed", "1"]
    subprocess.run(command, cwd=REPO, env=service_env(data_dir), check=True, timeout=3600, stdout=subprocess.DEVNULL)
    marker.write_text(f"{users}\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5, help="(a): rounds of WORKERS=1 and WORKERS=2")
    parser.add_argument("--duration", type=float, default=8.0, help="(a): seconds of wrk per row")
    parser.add_argument("--connections", type=int, default=32, help="(a): wrk's keep-alive connections")
    parser.add_argument("--threads", type=int, default=1, help="(a): wrk's threads")
    parser.add_argument("--commits", type=int, default=50, help="(b): commits by A")
    parser.add_argument("--follow-interval", type=float, default=2.0, help="(b): FOLLOW_INTERVAL of B")
    parser.add_argument("--takeovers", type=int, default=5, help="(c): rounds that count")
    parser.add_argument("--lease-ttl", type=float, default=3.0, help="(c): LEASE_TTL of A and B")
    parser.add_argument("--changed", type=int, help="(c): CSVs rewritten before A's run (2,000, at most --users)")
    parser.add_argument("--kill-after", type=float, default=0.1, help="(c): s from A's lease to its SIGKILL")
    parser.add_argument("--data-dir", type=Path, help="keep (and reuse) the demo data here")
    parser.add_argument("--only", choices=["a", "b", "c"], action="append", help="run these parts only")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.changed = min(2_000, args.users) if args.changed is None else args.changed
    if shutil.which("wrk") is None and (args.only is None or "a" in args.only):
        raise SystemExit("wrk is needed for (a): apt-get install -y wrk")
    print(machine_line())
    parts: set[str] = set(args.only or "abc")
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as temporary:
        work = Path(temporary)
        data_dir = args.data_dir or work / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        write_demo_data(data_dir, args.users)
        log(f"server logs in {work}")
        steps: list[tuple[str, Callable[[], None]]] = [
            ("a", lambda: report_throughput(throughput(data_dir, work, args), args)),
            ("b", lambda: report_lag(*follower_lag(data_dir, work, args), args)),
            ("c", lambda: report_takeovers(*takeovers(data_dir, work, args), args)),
        ]
        for part, step in steps:
            if part in parts:
                step()
                sys.stdout.flush()


if __name__ == "__main__":
    main()
