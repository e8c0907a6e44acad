"""CSV written a block of rows at a time, each block's bytes kept for the next write of the same table.

A targeted run changes a few hundred rows of tables that can hold millions; formatting every row as
CSV again (and compressing it, for the manifest) would make its commit cost what the bucket costs.
So rows are cut into blocks whose boundaries depend on the rows' keys alone: a block ends after each
row whose key hashes to a multiple of `BLOCK_ROWS`. Inserting or removing a row changes its own
block, and a write that knows which keys changed since the last one copies every other block.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Collection
from typing import NamedTuple

import numpy as np
import pandas as pd

BLOCK_ROWS = 32
"""Rows in a block, on average: smaller blocks mean less to redo for scattered changes, more blocks."""


SLICE_ROWS = 50_000
"""Rows in a block when blocks are not kept (a plain write): at a million rows the plain CSV is about
170 MiB, so a manifest is compressed a slice at a time."""


class Block(NamedTuple):
    rows: int
    data: bytes  # sealed


class BlockWriter:
    """Writes `columns` of a table as CSV rows, block by block; `seal` turns a block's CSV into what is
    stored (compresses it, say). With `keep`, the blocks of the last write are kept for the next.

    The CSV is the csv module's, as pandas writes it too: minimal quoting, booleans as True/False.
    """

    def __init__(self, columns: list[str], key: str, seal: Callable[[bytes], bytes], *, keep: bool) -> None:
        self._columns = columns
        self._key = key
        self._seal = seal
        self._keep = keep
        self._written: pd.DataFrame | None = None  # the table the blocks below were written from
        self._blocks: dict[tuple[object, object, int], bytes] = {}  # (first key, last key, rows) -> block

    def write(
        self, table: pd.DataFrame, previous: pd.DataFrame | None = None, changed: Collection[str] = ()
    ) -> list[Block]:
        """`table`'s blocks, in order. When `previous` is the table written last and `table` differs from it only
        in the rows of the `changed` keys (added, removed or modified), the other blocks are reused."""
        keys = table[self._key].to_numpy(dtype=object)
        # Blocks that are not kept need no boundaries by key: slices bound the memory a write takes.
        ends = (
            block_ends(keys)
            if self._keep
            else np.arange(SLICE_ROWS, len(keys) + SLICE_ROWS, SLICE_ROWS).clip(max=len(keys))
        )
        starts = np.concatenate([np.zeros(min(len(ends), 1), dtype=np.intp), ends[:-1]])
        known = self._blocks if previous is not None and previous is self._written else {}
        dirty = np.ones(len(ends), dtype=bool)
        if known:
            dirty[:] = False
            rows = np.flatnonzero(table[self._key].isin(list(changed)).to_numpy())
            dirty[np.searchsorted(ends, rows, side="right")] = True
        columns = [table[name].to_numpy(dtype=object) for name in self._columns]
        blocks: dict[tuple[object, object, int], bytes] = {}
        written: list[Block] = []
        for start, end, is_dirty in zip(starts.tolist(), ends.tolist(), dirty.tolist(), strict=True):
            # The same first and last key and as many rows, none of them changed: the same rows.
            identity = (keys[start], keys[end - 1], end - start)
            block = None if is_dirty else known.get(identity)
            if block is None:
                block = self._seal(csv_rows([column[start:end] for column in columns]))
            blocks[identity] = block
            written.append(Block(end - start, block))
        if self._keep:
            self._written, self._blocks = table, blocks
        return written


def block_ends(keys: np.ndarray) -> np.ndarray:
    """The end (exclusive) of each block of rows with these keys."""
    if not len(keys):
        return np.zeros(0, dtype=np.intp)
    ends = np.flatnonzero(pd.util.hash_array(keys, categorize=False) % BLOCK_ROWS == 0) + 1
    if not len(ends) or ends[-1] != len(keys):
        ends = np.append(ends, len(keys))
    return ends.astype(np.intp)


def csv_rows(columns: list[np.ndarray]) -> bytes:
    """Rows as CSV, given column by column."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(zip(*(column.tolist() for column in columns), strict=True))
    return text.getvalue().encode()
