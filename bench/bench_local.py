"""Benchmark the aggregator on the embedded LocalStore with many users (default 1,000,000).

The dataset is written straight to disk (os.write, no store), then each measurement runs in a child
process of its own so that its peak RSS (VmHWM, read by the child) is clean: the listing floor
(os.scandir + stat of every file), the read floor (also read every CSV), the project's listing
(LocalStore.list), the first full run, a no-change run and a run after 1% of the CSVs changed.

    python bench/bench_local.py --users 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

from _benchlib import hwm_mib, machine_line, print_table, rss_mib, verdict  # noqa: E402

from service.aggregator import Aggregator  # noqa: E402
from service.config import DEFAULT_FETCH_CONCURRENCY  # noqa: E402
from service.demo import demo_objects  # noqa: E402
from service.local_store import LocalStore  # noqa: E402

BUCKET = "bucket"
PREFIX = "src-data/"
FIRST_ID = 1000  # demo_objects numbers users from 1000
GIB = 1024.0  # MiB


# -- the dataset, written directly -------------------------------------------------------------------


def write_dataset(src: Path, users: int, image_ratio: float) -> tuple[int, int]:
    """Write every user's CSV (and ~image_ratio PNGs) with a bare os.open/os.write loop: (files, bytes)."""
    src.mkdir(parents=True, exist_ok=True)
    base = str(src) + os.sep
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    files = size = 0
    for name, data in demo_objects(users, image_ratio, seed=0, first_id=FIRST_ID):
        fd = os.open(base + name, flags, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        files += 1
        size += len(data)
    return files, size


def change_csvs(src: Path, user_ids: list[int], salt: int) -> None:
    """Replace CSVs as a producer would (temp file + rename): a new inode, so a new ETag."""
    rng = random.Random(salt)
    for user_id in user_ids:
        body = f"first_name, last_name, birthts\nChanged{salt}, Bench, {rng.randrange(0, 10**12)}\n"
        tmp, final = src / f".{user_id}.csv.partial", src / f"{user_id}.csv"
        tmp.write_bytes(body.encode())
        os.replace(tmp, final)


# -- child processes: one measurement each -----------------------------------------------------------


def walk(top: Path) -> Iterator[os.DirEntry[str]]:
    stack = [str(top)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    yield entry


def child_walk(src: Path, read: bool) -> dict[str, Any]:
    """The floors: walk + stat every file (as a listing must), and with `read`, read every CSV."""
    files = size = read_files = 0
    for entry in walk(src):
        files += 1
        size += entry.stat(follow_symlinks=False).st_size
        if read and entry.name.endswith(".csv"):
            with open(entry.path, "rb") as handle:
                handle.read()
            read_files += 1
    return {"listed": files, "fetched": read_files, "bytes": size}


async def child_list(root: Path) -> dict[str, Any]:
    listed = 0
    async for page in LocalStore(root, BUCKET).list(PREFIX):
        listed += len(page)
    return {"listed": listed, "fetched": 0}


async def child_run(root: Path, output_key: str, concurrency: int, repeat: int) -> dict[str, Any]:
    aggregator = Aggregator(LocalStore(root, BUCKET), src_prefix=PREFIX, output_key=output_key, concurrency=concurrency)
    runs = []
    for _ in range(repeat):
        began = time.perf_counter()
        report = (await aggregator.run()).report
        runs.append(
            {
                "seconds": time.perf_counter() - began,
                "hwm": hwm_mib(),
                "listed": report.listed,
                "fetched": report.fetched,
                "users": report.users,
                "updated": report.updated,
                "written": report.output_written,
                "full_rebuild": report.full_rebuild,
            }
        )
    return {**runs[0], "runs": runs}


def child_main(args: argparse.Namespace) -> int:
    root = Path(args.root)
    base_rss = rss_mib()
    began = time.perf_counter()
    if args.child in ("walk", "read"):
        result = child_walk(root / BUCKET / PREFIX, read=args.child == "read")
    elif args.child == "list":
        result = asyncio.run(child_list(root))
    else:
        result = asyncio.run(child_run(root, args.output_key, args.concurrency, args.repeat))
    result.setdefault("seconds", time.perf_counter() - began)
    result.update(base_rss=base_rss, peak_rss=hwm_mib())
    print(json.dumps(result))
    return 0


# -- the parent -----------------------------------------------------------------------------------------


class Runner:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.args = args
        self.rows: list[list[object]] = []
        self.results: dict[str, dict[str, Any]] = {}

    def child(self, name: str, label: str, mode: str, *extra: str) -> dict[str, Any]:
        command = [sys.executable, __file__, "--child", mode, "--root", str(self.root), *extra]
        command += ["--concurrency", str(self.args.concurrency)]
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=self.args.child_timeout, check=False)
        wall = time.perf_counter() - began
        if done.returncode != 0:
            raise RuntimeError(f"child {mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["wall"] = wall
        self.results[name] = result
        self.add_row(label, result)
        print(f"  {label}: {result['seconds']:.1f} s", flush=True)
        return result

    def add_row(self, label: str, r: dict[str, Any]) -> None:
        fetched = r.get("fetched") or 0
        self.rows.append(
            [
                label, r["seconds"], r.get("wall"), r.get("listed"), fetched,
                fetched / r["seconds"] if fetched else None, r.get("base_rss"), r.get("peak_rss"),
            ]
        )  # fmt: skip


def bench(root: Path, args: argparse.Namespace) -> None:
    users = args.users
    src = root / BUCKET / PREFIX
    print(f"# {machine_line()}")
    print(f"# data dir {root} (page cache warm: the files were just written)")
    began = time.perf_counter()
    files, size = write_dataset(src, users, args.image_ratio)
    write_s = time.perf_counter() - began
    began = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - began
    print(
        f"# dataset: {users:,} users, {files:,} files, {size / 2**20:,.1f} MiB written in {write_s:.1f} s "
        f"({files / write_s:,.0f} files/s) + os.sync {sync_s:.1f} s",
        flush=True,
    )
    run = Runner(root, args)
    key = "processed_data/output.csv"
    run.child("walk", "listing floor: scandir + stat every file", "walk")
    run.child("read", "read floor: scandir + stat + read every CSV, 1 thread", "read")
    run.child("list", "LocalStore.list alone", "list")
    run.child("full", "full run (first run, fresh process)", "run", "--output-key", key)
    nochange = run.child("none", "no change, fresh process (reads manifest)", "run", "--output-key", key,
                         "--repeat", "2")  # fmt: skip
    second = nochange["runs"][1]
    run.add_row("no change, same instance (2nd run in that process)", {**second, "wall": None})
    changed = max(1, round(users * args.changed))
    picked = random.Random(1).sample(range(FIRST_ID, FIRST_ID + users), changed)
    began = time.perf_counter()
    change_csvs(src, picked, 1)
    print(f"# changed {changed:,} CSVs in {time.perf_counter() - began:.1f} s", flush=True)
    run.child("changed", f"{changed:,} CSVs changed, fresh process", "run", "--output-key", key)

    headers = ["measurement", "seconds", "process wall s", "listed", "CSVs read", "CSV/s",
               "RSS after imports MiB", "peak RSS MiB"]  # fmt: skip
    print_table(headers, run.rows, f"Aggregator on LocalStore, {users:,} users (one child process per row)")
    print_summary(run.results, users)


def print_summary(r: dict[str, dict[str, Any]], users: int) -> None:
    full, none, changed = r["full"], r["none"], r["changed"]
    listing, floor = r["list"]["seconds"], r["walk"]["seconds"]
    rows = [
        ["full run peak RSS", f"{full['peak_rss']:,.0f} MiB", "< 1 GiB", verdict(full["peak_rss"] < GIB)],
        ["no-change run peak RSS", f"{none['peak_rss']:,.0f} MiB", "< 1 GiB", verdict(none["peak_rss"] < GIB)],
        ["1%-changed run peak RSS", f"{changed['peak_rss']:,.0f} MiB", "< 1 GiB",
         verdict(changed["peak_rss"] < GIB)],
        ["full run / read floor", f"{full['seconds'] / r['read']['seconds']:.2f}x", "", ""],
        ["LocalStore.list / listing floor", f"{listing / floor:.2f}x", "", ""],
        ["no change (fresh) - LocalStore.list", f"{none['seconds'] - listing:+.1f} s", "", ""],
        ["1% changed - LocalStore.list", f"{changed['seconds'] - listing:+.1f} s", "a few s",
         verdict(changed["seconds"] - listing <= 5)],
        ["full run: users in output", f"{full['users']:,}", f"{users:,}", verdict(full["users"] == users)],
        ["1% changed: users updated", f"{changed['updated']:,}", "", ""],
    ]  # fmt: skip
    print_table(["figure", "value", "goal", ""], rows, "Summary")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000, help="users in the dataset (default 1,000,000)")
    parser.add_argument("--image-ratio", type=float, default=0.7, help="share of users with a PNG")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_FETCH_CONCURRENCY, help="FETCH_CONCURRENCY")
    parser.add_argument("--changed", type=float, default=0.01, help="share of CSVs changed")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary data dir")
    parser.add_argument("--keep", action="store_true", help="keep the data dir (its path is printed)")
    parser.add_argument("--child-timeout", type=float, default=1800.0, help="seconds allowed per child")
    parser.add_argument("--child", choices=["walk", "read", "list", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--output-key", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.users < 1 or not 0 < args.changed <= 1:
        parser.error("--users must be positive and --changed in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    root = Path(tempfile.mkdtemp(prefix="bench-local-", dir=args.dir))
    try:
        bench(root, args)
    finally:
        if args.keep:
            print(f"# kept {root}")
        else:
            began = time.perf_counter()
            shutil.rmtree(root, ignore_errors=True)
            print(f"# removed {root} in {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
