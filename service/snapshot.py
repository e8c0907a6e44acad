"""An immutable, query-ready view of one committed output, swapped atomically after each commit."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import date, datetime

import numpy as np
import numpy.typing as npt
import pandas as pd

from .parsing import EARLIEST_BIRTH_YEAR
from .report import RejectedFiles, RunReport

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
# A birthday's slot, (month - 1) * 31 + day - 1, orders the dates of any year, 29 February included.
_DAYS_PER_SLOT_MONTH = 31
_BIRTHDAY_SLOTS = 12 * _DAYS_PER_SLOT_MONTH


@dataclass(frozen=True, eq=False)
class Snapshot:
    """The output table as numpy columns, ordered by user_id, plus the birth date parts ages need.

    `rejected` lists every file rejected as of the commit; a snapshot of the stored output loaded at
    start-up, before any run, has none (`report` is None then).
    """

    table: pd.DataFrame
    version: int
    committed_at: datetime
    report: RunReport | None = None
    rejected: RejectedFiles = field(default_factory=RejectedFiles.empty)
    user_ids: npt.NDArray[np.object_] = field(init=False)
    texts: dict[str, npt.NDArray[np.object_]] = field(init=False)  # first_name, last_name, img_path
    birthts: IntArray = field(init=False)
    has_image: BoolArray = field(init=False)
    birth_year: IntArray = field(init=False)
    birth_month_day: IntArray = field(init=False)  # month * 100 + day, for "has the birthday come"
    _ages: dict[date, IntArray] = field(init=False)
    _age_counts: dict[date, tuple[int, IntArray]] = field(init=False)
    _birthday_counts: dict[int, IntArray] = field(init=False)
    _lock: threading.Lock = field(init=False)

    def __post_init__(self) -> None:
        births = self.table["birthts"].to_numpy(dtype=np.int64)
        moments = births.astype("datetime64[ms]")
        years = moments.astype("datetime64[Y]").astype(np.int64) + 1970
        months = moments.astype("datetime64[M]").astype(np.int64) % 12 + 1
        days = (moments.astype("datetime64[D]") - moments.astype("datetime64[M]")).astype(np.int64) + 1
        user_ids = self.table["user_id"].to_numpy(dtype=object)
        for name, value in (
            ("user_ids", user_ids),
            ("texts", {c: self.table[c].to_numpy(dtype=object) for c in ("first_name", "last_name", "img_path")}),
            ("birthts", births),
            ("has_image", (self.table["img_path"] != "").to_numpy()),
            ("birth_year", years),
            ("birth_month_day", months * 100 + days),
            ("_ages", {}),
            ("_age_counts", {}),
            ("_birthday_counts", {}),
            ("_lock", threading.Lock()),
        ):
            object.__setattr__(self, name, value)
        for array in (births, years):
            array.setflags(write=False)

    def __len__(self) -> int:
        return len(self.user_ids)

    def position(self, user_id: str) -> int | None:
        """Row of `user_id`: a binary search, since rows are ordered by user_id (no extra index)."""
        at = int(np.searchsorted(self.user_ids, user_id))
        return at if at < len(self.user_ids) and self.user_ids[at] == user_id else None

    def ages(self, today: date) -> IntArray:
        """Completed years on `today` for every row; computed once per day and snapshot."""
        cached = self._ages.get(today)
        if cached is not None:
            return cached
        with self._lock:
            not_yet = self.birth_month_day > today.month * 100 + today.day
            ages = (today.year - self.birth_year - not_yet).astype(np.int64)
            ages.setflags(write=False)
            self._ages.clear()  # keep only today's
            self._ages[today] = ages
            return ages

    def age_counts(self, today: date) -> tuple[int, IntArray]:
        """(lowest, counts): counts[i, a] users of age lowest + a, row 1 with an image; once per day."""
        cached = self._age_counts.get(today)
        if cached is not None:
            return cached
        # Every row passed the input rules (born from 1800 to now), so ages are 0 to today.year - 1800.
        # The bounds are applied anyway: the histogram's size must never follow a value.
        lowest, highest = 0, today.year - EARLIEST_BIRTH_YEAR
        ages = np.clip(self.ages(today), lowest, highest)
        width = highest - lowest + 1
        counts = np.bincount(ages - lowest + width * self.has_image, minlength=2 * width).reshape(2, width)
        counts.setflags(write=False)
        with self._lock:
            self._age_counts.clear()  # keep only today's
            self._age_counts[today] = (lowest, counts)
        return lowest, counts

    def birth_year_counts(self, today: date) -> IntArray:
        """counts[y, i, c]: users born in the year EARLIEST_BIRTH_YEAR + y, row i = 1 with an image, c = 1
        when their birthday has come this year (aged today.year - year, else one less). Every age by year of
        birth is read from it: the work grows with the number of years, not of users."""
        slot = (today.month - 1) * _DAYS_PER_SLOT_MONTH + today.day - 1
        cumulative = self._birthdays(today.year)
        come = cumulative[:, :, slot]
        return np.stack([cumulative[:, :, -1] - come, come], axis=2)

    def _birthdays(self, year: int) -> IntArray:
        """counts[y, i, s]: as in `birth_year_counts`, with a birthday on slot s ((month - 1) * 31 + day - 1)
        of the year or earlier. Counted once per snapshot (and calendar year, which bounds the years)."""
        cached = self._birthday_counts.get(year)
        if cached is not None:
            return cached
        width = year - EARLIEST_BIRTH_YEAR + 1
        years = np.clip(self.birth_year - EARLIEST_BIRTH_YEAR, 0, width - 1)  # bounded, as in `age_counts`
        slots = (self.birth_month_day // 100 - 1) * _DAYS_PER_SLOT_MONTH + self.birth_month_day % 100 - 1
        cells = (years * 2 + self.has_image) * _BIRTHDAY_SLOTS + slots
        counts = np.bincount(cells, minlength=width * 2 * _BIRTHDAY_SLOTS).reshape(width, 2, _BIRTHDAY_SLOTS)
        counts = counts.cumsum(axis=2)
        counts.setflags(write=False)
        with self._lock:
            self._birthday_counts.clear()  # keep only this year's
            self._birthday_counts[year] = counts
        return counts
