"""Property: any sequence of source changes, processed incrementally, gives the view a model predicts,
and equals a from-scratch rebuild wherever no file is currently rejected.

The model is the README's rule for last valid rows, written out plainly: a file's last valid values
belong to that file and go when it goes; among one user's files, the most recently modified one that
has values (valid now, or last valid) wins. When the manifest is lost, the stored output is the only
record, and the model gives each user's row to the file the README says it belongs to.
"""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule
from support import BIRTHS, INVALID, NAMES, encode

from service.aggregator import Aggregator
from service.local_store import LocalStore

USERS = st.sampled_from(["1", "2", "01", "x y"])
FOLDERS = st.sampled_from(["src-data/", "src-data/sub/"])
Row = tuple[str, str, str, str]


def mtime_ns(info_time: float) -> int:
    return int(info_time * 1_000_000) * 1000  # the manifest's resolution


def user_of(key: str) -> str:
    return key.rpartition("/")[2].rpartition(".")[0]


class SourceChanges(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.root = Path(tempfile.mkdtemp())
        self.store = LocalStore(self.root, "lake")
        self.agg = Aggregator(self.store, src_prefix="src-data/", output_key="out/output.csv", concurrency=4)
        self.csvs: dict[str, tuple[str, str, int] | None] = {}  # key -> values, None when invalid
        self.images: set[str] = set()
        self.last_valid: dict[str, tuple[str, str, int]] = {}  # key -> values, as of the last run
        self.manifest_lost = False

    def teardown(self) -> None:
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _do(self, coroutine):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coroutine)

    @rule(user=USERS, folder=FOLDERS, first=NAMES, last=NAMES, birthts=BIRTHS)
    def write_valid_csv(self, user: str, folder: str, first: str, last: str, birthts: int) -> None:
        key = f"{folder}{user}.csv"
        self._do(self.store.put(key, encode(first, last, birthts)))
        self.csvs[key] = (first, last, birthts)

    @rule(user=USERS, folder=FOLDERS, content=INVALID)
    def write_invalid_csv(self, user: str, folder: str, content: bytes) -> None:
        key = f"{folder}{user}.csv"
        self._do(self.store.put(key, content))
        self.csvs[key] = None

    @rule(user=USERS, folder=FOLDERS, ext=st.sampled_from(["png", "JPG"]))
    def write_image(self, user: str, folder: str, ext: str) -> None:
        key = f"{folder}{user}.{ext}"
        self._do(self.store.put(key, b"img"))
        self.images.add(key)

    @precondition(lambda self: self.csvs or self.images)
    @rule(data=st.data())
    def delete_something(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted([*self.csvs, *self.images])))
        self._do(self.store.delete(key))
        self.csvs.pop(key, None)
        self.images.discard(key)

    @precondition(lambda self: any(v is not None for v in self.csvs.values()))
    @rule(data=st.data(), content=INVALID)
    def break_a_valid_csv(self, data: st.DataObject, content: bytes) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, v in self.csvs.items() if v is not None)))
        self._do(self.store.put(key, content))
        self.csvs[key] = None

    @precondition(lambda self: self.csvs or self.images)
    @rule(data=st.data())
    def move_to_the_other_folder(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted([*self.csvs, *self.images])))
        folder, _, name = key.rpartition("/")
        target = ("src-data/sub/" if folder == "src-data" else "src-data/") + name
        self._do(self.store.put(target, self._do(self.store.get(key))))
        self._do(self.store.delete(key))
        if key in self.csvs:
            self.csvs[target] = self.csvs.pop(key)
        else:
            self.images.discard(key)
            self.images.add(target)

    @rule(lose=st.sampled_from([(), (), ("manifest",), ("output",), ("manifest", "output")]))
    def run(self, lose: tuple[str, ...]) -> None:
        """A run, after losing the manifest, the output or both (as an operator's `rm` would)."""
        for name in lose:
            self._do(self._delete_if_present({"manifest": "out/output.csv.manifest", "output": "out/output.csv"}[name]))
        self.manifest_lost = self.manifest_lost or "manifest" in lose
        seed = self._stored_output() if self.manifest_lost else None
        self._do(self.agg.run())
        kept = {} if self.manifest_lost else self.last_valid  # the manifest was the record of them
        self.last_valid = {k: v for k, v in kept.items() if k in self.csvs}
        self.last_valid.update({k: v for k, v in self.csvs.items() if v is not None})
        if seed is not None:
            self.last_valid.update(self._attributed(*seed))
        self.manifest_lost = False
        assert self._rows("out/output.csv") == self._expected()
        rebuild = Aggregator(self.store, src_prefix="src-data/", output_key="rebuild/output.csv", concurrency=4)
        self._do(rebuild.run())
        rebuilt, current = self._rows("rebuild/output.csv"), self._rows("out/output.csv")
        rejected_users = {k.rpartition("/")[2].rpartition(".")[0] for k, v in self.csvs.items() if v is None}
        for user in set(rebuilt) | set(current):
            if user not in rejected_users:
                assert rebuilt.get(user) == current.get(user), user
        self._do(self.store.delete("rebuild/output.csv"))
        self._do(self.store.delete("rebuild/output.csv.manifest"))

    async def _delete_if_present(self, key: str) -> None:
        if await self.store.exists(key):
            await self.store.delete(key)

    def _stored_output(self) -> tuple[dict[str, Row], int] | None:
        """The output's rows and its last-modified second, before a run without a manifest."""
        if not self._do(self.store.exists("out/output.csv")):
            return None
        written = self._do(self.store.stat("out/output.csv")).last_modified.timestamp()
        return self._rows("out/output.csv"), int(written)

    def _attributed(self, rows: dict[str, Row], written: int) -> dict[str, tuple[str, str, int]]:
        """The README's rule for a rebuild without a manifest, one user at a time."""
        given: dict[str, tuple[str, str, int]] = {}
        for user, (first, last, birthts, _) in rows.items():
            row = (first, last, int(birthts))
            older = [
                k
                for k in self.csvs
                if user_of(k) == user and int(self._do(self.store.stat(k)).last_modified.timestamp()) <= written
            ]
            if any(self.csvs[k] == row for k in older):
                continue  # the row is a valid file's own
            rejected = [k for k in older if self.csvs[k] is None]
            if rejected:
                given[self._newest(rejected)] = row
        return given

    def _newest(self, keys: list[str]) -> str:
        stamps = {k: mtime_ns(self._do(self.store.stat(k)).last_modified.timestamp()) for k in keys}
        return max(keys, key=lambda k: (stamps[k], k))

    def _expected(self) -> dict[str, Row]:
        newest = self._newest
        expected: dict[str, Row] = {}
        for user in {user_of(k) for k in self.last_valid}:
            first, last, birthts = self.last_valid[newest([k for k in self.last_valid if user_of(k) == user])]
            images = [k for k in self.images if user_of(k) == user]
            expected[user] = (first, last, str(birthts), newest(images) if images else "")
        return expected

    def _rows(self, key: str) -> dict[str, Row]:
        text = self._do(self.store.get(key)).decode()
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        assert len({r["user_id"] for r in rows}) == len(rows)  # no duplicates
        return {r["user_id"]: (r["first_name"], r["last_name"], r["birthts"], r["img_path"]) for r in rows}


SourceChanges.TestCase.settings = settings(
    max_examples=60, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSourceChanges = SourceChanges.TestCase
