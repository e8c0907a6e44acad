"""The manifest: one columnar row per source object seen, with what the output is derived from."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .keys import Kind, classify
from .storage import ObjectInfo

FORMAT = 1
LISTING_COLUMNS = ["key", "etag", "size", "mtime", "kind", "user_id"]
RESULT_COLUMNS = ["status", "reason", "has_row", "first_name", "last_name", "birthts"]
COLUMNS = LISTING_COLUMNS + RESULT_COLUMNS
_STR = "str"
DTYPES: dict[str, Any] = {
    "key": _STR, "etag": _STR, "size": "int64", "mtime": "int64", "kind": _STR, "user_id": _STR,
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
    classified = [classify(info.key) for info in page]
    keep = [i for i, c in enumerate(classified) if c.kind is not Kind.IGNORED]
    frame = pd.DataFrame(
        {
            "key": pd.Series([page[i].key for i in keep], dtype=_STR),
            "etag": pd.Series([page[i].etag for i in keep], dtype=_STR),
            "size": np.array([page[i].size for i in keep], dtype=np.int64),
            "mtime": np.array([_ns(page[i]) for i in keep], dtype=np.int64),
            "kind": pd.Series([classified[i].kind.value for i in keep], dtype=_STR),
            "user_id": pd.Series([classified[i].user_id for i in keep], dtype=_STR),
        }
    )
    return frame, len(page) - len(keep)


def _ns(info: ObjectInfo) -> int:
    return int(info.last_modified.timestamp() * 1_000_000) * 1000


def merge(listing: pd.DataFrame, previous: pd.DataFrame, results: pd.DataFrame, seed: pd.DataFrame) -> pd.DataFrame:
    """The new manifest: listed objects, with fresh results for fetched CSVs and earlier ones otherwise.

    A CSV rejected now keeps the last valid values it had (from `previous`, else from `seed`, the rows
    of an earlier output indexed by user_id), so a bad upload never loses a user's row.
    """
    listing = listing.set_index("key")
    fresh = results.set_index("key")[RESULT_COLUMNS]
    prev = previous.set_index("key")[RESULT_COLUMNS]
    carried = prev[prev.index.isin(listing.index) & ~prev.index.isin(fresh.index)]
    new = listing.index.difference(fresh.index).difference(carried.index)  # objects never fetched: images
    parts = [frame for frame in (carried, fresh, _defaults(new)) if len(frame)]
    merged = listing.join(pd.concat(parts) if parts else _defaults(new))
    merged = merged.astype({name: DTYPES[name] for name in RESULT_COLUMNS})
    _carry_last_valid(merged, prev, seed)
    return merged.reset_index()[COLUMNS]


def _defaults(keys: pd.Index) -> pd.DataFrame:
    """Result columns of objects that are not parsed (images): empty values."""
    values = {"status": "", "reason": "", "has_row": False, "first_name": "", "last_name": "", "birthts": 0}
    return pd.DataFrame({name: pd.Series(values[name], index=keys, dtype=DTYPES[name]) for name in RESULT_COLUMNS})


def _carry_last_valid(frame: pd.DataFrame, prev: pd.DataFrame, seed: pd.DataFrame) -> None:
    """Give CSVs that are rejected now the values they had when last valid (in place)."""
    lost = frame.index[((frame["status"] == REJECTED) & ~frame["has_row"]).to_numpy()]
    if not len(lost):
        return
    before = prev.loc[prev.index.intersection(lost)]
    before = before[before["has_row"].to_numpy()]
    for column in VALUE_COLUMNS:  # column by column: each keeps its dtype
        frame.loc[before.index, column] = before[column]
    frame.loc[before.index, "has_row"] = True
    users = frame.loc[lost.difference(before.index), "user_id"]
    users = users[users.isin(seed.index).to_numpy()]
    for column in VALUE_COLUMNS:
        frame.loc[users.index, column] = seed.loc[users.to_numpy(), column].to_numpy()
    frame.loc[users.index, "has_row"] = True


def to_bytes(manifest: pd.DataFrame, header: ManifestHeader) -> bytes:
    meta = json.dumps({"format": FORMAT, "version": header.version, "output_etag": header.output_etag})
    buffer = io.BytesIO()
    buffer.write(meta.encode() + b"\n")
    manifest[COLUMNS].to_csv(buffer, index=False, lineterminator="\n", encoding="utf-8")
    return buffer.getvalue()


def from_bytes(data: bytes) -> tuple[pd.DataFrame, ManifestHeader]:
    """Parse a stored manifest; `ManifestError` when it cannot be trusted."""
    first, _, body = data.partition(b"\n")
    try:
        meta = json.loads(first)
        if meta.get("format") != FORMAT:
            raise ManifestError(f"manifest format {meta.get('format')!r}, expected {FORMAT}")
        header = ManifestHeader(version=int(meta["version"]), output_etag=str(meta["output_etag"]))
        frame = pd.read_csv(io.BytesIO(body), dtype=DTYPES, keep_default_na=False, na_filter=False)
    except (ValueError, KeyError, TypeError, pd.errors.ParserError) as exc:
        raise ManifestError(f"unreadable manifest: {exc}") from exc
    if list(frame.columns) != COLUMNS or frame["key"].duplicated().any():
        raise ManifestError("manifest columns or keys are inconsistent")
    return frame, header
