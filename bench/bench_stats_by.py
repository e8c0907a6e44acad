"""Grouped statistics: `statsBy` against `stats` and against a pandas groupby, on one in-memory snapshot.

Builds a snapshot of `--users` generated users in this process (no server, no store): birth times uniform
over 1926..2025, `--image-ratio` with an image, names from small pools. Then, in turn and `--rounds` times
interleaved, each row is called `--calls` times and timed call by call:

  query level   `query.stats` and `query.stats_by` as the resolvers call them (the cached per-day and
                per-snapshot histograms already built: their one-off cost is printed apart)
  GraphQL       the same through the service's schema (`execute_sync`: parse and validation caches,
                guards, completion of every group's fields), a context holding only the snapshot
  pandas        the usual answer: the snapshot's table as a DataFrame, ages computed from birthts per
                request (a) or kept in a column (b), then `groupby(...).agg(count, mean, min, max)`

    python bench/bench_stats_by.py --users 1000000

Reported: median and p99 per call (microseconds), calls per second, and the ratio of each median to the
median of `stats` at the same level; groups returned, to check that every row answers the same question.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _benchlib import machine_line, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import query
from service.schema import Context, build_schema
from service.snapshot import Snapshot

FIRST_NAMES = ["Anna", "John", "Zoë", "Li", "Mary Ann", "Sam", "Nanna", "Ösel"]
LAST_NAMES = ["Smith", "Strauß", "O'Brien", "Na", "Lee", "Anderson", "Ångström", "Işık"]
AGE, BIRTH_YEAR, HAS_IMAGE = query.GROUPINGS
GROUP_FIELDS = " ".join(f.graphql for f in query.GROUP_FIELDS)


@dataclass(frozen=True)
class Row:
    level: str
    name: str
    call: Callable[[], int]  # returns how many groups (or 1 for `stats`) it answered


def make_snapshot(users: int, image_ratio: float, seed: int) -> Snapshot:
    rng = np.random.default_rng(seed)
    low = int(datetime(1926, 1, 1, tzinfo=UTC).timestamp() * 1000)
    high = int(datetime(2025, 12, 31, tzinfo=UTC).timestamp() * 1000)
    ids = np.array([f"{i:08d}" for i in range(users)], dtype=object)
    table = pd.DataFrame(
        {
            "user_id": ids,
            "first_name": np.array(FIRST_NAMES, dtype=object)[rng.integers(0, len(FIRST_NAMES), users)],
            "last_name": np.array(LAST_NAMES, dtype=object)[rng.integers(0, len(LAST_NAMES), users)],
            "birthts": rng.integers(low, high, users, dtype=np.int64),
            "img_path": np.where(rng.random(users) < image_ratio, "src-data/" + ids + ".png", ""),
        }
    )
    return Snapshot(table, version=1, committed_at=datetime.now(UTC))


class _State:
    """What the `stats` and `statsBy` resolvers read of the service's state."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def current(self) -> Snapshot:
        return self.snapshot


def graphql_call(schema: Any, context: Context, document: str, root: str) -> Callable[[], int]:
    def call() -> int:
        result = schema.execute_sync(document, context_value=context)
        assert result.errors is None, result.errors
        answer = result.data[root]
        return len(answer) if isinstance(answer, list) else 1

    return call


def pandas_by_age(frame: pd.DataFrame, today: date, keep_ages: bool) -> Callable[[], int]:
    """Ages from birthts on every call (a), as a per-request solution computes them, or a kept column (b)."""
    kept = pd.Series(_ages(frame, today), index=frame.index) if keep_ages else None

    def call() -> int:
        ages = kept if kept is not None else pd.Series(_ages(frame, today), index=frame.index)
        grouped = ages.groupby(ages).agg(["count", "mean", "min", "max"])
        return len(grouped)

    return call


def _ages(frame: pd.DataFrame, today: date) -> np.ndarray[Any, Any]:
    born = pd.to_datetime(frame["birthts"], unit="ms", utc=True)
    not_yet = (born.dt.month * 100 + born.dt.day) > today.month * 100 + today.day
    return (today.year - born.dt.year - not_yet).to_numpy()


