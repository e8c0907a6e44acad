"""Queries over a snapshot: pure functions shared by GraphQL and REST, and the one definition of the filters
(`FILTERS`), statistics (`STATS_FIELDS`) and groupings of statistics (`GROUPINGS`, `GROUP_FIELDS`) both APIs
offer. The adapters build their inputs, outputs and messages from these, so each is added here, once."""

from __future__ import annotations

import base64
import dataclasses
import enum
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import pandas as pd

from .errors import BadRequest
from .parsing import EARLIEST_BIRTH_YEAR
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
    # (ages, images, value) -> the cells of an age and image histogram it keeps; None: only rows can tell
    keeps_cells: Callable[[IntArray, BoolArray, T], BoolArray] | None = None
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
        keeps_cells=lambda ages, images, value: images == value,
        doc="Only users with (true) or without (false) an image.",
    ),
    FilterField(
        "min_age", graphql="minAge", rest="min_age", type=int, bounds=(0, 1000), at_most="max_age",
        apply=lambda snapshot, ages, value: ages >= value, keeps_cells=lambda ages, images, value: ages >= value,
        doc="Only users at least this old (in completed years).",
    ),
    FilterField(
        "max_age", graphql="maxAge", rest="max_age", type=int, bounds=(0, 1000),
        apply=lambda snapshot, ages, value: ages <= value, keeps_cells=lambda ages, images, value: ages <= value,
        doc="Only users at most this old (in completed years).",
    ),
    FilterField(
        "name_contains", graphql="nameContains", rest="name_contains", type=str, bounds=(1, 100),
        apply=_name_contains, doc="Only users whose first or last name contains this text, ignoring case.",
    ),
)  # fmt: skip
_BY_NAME = {field.name: field for field in FILTERS}
HISTOGRAM_FILTERS = frozenset(field.name for field in FILTERS if field.keeps_cells is not None)
"""The filters `stats` and `stats_by` answer from the snapshot's histograms, whatever the number of users;
with any other, they count the selected rows."""


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
        """Whether `stats` and `stats_by` read every row for this filter, rather than the snapshot's histograms."""
        return any(field.name not in HISTOGRAM_FILTERS for field, _ in self.given())

    def keeps_cells(self, ages: IntArray, images: BoolArray) -> BoolArray:
        """The cells of a histogram whose users match (ages and images broadcast to its shape); only for a
        filter that does not read rows."""
        kept = np.ones(np.broadcast_shapes(ages.shape, images.shape), dtype=bool)
        for field, value in self.given():
            assert field.keeps_cells is not None, f"{field.name} reads rows"
            kept &= field.keeps_cells(ages, images, value)
        return kept


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


_CURSOR_FORMAT = "v1:"  # what a cursor's payload starts with: a later format gets another, and old ones a message


def cursor(user_id: str) -> str:
    """The cursor of a user: base64 of a versioned payload holding its user_id, a place in user_id order that
    outlives the snapshot (a cursor of a deleted user still marks where it was)."""
    return base64.urlsafe_b64encode(f"{_CURSOR_FORMAT}{user_id}".encode()).decode("ascii")


def _cursor_user_id(name: str, value: str) -> str:
    """The user_id a cursor holds; `BadRequest` names the argument and what is wrong with its value."""
    shown = f"{value[:50]!r}{'...' if len(value) > 50 else ''}"
    try:
        payload = base64.b64decode(value, altchars=b"-_", validate=True).decode()
    except ValueError:  # not ASCII, not base64, or not UTF-8 once decoded
        raise BadRequest(f"{name} must be a cursor from usersConnection, got {shown}: not base64 of one") from None
    if not payload.startswith(_CURSOR_FORMAT) or payload == _CURSOR_FORMAT:
        raise BadRequest(f"{name} must be a cursor from usersConnection, got {shown}: not a format this service wrote")
    return payload.removeprefix(_CURSOR_FORMAT)


@dataclass(frozen=True, slots=True)
class CursorPage:
    """What a page of cursor paging asks for: `first` users after the user_id `after`, or `last` users before
    the user_id `before` (each bound optional); exactly one of `first` and `last` is set."""

    first: int | None
    after: str | None
    last: int | None
    before: str | None


