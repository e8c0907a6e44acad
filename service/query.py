"""Queries over a snapshot: pure functions shared by GraphQL and REST, and the one definition of the filters
(`FILTERS`) and statistics (`STATS_FIELDS`) both APIs offer. The adapters build their inputs, outputs and
messages from these, so a filter or a statistic is added here, once."""

from __future__ import annotations

import enum
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Generic, TypeVar

import numpy as np
import pandas as pd

from .errors import BadRequest
from .snapshot import BoolArray, IntArray, Snapshot

T = TypeVar("T", bool, int, str)


class Api(enum.Enum):
    """Whose names a message uses: each caller reads the names it sent."""

    GRAPHQL = "graphql"
    REST = "rest"


@dataclass(frozen=True, slots=True)
class FilterField(Generic[T]):
    """One filter of the users: a field of GraphQL's `UserFilter` input and a query parameter of `GET /data`
    and `GET /stats`, both derived from this."""

    name: str  # the `UserFilter` attribute that holds its value
    graphql: str
    rest: str
    type: type[T]
    doc: str
    apply: Callable[[Snapshot, IntArray, T], BoolArray]  # (snapshot, ages today, value) -> the rows it keeps
    bounds: tuple[int, int] | None = None  # inclusive: of the value (a number) or of its length (a string)
    at_most: str | None = None  # the `name` of a filter whose value this one's must not exceed

    def spelling(self, api: Api) -> str:
        return self.graphql if api is Api.GRAPHQL else self.rest

    @property
    def description(self) -> str:
        """`doc` and the bounds, for the API's documentation."""
        if self.bounds is None:
            return self.doc
        low, high = self.bounds
        return f"{self.doc} From {low} to {high}{' characters' if self.type is str else ''}."

    def check(self, value: T, api: Api) -> None:
        if self.bounds is None:
            return
        low, high = self.bounds
        if isinstance(value, str):
            if not low <= len(value) <= high:
                raise BadRequest(f"{self.spelling(api)} must have {low} to {high} characters, got {len(value)}")
        elif not low <= value <= high:
            raise BadRequest(f"{self.spelling(api)} must be between {low} and {high}, got {value}")


def _has_image(snapshot: Snapshot, ages: IntArray, value: bool) -> BoolArray:
    return snapshot.has_image if value else ~snapshot.has_image


def _name_contains(snapshot: Snapshot, ages: IntArray, value: str) -> BoolArray:
    needle = value.casefold()
    first, last = (names.str.contains(needle, regex=False).to_numpy(dtype=bool) for names in _folded_names(snapshot))
    found: BoolArray = first | last
    return found


FILTERS: tuple[FilterField[Any], ...] = (
    FilterField(
        "has_image", graphql="isImageExists", rest="is_image_exists", type=bool, apply=_has_image,
        doc="Only users with (true) or without (false) an image.",
    ),
    FilterField(
        "min_age", graphql="minAge", rest="min_age", type=int, bounds=(0, 1000), at_most="max_age",
        apply=lambda snapshot, ages, value: ages >= value, doc="Only users at least this old (in completed years).",
    ),
    FilterField(
        "max_age", graphql="maxAge", rest="max_age", type=int, bounds=(0, 1000),
        apply=lambda snapshot, ages, value: ages <= value, doc="Only users at most this old (in completed years).",
    ),
    FilterField(
        "name_contains", graphql="nameContains", rest="name_contains", type=str, bounds=(1, 100),
        apply=_name_contains, doc="Only users whose first or last name contains this text, ignoring case.",
    ),
)  # fmt: skip
_BY_NAME = {field.name: field for field in FILTERS}
HISTOGRAM_FILTERS = frozenset({"has_image", "min_age", "max_age"})
"""The filters `stats` answers from the snapshot's per-day (image, age) histogram, whatever the number of
users; with any other, it counts the selected rows."""


@dataclass(frozen=True, slots=True)
class UserFilter:
    """The value of each filter of `FILTERS` (in the attribute its `name` says), None for no filter; the
    filters combine with AND."""

    has_image: bool | None = None
    min_age: int | None = None
    max_age: int | None = None
    name_contains: str | None = None

    def given(self) -> list[tuple[FilterField[Any], Any]]:
        """The filters that have a value, with it."""
        return [(field, value) for field in FILTERS if (value := getattr(self, field.name)) is not None]

    def validate(self, api: Api) -> UserFilter:
        """Refuses a value out of bounds, then bounds in the wrong order, naming the fields as `api` does."""
        given = self.given()
        for field, value in given:
            field.check(value, api)
        for field, value in given:
            if field.at_most is None:
                continue
            other, limit = _BY_NAME[field.at_most], getattr(self, field.at_most)
            if limit is not None and value > limit:
                raise BadRequest(f"{field.spelling(api)} ({value}) is greater than {other.spelling(api)} ({limit})")
        return self

    def reads_rows(self) -> bool:
        """Whether `stats` reads every row for this filter, rather than the snapshot's age histogram."""
        return any(field.name not in HISTOGRAM_FILTERS for field, _ in self.given())


@dataclass(frozen=True, slots=True)
class StatsField:
    """One number of the statistics: a `Stats` attribute, named in each API; its type is the attribute's."""

    name: str
    graphql: str
    rest: str
    doc: str


STATS_FIELDS = (
    StatsField("count", graphql="count", rest="count", doc="How many users match."),
    StatsField("average_age", graphql="averageAge", rest="average_age", doc="Mean age; null when none match."),
    StatsField("youngest_age", graphql="youngestAge", rest="youngest_age", doc="Lowest age; null when none match."),
    StatsField("oldest_age", graphql="oldestAge", rest="oldest_age", doc="Highest age; null when none match."),
    StatsField("with_image", graphql="withImage", rest="with_image", doc="How many of them have an image."),
    StatsField("without_image", graphql="withoutImage", rest="without_image", doc="How many of them have no image."),
)


