"""Property: any sequence of source changes, processed incrementally, gives the view a model predicts,
and equals a from-scratch rebuild wherever no file is currently rejected."""

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

from service.aggregator import Aggregator
from service.local_store import LocalStore

USERS = st.sampled_from(["1", "2", "01", "x y"])
FOLDERS = st.sampled_from(["src-data/", "src-data/sub/"])
NAMES = st.text(alphabet='ab ,"éZ\n', min_size=1, max_size=6).map(str.strip).filter(bool)
BIRTHS = st.integers(min_value=-5_000_000_000_000, max_value=1_700_000_000_000)
INVALID = st.sampled_from([b"", b"first_name,last_name\nA,B\n", b"first_name,last_name,birthts\nA,B,x\n", b"\xff"])
Row = tuple[str, str, str, str]


def encode(first: str, last: str, birthts: int) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows([["first_name", " last_name", " birthts"], [first, last, birthts]])
    return buffer.getvalue().encode()


def mtime_ns(info_time: float) -> int:
    return int(info_time * 1_000_000) * 1000  # the manifest's resolution


class SourceChanges(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.root = Path(tempfile.mkdtemp())
        self.store = LocalStore(self.root, "lake")
        self.agg = Aggregator(self.store, src_prefix="src-data/", output_key="out/output.csv", concurrency=4)
        self.csvs: dict[str, tuple[str, str, int] | None] = {}  # key -> values, None when invalid
        self.images: set[str] = set()
        self.last_valid: dict[str, tuple[str, str, int]] = {}

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

    @rule()
    def run(self) -> None:
        self._do(self.agg.run())
        for key in list(self.last_valid):
            if key not in self.csvs:
                del self.last_valid[key]
        self.last_valid.update({k: v for k, v in self.csvs.items() if v is not None})
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

    def _expected(self) -> dict[str, Row]:
        def newest(keys: list[str]) -> str:
            stamps = {k: mtime_ns(self._do(self.store.stat(k)).last_modified.timestamp()) for k in keys}
            return max(keys, key=lambda k: (stamps[k], k))

        def user_of(key: str) -> str:
            return key.rpartition("/")[2].rpartition(".")[0]

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
    max_examples=30, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSourceChanges = SourceChanges.TestCase
