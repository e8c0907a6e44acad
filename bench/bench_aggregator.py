"""Benchmark the aggregator against a real S3 server (SeaweedFS, started and stopped here).

One run measures, on the same dataset and the same client: the I/O floor (list + GET every CSV),
the first full run, runs after 1% of the CSVs changed, a no-change run, the listing alone, and the
seed's approach (sequential GET + pandas.read_csv per file); then, optionally, a FETCH_CONCURRENCY
sweep of the full run. Only 127.0.0.1 is contacted.

    python bench/bench_aggregator.py --users 5000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]

import pandas as pd  # noqa: E402
from _benchlib import (  # noqa: E402
    Phase,
    find_pid,
    machine_line,
    measure,
    peak_mib,
    print_table,
    verdict,
)
from s3server import SeaweedServer  # noqa: E402

from service.aggregator import Aggregator, RunResult  # noqa: E402
from service.config import DEFAULT_FETCH_CONCURRENCY  # noqa: E402
from service.demo import write_demo_data  # noqa: E402
from service.minio_store import MinioStore  # noqa: E402
from service.parsing import MAX_CSV_BYTES  # noqa: E402

BUCKET = "bench"
PREFIX = "src-data/"
FIRST_ID = 1000  # write_demo_data numbers users from 1000


@dataclass
class Bench:
    server: SeaweedServer
    store: MinioStore
    server_pid: int | None
    users: int
    concurrency: int
    runs: int = 0

    def output_key(self) -> str:
        self.runs += 1
        return f"bench-out/run-{self.runs}/output.csv"

    def aggregator(
        self, output_key: str, concurrency: int | None = None, store: MinioStore | None = None
    ) -> Aggregator:
        return Aggregator(
            store or self.store,
            src_prefix=PREFIX,
            output_key=output_key,
            concurrency=concurrency or self.concurrency,
        )


# -- the measured operations ---------------------------------------------------------------------


async def list_all(store: MinioStore) -> tuple[int, list[str]]:
    """(objects listed, CSV keys) under the prefix."""
    count = 0
    csvs: list[str] = []
    async for page in store.list(PREFIX):
        count += len(page)
        csvs.extend(info.key for info in page if info.key.endswith(".csv"))
    return count, csvs


async def io_floor(store: MinioStore, concurrency: int) -> tuple[int, int, int]:
    """List and GET every CSV as the aggregator does (pages feed a bounded queue), without parsing.

    Returns (objects listed, CSVs fetched, bytes fetched).
    """
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=concurrency * 2)
    totals = {"listed": 0, "fetched": 0, "bytes": 0}

    async def produce() -> None:
        async for page in store.list(PREFIX):
            totals["listed"] += len(page)
            for info in page:
                if info.key.endswith(".csv"):
                    await queue.put(info.key)
        for _ in range(concurrency):
            await queue.put(None)

    async def fetch() -> None:
        while (key := await queue.get()) is not None:
            totals["bytes"] += len(await store.get(key, max_bytes=MAX_CSV_BYTES))
            totals["fetched"] += 1

    await asyncio.gather(produce(), *(fetch() for _ in range(concurrency)))
    return totals["listed"], totals["fetched"], totals["bytes"]


async def seed_approach(store: MinioStore, limit: int, output_key: str) -> tuple[float, int, int, float]:
    """The seed's way: list, then one GET + `pd.read_csv` per CSV in turn, concat, write the output.

    Only the first `limit` CSVs are processed. Returns (listing seconds, CSVs in the bucket, CSVs
    processed, seconds for GET + parse + concat + write).
    """
    began = time.perf_counter()
    keys: list[str] = []
    async for page in store.list(PREFIX):
        keys.extend(info.key for info in page)
    listed = time.perf_counter()
    images = {k.rpartition("/")[2].rpartition(".")[0]: k for k in keys if k.endswith(".png")}
    csvs = [k for k in keys if k.endswith(".csv")]
    frames = []
    for key in csvs[:limit]:
        frame = pd.read_csv(io.BytesIO(await store.get(key)), skipinitialspace=True)
        frame.insert(0, "user_id", key.rpartition("/")[2].removesuffix(".csv"))
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table["img_path"] = table["user_id"].map(images).fillna("")
    await store.put(output_key, table.to_csv(index=False).encode(), "text/csv")
    return listed - began, len(csvs), min(limit, len(csvs)), time.perf_counter() - listed


async def overwrite(store: MinioStore, user_ids: list[int], salt: int, concurrency: int) -> None:
    """Give each user's CSV new content (a new ETag and a new row)."""
    semaphore = asyncio.Semaphore(concurrency)
    rng = random.Random(salt)

    async def put(user_id: int) -> None:
        body = f"first_name, last_name, birthts\nChanged{salt}, Bench, {rng.randrange(0, 10**12)}\n"
        async with semaphore:
            await store.put(f"{PREFIX}{user_id}.csv", body.encode(), "text/csv")

    await asyncio.gather(*(put(u) for u in user_ids))


