"""The response cache under wrk: a repeated `stats` query against the Strawberry ceiling and bare aiohttp, and
the cost of a cache miss against the service without the cache, all in one run.

Servers, subprocesses of this script on 127.0.0.1, measured one at a time while the others sit idle:

  (S) `python -m service serve` on demo data: the cache on (RESPONSE_CACHE_BYTES default), with the query
      limits, the access log (to a file) and the metrics as in production;
  (O) the same with RESPONSE_CACHE_BYTES=0: every request worked out by Strawberry;
  (T) with --today-src DIR: the `service` package of DIR (e.g. `git archive <commit> service | tar -x -C DIR`
      of the commit before the cache), with its defaults: what the service did before;
  (b) bench/_ceiling_app.py: the service's Strawberry schema class, types and extensions with constant
      resolvers and Strawberry's own view: the most Strawberry answers per second;
  (c) bench/_bare_app.py: aiohttp answering fixed bytes, no GraphQL, no access log, no metrics.

Rows, each `--duration` seconds after `--warmup` seconds, `--connections` keep-alive connections from one
wrk thread:

  repeated  the same `stats` POST on every request (on S: answered from the cache after the first);
  GET       the same as a GET (S only: the cache, and the ETag worked out once);
  miss      a `stats` POST whose variables differ on every request (250,000 distinct pairs of age bounds,
            so S finds none of them in its cache: every request is a miss and is then kept).

Printed, the median over `--rounds` rounds (rows interleaved): req/s, p50/p99 latency (wrk's), server CPU
per request (from /proc: capacity per core, steadier than req/s when other processes share the CPUs), and
the goals: S repeated >= 3x (b); S miss as fast as O (and T).

    python bench/bench_cache.py --users 20000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from statistics import median
from urllib.parse import urlencode

import aiohttp
import bench_queries as bq

STATS_QUERY = bq.STATS_QUERY
MISS_QUERY = "query($min: Int, $max: Int) { stats(filter: {minAge: $min, maxAge: $max}) { count averageAge } }"
REPEATED_BODY = json.dumps({"query": STATS_QUERY})
# One wrk thread: its Lua counter, from the offset given after `--`, makes each request's variables differ
# from every other one's, the warm-up's and earlier rows' included.
MISS_SCRIPT = """
local counter = 0
local query = %s
init = function(args)
  counter = tonumber(args[1])
end
request = function()
  counter = counter + 1
  local low = counter %% 500
  local high = 500 + math.floor(counter / 500) %% 500
  local body = string.format('{"query":%%s,"variables":{"min":%%d,"max":%%d}}', query, low, high)
  return wrk.format("POST", "/graphql", {["Content-Type"] = "application/json"}, body)
end
"""
POST_SCRIPT = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
"""


@dataclass(frozen=True)
class Row:
    name: str
    script: str | None  # a wrk Lua script; None for a GET of `path`
    path: str


ROWS = {
    "repeated": Row("repeated", POST_SCRIPT % json.dumps(REPEATED_BODY), "/graphql"),
    "GET": Row("GET", None, "/graphql?" + urlencode({"query": STATS_QUERY})),
    "miss": Row("miss", MISS_SCRIPT % json.dumps(json.dumps(MISS_QUERY)), "/graphql"),
}
# The rows of each server in the order measured: `miss` first, so that every server comes to it in the same
# state, just started (after the others, S would have sent ten times as many answers as O and T).
PLAN = {"S": ("miss", "repeated", "GET"), "O": ("miss", "repeated"), "T": ("miss", "repeated"), "b": ("repeated",),
        "c": ("repeated",)}  # fmt: skip


@dataclass
class Result:
    server: str
    row: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    server_cpu_ms: float  # per request


SENT: dict[str, int] = {}  # requests sent to each server so far (at least): the next miss row starts there


def wrk(server: bq.Server, row: Row, args: argparse.Namespace, seconds: float, scripts: Path) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{args.connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    if row.script is not None:
        script = scripts / f"{row.name}.lua"
        script.write_text(row.script)
        command += ["-s", str(script)]
    offset = SENT.get(server.key, 0)
    command += [server.url + row.path, "--", str(offset)]
    found = parse_wrk(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    SENT[server.key] = offset + int(found["requests"]) + 10 * args.connections  # and those still in flight
    return found


def parse_wrk(output: str) -> dict[str, float]:
    """Requests, errors (socket errors and non-2xx/3xx answers) and p50/p99 in ms from wrk's report."""

    def number(pattern: str) -> float:
        found = re.search(pattern, output)
        return float(found.group(1)) if found else 0.0

    def latency(percent: str) -> float:
        found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, flags=re.MULTILINE)
        if not found:
            return float("nan")
        return float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]

    errors = number(r"Non-2xx or 3xx responses: (\d+)")
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors += sum(int(n) for n in socket.groups()) if socket else 0
    return {"requests": number(r"(\d+) requests in"), "errors": errors, "p50": latency("50"), "p99": latency("99")}


