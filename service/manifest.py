"""The manifest: one columnar row per source object seen, with what the output is derived from.

An object's ETag is kept as a 64-bit digest (BLAKE2b), not as text: ETags are only ever compared for
equality, and at a million objects the strings alone would take about 130 MiB. A changed object goes
unnoticed only if its new ETag's digest equals the old one's, a 2**-64 chance.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .keys import Kind, classify
from .storage import ObjectInfo

FORMAT = 2  # 2: gzip-compressed
LISTING_COLUMNS = ["key", "etag", "size", "mtime", "kind", "user_id"]
RESULT_COLUMNS = ["status", "reason", "has_row", "first_name", "last_name", "birthts"]
COLUMNS = LISTING_COLUMNS + RESULT_COLUMNS
_STR = "str"
DTYPES: dict[str, Any] = {
    "key": _STR, "etag": "int64", "size": "int64", "mtime": "int64", "kind": _STR, "user_id": _STR,
    "status": _STR, "reason": _STR, "has_row": "bool", "first_name": _STR, "last_name": _STR,
    "birthts": "int64",
}  # fmt: skip
OK, REJECTED = "ok", "rejected"
VALUE_COLUMNS = ["first_name", "last_name", "birthts"]


class ManifestError(ValueError):
    """The stored manifest cannot be used (unreadable, another format, inconsistent)."""


@dataclass(frozen=True)
class ManifestHeader:
    """What the manifest says about the commit it belongs to."""

    version: int
    output_etag: str


def empty(columns: list[str] = COLUMNS) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series([], dtype=DTYPES[name]) for name in columns})


def listing_frame(page: list[ObjectInfo]) -> tuple[pd.DataFrame, int]:
    """Turn one listing page into listing rows (CSVs and images) and the count of ignored objects."""
    keys: list[str] = []
    etags: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    kinds: list[str] = []
    user_ids: list[str] = []
    shared: dict[str, str] = {}  # a user's CSV and image are usually listed together: one user_id string
    for info in page:
        kind, user_id = classify(info.key)
        if kind is Kind.IGNORED:
            continue
        keys.append(info.key)
        etags.append(info.etag)
        sizes.append(info.size)
        mtimes.append(int(info.last_modified.timestamp() * 1_000_000) * 1000)
        kinds.append(_KIND_TEXT[kind])
        user_ids.append(shared.setdefault(user_id, user_id))
    frame = pd.DataFrame(
        {
            "key": pd.Series(keys, dtype=_STR),
            "etag": etag_digests(etags),
            "size": np.array(sizes, dtype=np.int64),
            "mtime": np.array(mtimes, dtype=np.int64),
            "kind": pd.Series(kinds, dtype=_STR),
            "user_id": pd.Series(user_ids, dtype=_STR),
        },
        copy=False,
    )
    return frame, len(page) - len(keys)


_KIND_TEXT = {kind: kind.value for kind in Kind}  # plain strings: enum members would leak into the frame


class Diff:
    """Which listed objects are new or changed since `previous` (a manifest), page by page.

    Rows of unchanged objects are given the previous manifest's strings, so that an incremental run
    holds one copy of each key and user_id instead of two. Rows where `refetch` is true count as changed
    whatever their ETag.
    """

    def __init__(self, previous: pd.DataFrame, refetch: np.ndarray) -> None:
        self._previous = previous
        self._index = pd.Index(previous["key"])
        self._etags = previous["etag"].to_numpy()
        self._refetch = refetch

    def changed(self, frame: pd.DataFrame) -> np.ndarray:
        """A mask of `frame`'s rows whose object is new or changed; unchanged rows reuse strings (in place)."""
        if not len(self._previous):
            return np.ones(len(frame), dtype=bool)
        at = self._index.get_indexer(frame["key"])
        found = np.flatnonzero(at >= 0)
        same = np.zeros(len(frame), dtype=bool)
        same[found] = (self._etags[at[found]] == frame["etag"].to_numpy()[found]) & ~self._refetch[at[found]]
        rows = np.flatnonzero(same)
        for name in ("key", "user_id") if len(rows) else ():
            column = frame[name].to_numpy(dtype=object, copy=True)
            column[rows] = self._previous[name].to_numpy()[at[rows]]
            frame[name] = pd.Series(column, index=frame.index, dtype=_STR)
        return ~same


def etag_digests(etags: list[str]) -> np.ndarray:
    """The 64-bit digests of ETags, as int64."""
    digests = b"".join(hashlib.blake2b(etag.encode(errors="surrogatepass"), digest_size=8).digest() for etag in etags)
    return np.frombuffer(digests, dtype="<i8").astype(np.int64)