# -- phases -----------------------------------------------------------------------------------------


def report_extra(phase: Phase, result: RunResult) -> None:
    report = result.report
    phase.extra.update(
        listed=report.listed,
        fetched=report.fetched,
        users=report.users,
        updated=report.updated,
        written=report.output_written,
    )


async def timed_run(bench: Bench, name: str, aggregator: Aggregator) -> Phase:
    with measure(name, bench.server_pid) as phase:
        result = await aggregator.run()
    report_extra(phase, result)
    return phase


async def timed_floor(bench: Bench, name: str, concurrency: int) -> Phase:
    with measure(name, bench.server_pid) as phase:
        listed, fetched, size = await io_floor(bench.store, concurrency)
    phase.extra.update(listed=listed, fetched=fetched, bytes=size)
    return phase


async def timed_listing(bench: Bench, name: str) -> Phase:
    with measure(name, bench.server_pid) as phase:
        listed, _ = await list_all(bench.store)
    phase.extra.update(listed=listed, fetched=0)
    return phase


async def fresh_store_run(bench: Bench, name: str, output_key: str) -> Phase:
    """A run by a new Aggregator on a new client, as a restarted process: it must read the manifest."""
    store = bench.server.store(BUCKET, timeout=60)
    try:
        return await timed_run(bench, name, bench.aggregator(output_key, store=store))
    finally:
        await store.close()


async def repeated(times: int, make: Callable[[int], Awaitable[Phase]]) -> list[Phase]:
    return [await make(i) for i in range(times)]


