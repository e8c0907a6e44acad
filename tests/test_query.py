"""Ages, filters and statistics over a snapshot, against independently computed expectations."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import statistics
import typing
import weakref
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import snapshot_of

from service import query
from service.errors import BadRequest
from service.snapshot import Snapshot

untimed = settings(deadline=None)  # these check results, not speed: a busy machine must not fail them


def ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp() * 1000)


def reference_age(birthts: int, today: date) -> int:
    born = datetime.fromtimestamp(birthts / 1000, tz=UTC).date()
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


@pytest.mark.parametrize(
    ("born", "today", "age"),
    [
        (ms(2000, 6, 15), date(2026, 6, 15), 26),  # birthday today
        (ms(2000, 6, 16), date(2026, 6, 15), 25),  # birthday tomorrow
        (ms(2000, 6, 14, 23), date(2026, 6, 15), 26),
        (ms(2000, 6, 15, 23), date(2026, 6, 15), 26),  # late in the day, still the same UTC date
        (ms(2004, 2, 29), date(2026, 2, 28), 21),  # leapling: not yet on 28 February
        (ms(2004, 2, 29), date(2026, 3, 1), 22),  # a year older on 1 March
        (ms(2004, 2, 29), date(2028, 2, 29), 24),  # on the day in a leap year
        (ms(1950, 1, 1), date(2026, 1, 1), 76),  # before 1970: negative timestamp
        (ms(1969, 12, 31, 23), date(2026, 12, 31), 57),
        (ms(2026, 1, 1), date(2026, 1, 1), 0),
    ],
)
def test_age_boundaries(born: int, today: date, age: int) -> None:
    snapshot = snapshot_of([("u", born, "")])
    assert int(snapshot.ages(today)[0]) == age == reference_age(born, today)


@untimed
@given(
    births=st.lists(st.integers(min_value=-5_364_662_400_000, max_value=ms(2026, 1, 1)), min_size=1, max_size=50),
    today=st.dates(min_value=date(2026, 1, 1), max_value=date(2100, 12, 31)),
)
def test_ages_match_calendar_arithmetic(births: list[int], today: date) -> None:
    snapshot = snapshot_of([(f"u{i:03}", b, "") for i, b in enumerate(births)])
    assert list(snapshot.ages(today)) == [reference_age(b, today) for b in births]


TODAY = date(2026, 11, 27)
PEOPLE = [
    ("1000", ms(2000, 11, 27), "src-data/1000.png"),  # 26 today
    ("1001", ms(2000, 11, 28), ""),  # 25 (birthday tomorrow)
    ("1002", ms(1960, 1, 1), "src-data/1002.jpg"),  # 66
    ("1003", ms(2010, 5, 5), ""),  # 16
    ("1004", ms(1990, 2, 28), "src-data/x/1004.png"),  # 36
]


@pytest.mark.parametrize(
    ("has_image", "min_age", "max_age"),
    list(itertools.product([None, True, False], [None, 0, 16, 25, 26, 67], [None, 16, 25, 26, 66, 100])),
)
def test_every_filter_combination(has_image: bool | None, min_age: int | None, max_age: int | None) -> None:
    snapshot = snapshot_of(PEOPLE)
    flt = query.UserFilter(has_image, min_age, max_age)
    if min_age is not None and max_age is not None and min_age > max_age:
        with pytest.raises(BadRequest, match="minAge"):
            flt.validate(query.Api.GRAPHQL)
        return
    expected = [
        (uid, reference_age(b, TODAY), img)
        for uid, b, img in PEOPLE
        if (has_image is None or bool(img) == has_image)
        and (min_age is None or reference_age(b, TODAY) >= min_age)
        and (max_age is None or reference_age(b, TODAY) <= max_age)
    ]
    rows = query.users(snapshot, query.select(snapshot, flt.validate(query.Api.GRAPHQL), TODAY), TODAY)
    assert [(r.user_id, r.age, r.img_path) for r in rows] == expected
    result = query.stats(snapshot, flt, TODAY)
    assert result.count == len(expected)
    ages = [age for _, age, _ in expected]
    assert result.average_age == (pytest.approx(statistics.mean(ages)) if ages else None)
    assert (result.youngest_age, result.oldest_age) == ((min(ages), max(ages)) if ages else (None, None))
    assert result.with_image == sum(1 for *_, img in expected if img)
    assert result.with_image + result.without_image == result.count


@pytest.mark.parametrize(
    ("flt", "graphql", "rest"),
    [
        (query.UserFilter(min_age=-1), "minAge must be between 0 and 1000, got -1", "min_age must be between 0"),
        (query.UserFilter(max_age=1001), "maxAge must be between 0 and 1000, got 1001", "max_age must be between 0"),
        (query.UserFilter(min_age=5, max_age=4), r"minAge \(5\) is greater than maxAge \(4\)", r"min_age \(5\) is"),
        (query.UserFilter(min_age=5, max_age=-4), "maxAge must be between", "max_age must be between"),  # bounds first
        (query.UserFilter(name_contains=""), "nameContains must have 1 to 100 characters, got 0", "name_contains"),
        (query.UserFilter(name_contains="x" * 101), "nameContains must have 1 to 100 characters", "name_contains"),
    ],
)
def test_invalid_filters_are_refused_in_the_callers_names(flt: query.UserFilter, graphql: str, rest: str) -> None:
    with pytest.raises(BadRequest, match=graphql):
        flt.validate(query.Api.GRAPHQL)
    with pytest.raises(BadRequest, match=rest):
        flt.validate(query.Api.REST)


def test_every_filter_is_a_user_filter_attribute_and_every_statistic_a_stats_one() -> None:
    # The adapters read and write these attributes by the names the definitions give.
    assert [f.name for f in query.FILTERS] == [f.name for f in dataclasses.fields(query.UserFilter)]
    assert [f.name for f in query.STATS_FIELDS] == [f.name for f in dataclasses.fields(query.Stats)]
    for field in query.FILTERS:
        assert typing.get_type_hints(query.UserFilter)[field.name] == field.type | None
        assert field.at_most is None or field.at_most in {f.name for f in query.FILTERS}


NAMED = [  # user_id, first name, last name
    ("1", "Anna", "Smith"),
    ("2", "JOHANN", "Strauß"),
    ("3", "Zoë", "O'Brien"),
    ("4", "li", "Na"),
    ("5", "Ösel", "Ångström"),
]


@pytest.mark.parametrize(
    ("needle", "ids"),
    [
        ("ann", ["1", "2"]),  # a part of a first name, in any case
        ("SMITH", ["1"]),
        ("strauss", ["2"]),  # Unicode case folding: ß is ss
        ("STRAUß", ["2"]),
        ("zoË", ["3"]),
        ("o'b", ["3"]),
        ("na", ["1", "4"]),  # first or last name
        ("ångs", ["5"]),
        ("a s", []),  # never across first and last name
        ("%", []),  # a plain substring, not a pattern
        (".*", []),
    ],
)
def test_name_contains_is_a_case_insensitive_substring_of_either_name(needle: str, ids: list[str]) -> None:
    snapshot = named_snapshot(NAMED)
    flt = query.UserFilter(name_contains=needle).validate(query.Api.GRAPHQL)
    assert [r.user_id for r in query.users(snapshot, query.select(snapshot, flt, TODAY), TODAY)] == ids
    assert query.stats(snapshot, flt, TODAY).count == len(ids)


def named_snapshot(rows: list[tuple[str, str, str]], births: list[int] | None = None) -> Snapshot:
    table = pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "first_name": [r[1] for r in rows],
            "last_name": [r[2] for r in rows],
            "birthts": pd.array(births or [ms(1990, 1, 1)] * len(rows), dtype="int64"),
            "img_path": [f"img/{r[0]}.png" if i % 2 else "" for i, r in enumerate(rows)],
        }
    )
    return Snapshot(table, version=1, committed_at=datetime.now(UTC))


names = st.text(alphabet="aAbBßSsİiıÅå '", min_size=1, max_size=6)


@untimed
@given(
    people=st.lists(
        st.tuples(names, names, st.integers(min_value=-5_364_662_400_000, max_value=ms(2026, 11, 27))), max_size=30
    ),
    needle=names,
    min_age=st.none() | st.integers(min_value=0, max_value=130),
    has_image=st.none() | st.booleans(),
)
def test_stats_with_a_name_filter_equal_a_brute_force_count(
    people: list[tuple[str, str, int]], needle: str, min_age: int | None, has_image: bool | None
) -> None:
    # A filter the age histogram cannot answer counts the selected rows: the same numbers, by another way.
    snapshot = named_snapshot([(f"u{i:03}", f, ln) for i, (f, ln, _) in enumerate(people)], [b for *_, b in people])
    flt = query.UserFilter(has_image=has_image, min_age=min_age, name_contains=needle)
    chosen = [
        (reference_age(b, TODAY), i % 2 == 1)
        for i, (first, last, b) in enumerate(people)
        if (needle.casefold() in first.casefold() or needle.casefold() in last.casefold())
        and (has_image is None or (i % 2 == 1) == has_image)
        and (min_age is None or reference_age(b, TODAY) >= min_age)
    ]
    ages = [age for age, _ in chosen]
    with_image = sum(image for _, image in chosen)
    expected = query.Stats(
        len(chosen),
        statistics.mean(ages) if ages else None,
        min(ages) if ages else None,
        max(ages) if ages else None,
        with_image,
        len(chosen) - with_image,
    )
    result = query.stats(snapshot, flt, TODAY)
    assert result == dataclasses.replace(expected, average_age=pytest.approx(expected.average_age))
    assert len(query.select(snapshot, flt, TODAY)) == len(chosen)


def test_folded_names_are_kept_per_snapshot_and_go_with_it() -> None:
    snapshot = named_snapshot(NAMED)
    query.select(snapshot, query.UserFilter(name_contains="a"), TODAY)
    first = query._folded_names(snapshot)
    query.select(snapshot, query.UserFilter(name_contains="b"), TODAY)
    assert query._folded_names(snapshot) is first  # folded once
    gone = weakref.ref(snapshot)
    del snapshot, first
    gc.collect()
    assert gone() is None  # the cache does not keep a snapshot alive


def test_a_negative_limit_is_not_told_to_page() -> None:
    positions = np.arange(10)
    with pytest.raises(BadRequest, match=r"^limit must not be negative, got -1$"):
        query.page(positions, -1, 0, 5)
    with pytest.raises(BadRequest, match=r"^limit must be at most 5 \(MAX_PAGE_SIZE\), got 6; .* with offset$"):
        query.page(positions, 6, 0, 5)
    with pytest.raises(BadRequest, match=r"^offset must not be negative, got -2$"):
        query.page(positions, 1, -2, 5)


def test_user_lookup_and_empty_snapshot() -> None:
    snapshot = snapshot_of(PEOPLE)
    found = query.user(snapshot, "1002", TODAY)
    assert found is not None and (found.age, found.img_path) == (66, "src-data/1002.jpg")
    assert query.user(snapshot, "nope", TODAY) is None
    empty = Snapshot(snapshot.table.iloc[0:0], 0, datetime.now(UTC))
    assert query.stats(empty, query.UserFilter(), TODAY) == query.Stats(0, None, None, None, 0, 0)


@untimed
@given(
    people=st.lists(
        st.tuples(st.integers(min_value=-5_364_662_400_000, max_value=ms(2026, 11, 27)), st.booleans()),
        max_size=60,
    ),
    has_image=st.none() | st.booleans(),
    min_age=st.none() | st.integers(min_value=0, max_value=130),
    span=st.none() | st.integers(min_value=0, max_value=130),
)
def test_stats_equal_a_brute_force_count(
    people: list[tuple[int, bool]], has_image: bool | None, min_age: int | None, span: int | None
) -> None:
    max_age = None if span is None else (min_age or 0) + span
    snapshot = snapshot_of([(f"u{i:03}", b, "img.png" if img else "") for i, (b, img) in enumerate(people)])
    chosen = [
        (reference_age(b, TODAY), img)
        for b, img in people
        if (has_image is None or img == has_image)
        and (min_age is None or reference_age(b, TODAY) >= min_age)
        and (max_age is None or reference_age(b, TODAY) <= max_age)
    ]
    result = query.stats(snapshot, query.UserFilter(has_image, min_age, max_age), TODAY)
    ages = [age for age, _ in chosen]
    assert result.count == len(chosen)
    assert result.average_age == (pytest.approx(statistics.mean(ages)) if ages else None)
    assert (result.youngest_age, result.oldest_age) == ((min(ages), max(ages)) if ages else (None, None))
    assert result.with_image == sum(img for _, img in chosen)


def test_the_age_histogram_never_grows_with_a_value() -> None:
    # Rows always pass the input rules before they reach a snapshot; even if one did not, the
    # histogram behind `stats` keeps its size (a value of -9e18 once made it 9 GB wide).
    today = date(2026, 6, 1)
    snapshot = snapshot_of([("1", ms(1990, 1, 1), ""), ("2", -9_000_000_000_000_000_000, "")])
    lowest, counts = snapshot.age_counts(today)
    assert lowest == 0 and counts.shape == (2, today.year - 1800 + 1)
    assert int(counts.sum()) == 2


def reference_groups(people: list[tuple[int, bool]], grouping: query.Grouping, today: date) -> list[query.StatsGroup]:
    """Groups by brute force: each user's key and age from the calendar, then count, mean, min and max."""
    by_key: dict[str, list[int]] = {}
    for birthts, image in people:
        born = datetime.fromtimestamp(birthts / 1000, tz=UTC).date()
        age = reference_age(birthts, today)
        key = {"age": str(age), "birth_year": str(born.year), "has_image": str(image).lower()}[grouping.name]
        by_key.setdefault(key, []).append(age)
    order = (lambda key: (key,)) if grouping.name == "has_image" else (lambda key: (int(key),))
    return [
        query.StatsGroup(key, len(ages), pytest.approx(statistics.mean(ages)), min(ages), max(ages))
        for key, ages in sorted(by_key.items(), key=lambda item: order(item[0]))
    ]