@dataclass(frozen=True, slots=True)
class UserRow:
    user_id: str
    first_name: str
    last_name: str
    birthts: int
    img_path: str
    age: int


@dataclass(frozen=True, slots=True)
class Stats:
    count: int
    average_age: float | None
    youngest_age: int | None
    oldest_age: int | None
    with_image: int
    without_image: int


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a selection: its rows' positions, how many rows the whole selection has, and where
    the next page starts (None on the last page)."""

    positions: IntArray
    total: int
    next_offset: int | None


def page(positions: IntArray, limit: int | None, offset: int, maximum: int) -> Page:
    """`limit` rows of `positions` from `offset`; without a limit, `maximum` rows. The one paging rule of
    GraphQL `users` and REST `GET /data`, so both page alike and refuse alike."""
    if offset < 0:
        raise BadRequest(f"offset must not be negative, got {offset}")
    if limit is not None and limit < 0:
        raise BadRequest(f"limit must not be negative, got {limit}")
    if limit is not None and limit > maximum:
        raise BadRequest(
            f"limit must be at most {maximum} (MAX_PAGE_SIZE), got {limit}; fetch the following pages with offset"
        )
    end = offset + (maximum if limit is None else limit)
    rows = positions[offset:end]
    # An empty page has no next one: limit=0 would otherwise point at itself forever.
    return Page(rows, len(positions), end if len(rows) and end < len(positions) else None)


def today_utc() -> date:
    return datetime.now(UTC).date()


def select(snapshot: Snapshot, flt: UserFilter, today: date) -> IntArray:
    """Positions (in user_id order) of the rows matching `flt`."""
    ages = snapshot.ages(today)
    mask = np.ones(len(snapshot), dtype=bool)
    for field, value in flt.given():
        mask &= field.apply(snapshot, ages, value)
    return np.flatnonzero(mask)


_FOLDED_NAMES: weakref.WeakKeyDictionary[Snapshot, tuple[pd.Series[str], pd.Series[str]]] = weakref.WeakKeyDictionary()
_FOLDING = threading.Lock()


def _folded_names(snapshot: Snapshot) -> tuple[pd.Series[str], pd.Series[str]]:
    """First and last names case-folded, once per snapshot, for as long as the snapshot lives: folding a
    million names takes ~0.5 s, searching them ~0.1 s per column."""
    with _FOLDING:  # one thread folds; the others wait for its result rather than fold again
        folded = _FOLDED_NAMES.get(snapshot)
        if folded is None:
            first, last = (
                pd.Series(snapshot.texts[c], dtype=object).str.casefold() for c in ("first_name", "last_name")
            )
            folded = _FOLDED_NAMES[snapshot] = (first, last)
        return folded


def users(snapshot: Snapshot, positions: IntArray, today: date) -> list[UserRow]:
    ages, texts = snapshot.ages(today), snapshot.texts
    # Columns converted once per snapshot, not per request: only the page's rows are touched here.
    first, last, img = (texts[c][positions] for c in ("first_name", "last_name", "img_path"))
    return [
        UserRow(str(u), str(f), str(ln), int(b), str(i), int(a))
        for u, f, ln, b, i, a in zip(
            snapshot.user_ids[positions],
            first,
            last,
            snapshot.birthts[positions],
            img,
            ages[positions],
            strict=True,
        )
    ]


def user(snapshot: Snapshot, user_id: str, today: date) -> UserRow | None:
    position = snapshot.position(user_id)
    if position is None:
        return None
    return users(snapshot, np.array([position], dtype=np.int64), today)[0]


def stats(snapshot: Snapshot, flt: UserFilter, today: date) -> Stats:
    """From an (image, age) histogram of the matching users. With filters on images and ages only, it is a cut
    of the snapshot's per-day histogram: the work grows with the number of ages, not of users."""
    lowest, counts = snapshot.age_counts(today)
    if flt.reads_rows():
        return _summary(_histogram(snapshot, select(snapshot, flt, today), today), lowest)
    start = max(flt.min_age - lowest, 0) if flt.min_age is not None else 0
    stop = max(flt.max_age - lowest + 1, 0) if flt.max_age is not None else counts.shape[1]
    window = counts[:, start:stop]
    if flt.has_image is not None:
        window = window * np.array([[not flt.has_image], [flt.has_image]])  # row 1 counts users with an image
    return _summary(window, lowest + start)


def _histogram(snapshot: Snapshot, positions: IntArray, today: date) -> IntArray:
    """The rows at `positions` counted as `Snapshot.age_counts` counts them all, in an array of its shape."""
    lowest, counts = snapshot.age_counts(today)
    width = counts.shape[1]
    ages = np.clip(snapshot.ages(today)[positions], lowest, lowest + width - 1) - lowest
    return np.bincount(ages + width * snapshot.has_image[positions], minlength=2 * width).reshape(2, width)


def _summary(counts: IntArray, first_age: int) -> Stats:
    """`counts[i, a]`: users of age `first_age + a`, row 1 with an image, row 0 without."""
    per_age = counts.sum(axis=0)
    count = int(per_age.sum())
    if not count:
        return Stats(0, None, None, None, 0, 0)
    ages = np.arange(first_age, first_age + len(per_age))
    present = np.flatnonzero(per_age)
    with_image = int(counts[1].sum())
    return Stats(
        count=count,
        average_age=int(per_age @ ages) / count,  # exact integer sum: the same value as ages.mean()
        youngest_age=int(ages[present[0]]),
        oldest_age=int(ages[present[-1]]),
        with_image=with_image,
        without_image=count - with_image,
    )
