"""Queries over a snapshot: pure functions shared by GraphQL and REST."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import numpy as np

from .errors import BadRequest
from .snapshot import IntArray, Snapshot


@dataclass(frozen=True, slots=True)
class UserFilter:
    """All optional, combined with AND; age bounds are inclusive."""

    has_image: bool | None = None
    min_age: int | None = None
    max_age: int | None = None

    def validate(self, names: tuple[str, str] = ("minAge", "maxAge")) -> UserFilter:
        for name, value in zip(names, (self.min_age, self.max_age), strict=True):
            if value is not None and not 0 <= value <= 1000:
                raise BadRequest(f"{name} must be between 0 and 1000, got {value}")
        if self.min_age is not None and self.max_age is not None and self.min_age > self.max_age:
            raise BadRequest(f"{names[0]} ({self.min_age}) is greater than {names[1]} ({self.max_age})")
        return self


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
    min_age: int | None
    max_age: int | None
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
    if flt.has_image is not None:
        mask &= snapshot.has_image == flt.has_image
    if flt.min_age is not None:
        mask &= ages >= flt.min_age
    if flt.max_age is not None:
        mask &= ages <= flt.max_age
    return np.flatnonzero(mask)


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
    """From the per-day (image, age) histogram: the work grows with the number of ages, not of users."""
    lowest, counts = snapshot.age_counts(today)
    start = max(flt.min_age - lowest, 0) if flt.min_age is not None else 0
    stop = max(flt.max_age - lowest + 1, 0) if flt.max_age is not None else counts.shape[1]
    rows = (0, 1) if flt.has_image is None else (int(flt.has_image),)
    window = counts[list(rows), start:stop]
    per_age = window.sum(axis=0)
    count = int(per_age.sum())
    if not count:
        return Stats(0, None, None, None, 0, 0)
    ages = np.arange(lowest + start, lowest + start + len(per_age))
    present = np.flatnonzero(per_age)
    with_image = int(window[-1].sum()) if rows[-1] == 1 else 0
    return Stats(
        count=count,
        average_age=int(per_age @ ages) / count,  # exact integer sum: the same value as ages.mean()
        min_age=int(ages[present[0]]),
        max_age=int(ages[present[-1]]),
        with_image=with_image,
        without_image=count - with_image,
    )