@untimed
@given(
    people=st.lists(
        st.tuples(st.integers(min_value=-5_364_662_400_000, max_value=ms(2026, 11, 27)), st.booleans()),
        max_size=60,
    ),
    grouping=st.sampled_from(query.GROUPINGS),
    has_image=st.none() | st.booleans(),
    min_age=st.none() | st.integers(min_value=0, max_value=130),
    span=st.none() | st.integers(min_value=0, max_value=130),
    reads_rows=st.booleans(),
    today=st.dates(min_value=date(2026, 11, 27), max_value=date(2100, 12, 31)),
)
def test_stats_by_group_equal_a_brute_force_count(  # noqa: PLR0917 - one argument per generated part
    people: list[tuple[int, bool]],
    grouping: query.Grouping,
    has_image: bool | None,
    min_age: int | None,
    span: int | None,
    reads_rows: bool,
    today: date,
) -> None:
    # From the snapshot's histograms, or (with a name filter every user passes) by counting the selected rows.
    max_age = None if span is None else (min_age or 0) + span
    snapshot = snapshot_of([(f"u{i:03}", b, "img.png" if img else "") for i, (b, img) in enumerate(people)])
    flt = query.UserFilter(has_image, min_age, max_age, name_contains="f" if reads_rows else None)
    assert flt.reads_rows() == reads_rows
    chosen = [
        (b, img)
        for b, img in people
        if (has_image is None or img == has_image)
        and (min_age is None or reference_age(b, today) >= min_age)
        and (max_age is None or reference_age(b, today) <= max_age)
    ]
    assert query.stats_by(snapshot, grouping, flt, today) == reference_groups(chosen, grouping, today)