def measure(server: bq.Server, row: Row, args: argparse.Namespace, scripts: Path) -> Result:
    if args.warmup:
        wrk(server, row, args, args.warmup, scripts)
    pid = server.process.pid
    cpu, began = bq.cpu_seconds(pid), time.perf_counter()
    found = wrk(server, row, args, args.duration, scripts)
    elapsed, cpu = time.perf_counter() - began, bq.cpu_seconds(pid) - cpu
    requests = int(found["requests"])
    result = Result(
        server.name, row.name, requests / elapsed, found["p50"], found["p99"], requests, int(found["errors"]),
        1000 * cpu / requests if requests else float("nan"),
    )  # fmt: skip
    bq.log(
        f"{server.name:<30} {row.name:<9} {result.rps:9.0f} req/s  p99 {result.p99_ms:7.2f} ms  errors {result.errors}"
    )
    return result


async def wait_service(server: bq.Server, limit_seconds: float) -> None:
    """Until /readyz is 200 and the start-up run of this process has finished (it must not overlap a row)."""
    body = json.dumps({"query": "{ lastRun { startedAt } }"})
    deadline = time.monotonic() + limit_seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise SystemExit(f"{server.name} exited; see {server.log}")
            try:
                async with session.post(server.url + "/graphql", data=body, headers=bq.JSON_HEADERS) as response:
                    last = (await response.json()).get("data", {}).get("lastRun") if response.status == 200 else None
                if last is not None and datetime.fromisoformat(last["startedAt"]) >= server.started_at:
                    return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{server.name} not ready after {limit_seconds:.0f}s; see {server.log}")


async def wait_up(server: bq.Server) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await bq.wait_ready(session, server, 120)


