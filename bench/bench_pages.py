"""Large pages: what the biggest requests cost, and how long `/healthz` waits while one is served.

The service runs as `python -m service serve` (a subprocess on 127.0.0.1, demo data written by
`bench_queries.py`'s helpers). Each row sends one request `--trials` times in turn; while it is in
flight, this process sends `GET /healthz` after `--probe-delay` seconds and times its answer: an event
loop kept busy by the large request shows as a slow `/healthz`, a free one answers in milliseconds.

    python bench/bench_pages.py --users 20000

`--service-src DIR` runs the `service` package of another directory, e.g. an export of an earlier
commit (`git archive <commit> service | tar -x -C DIR`), to compare before and after on the same data.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from _benchlib import machine_line, print_table
from bench_queries import (
    JSON_HEADERS,
    Server,
    describe_source,
    free_port,
    log,
    service_env,
    start_server,
    stop_server,
    wait_ready,
    with_service_src,
    write_demo_data,
)

FIELDS = "userId firstName lastName birthts birthDate age imgPath imageUrl"
REPO = Path(__file__).resolve().parent.parent


def aliases(count: int, limit: int, step: int) -> str:
    """`count` aliased `users` fields of `limit` rows each from offsets 0, step, 2 * step..., all fields."""
    fields = " ".join(f"a{i}: users(limit: {limit}, offset: {i * step}) {{ {FIELDS} }}" for i in range(count))
    return "{ " + fields + " }"


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    path: str
    query: str | None = None  # a GraphQL POST when set


def rows(page: int) -> list[Row]:
    return [
        Row(f"1 x users(limit: {page}), all fields", "POST", "/graphql", aliases(1, page, 0)),
        Row(f"20 x users(limit: {page // 20}), all fields", "POST", "/graphql", aliases(20, page // 20, page // 20)),
        Row(f"20 x users(limit: {page}, offset: i)", "POST", "/graphql", aliases(20, page, 1)),  # the issue's
        Row("GET /data (no limit)", "GET", "/data"),
        Row("GET /data?is_image_exists=true&min_age=20", "GET", "/data?is_image_exists=true&min_age=20"),
    ]


@dataclass
class Trial:
    seconds: float
    healthz_ms: float
    status: int
    body_bytes: int
    outcome: str


async def one_trial(session: aiohttp.ClientSession, url: str, row: Row, probe_delay: float) -> Trial:
    async def request() -> tuple[int, bytes]:
        body = json.dumps({"query": row.query}).encode() if row.query is not None else None
        headers = JSON_HEADERS if body is not None else None
        async with session.request(row.method, url + row.path, data=body, headers=headers) as response:
            return response.status, await response.read()

    started = time.perf_counter()
    task = asyncio.create_task(request())
    await asyncio.sleep(probe_delay)
    probe = time.perf_counter()
    async with session.get(url + "/healthz") as response:
        await response.read()
    healthz = time.perf_counter() - probe
    status, body = await task
    seconds = time.perf_counter() - started
    return Trial(seconds, healthz * 1000, status, len(body), describe(row, status, body))


def describe(row: Row, status: int, body: bytes) -> str:
    """Whether the request was answered ("ok" and the rows returned) or refused (the error's start)."""
    answer = json.loads(body) if body[:1] in (b"{", b"[") else body.decode(errors="replace")
    if isinstance(answer, dict) and answer.get("errors"):
        return "refused: " + answer["errors"][0]["message"][:60]
    if isinstance(answer, dict) and isinstance(answer.get("data"), dict):
        return f"ok, {sum(len(v) for v in answer['data'].values())} rows"
    if isinstance(answer, list):
        return f"ok, {len(answer)} rows"
    return f"HTTP {status}: {str(answer)[:60]}"


async def measure(server: Server, page: int, trials: int, probe_delay: float) -> list[list[object]]:
    table: list[list[object]] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for row in rows(page):
            await one_trial(session, server.url, row, probe_delay)  # warm-up: caches, first-day ages
            results = [await one_trial(session, server.url, row, probe_delay) for _ in range(trials)]
            seconds = [t.seconds for t in results]
            waits = [t.healthz_ms for t in results]
            table.append([
                row.name, results[-1].outcome, f"{results[-1].body_bytes / 1e6:.2f}",
                f"{statistics.median(seconds):.3f}", f"{max(seconds):.3f}",
                f"{statistics.median(waits):.0f}", f"{max(waits):.0f}",
            ])  # fmt: skip
            log(f"{row.name}: {statistics.median(seconds):.3f}s, /healthz {statistics.median(waits):.0f} ms")
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20_000, help="demo users to write (default 20000)")
    parser.add_argument("--page", type=int, default=10_000, help="MAX_PAGE_SIZE of the service (default 10000)")
    parser.add_argument("--trials", type=int, default=5, help="requests per row (default 5), after one warm-up")
    parser.add_argument("--probe-delay", type=float, default=0.05, help="seconds between a request and its "
                        "/healthz probe (default 0.05)")  # fmt: skip
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for /readyz")
    parser.add_argument("--data-dir", type=Path, help="use (and keep) this DATA_DIR; reused when it holds "
                        "demo data this script wrote for the same --users")  # fmt: skip
    parser.add_argument("--service-src", type=Path, help="import `service` from this directory instead")
    args = parser.parse_args(argv)
    if args.users < 1 or args.page < 20 or args.trials < 1 or args.probe_delay < 0:
        parser.error("--users, --trials must be >= 1, --page >= 20, --probe-delay >= 0")
    return args


async def start(args: argparse.Namespace, data_dir: Path, logs: Path) -> Server:
    port = free_port()
    env = with_service_src({**service_env(data_dir, port), "MAX_PAGE_SIZE": str(args.page)}, args.service_src)
    server = start_server(
        "S", "service", [sys.executable, "-m", "service", "serve"], env=env, logs=logs, port=port,
        cwd=args.service_src or REPO,
    )  # fmt: skip
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await wait_ready(session, server, args.ready_timeout)
    return server


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    own_dir = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="bench-pages-")) if own_dir else args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-pages-logs-"))
    server: Server | None = None
    try:
        write_demo_data(data_dir, args.users)
        server = asyncio.run(start(args, data_dir, logs))
        table = asyncio.run(measure(server, args.page, args.trials, args.probe_delay))
    finally:
        if server is not None:
            stop_server(server)
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(machine_line())
    print(f"{args.users:,} users, MAX_PAGE_SIZE {args.page}, {args.trials} trials per row; {os.cpu_count()} CPUs")
    print(describe_source(args.service_src))
    headers = ["request", "answer", "MB", "median s", "max s", "/healthz median ms", "/healthz max ms"]
    print_table(headers, table)
    print(f"(server log: {logs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