def median_phase(phases: list[Phase]) -> Phase:
    return sorted(phases, key=lambda p: p.seconds)[(len(phases) - 1) // 2]


# -- the benchmark ----------------------------------------------------------------------------------


async def main_bench(args: argparse.Namespace, server: SeaweedServer) -> None:
    store = server.store(BUCKET, timeout=60)
    bench = Bench(server, store, find_pid(str(server.root)), args.users, args.concurrency)
    try:
        await run_all(bench, args)
    finally:
        await store.close()


async def run_all(bench: Bench, args: argparse.Namespace) -> None:
    users, c = bench.users, bench.concurrency
    print(f"# {machine_line()}")
    print(f"# SeaweedFS `weed mini` on {bench.server.endpoint}, started in {bench.server.start_seconds:.1f} s")
    with measure("upload", bench.server_pid) as upload:
        summary = await write_demo_data(
            bench.store, PREFIX, users=users, image_ratio=args.image_ratio, concurrency=args.upload_concurrency
        )
    objects = summary.users + summary.images
    print(
        f"# dataset: {users:,} users, {summary.images:,} images = {objects:,} objects, uploaded by "
        f"write_demo_data at concurrency {args.upload_concurrency} in {upload.seconds:.1f} s "
        f"({objects / upload.seconds:,.0f} PUT/s)"
    )
    await list_all(bench.store)  # warm-up: connections and the server's metadata caches
    rows: list[tuple[str, Phase]] = []

    floors = await repeated(args.repeat, lambda i: timed_floor(bench, f"(a) I/O floor #{i + 1}", c))
    last: list[Aggregator] = []

    async def full_run(i: int) -> Phase:
        last[:] = [bench.aggregator(bench.output_key())]
        return await timed_run(bench, f"(b) full run #{i + 1}", last[0])

    fulls = await repeated(args.repeat, full_run)
    rows += [(f"(a) I/O floor: list + GET every CSV, c={c}", p) for p in floors]
    rows += [(f"(b) full run, fresh output key, c={c}", p) for p in fulls]

    # The incremental runs continue from the last full run's output, first with its instance.
    agg = last.pop()
    key = agg.output_key
    rng = random.Random(1)
    changed = max(1, round(users * args.changed))
    picked = rng.sample(range(FIRST_ID, FIRST_ID + users), min(users, 2 * changed))
    await overwrite(bench.store, picked[:changed], 1, args.upload_concurrency)
    rows.append((f"(c) {changed:,} CSVs changed, same instance", await timed_run(bench, "c1", agg)))
    await overwrite(bench.store, picked[changed:], 2, args.upload_concurrency)
    rows.append((f"(c) {changed:,} other CSVs changed, fresh instance", await fresh_store_run(bench, "c2", key)))
    rows.append(("(d) no change, same instance", await timed_run(bench, "d1", agg)))
    rows.append(("(d) no change, fresh instance", await fresh_store_run(bench, "d2", key)))
    del agg
    listings = await repeated(args.repeat, lambda i: timed_listing(bench, f"(e) listing #{i + 1}"))
    rows += [("(e) listing alone", p) for p in listings]

    limit = min(args.seed_files, users)
    with measure("seed", bench.server_pid) as seed:
        list_s, n_csv, done, work_s = await seed_approach(bench.store, limit, "bench-out/seed/output.csv")
    scale = n_csv / done
    seed.extra.update(listed=objects, fetched=done, rate=done / work_s)
    if scale > 1:
        seed.extra["measured"] = seed.seconds
        seed.seconds = list_s + work_s * scale
        seed_label = f"(f) seed: sequential GET+read_csv, EXTRAPOLATED x{scale:.1f} from {done:,} CSVs"
    else:
        seed_label = "(f) seed: sequential GET + read_csv per file"
    rows.append((seed_label, seed))

    traced: float | None = None
    if args.tracemalloc == "on" or (args.tracemalloc == "auto" and users <= 10_000):
        tracemalloc.start()
        phase = await timed_run(bench, "traced", bench.aggregator(bench.output_key()))
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        rows.append((f"(b) full run under tracemalloc: traced peak {traced:,.0f} MiB", phase))

    floor, full = median_phase(floors), median_phase(fulls)
    print_main_table(rows, floor.seconds)
    listing = median_phase(listings).seconds
    by = {p.name: p for _, p in rows}
    print_ratios(floor, full, seed, by, listing, extrapolated=scale > 1)
    print(
        f"\npeak memory: process peak RSS {peak_mib():,.0f} MiB (whole benchmark, upload included); "
        f"full run VmHWM {full.hwm:,.0f} MiB (started at {full.rss_before:,.0f} MiB)"
        + (f"; tracemalloc peak of a full run {traced:,.0f} MiB" if traced is not None else "")
    )
    if args.sweep:
        await sweep(bench, args.sweep, args.sweep_rounds)


def print_main_table(rows: list[tuple[str, Phase]], floor_s: float) -> None:
    headers = [
        "measurement", "seconds", "listed", "CSVs fetched", "CSV/s", "client CPU s", "server CPU s",
        "RSS before MiB", "peak RSS MiB", "x floor",
    ]  # fmt: skip
    table = []
    for label, p in rows:
        fetched = p.extra.get("fetched")
        rate = p.extra.get("rate") or (fetched / p.seconds if isinstance(fetched, int) and fetched else None)
        measured_only = "measured" in p.extra  # an extrapolated row: CPU and RSS are the subset's
        table.append(
            [
                label, p.seconds, p.extra.get("listed"), fetched, rate,
                None if measured_only else p.cpu, None if measured_only else p.server_cpu,
                p.rss_before, p.hwm, p.seconds / floor_s,
            ]
        )  # fmt: skip
    print_table(headers, table, "Aggregator on SeaweedFS (seconds are wall time; x floor = seconds / (a))")


def print_ratios(
    floor: Phase, full: Phase, seed: Phase, by: dict[str, Phase], listing: float, *, extrapolated: bool
) -> None:
    inc_same, inc_fresh = by["c1"].seconds - listing, by["c2"].seconds - listing
    none_same, none_fresh = by["d1"].seconds - listing, by["d2"].seconds - listing
    note = " (seed extrapolated)" if extrapolated else ""
    ratios = [
        ["full run / I/O floor", f"{full.seconds / floor.seconds:.2f}x", "<= 1.5x",
         verdict(full.seconds <= 1.5 * floor.seconds)],
        [f"seed / full run{note}", f"{seed.seconds / full.seconds:.2f}x", ">= 5x",
         verdict(seed.seconds >= 5 * full.seconds)],
        ["1% changed - listing, same instance", f"{inc_same:+.2f} s", "a few s", verdict(inc_same <= 3)],
        ["1% changed - listing, fresh instance", f"{inc_fresh:+.2f} s", "a few s", verdict(inc_fresh <= 3)],
        ["no change - listing, same instance", f"{none_same:+.2f} s", "", ""],
        ["no change - listing, fresh instance", f"{none_fresh:+.2f} s", "", ""],
    ]  # fmt: skip
    print_table(["ratio", "value", "goal", ""], ratios, "Ratios (medians where repeated)")


async def sweep(bench: Bench, levels: list[int], rounds: int) -> None:
    """Full runs and I/O floors at each FETCH_CONCURRENCY; rounds alternate the order to spread drift."""
    floors: dict[int, list[float]] = {c: [] for c in levels}
    fulls: dict[int, list[float]] = {c: [] for c in levels}
    fetched = 0
    for round_no in range(rounds):
        for c in levels if round_no % 2 == 0 else list(reversed(levels)):
            floors[c].append((await timed_floor(bench, "sweep floor", c)).seconds)
            phase = await timed_run(bench, "sweep full", bench.aggregator(bench.output_key(), concurrency=c))
            fulls[c].append(phase.seconds)
            fetched = int(str(phase.extra["fetched"]))
    medians = {c: statistics.median(fulls[c]) for c in levels}
    best = min(levels, key=lambda c: medians[c])
    rows = [
        [
            f"{c}{'  <- best' if c == best else ''}",
            statistics.median(floors[c]), min(floors[c]), medians[c], min(fulls[c]),
            fetched / medians[c], medians[c] / statistics.median(floors[c]),
        ]
        for c in levels
    ]  # fmt: skip
    headers = ["FETCH_CONCURRENCY", "floor median s", "floor min s", "full median s", "full min s",
               "CSV/s (median)", "full/floor"]  # fmt: skip
    print_table(headers, rows, f"FETCH_CONCURRENCY sweep: {bench.users:,} users, {rounds} round(s) each")
    print(f"best FETCH_CONCURRENCY by median full-run time: {best} (project default {DEFAULT_FETCH_CONCURRENCY})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5000, help="users in the dataset (default 5000)")
    parser.add_argument("--image-ratio", type=float, default=0.7, help="share of users with a PNG")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_FETCH_CONCURRENCY, help="FETCH_CONCURRENCY")
    parser.add_argument("--upload-concurrency", type=int, default=128, help="concurrency of the upload")
    parser.add_argument("--changed", type=float, default=0.01, help="share of CSVs changed for (c)")
    parser.add_argument("--seed-files", type=int, default=5000, help="CSVs the seed approach really processes")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions of (a), (b) and (e); medians used")
    parser.add_argument(
        "--sweep",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[8, 16, 32, 64, 128],
        help="FETCH_CONCURRENCY values to sweep, comma-separated; '' skips the sweep",
    )
    parser.add_argument("--sweep-rounds", type=int, default=1, help="full runs per sweep value")
    parser.add_argument(
        "--tracemalloc",
        choices=["auto", "on", "off"],
        default="auto",
        help="an extra full run under tracemalloc (about 5x slower); auto: only up to 10,000 users",
    )
    parser.add_argument("--time-limit", type=float, default=3600.0, help="abort after this many seconds")
    args = parser.parse_args(argv)
    if args.users < 1 or args.repeat < 1 or args.sweep_rounds < 1 or not 0 < args.changed <= 0.5:
        parser.error("--users, --repeat and --sweep-rounds must be positive, --changed in (0, 0.5]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = SeaweedServer(startup_timeout=60.0)
    server.start()
    try:
        asyncio.run(asyncio.wait_for(main_bench(args, server), timeout=args.time_limit))
    except TimeoutError:
        print(f"aborted: over --time-limit {args.time_limit:g} s", file=sys.stderr)
        return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
