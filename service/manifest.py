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
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from .blocks import BlockWriter
from .keys import Kind, classify
from .parsing import valid_values
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
class Seed:
    """The stored output, when there is no manifest: the only record left of last valid rows.

    It records values per user, not per file, so a rebuild gives a user's row to the one file it can
    have come from (`_attribute_seed`). `written` is the output's last-modified time (ns): a file
    modified later cannot have given the output its values.
    """

    rows: pd.DataFrame  # the output's rows, indexed by user_id
    written: int


@dataclass(frozen=True)
class ManifestHeader:
    """What the manifest says about the commit it belongs to."""

    version: int
    output_etag: str


def empty(columns: list[str] = COLUMNS) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series([], dtype=DTYPES[name]) for name in columns})


def listing_frame(page: list[ObjectInfo]) -> tuple[pd.DataFrame, list[str]]:
    """Turn one listing page into listing rows (CSVs and images) and the keys of the ignored objects."""
    keys: list[str] = []
    etags: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    kinds: list[str] = []
    user_ids: list[str] = []
    ignored: list[str] = []
    shared: dict[str, str] = {}  # a user's CSV and image are usually listed together: one user_id string
    for info in page:
        kind, user_id = classify(info.key)
        if kind is Kind.IGNORED:
            ignored.append(info.key)
            continue
        keys.append(info.key)
        etags.append(info.etag)
        sizes.append(info.size)
        mtimes.append(mtime_ns(info.last_modified))
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
    return frame, ignored


def mtime_ns(moment: datetime) -> int:
    """A last-modified time as the manifest keeps it: integer nanoseconds, at microsecond resolution."""
    return int(moment.timestamp() * 1_000_000) * 1000


_KIND_TEXT = {kind: kind.value for kind in Kind}  # plain strings: enum members would leak into the frame