def rows(snapshot: Snapshot, today: date) -> list[Row]:
    everyone, adults = query.UserFilter(), query.UserFilter(has_image=True, min_age=18, max_age=65)
    by_name = query.UserFilter(name_contains="an")
    schema = build_schema()
    context = Context(state=_State(snapshot), request=None)  # type: ignore[arg-type]
    frame = snapshot.table
    return [
        Row("query", "stats", lambda: _one(query.stats(snapshot, everyone, today))),
        Row("query", "stats(isImageExists, 18..65)", lambda: _one(query.stats(snapshot, adults, today))),
        Row("query", "statsBy(AGE)", lambda: len(query.stats_by(snapshot, AGE, everyone, today))),
        Row("query", "statsBy(AGE, isImageExists, 18..65)", lambda: len(query.stats_by(snapshot, AGE, adults, today))),
        Row("query", "statsBy(BIRTH_YEAR)", lambda: len(query.stats_by(snapshot, BIRTH_YEAR, everyone, today))),
        Row("query", "statsBy(HAS_IMAGE)", lambda: len(query.stats_by(snapshot, HAS_IMAGE, everyone, today))),
        Row("query", "stats(nameContains) [rows]", lambda: _one(query.stats(snapshot, by_name, today))),
        Row("query", "statsBy(AGE, nameContains) [rows]", lambda: len(query.stats_by(snapshot, AGE, by_name, today))),
        Row("graphql", "stats", graphql_call(schema, context, "{ stats { count averageAge } }", "stats")),
        Row(
            "graphql",
            "statsBy(AGE)",
            graphql_call(schema, context, f"{{ statsBy(groupBy: AGE) {{ {GROUP_FIELDS} }} }}", "statsBy"),
        ),
        Row(
            "graphql",
            "statsBy(BIRTH_YEAR)",
            graphql_call(schema, context, f"{{ statsBy(groupBy: BIRTH_YEAR) {{ {GROUP_FIELDS} }} }}", "statsBy"),
        ),
        Row("pandas", "(a) groupby age, ages per call", pandas_by_age(frame, today, keep_ages=False)),
        Row("pandas", "(b) groupby age, ages kept", pandas_by_age(frame, today, keep_ages=True)),
    ]


def _one(_: query.Stats) -> int:
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--image-ratio", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per row and round")
    parser.add_argument("--slow-calls", type=int, default=10, help="calls per round of rows that read rows")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    print(machine_line())
    started = time.perf_counter()
    snapshot = make_snapshot(args.users, args.image_ratio, args.seed)
    print(f"{args.users:,} users generated and loaded in {time.perf_counter() - started:.1f} s")
    today = query.today_utc()
    once = [
        ("ages, per day", lambda: snapshot.ages(today)),
        ("age x image histogram, per day (stats, statsBy AGE/HAS_IMAGE)", lambda: snapshot.age_counts(today)),
        ("birth year x image x birthday, per snapshot (statsBy BIRTH_YEAR)", lambda: snapshot._birthdays(today.year)),
        ("case-folded names, per snapshot (nameContains)", lambda: query._folded_names(snapshot)),
    ]  # fmt: skip
    one_off = []
    for name, build in once:
        started = time.perf_counter()
        build()
        one_off.append((name, (time.perf_counter() - started) * 1000))
    print_table(["built once", "ms"], one_off, title="One-off costs (before the timed calls)")

    measured = rows(snapshot, today)
    times: dict[str, list[float]] = {f"{r.level}: {r.name}": [] for r in measured}
    groups: dict[str, int] = {}
    for _ in range(args.rounds):
        for row in measured:
            key = f"{row.level}: {row.name}"
            calls = args.slow_calls if "[rows]" in row.name or row.level == "pandas" else args.calls
            for _ in range(calls):
                started = time.perf_counter_ns()
                groups[key] = row.call()
                times[key].append((time.perf_counter_ns() - started) / 1000)

    baseline = {level: statistics.median(times[f"{level}: stats"]) for level in ("query", "graphql")}
    baseline["pandas"] = baseline["query"]
    table = []
    for row in measured:
        key = f"{row.level}: {row.name}"
        samples = sorted(times[key])
        median = statistics.median(samples)
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        table.append((key, groups[key], len(samples), median, p99, 1e6 / median, median / baseline[row.level]))
    headers = ["row", "groups", "calls", "median us", "p99 us", "calls/s", "x stats"]
    print_table(headers, table, title=f"Per call, {args.users:,} users ('x stats': against `stats` of its level)")
    pandas_median = statistics.median(times["pandas: (b) groupby age, ages kept"])
    ours = statistics.median(times["query: statsBy(AGE)"])
    print(f"\nstatsBy(AGE) at the query level is {pandas_median / ours:,.0f}x faster than pandas groupby (b)")


if __name__ == "__main__":
    main()