def merge(listing: pd.DataFrame, previous: pd.DataFrame, results: pd.DataFrame, seed: pd.DataFrame) -> pd.DataFrame:
    """The new manifest: listed objects, with fresh results for fetched CSVs and earlier ones otherwise.

    A CSV rejected now keeps the last valid values it had (from `previous`, else from `seed`, the rows
    of an earlier output indexed by user_id), so a bad upload never loses a user's row.

    Built column by column from row positions, never from whole-frame joins: at a million objects each
    copy of the frame costs about 100 MiB.
    """
    keys = listing["key"]
    fresh_at = positions(results["key"], keys)
    prev_at = positions(previous["key"], keys)
    use_fresh = np.flatnonzero(fresh_at >= 0)
    use_prev = np.flatnonzero((prev_at >= 0) & (fresh_at < 0))
    values: dict[str, np.ndarray] = {}
    for name in RESULT_COLUMNS:  # objects neither fetched nor known (images) keep the defaults
        column = np.full(len(listing), _DEFAULTS[name], dtype=object if DTYPES[name] == _STR else DTYPES[name])
        column[use_prev] = previous[name].to_numpy()[prev_at[use_prev]]
        column[use_fresh] = results[name].to_numpy()[fresh_at[use_fresh]]
        values[name] = column
    _carry_last_valid(values, listing["user_id"], previous, prev_at, seed)
    merged = {name: listing[name] for name in LISTING_COLUMNS}
    merged.update(
        {name: pd.Series(values.pop(name), index=listing.index, dtype=DTYPES[name]) for name in RESULT_COLUMNS}
    )
    return pd.DataFrame(merged, copy=False).reset_index(drop=True)


_DEFAULTS: dict[str, object] = {
    "status": "",
    "reason": "",
    "has_row": False,
    "first_name": "",
    "last_name": "",
    "birthts": 0,
}


def positions(source: pd.Series | pd.Index | np.ndarray, keys: pd.Series | np.ndarray) -> np.ndarray:
    """Where each of `keys` is in `source` (whose values are unique), -1 where it is not."""
    if not len(source):  # no hash table to build
        return np.full(len(keys), -1, dtype=np.intp)
    return np.asarray(pd.Index(source).get_indexer(pd.Index(keys)), dtype=np.intp)


def _carry_last_valid(
    values: dict[str, np.ndarray], user_ids: pd.Series, prev: pd.DataFrame, prev_at: np.ndarray, seed: pd.DataFrame
) -> None:
    """Give CSVs that are rejected now the values they had when last valid (in place)."""
    lost = (values["status"] == REJECTED) & ~values["has_row"]
    if not lost.any():
        return
    known = lost & (prev_at >= 0)
    rows = np.flatnonzero(known)[prev["has_row"].to_numpy()[prev_at[known]]]
    for column in VALUE_COLUMNS:
        values[column][rows] = prev[column].to_numpy()[prev_at[rows]]
    values["has_row"][rows] = True
    lost[rows] = False
    rows = np.flatnonzero(lost)
    seed_at = positions(seed.index, user_ids.to_numpy()[rows])
    rows, seed_at = rows[seed_at >= 0], seed_at[seed_at >= 0]
    for column in VALUE_COLUMNS:
        values[column][rows] = seed[column].to_numpy()[seed_at]
    values["has_row"][rows] = True


def to_bytes(manifest: pd.DataFrame, header: ManifestHeader) -> bytes:
    """A JSON header line, then the rows as CSV, gzip-compressed a slice at a time.

    At a million objects the plain CSV is about 170 MiB: compressing slices as they are formatted keeps
    the peak at the compressed size (about a quarter) plus one slice.
    """
    meta = json.dumps({"format": FORMAT, "version": header.version, "output_etag": header.output_etag})
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1, mtime=0) as stream:
        stream.write(meta.encode() + b"\n")
        for start in range(0, max(len(manifest), 1), _SLICE_ROWS):  # one slice at least: the header
            rows = manifest.iloc[start : start + _SLICE_ROWS][COLUMNS]
            stream.write(rows.to_csv(index=False, header=start == 0, lineterminator="\n").encode())
    return buffer.getvalue()


_SLICE_ROWS = 50_000


def from_bytes(data: bytes) -> tuple[pd.DataFrame, ManifestHeader]:
    """Parse a stored manifest; `ManifestError` when it cannot be trusted."""
    if not data.startswith(_GZIP_MAGIC):
        raise ManifestError("not a compressed manifest (an older format, or damaged)")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as stream:
            meta = json.loads(stream.readline())
            if not isinstance(meta, dict):
                raise ManifestError("manifest header is not a JSON object")
            if meta.get("format") != FORMAT:
                raise ManifestError(f"manifest format {meta.get('format')!r}, expected {FORMAT}")
            header = ManifestHeader(version=int(meta["version"]), output_etag=str(meta["output_etag"]))
            frame = pd.read_csv(stream, dtype=DTYPES, keep_default_na=False, na_filter=False)
    except (ValueError, KeyError, TypeError, OSError, EOFError, zlib.error, pd.errors.ParserError) as exc:
        raise ManifestError(f"unreadable manifest: {exc}") from exc
    if list(frame.columns) != COLUMNS or frame["key"].duplicated().any():
        raise ManifestError("manifest columns or keys are inconsistent")
    for name in ("kind", "status", "reason", "user_id"):
        frame[name] = _shared(frame[name])
    return frame, header


def _shared(column: pd.Series) -> pd.Series:
    """The column with one string object per distinct value: the parser makes one per cell.

    A million "csv" cells are 50 MiB as separate objects, and a user's CSV and image rows repeat
    its user_id.
    """
    codes, uniques = pd.factorize(column.to_numpy(dtype=object))
    return pd.Series(np.asarray(uniques, dtype=object)[codes], index=column.index, dtype=_STR)


_GZIP_MAGIC = b"\x1f\x8b"
