"""Input and output rules, incrementality and crash safety, through each real store."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime

import pytest
from recording import Recording
from support import user_csv

from service.aggregator import Aggregator
from service.errors import StorageError
from service.parsing import MAX_CSV_BYTES
from service.storage import ObjectStore

OUTPUT = "processed_data/output.csv"
HEADER = "user_id,first_name,last_name,birthts,img_path"


def aggregator(store: ObjectStore, output_key: str = OUTPUT) -> Aggregator:
    return Aggregator(store, src_prefix="src-data/", output_key=output_key, concurrency=8)


async def read_output(store: ObjectStore, key: str = OUTPUT) -> list[dict[str, str]]:
    text = (await store.get(key)).decode()
    assert text.splitlines()[0] == HEADER
    return list(csv.DictReader(io.StringIO(text, newline="")))


async def rows_by_user(store: ObjectStore, key: str = OUTPUT) -> dict[str, tuple[str, str, str, str]]:
    rows = await read_output(store, key)
    return {r["user_id"]: (r["first_name"], r["last_name"], r["birthts"], r["img_path"]) for r in rows}


async def test_first_run_builds_the_output(store: ObjectStore) -> None:
    await store.put("src-data/1000.csv", user_csv("Susan", "Lee", 612302400000))
    await store.put("src-data/1000.png", b"png")
    await store.put("src-data/0001.CSV", b'\xef\xbb\xbffirst_name,last_name,birthts\r\nBo,"Smith, Jr.",-5\r\n')
    await store.put("src-data/nested/deeper/10.csv", user_csv("Ten", "Tenner", 10))
    await store.put("src-data/elsewhere/10.JPG", b"jpg")
    await store.put("src-data/README.txt", b"hello")
    await store.put("src-data/.DS_Store", b"\x00")
    await store.put("src-data/42.png", b"orphan")
    await store.put("src-data-old/7.csv", user_csv("Not", "Mine", 7))
    await store.put("elsewhere/8.csv", user_csv("Not", "Mine", 8))

    report = (await aggregator(store).run()).report

    text = (await store.get(OUTPUT)).decode()
    assert text == (
        f"{HEADER}\n"
        '0001,Bo,"Smith, Jr.",-5,\n'
        "10,Ten,Tenner,10,src-data/elsewhere/10.JPG\n"
        "1000,Susan,Lee,612302400000,src-data/1000.png\n"
    )
    assert (report.listed, report.fetched, report.added, report.users, report.images) == (8, 3, 3, 3, 2)
    assert report.ignored == 3  # README.txt, .DS_Store and the image of a user without a CSV
    assert report.rejected == () and report.output_written and report.output_version == 1


async def test_bad_files_are_rejected_with_reasons_and_the_run_goes_on(store: ObjectStore) -> None:
    await store.put("src-data/1.csv", user_csv("Good", "One", 1))
    await store.put("src-data/2.csv", b"")
    await store.put("src-data/3.csv", user_csv("Bad", "Ts", "soon"))
    await store.put("src-data/4.csv", b"first_name,last_name,birthts\nA,B,1\nC,D,2\n")
    await store.put("src-data/5.csv", b"\xff\xfe\x00garbage")

    report = (await aggregator(store).run()).report

    assert set(await rows_by_user(store)) == {"1"}
    reasons = {r.key: r.reason for r in report.rejected}
    assert reasons == {
        "src-data/2.csv": "file is empty",
        "src-data/3.csv": "birthts is not an integer: 'soon'",
        "src-data/4.csv": "2 data rows, expected exactly one",
        "src-data/5.csv": "not valid UTF-8 (byte 0)",
    }


async def test_large_csv_is_rejected_without_download(store: ObjectStore) -> None:
    recording = Recording(store)
    await store.put("src-data/big.csv", user_csv("A", "B", 1) + b" " * MAX_CSV_BYTES)
    await store.put("src-data/ok.csv", user_csv("A", "B", 1))
    report = (await aggregator(recording).run()).report  # type: ignore[arg-type]
    assert "src-data/big.csv" not in recording.gets
    assert [r.key for r in report.rejected] == ["src-data/big.csv"]
    assert "larger than" in report.rejected[0].reason


async def test_output_is_ordered_by_user_id_as_text(store: ObjectStore) -> None:
    for user in ["9", "10", "100", "0010", "b", "A"]:
        await store.put(f"src-data/{user}.csv", user_csv("F", user, 1))
    await aggregator(store).run()
    assert [r["user_id"] for r in await read_output(store)] == sorted(["9", "10", "100", "0010", "b", "A"])


async def test_output_is_a_materialized_view_of_the_source(store: ObjectStore) -> None:
    recording = Recording(store)
    agg = aggregator(recording)  # type: ignore[arg-type]
    for user in ("1", "2", "3"):
        await store.put(f"src-data/{user}.csv", user_csv("First", user, 100))
    await store.put("src-data/1.png", b"png")
    await agg.run()

    await store.put("src-data/2.csv", user_csv("Second", "Two", 200))  # overwritten
    await store.delete("src-data/3.csv")  # deleted
    await store.put("src-data/4.csv", user_csv("New", "Four", 400))  # new
    await store.delete("src-data/1.png")  # image deleted
    await store.put("src-data/2.jpeg", b"jpeg")  # image added
    recording.gets.clear()
    report = (await agg.run()).report

    assert await rows_by_user(store) == {
        "1": ("First", "1", "100", ""),
        "2": ("Second", "Two", "200", "src-data/2.jpeg"),
        "4": ("New", "Four", "400", ""),
    }
    assert sorted(recording.gets) == ["src-data/2.csv", "src-data/4.csv"]  # only what changed
    assert (report.added, report.updated, report.removed, report.unchanged) == (1, 2, 1, 0)
    assert report.output_version == 2

    recording.gets.clear()
    report = (await agg.run()).report
    assert recording.gets == [] and not report.output_written and report.fetched == 0
    assert (report.unchanged, report.output_version) == (3, 2)


async def test_a_user_whose_file_turns_invalid_keeps_the_last_valid_row(store: ObjectStore) -> None:
    agg = aggregator(store)
    await store.put("src-data/1.csv", user_csv("Valid", "One", 1))
    await agg.run()
    await store.put("src-data/1.csv", b"first_name, last_name\nbroken, file\n")
    report = (await agg.run()).report
    assert (await rows_by_user(store))["1"] == ("Valid", "One", "1", "")
    assert [r.key for r in report.rejected] == ["src-data/1.csv"]
    # A fresh process (no in-memory state) keeps the row too, and so does a rebuild from the output.
    assert (await aggregator(store).run()).report.rejected == report.rejected
    await store.delete(OUTPUT + ".manifest")
    rebuilt = (await aggregator(store).run()).report
    assert rebuilt.full_rebuild and (await rows_by_user(store))["1"] == ("Valid", "One", "1", "")
    await store.put("src-data/1.csv", user_csv("Fixed", "One", 2))
    await agg.run()
    assert (await rows_by_user(store))["1"] == ("Fixed", "One", "2", "")
    await store.delete("src-data/1.csv")
    await agg.run()
    assert await rows_by_user(store) == {}


async def test_conflicting_files_the_most_recent_wins(store: ObjectStore) -> None:
    await store.put("src-data/a/7.csv", user_csv("Old", "Seven", 1))
    await store.put("src-data/b/7.png", b"png")
    first_listing = [info async for page in store.list("src-data/") for info in page]
    # S3 has one-second resolution: make sure the second write is strictly newer.
    while (datetime.now(UTC) - max(i.last_modified for i in first_listing)).total_seconds() < 1.1:
        await _tick()
    await store.put("src-data/b/7.csv", user_csv("New", "Seven", 2))
    await store.put("src-data/a/7.jpg", b"jpg")
    report = (await aggregator(store).run()).report
    assert await rows_by_user(store) == {"7": ("New", "Seven", "2", "src-data/a/7.jpg")}
    found = {(c.kind, c.keys, c.winner) for c in report.conflicts}
    assert found == {
        ("csv", ("src-data/a/7.csv", "src-data/b/7.csv"), "src-data/b/7.csv"),
        ("image", ("src-data/b/7.png", "src-data/a/7.jpg"), "src-data/a/7.jpg"),
    }


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.05)


async def test_crash_between_output_and_manifest_converges(store: ObjectStore) -> None:
    recording = Recording(store)
    agg = aggregator(recording)  # type: ignore[arg-type]
    await store.put("src-data/1.csv", user_csv("One", "A", 1))
    await agg.run()
    before = await store.get(OUTPUT)

    await store.put("src-data/2.csv", user_csv("Two", "B", 2))
    await store.put("src-data/1.csv", user_csv("One", "Changed", 1))
    recording.fail_put = {OUTPUT}
    with pytest.raises(StorageError):
        await agg.run()
    assert await store.get(OUTPUT) == before  # the previous output stays readable and intact

    recording.fail_put = {OUTPUT + ".manifest"}
    with pytest.raises(StorageError):
        await agg.run()  # output written, manifest not: the stored manifest is now stale
    recording.fail_put = set()
    for fresh in (agg, aggregator(store)):  # the same process, or a restarted one
        report = (await fresh.run()).report
        assert await rows_by_user(store) == {"1": ("One", "Changed", "1", ""), "2": ("Two", "B", "2", "")}
        assert not report.full_rebuild and any("does not match the manifest" in w for w in report.warnings)
        await store.put(OUTPUT, b"user_id,first_name,last_name,birthts,img_path\n1,Hand,Edited,5,\n")
    report = (await aggregator(store).run()).report  # an output edited by hand is derived again
    assert not report.full_rebuild and report.output_written
    assert await rows_by_user(store) == {"1": ("One", "Changed", "1", ""), "2": ("Two", "B", "2", "")}


@pytest.mark.parametrize("content", [b"", b"not json\n", b'{"format": 99}\nkey\n', b'{"format": 1}\n'])
async def test_corrupt_manifest_means_a_full_rebuild(store: ObjectStore, content: bytes) -> None:
    await store.put("src-data/1.csv", user_csv("One", "A", 1))
    await aggregator(store).run()
    await store.put(OUTPUT + ".manifest", content)
    report = (await aggregator(store).run()).report
    assert report.full_rebuild and report.warnings
    assert await rows_by_user(store) == {"1": ("One", "A", "1", "")}
    assert not (await aggregator(store).run()).report.full_rebuild  # and then incremental again


async def test_unreadable_output_without_manifest_is_replaced(store: ObjectStore) -> None:
    await store.put(OUTPUT, b"\x00garbage")
    await store.put("src-data/1.csv", user_csv("One", "A", 1))
    report = (await aggregator(store).run()).report
    assert report.full_rebuild and any("unreadable" in w for w in report.warnings)
    assert await rows_by_user(store) == {"1": ("One", "A", "1", "")}


async def test_empty_source_writes_a_header_only_output(store: ObjectStore) -> None:
    report = (await aggregator(store).run()).report
    assert (await store.get(OUTPUT)).decode() == HEADER + "\n"
    assert report.users == 0 and report.listed == 0


async def test_a_hand_edited_output_is_served_in_user_id_order(store: ObjectStore) -> None:
    await store.put(OUTPUT, f"{HEADER}\n9,A,B,1,\n10,C,D,2,\n1,E,F,3,\n".encode())
    loaded = await aggregator(store).load_committed()
    assert loaded is not None
    assert list(loaded.table["user_id"]) == ["1", "10", "9"] and loaded.version == 0


async def test_a_future_birthts_is_accepted_once_its_time_has_come(store: ObjectStore) -> None:
    recording = Recording(store)
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    agg = Aggregator(recording, src_prefix="src-data/", output_key=OUTPUT, concurrency=2, clock=lambda: now[0])  # type: ignore[arg-type]
    soon = int(datetime(2030, 6, 1, tzinfo=UTC).timestamp() * 1000)
    await store.put("src-data/1.csv", user_csv("Early", "Bird", soon))
    await store.put("src-data/2.csv", user_csv("Bad", "Row", "x"))
    first = (await agg.run()).report
    assert [r.reason for r in first.rejected] == [f"birthts {soon} is in the future", "birthts is not an integer: 'x'"]
    now[0] = datetime(2030, 7, 1, tzinfo=UTC)
    recording.gets.clear()
    second = (await agg.run()).report
    assert recording.gets == ["src-data/1.csv"]  # the other rejected file is not downloaded again
    assert await rows_by_user(store) == {"1": ("Early", "Bird", str(soon), "")}
    assert second.added == 1


async def test_an_unreadable_stored_output_is_not_served(store: ObjectStore) -> None:
    await store.put(OUTPUT, b"not,the,header\n1,2,3\n")
    assert await aggregator(store).load_committed() is None


DAMAGES = {
    "appended line": lambda data: data + b"9,Extra,Line,not-a-number,\n",
    "wrong header": lambda data: b"user_id,first,last,birthts,img_path" + data[data.index(b"\n") :],
    "truncated": lambda data: data[: len(data) // 2],
    "deleted": lambda data: None,
    "huge birthts": lambda data: data + b"9,A,B,99999999999999999999,\n",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
async def test_a_damaged_output_is_derived_again_from_the_manifest(store: ObjectStore, damage: str) -> None:
    await store.put("src-data/1.csv", user_csv("One", "A", 1))
    await store.put("src-data/2.csv", user_csv("Two", "B", 2))
    await aggregator(store).run()
    await store.put("src-data/2.csv", b"first_name, last_name, birthts\nTwo, B, soon\n")  # rejected now
    await aggregator(store).run()
    expected = await rows_by_user(store)
    assert expected == {"1": ("One", "A", "1", ""), "2": ("Two", "B", "2", "")}
    damaged = DAMAGES[damage](await store.get(OUTPUT))
    await (store.delete(OUTPUT) if damaged is None else store.put(OUTPUT, damaged))
    loaded = await aggregator(store).load_committed()  # what `serve` shows before its first run
    assert loaded is not None and sorted(loaded.table["user_id"]) == ["1", "2"]
    assert [f.key for f in loaded.rejected.page(slice(None))] == ["src-data/2.csv"]  # listed before any run
    report = (await aggregator(store).run()).report
    assert not report.full_rebuild and report.output_written
    assert await rows_by_user(store) == expected  # the rejected file's last valid row is not lost


async def test_values_of_a_hand_edited_output_pass_the_input_rules(store: ObjectStore) -> None:
    await store.put("src-data/1.csv", user_csv("One", "A", 1))
    await store.put("src-data/2.csv", b"garbage")
    await store.put(
        OUTPUT, f"{HEADER}\n1,One,A,1,\n2,Two,B,-9000000000000000000,\n3,X,Y,99999999999999999999,\n".encode()
    )
    loaded = await aggregator(store).load_committed()
    assert loaded is None  # a value out of any range: the file is unreadable, not served
    await store.put(OUTPUT, f"{HEADER}\n1,One,A,1,\n2,Two,B,-9000000000000000000,\n".encode())
    loaded = await aggregator(store).load_committed()
    assert loaded is not None and list(loaded.table["user_id"]) == ["1"]  # the out-of-range row is not served
    report = (await aggregator(store).run()).report
    assert report.full_rebuild and any("1 rows of" in w for w in report.warnings)
    assert await rows_by_user(store) == {"1": ("One", "A", "1", "")}  # not copied to the rejected file


async def _lose(store: ObjectStore, key: str) -> None:
    await store.delete(key)


async def test_a_deleted_files_values_go_with_it_with_or_without_the_manifest(store: ObjectStore) -> None:
    """a/1.csv valid, then deleted while b/1.csv is added with garbage: user 1 goes, manifest or not."""
    for lose_manifest in (False, True):
        await store.put("src-data/a/1.csv", user_csv("One", "A", 1))
        await store.put("src-data/0.csv", user_csv("Zero", "Z", 0))
        await aggregator(store).run()
        await store.delete("src-data/a/1.csv")
        await asyncio.sleep(1.1 if lose_manifest else 0)  # a later second than the output's (S3's resolution)
        await store.put("src-data/b/1.csv", b"garbage")
        if lose_manifest:
            await _lose(store, OUTPUT + ".manifest")
        await aggregator(store).run()
        assert set(await rows_by_user(store)) == {"0"}, lose_manifest
        for key in ("src-data/b/1.csv", "src-data/0.csv", OUTPUT, OUTPUT + ".manifest"):
            await store.delete(key)


async def test_a_never_valid_file_does_not_take_an_older_files_row_after_a_rebuild(store: ObjectStore) -> None:
    """Older a/5.csv valid, newer b/5.csv never valid: after a rebuild, a/5.csv still owns the row."""
    await store.put("src-data/a/5.csv", user_csv("Five", "A", 5))
    await asyncio.sleep(0.01)
    await store.put("src-data/b/5.csv", b"garbage")
    await aggregator(store).run()
    await _lose(store, OUTPUT + ".manifest")
    report = (await aggregator(store).run()).report
    assert report.full_rebuild
    assert [c.winner for c in report.conflicts] == ["src-data/a/5.csv"]
    await store.delete("src-data/a/5.csv")
    await aggregator(store).run()
    assert await rows_by_user(store) == {}


async def test_a_file_rejected_after_being_valid_keeps_its_row_through_a_rebuild(store: ObjectStore) -> None:
    await store.put("src-data/1.csv", user_csv("One", "A", 1))
    await store.put("src-data/2.csv", user_csv("Two", "B", 2))
    await aggregator(store).run()
    await asyncio.sleep(1.1)
    await store.put("src-data/1.csv", b"garbage")  # newer than the output it is now rejected from
    await aggregator(store).run()
    await _lose(store, OUTPUT + ".manifest")
    assert (await aggregator(store).run()).report.full_rebuild
    assert await rows_by_user(store) == {"1": ("One", "A", "1", ""), "2": ("Two", "B", "2", "")}
