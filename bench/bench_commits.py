"""What a targeted run and a follower's look at its commit cost, against rewriting and rereading it all.

On the embedded store (a temporary `DATA_DIR`), `--users` demo users are written and committed by a
first full run. Then, `--rounds` times, `--changed` CSVs are rewritten (scattered over the bucket, as
real updates are) and two aggregators apply them in turn with a targeted run:

- kept: `keep_blocks` on, as `serve` runs it with `EVENTS_TOKEN` set (only changed blocks are
  formatted and compressed again, and only the named users derived again);
- afresh: `keep_blocks` off, the output and the manifest written whole: the baseline.

After each kept commit, two readers look at it as a follower does (`load_committed`): one that read
the previous commit (block by block) and a fresh one (the whole manifest): the baseline. Medians of
the rounds; wall seconds of one process on an otherwise idle machine.

    python bench/bench_commits.py --users 50000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

from _benchlib import machine_line, print_table  # noqa: E402

from service.aggregator import Aggregator, Targets  # noqa: E402
from service.demo import write_demo_data  # noqa: E402
from service.local_store import LocalStore  # noqa: E402

PREFIX = "src-data/"
FIRST_ID = 1000  # demo users are numbered from 1000


def aggregator(store: LocalStore, output_key: str, *, keep_blocks: bool) -> Aggregator:
    return Aggregator(store, src_prefix=PREFIX, output_key=output_key, concurrency=64, keep_blocks=keep_blocks)


async def timed(awaitable: Awaitable[object]) -> float:
    began = time.perf_counter()
    await awaitable
    return time.perf_counter() - began


async def bench(args: argparse.Namespace, root: Path) -> None:
    store = LocalStore(root, "bench")
    await store.ensure_bucket()
    await write_demo_data(store, PREFIX, users=args.users, concurrency=64)
    kept = aggregator(store, "kept/output.csv", keep_blocks=True)
    afresh = aggregator(store, "afresh/output.csv", keep_blocks=False)
    follower = aggregator(store, "kept/output.csv", keep_blocks=False)
    for first in (kept, afresh):
        await first.run()
    await follower.load_committed()
    rng = random.Random(1)
    times: dict[str, list[float]] = {name: [] for name in ("kept", "afresh", "follower", "fresh reader")}
    for round_ in range(args.rounds):
        numbers = rng.sample(range(FIRST_ID, FIRST_ID + args.users), args.changed)
        keys = [f"{PREFIX}{number}.csv" for number in numbers]
        for number, key in zip(numbers, keys, strict=True):
            await store.put(key, f"first_name,last_name,birthts\nRound{round_},U{number},631152000000\n".encode())
        targets = Targets(frozenset(keys))
        times["kept"].append(await timed(kept.run(targets=targets)))
        times["afresh"].append(await timed(afresh.run(targets=targets)))
        times["follower"].append(await timed(follower.load_committed()))
        fresh = aggregator(store, "kept/output.csv", keep_blocks=False)
        times["fresh reader"].append(await timed(fresh.load_committed()))
    followed, written = await follower.load_committed(), await afresh.load_committed()
    assert followed is not None and written is not None and followed.table.equals(written.table)
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = [
        ["targeted run, changed blocks kept", median["kept"], median["afresh"], median["afresh"] / median["kept"]],
        ["follower's look, block by block", median["follower"], median["fresh reader"],
         median["fresh reader"] / median["follower"]],
    ]  # fmt: skip
    sizes = {key: (await store.stat(key)).size / 1e6 for key in ("kept/output.csv", "kept/output.csv.manifest")}
    print_table(
        ["", "seconds", "baseline s", "faster"],
        rows,
        title=(
            f"{args.users:,} users, {args.changed} scattered CSVs changed per round, median of {args.rounds} rounds "
            f"(output {sizes['kept/output.csv']:.1f} MB, manifest {sizes['kept/output.csv.manifest']:.1f} MB); "
            "baselines: the same run writing both whole, a reader's first look:"
        ),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--changed", type=int, default=200, help="CSVs rewritten per round")
    parser.add_argument("--rounds", type=int, default=7)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(machine_line())
    root = Path(tempfile.mkdtemp(prefix="bench-commits-"))
    try:
        asyncio.run(bench(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