def cursor_page(first: int | None, after: str | None, last: int | None, before: str | None, maximum: int) -> CursorPage:
    """The page asked for, checked: `first` and `last` from 0 to `maximum` and not both (the Relay spec
    discourages the pair, whose meaning few clients expect), neither meaning `first` = `maximum`."""
    if first is not None and last is not None:
        raise BadRequest(
            "first and last cannot be combined: page forward with first and after, or back with last and before"
        )
    hints = {"first": "following pages with after: endCursor", "last": "preceding pages with before: startCursor"}
    for name, size in (("first", first), ("last", last)):
        if size is not None and size < 0:
            raise BadRequest(f"{name} must not be negative, got {size}")
        if size is not None and size > maximum:
            raise BadRequest(f"{name} must be at most {maximum} (MAX_PAGE_SIZE), got {size}; fetch the {hints[name]}")
    return CursorPage(
        first=maximum if first is None and last is None else first,
        after=None if after is None else _cursor_user_id("after", after),
        last=last,
        before=None if before is None else _cursor_user_id("before", before),
    )


@dataclass(frozen=True, slots=True)
class Window:
    """A page of cursor paging: its rows' positions, how many rows the whole selection has, and whether rows
    come before or after it, as the Relay spec defines `hasPreviousPage` and `hasNextPage`."""

    positions: IntArray
    total: int
    has_previous: bool
    has_next: bool


def window(snapshot: Snapshot, positions: IntArray, asked: CursorPage) -> Window:
    """The rows of `positions` (a selection, in user_id order) that `asked` names. The cursors are found by user_id,
    so a user added or removed before a cursor does not move the rows after it. The spec leaves it to the
    server whether rows before `after` (paging forward) or after `before` (back) count: they do."""
    low, high = 0, len(positions)
    if asked.after is not None:
        low = _place(snapshot, positions, asked.after, "right")
    if asked.before is not None:
        high = max(low, _place(snapshot, positions, asked.before, "left"))
    if asked.last is not None:
        start = max(low, high - asked.last)
        return Window(positions[start:high], len(positions), has_previous=start > low, has_next=high < len(positions))
    assert asked.first is not None, "cursor_page sets one of first and last"
    end = min(high, low + asked.first)
    return Window(positions[low:end], len(positions), has_previous=low > 0, has_next=end < high)


def _place(snapshot: Snapshot, positions: IntArray, user_id: str, side: Literal["left", "right"]) -> int:
    """How many of the selected `positions` hold a user_id below `user_id` ("left") or up to it ("right"):
    binary searches over the snapshot's sorted user_ids, then over the selection."""
    row = np.searchsorted(snapshot.user_ids, user_id, side=side)
    return int(np.searchsorted(positions, row))


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
    ages = lowest + np.arange(counts.shape[1])
    return _summary(counts * flt.keeps_cells(ages, _IMAGE_ROWS), lowest)


_IMAGE_ROWS = np.array([[False], [True]])  # the image of each row of an age histogram


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


# -- Statistics by group ------------------------------------------------------------------------------------


@dataclass(slots=True)
class StatsGroup:
    """Not frozen, unlike the other results: a frozen dataclass takes ten times longer to make, and a request
    may make a couple of hundred groups, each for its own response."""

    key: str
    count: int
    average_age: float | None
    youngest_age: int | None
    oldest_age: int | None


GROUP_FIELDS = (
    StatsField("key", graphql="key", rest="key", doc="The group: an age, a year of birth, or true or false."),
    *(field for field in STATS_FIELDS if field.name in {f.name for f in dataclasses.fields(StatsGroup)}),
)
"""The numbers of each group, a `StatsGroup` attribute each: `key` and the statistics of `Stats` that apply."""


@dataclass(frozen=True, slots=True)
class _Grid:
    """Users counted by group and cell: counts[g, c] users of group g, all aged ages[g, c] and with an image
    if images[g, c] (ages and images broadcast to the shape of counts). Groups are in the order of their keys."""

    counts: IntArray
    ages: IntArray
    images: BoolArray
    key: Callable[[int], str]  # group -> its key

    def cut(self, flt: UserFilter) -> _Grid:
        kept = self.counts * flt.keeps_cells(self.ages, self.images)
        return dataclasses.replace(self, counts=kept)

    def groups(self) -> list[StatsGroup]:
        """The groups with users, ordered by key; each one's numbers as `_summary` computes them."""
        ages = np.broadcast_to(self.ages, self.counts.shape)
        occupied = self.counts > 0
        count, age_sum = self.counts.sum(axis=1), (self.counts * ages).sum(axis=1)
        youngest = np.where(occupied, ages, np.iinfo(np.int64).max).min(axis=1)
        oldest = np.where(occupied, ages, np.iinfo(np.int64).min).max(axis=1)
        present = np.flatnonzero(count)
        numbers = (count[present].tolist(), age_sum[present].tolist(), youngest[present].tolist())
        return [
            StatsGroup(self.key(g), n, total / n, low, high)  # an exact integer sum, as in `_summary`
            for g, n, total, low, high in zip(present.tolist(), *numbers, oldest[present].tolist(), strict=True)
        ]