async def check(server: bq.Server, expected: object) -> object:
    """The server's answer to the repeated query, without errors (and S's equal to (O)'s)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + "/graphql", data=REPEATED_BODY, headers=bq.JSON_HEADERS) as response,
    ):
        answer = await response.json()
    if response.status != 200 or "errors" in answer or (expected is not None and answer != expected):
        raise SystemExit(f"{server.name}: unexpected answer {answer}")
    return answer


def commit_output(data_dir: Path) -> None:
    """One aggregation before any service starts: each one's start-up run then finds nothing changed, so
    none of them carries the heap of a first full run into its rows."""
    env = bq.service_env(data_dir)
    subprocess.run([sys.executable, "-m", "service", "process"], cwd=bq.REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=3600)  # fmt: skip


def start(args: argparse.Namespace, data_dir: Path, logs: Path) -> dict[str, bq.Server]:
    python, servers = sys.executable, {}
    commit_output(data_dir)
    services = [("S", "service, cache on", {}, None), ("O", "service, cache off", {"RESPONSE_CACHE_BYTES": "0"}, None)]
    if args.today_src is not None:
        services.append(("T", "service before the cache", {}, args.today_src))
    for key, label, extra, source in services:  # one at a time: their start-up runs must not compete
        port = bq.free_port()
        env = bq.with_service_src({**bq.service_env(data_dir, port), **extra}, source)
        servers[key] = bq.start_server(key, label, [python, "-m", "service", "serve"], env=env, logs=logs, port=port,
                                       cwd=source or bq.REPO)  # fmt: skip
        asyncio.run(wait_service(servers[key], args.ready_timeout))
        bq.log(f"{servers[key].name} ready")
    for key, label, script in (("b", "Strawberry ceiling", "_ceiling_app.py"), ("c", "bare aiohttp", "_bare_app.py")):
        port = bq.free_port()
        argv = [python, str(bq.BENCH_DIR / script), "--port", str(port)]
        servers[key] = bq.start_server(key, label, argv, env=dict(os.environ), logs=logs, port=port)
        asyncio.run(wait_up(servers[key]))
    return servers


def run(args: argparse.Namespace, servers: dict[str, bq.Server], scripts: Path) -> list[Result]:
    reference = asyncio.run(check(servers["O"], None))
    for key in servers.keys() & {"S", "T"}:
        asyncio.run(check(servers[key], reference))
    results = []
    for _ in range(args.rounds):
        for key, server in servers.items():
            results += [measure(server, ROWS[row], args, scripts) for row in PLAN[key] if row in args.rows]
    return merge(results)


def merge(results: Sequence[Result]) -> list[Result]:
    """One result per (server, row) over the rounds: requests and errors added, the medians of the rest (a
    round disturbed by other processes on the machine moves a median less than a mean)."""
    merged: dict[tuple[str, str], list[Result]] = {}
    for result in results:
        merged.setdefault((result.server, result.row), []).append(result)
    return [
        Result(
            server, row, median(r.rps for r in parts), median(r.p50_ms for r in parts),
            median(r.p99_ms for r in parts), sum(r.requests for r in parts), sum(r.errors for r in parts),
            median(r.server_cpu_ms for r in parts),
        )
        for (server, row), parts in merged.items()
    ]  # fmt: skip


COLUMNS = f"{'server':<32} {'row':<9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'errors':>6}"


def report(results: Sequence[Result], servers: dict[str, bq.Server], rows: Sequence[str]) -> bool:
    header = f"{COLUMNS} {'CPU ms/req':>10}"
    print(header + "\n" + "-" * len(header))
    for r in results:
        print(
            f"{r.server:<32} {r.row:<9} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.requests:9d} {r.errors:6d} "
            f"{r.server_cpu_ms:10.3f}"
        )
    by = {(r.server, r.row): r for r in results}

    def ratios(top: str, bottom: str, row: str) -> str:
        """top / bottom by req/s, and by server CPU per request (how many more per core)."""
        high, low = by[(servers[top].name, row)], by[(servers[bottom].name, row)]
        return f"{high.rps / low.rps:5.2f}x by req/s, {low.server_cpu_ms / high.server_cpu_ms:5.2f}x by CPU per request"

    print()
    met = True
    if "repeated" in rows:
        hit = by[(servers["S"].name, "repeated")].rps / by[(servers["b"].name, "repeated")].rps
        met = hit >= 3
        print(f"repeated stats: S / (b) Strawberry ceiling = {ratios('S', 'b', 'repeated')} (goal >= 3x by req/s: "
              f"{'MET' if met else 'NOT MET'})")  # fmt: skip
        print(f"repeated stats: S / (c) bare aiohttp = {ratios('S', 'c', 'repeated')}")
    for key in sorted(servers.keys() & {"O", "T"} if "miss" in rows else ()):
        print(f"miss: S / ({key}) = {ratios('S', key, 'miss')} (1.00x: the same cost)")
    errors = sum(r.errors for r in results)
    if errors:
        print(f"WARNING: {errors} requests failed")
    return met and not errors


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20_000, help="demo users (default 20000)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per row (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each row (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every row this many times, interleaved")
    parser.add_argument("--rows", default="repeated,GET,miss", help="the rows to measure (default: all three)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for each service")
    parser.add_argument("--data-dir", type=Path, help="use (and keep) this DATA_DIR")
    parser.add_argument("--today-src", type=Path, help="also run (T): the `service` package of this directory")
    args = parser.parse_args(argv)
    args.rows = args.rows.split(",")
    if not set(args.rows) <= ROWS.keys():
        parser.error(f"--rows: choose among {', '.join(ROWS)}")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (Debian: apt-get install wrk)")
    if args.today_src is not None and not (args.today_src / "service" / "__init__.py").is_file():
        parser.error(f"--today-src {args.today_src} has no service/ package")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    own_dir = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="bench-cache-")) if own_dir else args.data_dir.resolve()
    logs, scripts = Path(tempfile.mkdtemp(prefix="bench-cache-logs-")), Path(tempfile.mkdtemp(prefix="bench-wrk-"))
    servers: dict[str, bq.Server] = {}
    try:
        bq.write_demo_data(data_dir, args.users)
        servers = start(args, data_dir, logs)
        results = run(args, servers, scripts)
    finally:
        for server in servers.values():
            bq.stop_server(server)
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(scripts, ignore_errors=True)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{args.users:,} users; wrk, 1 thread, {args.connections} connections, {args.duration:g} s per row after "
        f"{args.warmup:g} s of warm-up, {args.rounds} round(s); {os.cpu_count()} CPUs shared by wrk and the servers; "
        f"load average {load}; server logs in {logs}\n"
    )
    print(bq.describe_source(None))
    met = report(results, servers, args.rows)
    print(f"goal met: {'yes' if met else 'NO'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