@pytest.mark.parametrize("grouping", query.GROUPINGS, ids=lambda g: g.name)
def test_stats_by_group_of_nobody_is_empty(grouping: query.Grouping) -> None:
    empty = Snapshot(snapshot_of(PEOPLE).table.iloc[0:0], 0, datetime.now(UTC))
    assert query.stats_by(empty, grouping, query.UserFilter(), TODAY) == []
    assert query.stats_by(empty, grouping, query.UserFilter(name_contains="a"), TODAY) == []
    nobody = query.UserFilter(min_age=200)  # a filter nobody passes, on a snapshot with users
    assert query.stats_by(snapshot_of(PEOPLE), grouping, nobody, TODAY) == []


def test_stats_by_birth_year_splits_a_year_at_the_birthday() -> None:
    # Born in one year, two ages until the later birthday has come: the year's youngest and oldest differ.
    people = [("a", ms(2000, 3, 1), ""), ("b", ms(2000, 12, 31), "x.png"), ("c", ms(2004, 2, 29), "")]
    by_year = query.GROUPINGS[1]
    assert by_year.name == "birth_year"
    groups = query.stats_by(snapshot_of(people), by_year, query.UserFilter(), date(2026, 11, 27))
    assert groups == [query.StatsGroup("2000", 2, 25.5, 25, 26), query.StatsGroup("2004", 1, 22.0, 22, 22)]
    on_the_day = query.stats_by(snapshot_of(people), by_year, query.UserFilter(has_image=True), date(2026, 12, 31))
    assert on_the_day == [query.StatsGroup("2000", 1, 26.0, 26, 26)]
    # Born on 29 February: 22 until 28 February 2027, 23 from 1 March.
    twenty_two = query.UserFilter(min_age=22, max_age=22)
    assert query.stats_by(snapshot_of(people), by_year, twenty_two, date(2027, 2, 28)) == [
        query.StatsGroup("2004", 1, 22.0, 22, 22)
    ]
    assert query.stats_by(snapshot_of(people), by_year, twenty_two, date(2027, 3, 1)) == []


def test_the_year_histogram_is_counted_once_per_snapshot_and_keeps_its_size() -> None:
    snapshot = snapshot_of([("1", ms(1990, 1, 1), ""), ("2", -9_000_000_000_000_000_000, "")])
    counts = snapshot.birth_year_counts(TODAY)
    assert counts.shape == (TODAY.year - 1800 + 1, 2, 2) and int(counts.sum()) == 2
    assert snapshot._birthdays(TODAY.year) is snapshot._birthdays(TODAY.year)
