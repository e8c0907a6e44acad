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
    prev = previous.set_index("key")[RESULT_COLUMNS]
    fresh = results.set_index("key")[RESULT_COLUMNS]
    carried = prev.reindex(listing.index.difference(fresh.index))
    merged = listing.join(pd.concat([carried, fresh]) if len(fresh) else carried)
    merged = _fill_images(merged)
    merged = _carry_last_valid(merged, prev, seed)
    return merged.reset_index()[COLUMNS].astype(DTYPES)


def _fill_images(frame: pd.DataFrame) -> pd.DataFrame:
    images = frame["kind"] == Kind.IMAGE.value
    frame.loc[images, ["status", "reason", "first_name", "last_name"]] = ""
    frame.loc[images, "has_row"] = False
    frame.loc[images, "birthts"] = 0
    return frame


def _carry_last_valid(frame: pd.DataFrame, prev: pd.DataFrame, seed: pd.DataFrame) -> pd.DataFrame:
    lost = (frame["status"] == REJECTED) & ~frame["has_row"].astype(bool)
    if not lost.any():
        return frame
    value_columns = ["first_name", "last_name", "birthts"]
    keys = frame.index[lost]
    before = prev.reindex(keys)
    from_prev = before["has_row"].fillna(False).astype(bool)
    frame.loc[keys[from_prev.to_numpy()], value_columns] = before.loc[from_prev, value_columns].to_numpy()
    frame.loc[keys[from_prev.to_numpy()], "has_row"] = True
    rest = keys[~from_prev.to_numpy()]
    if len(rest) and len(seed):
        users = frame.loc[rest, "user_id"]
        found = users.isin(seed.index)
        hit = rest[found.to_numpy()]
        frame.loc[hit, value_columns] = seed.loc[users[found], value_columns].to_numpy()
        frame.loc[hit, "has_row"] = True
    return frame


def to_bytes(manifest: pd.DataFrame, header: ManifestHeader) -> bytes:
    meta = json.dumps({"format": FORMAT, "version": header.version, "output_etag": header.output_etag})
    body = manifest[COLUMNS].to_csv(index=False, lineterminator="\n")
    return (meta + "\n" + body).encode()


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