class Diff:
    """Which listed objects are new or changed since `previous` (a manifest), page by page.

    Rows where `refetch` is true count as changed whatever their ETag.
    """

    def __init__(self, previous: pd.DataFrame, refetch: np.ndarray) -> None:
        self._previous = previous
        self._index = pd.Index(previous["key"])
        self._etags = previous["etag"].to_numpy()
        self._refetch = refetch

    def compare(self, page: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        """`page` with the previous manifest's strings on unchanged rows, and a mask of changed rows.

        Sharing strings is a memory measure, not a rule: an incremental run then holds one copy of
        each key and user_id instead of two (at a million objects, about 100 MiB).
        """
        if not len(self._previous):
            return page, np.ones(len(page), dtype=bool)
        at = self._index.get_indexer(page["key"])
        found = np.flatnonzero(at >= 0)
        same = np.zeros(len(page), dtype=bool)
        same[found] = (self._etags[at[found]] == page["etag"].to_numpy()[found]) & ~self._refetch[at[found]]
        rows = np.flatnonzero(same)
        if len(rows):
            page = page.copy(deep=False)
            for name in ("key", "user_id"):
                column = page[name].to_numpy(dtype=object, copy=True)
                column[rows] = self._previous[name].to_numpy()[at[rows]]
                page[name] = pd.Series(column, index=page.index, dtype=_STR)
        return page, ~same


def etag_digests(etags: list[str]) -> np.ndarray:
    """The 64-bit digests of ETags, as int64."""
    digests = b"".join(hashlib.blake2b(etag.encode(errors="surrogatepass"), digest_size=8).digest() for etag in etags)
    return np.frombuffer(digests, dtype="<i8").astype(np.int64)


def merge(
    listing: pd.DataFrame, previous: pd.DataFrame, results: pd.DataFrame, seed: Seed | None = None
) -> pd.DataFrame:
    """The new manifest: listed objects, with fresh results for fetched CSVs and earlier ones otherwise.

    The rule for last valid values: they belong to the file that had them and go when it goes. A CSV
    rejected now keeps the values it had when it was last valid (from `previous`). Without a previous
    manifest, `seed` (the stored output) is the only record, and `_attribute_seed` decides which file
    its rows belong to.

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
    _carry_last_valid(values, previous, prev_at)
    if seed is not None and len(seed.rows):
        _attribute_seed(values, listing, seed)
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


def _carry_last_valid(values: dict[str, np.ndarray], prev: pd.DataFrame, prev_at: np.ndarray) -> None:
    """Give CSVs that are rejected now the values they had when last valid (in place)."""
    lost = (values["status"] == REJECTED) & ~values["has_row"] & (prev_at >= 0)
    rows = np.flatnonzero(lost)
    rows = rows[prev["has_row"].to_numpy()[prev_at[rows]]]
    for column in VALUE_COLUMNS:
        values[column][rows] = prev[column].to_numpy()[prev_at[rows]]
    values["has_row"][rows] = True


_SECOND = 1_000_000_000  # ns


def _attribute_seed(values: dict[str, np.ndarray], listing: pd.DataFrame, seed: Seed) -> None:
    """Give each user's row of the stored output to the rejected CSV it can have come from (in place).

    Only CSVs not modified since the output was written (to the second) can have given it values. If one of the
    user's valid CSVs among them holds exactly the row's values, the row is its own and no rejected
    file gets it. Otherwise the row was the last valid content of a file rejected now: the newest
    such file gets it, as the newest file with content is the one whose values the output shows.
    """
    # At the resolution every store gives (S3's Last-Modified header has whole seconds): a file from
    # the same second as the output may have given it values.
    older = listing["mtime"].to_numpy() // _SECOND <= seed.written // _SECOND
    csv = (listing["kind"] == Kind.CSV.value).to_numpy() & older
    user_ids = listing["user_id"].to_numpy()
    seed_at = np.full(len(listing), -1, dtype=np.intp)
    seed_at[csv] = positions(seed.rows.index, user_ids[csv])
    known = np.flatnonzero(seed_at >= 0)
    valid = known[values["has_row"][known]]
    same = np.ones(len(valid), dtype=bool)
    for column in VALUE_COLUMNS:
        same &= values[column][valid] == seed.rows[column].to_numpy()[seed_at[valid]]
    explained = pd.Index(user_ids[valid[same]]).unique()
    candidates = known[(values["status"][known] == REJECTED) & ~values["has_row"][known]]
    candidates = candidates[~pd.Index(user_ids[candidates]).isin(explained)]
    claims = pd.DataFrame(
        {"user_id": user_ids[candidates], "mtime": listing["mtime"].to_numpy()[candidates],
         "key": listing["key"].to_numpy()[candidates]},
        index=candidates,
    )  # fmt: skip
    ordered = claims.sort_values(["user_id", "mtime", "key"], kind="stable")
    rows = ordered.index.to_numpy()[~ordered["user_id"].duplicated(keep="last").to_numpy()]
    for column in VALUE_COLUMNS:
        values[column][rows] = seed.rows[column].to_numpy()[seed_at[rows]]
    values["has_row"][rows] = True


def to_bytes(manifest: pd.DataFrame, header: ManifestHeader) -> bytes:
    """The manifest as stored, encoded afresh (see `Encoder`)."""
    return Encoder(keep=False).encode(manifest, header)


class Encoder:
    """Encodes manifests for storage; with `keep`, each block of rows stays compressed for the next.

    The stored form is a gzip file of several members, which a reader sees as one stream: a JSON
    header line and the CSV header first, then one member per block of rows (`blocks.BlockWriter`).
    The header lists each block's rows and compressed size, so that a reader (`Decoder`) can tell the
    blocks apart without decompressing them. A commit that changed a few hundred rows of a large
    manifest compresses only their blocks and copies the rest from the previous commit: formatting
    and compressing rows is most of a manifest's cost.
    """

    def __init__(self, *, keep: bool) -> None:
        self._rows = BlockWriter(COLUMNS, "key", _member, keep=keep)

    def encode(
        self,
        manifest: pd.DataFrame,
        header: ManifestHeader,
        previous: pd.DataFrame | None = None,
        changed: Collection[str] = (),
    ) -> bytes:
        """`manifest` as stored (see `BlockWriter.write` for `previous` and `changed`)."""
        blocks = self._rows.write(manifest, previous, changed)
        meta = json.dumps(
            {
                "format": FORMAT, "version": header.version, "output_etag": header.output_etag,
                "blocks": [[block.rows, len(block.data)] for block in blocks],
            },
            separators=(",", ":"),
        )  # fmt: skip
        first = _member(meta.encode() + b"\n" + ",".join(COLUMNS).encode() + b"\n")
        return b"".join([first, *(block.data for block in blocks)])


def _member(data: bytes) -> bytes:
    """One gzip member (no timestamp: the same rows give the same bytes)."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def from_bytes(data: bytes, now_ms: int) -> tuple[pd.DataFrame, ManifestHeader]:
    """Parse a stored manifest; `ManifestError` when it cannot be trusted.

    Any failure to read it makes it unusable, and so does a row whose values a source file could not
    have given: what a state file says is checked like a source file.
    """
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
    except ManifestError:
        raise
    except Exception as exc:  # OverflowError, zlib.error, EOFError, ParserError, ...: all mean "unusable"
        raise ManifestError(f"unreadable manifest: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if list(frame.columns) != COLUMNS or frame["key"].duplicated().any():
        raise ManifestError("manifest columns or keys are inconsistent")
    _check_rows(frame, now_ms)
    for name in ("kind", "status", "reason", "user_id"):
        frame[name] = _shared(frame[name])
    return frame, header


@dataclass(frozen=True)
class Decoded:
    """A stored manifest as read, and what it shares with the one read before it."""

    frame: pd.DataFrame
    header: ManifestHeader
    #: The manifest read before, when this one was read from the blocks it shares with it; then
    #: `changed_users` are the users with a row that is new, different or gone since.
    previous: pd.DataFrame | None = None
    changed_users: np.ndarray | None = None


class Decoder:
    """Reads stored manifests, keeping the last one's blocks (by digest) so that the next read parses
    only the blocks that are new: a follower that serves a commit which changed a few rows of a large
    manifest does not parse it all again. Manifests without a block list (written by earlier
    releases) are read whole."""

    def __init__(self) -> None:
        self._frame: pd.DataFrame | None = None
        self._spans: dict[bytes, tuple[int, int]] = {}  # a block's digest -> its rows in `_frame`

    def decode(self, data: bytes, now_ms: int) -> Decoded:
        """`ManifestError` when it cannot be trusted (see `from_bytes`)."""
        blocks = _blocks(data)
        previous = self._frame
        decoded = None
        if blocks is not None and previous is not None:
            try:
                decoded = self._from_known_blocks(blocks, previous, now_ms)
            except Exception:  # read it whole instead: that read says what is wrong
                decoded = None
        if decoded is None:
            frame, header = from_bytes(data, now_ms)
            decoded = Decoded(frame, header)
        self._remember(decoded.frame, blocks)
        return decoded

    def remember(self, manifest: pd.DataFrame, data: bytes) -> None:
        """Take `manifest`, stored as `data` (this process wrote it), as the one read last."""
        self._remember(manifest, _blocks(data))

    def _remember(self, frame: pd.DataFrame, blocks: _Blocks | None) -> None:
        self._frame, self._spans = frame, {}
        if blocks is not None and sum(rows for rows, _ in blocks[1]) == len(frame):
            self._spans = _spans(blocks[1])

    def _from_known_blocks(self, blocks: _Blocks, previous: pd.DataFrame, now_ms: int) -> Decoded | None:
        """The manifest from the rows of `previous` for the blocks read before, and the new blocks
        parsed together (one parse, however scattered they are); None when they do not add up."""
        header, members = blocks
        order: list[np.ndarray] = []  # row positions in `previous` followed by the new rows
        texts: list[bytes] = []
        reused = np.zeros(len(previous), dtype=bool)
        fresh_rows = 0
        for rows, member in members:
            span = self._spans.get(_digest(member))
            if span is not None and span[1] - span[0] == rows:
                reused[span[0] : span[1]] = True
                order.append(np.arange(span[0], span[1]))
            else:
                texts.append(zlib.decompress(member, 31))
                order.append(np.arange(len(previous) + fresh_rows, len(previous) + fresh_rows + rows))
                fresh_rows += rows
        fresh = empty()
        if texts:
            fresh = pd.read_csv(
                io.BytesIO(b"".join(texts)), names=COLUMNS, header=None, dtype=DTYPES,
                keep_default_na=False, na_filter=False,
            )  # fmt: skip
        if len(fresh) != fresh_rows:
            return None
        _check_rows(fresh, now_ms)
        for name in ("kind", "status", "reason", "user_id"):
            fresh[name] = _shared(fresh[name])
        both = pd.concat([previous, fresh], ignore_index=True) if len(fresh) else previous
        frame = both.take(np.concatenate(order) if order else np.zeros(0, dtype=np.intp)).reset_index(drop=True)
        if frame["key"].duplicated().any():
            return None
        # A new block holds a few changed rows among unchanged ones: the changed users are those of
        # rows that are new or differ, and of rows that are gone.
        at = positions(previous["key"], fresh["key"].to_numpy())
        same = at >= 0
        for name in COLUMNS[1:]:
            same[same] &= previous[name].to_numpy()[at[same]] == fresh[name].to_numpy()[same]
        kept = reused.copy()
        kept[at[same]] = True
        users = np.concatenate([previous["user_id"].to_numpy()[~kept], fresh["user_id"].to_numpy()[~same]])
        return Decoded(frame, header, previous, pd.unique(users))


_Blocks = tuple[ManifestHeader, list[tuple[int, memoryview]]]


def _blocks(data: bytes) -> _Blocks | None:
    """The header and each block's rows and compressed bytes, from the block list the header gives;
    None when it gives none (or a list that does not add up): the manifest is then read whole."""
    try:
        head = zlib.decompressobj(31)
        text = head.decompress(data, 1 << 20)  # the header member: a JSON line and the CSV header
        if not head.eof:
            return None
        meta = json.loads(text.partition(b"\n")[0])
        blocks = meta["blocks"]
        header = ManifestHeader(version=int(meta["version"]), output_etag=str(meta["output_etag"]))
        at = len(data) - len(head.unused_data)
        members = []
        view = memoryview(data)
        for rows, size in blocks:
            members.append((int(rows), view[at : at + int(size)]))
            at += int(size)
    except Exception:  # no usable block list: read it whole
        return None
    if meta.get("format") != FORMAT or at != len(data) or any(rows <= 0 for rows, _ in members):
        return None
    return header, members


def _spans(members: list[tuple[int, memoryview]]) -> dict[bytes, tuple[int, int]]:
    spans, at = {}, 0
    for rows, member in members:
        spans[_digest(member)] = (at, at + rows)
        at += rows
    return spans


def _digest(member: memoryview) -> bytes:
    return hashlib.blake2b(member, digest_size=16).digest()


def _check_rows(frame: pd.DataFrame, now_ms: int) -> None:
    kinds = frame["kind"].to_numpy()
    if not np.isin(kinds, [Kind.CSV.value, Kind.IMAGE.value]).all():
        raise ManifestError("manifest has rows of an unknown kind")
    if not np.isin(frame["status"].to_numpy(), ["", OK, REJECTED]).all():
        raise ManifestError("manifest has rows of an unknown status")
    content = frame[frame["has_row"].to_numpy() & (kinds == Kind.CSV.value)]
    if not valid_values(content["first_name"], content["last_name"], content["birthts"], now_ms).all():
        raise ManifestError("manifest has values no valid file could hold")


def _shared(column: pd.Series) -> pd.Series:
    """The column with one string object per distinct value: the parser makes one per cell.

    A million "csv" cells are 50 MiB as separate objects, and a user's CSV and image rows repeat
    its user_id.
    """
    codes, uniques = pd.factorize(column.to_numpy(dtype=object))
    return pd.Series(np.asarray(uniques, dtype=object)[codes], index=column.index, dtype=_STR)


_GZIP_MAGIC = b"\x1f\x8b"
