"""The output table: derived from the manifest, compared between runs, (de)serialized as CSV."""

from __future__ import annotations

import io
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .blocks import BlockWriter
from .keys import Kind
from .manifest import positions
from .parsing import valid_values

OUTPUT_COLUMNS = ["user_id", "first_name", "last_name", "birthts", "img_path"]
_DTYPES = {"user_id": "str", "first_name": "str", "last_name": "str", "birthts": "int64", "img_path": "str"}


class OutputError(ValueError):
    """A stored output.csv that is not in the expected format."""


@dataclass(frozen=True, slots=True)
class Conflict:
    """Several source files claim one user: the most recently modified one wins."""

    user_id: str
    kind: str
    keys: tuple[str, ...]
    winner: str


def empty_output() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in _DTYPES.items()})


def derive(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per user with a valid CSV (the newest wins), its newest image's key, ordered by user_id."""
    kind = manifest["kind"].to_numpy()
    csvs = _winners(manifest, np.flatnonzero((kind == Kind.CSV.value) & manifest["has_row"].to_numpy()))
    images = _winners(manifest, np.flatnonzero(kind == Kind.IMAGE.value))
    user_ids = manifest["user_id"].to_numpy()[csvs]
    image_at = positions(manifest["user_id"].to_numpy()[images], user_ids)
    img_path = np.full(len(csvs), "", dtype=object)
    img_path[image_at >= 0] = manifest["key"].to_numpy()[images[image_at[image_at >= 0]]]
    columns = {name: manifest[name].to_numpy()[csvs] for name in ("first_name", "last_name", "birthts")}
    table = {"user_id": user_ids, **columns, "img_path": img_path}
    return pd.DataFrame({name: pd.Series(table[name], dtype=_DTYPES[name]) for name in OUTPUT_COLUMNS}, copy=False)


def _winners(manifest: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """Of `rows`, the newest one of each user (ties: the greatest key), as positions ordered by user_id."""
    claims = pd.DataFrame({name: manifest[name].to_numpy()[rows] for name in ("user_id", "mtime", "key")}, copy=False)
    claims.index = rows
    ordered = claims.sort_values(["user_id", "mtime", "key"], kind="stable")
    return ordered.index.to_numpy()[~ordered["user_id"].duplicated(keep="last").to_numpy()]


def conflicts(manifest: pd.DataFrame) -> list[Conflict]:
    """Users claimed by more than one CSV (or more than one image)."""
    claimed = manifest[manifest.duplicated(["user_id", "kind"], keep=False)]
    found = []
    for (user_id, kind), group in claimed.groupby(["user_id", "kind"], sort=True):
        ordered = group.sort_values(["mtime", "key"])
        eligible = ordered[ordered["has_row"]] if kind == Kind.CSV.value else ordered
        winner = str(eligible["key"].iloc[-1]) if len(eligible) else ""
        found.append(Conflict(str(user_id), str(kind), tuple(ordered["key"]), winner))
    return found


@dataclass(frozen=True, slots=True)
class Changes:
    added: int
    updated: int
    removed: int
    unchanged: int


def compare(old: pd.DataFrame, new: pd.DataFrame) -> Changes:
    """Row-level differences between two outputs, keyed by user_id (unique in each)."""
    if old is new:
        return Changes(added=0, updated=0, removed=0, unchanged=len(new))
    at = positions(old["user_id"], new["user_id"])
    rows = np.flatnonzero(at >= 0)
    same = np.ones(len(rows), dtype=bool)
    for column in OUTPUT_COLUMNS[1:]:  # a column at a time: no copies of whole tables
        same &= old[column].to_numpy()[at[rows]] == new[column].to_numpy()[rows]
    unchanged = int(same.sum())
    return Changes(
        added=len(new) - len(rows),
        updated=len(rows) - unchanged,
        removed=len(old) - len(rows),
        unchanged=unchanged,
    )


def to_csv_bytes(table: pd.DataFrame) -> bytes:
    """The table as output.csv, written afresh (see `Writer`)."""
    return Writer(keep=False).write(table)


class Writer:
    """Writes output.csv; with `keep`, each block of rows stays formatted for the next write, so a
    commit that changed a few users formats only their blocks (`blocks.BlockWriter`)."""

    def __init__(self, *, keep: bool) -> None:
        self._rows = BlockWriter(OUTPUT_COLUMNS, "user_id", _as_is, keep=keep)

    def write(self, table: pd.DataFrame, previous: pd.DataFrame | None = None, changed: Collection[str] = ()) -> bytes:
        """`table` as output.csv (see `BlockWriter.write` for `previous` and `changed`, user ids here)."""
        return b"".join([_HEADER, *(block.data for block in self._rows.write(table, previous, changed))])


_HEADER = ",".join(OUTPUT_COLUMNS).encode() + b"\n"


def _as_is(data: bytes) -> bytes:
    return data


def from_csv_bytes(data: bytes, now_ms: int) -> tuple[pd.DataFrame, int]:
    """Parse a stored output.csv: its rows that pass the input rules, and how many did not.

    `OutputError` when the file as a whole cannot be read (header, format, a value out of any range).
    A row that breaks a rule a source file is held to (an empty name, a birthts before 1800 or in the
    future) is dropped: values from a state file are trusted no more than values from a source file.
    """
    first_line = data.partition(b"\n")[0].rstrip(b"\r")
    if first_line != ",".join(OUTPUT_COLUMNS).encode():
        raise OutputError(f"unexpected output header {first_line[:200]!r}")
    try:
        table = pd.read_csv(io.BytesIO(data), dtype=_DTYPES, keep_default_na=False, na_filter=False)
    except Exception as exc:  # any failure to read a state file makes it unusable (OverflowError too)
        raise OutputError(f"unreadable output: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if list(table.columns) != OUTPUT_COLUMNS:
        raise OutputError("output rows do not match its header")
    if table["user_id"].duplicated().any():
        raise OutputError("output has duplicate user_id rows")
    valid = (table["user_id"] != "").to_numpy() & valid_values(
        table["first_name"], table["last_name"], table["birthts"], now_ms
    )
    dropped = int((~valid).sum())
    if dropped:
        table = table[valid].reset_index(drop=True)
    if not table["user_id"].is_monotonic_increasing:  # edited by hand: restore the contract's order
        table = table.sort_values("user_id", kind="stable", ignore_index=True)
    return table, dropped