def _age_histogram(snapshot: Snapshot, today: date, positions: IntArray | None) -> tuple[int, IntArray]:
    """(lowest, counts) as `Snapshot.age_counts` gives them, of all users or of the rows at `positions`."""
    lowest, counts = snapshot.age_counts(today)
    return lowest, counts if positions is None else _histogram(snapshot, positions, today)


def _by_age(snapshot: Snapshot, today: date, positions: IntArray | None) -> _Grid:
    lowest, counts = _age_histogram(snapshot, today, positions)
    ages = (lowest + np.arange(counts.shape[1]))[:, None]
    return _Grid(counts.T, ages, _IMAGE_ROWS.T, key=lambda g: str(lowest + g))


def _by_image(snapshot: Snapshot, today: date, positions: IntArray | None) -> _Grid:
    lowest, counts = _age_histogram(snapshot, today, positions)
    ages = lowest + np.arange(counts.shape[1])
    return _Grid(counts, ages, _IMAGE_ROWS, key=lambda g: ("false", "true")[g])


def _by_birth_year(snapshot: Snapshot, today: date, positions: IntArray | None) -> _Grid:
    """Cells (image, birthday come this year) of each year: their users are of one age each."""
    counts = snapshot.birth_year_counts(today) if positions is None else _year_histogram(snapshot, positions, today)
    years = EARLIEST_BIRTH_YEAR + np.arange(counts.shape[0])
    ages = (today.year - years)[:, None] - _NOT_COME_YET
    return _Grid(counts.reshape(len(years), 4), ages, _IMAGE_OF_CELL, key=lambda g: str(EARLIEST_BIRTH_YEAR + g))


# The cells of a year, as `Snapshot.birth_year_counts` orders them: (image, birthday come) = 00, 01, 10, 11.
_NOT_COME_YET = np.array([1, 0, 1, 0])
_IMAGE_OF_CELL = np.array([False, False, True, True])


def _year_histogram(snapshot: Snapshot, positions: IntArray, today: date) -> IntArray:
    """The rows at `positions` counted as `Snapshot.birth_year_counts` counts them all, in an array of its shape."""
    width = today.year - EARLIEST_BIRTH_YEAR + 1
    years = np.clip(snapshot.birth_year[positions] - EARLIEST_BIRTH_YEAR, 0, width - 1)
    come = snapshot.birth_month_day[positions] <= today.month * 100 + today.day
    cells = years * 4 + snapshot.has_image[positions] * 2 + come
    return np.bincount(cells, minlength=width * 4).reshape(width, 2, 2)


@dataclass(frozen=True, slots=True)
class Grouping:
    """One way to group the statistics: a value of GraphQL's `StatsGroupBy` and of REST's `group_by`."""

    name: str
    graphql: str
    rest: str
    doc: str
    # (snapshot, today, positions) -> the users of the rows at positions, or all users (None) from the
    # snapshot's histograms, counted by group
    count: Callable[[Snapshot, date, IntArray | None], _Grid]


GROUPINGS = (
    Grouping("age", graphql="AGE", rest="age", count=_by_age, doc="By age in completed years: the key is the age."),
    Grouping(
        "birth_year", graphql="BIRTH_YEAR", rest="birth_year", count=_by_birth_year,
        doc="By year of birth (UTC): the key is the year.",
    ),
    Grouping(
        "has_image", graphql="HAS_IMAGE", rest="has_image", count=_by_image,
        doc="By whether the user has an image: the key is false or true.",
    ),
)  # fmt: skip


def stats_by(snapshot: Snapshot, grouping: Grouping, flt: UserFilter, today: date) -> list[StatsGroup]:
    """The statistics of each group of the matching users, ordered by key; groups without users are left out.
    With filters on images and ages only, a cut of the snapshot's histograms, as `stats`: the work grows with
    the number of groups, not of users. Otherwise the selected rows are counted into the same cells."""
    if flt.reads_rows():
        return grouping.count(snapshot, today, select(snapshot, flt, today)).groups()
    return grouping.count(snapshot, today, None).cut(flt).groups()
