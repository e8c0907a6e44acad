"""The manifest's merge and its serialization, on plain frames."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from service import blocks as bl
from service import manifest as mf
from service.output import OUTPUT_COLUMNS, Changes, Writer, compare, conflicts, derive, to_csv_bytes


def listing(*rows: tuple[str, str, str]) -> pd.DataFrame:
    """(key, etag, kind) rows; user_id is the key's base name."""
    return pd.DataFrame(
        {
            "key": [k for k, _, _ in rows],
            "etag": mf.etag_digests([e for _, e, _ in rows]),
            "size": 10,
            "mtime": [i * 1_000_000_000 for i in range(len(rows))],  # a second apart
            "kind": [kind for _, _, kind in rows],
            "user_id": [k.rpartition("/")[2].rpartition(".")[0] for k, _, _ in rows],
        }
    ).astype({c: mf.DTYPES[c] for c in mf.LISTING_COLUMNS})


def results(*rows: tuple[str, str, tuple[str, str, int] | None]) -> pd.DataFrame:
    """(key, reason, values) rows: values None means rejected with `reason`."""
    frame = pd.DataFrame(
        {
            "key": [k for k, _, _ in rows],
            "status": [mf.REJECTED if v is None else mf.OK for _, _, v in rows],
            "reason": [r for _, r, _ in rows],
            "has_row": [v is not None for _, _, v in rows],
            "first_name": [v[0] if v else "" for _, _, v in rows],
            "last_name": [v[1] if v else "" for _, _, v in rows],
            "birthts": [v[2] if v else 0 for _, _, v in rows],
        }
    )
    return frame.astype({c: mf.DTYPES[c] for c in ["key", *mf.RESULT_COLUMNS]})


NO_SEED = None
NOW = 1_800_000_000_000  # ms: every test value is before it


def test_first_merge_fetched_csvs_and_new_images() -> None:
    merged = mf.merge(
        listing(("s/1.csv", "a", "csv"), ("s/1.png", "b", "image"), ("s/2.csv", "c", "csv")),
        mf.empty(),
        results(("s/1.csv", "", ("Ann", "Lee", 5)), ("s/2.csv", "empty file", None)),
        NO_SEED,
    )
    assert list(merged.columns) == mf.COLUMNS
    assert dict(merged.dtypes.astype(str)) == {c: str(pd.Series(dtype=mf.DTYPES[c]).dtype) for c in mf.COLUMNS}
    rows = merged.set_index("key")
    assert rows.loc["s/1.png", ["status", "has_row", "birthts"]].tolist() == ["", False, 0]
    assert rows.loc["s/2.csv", ["status", "reason", "has_row"]].tolist() == ["rejected", "empty file", False]
    assert derive(merged).to_dict("records") == [
        {"user_id": "1", "first_name": "Ann", "last_name": "Lee", "birthts": 5, "img_path": "s/1.png"}
    ]


def test_a_rejected_csv_keeps_its_last_valid_values_and_unchanged_rows_carry_over() -> None:
    first = mf.merge(
        listing(("s/1.csv", "a", "csv"), ("s/2.csv", "b", "csv"), ("s/3.png", "c", "image")),
        mf.empty(),
        results(("s/1.csv", "", ("Ann", "Lee", 5)), ("s/2.csv", "", ("Bo", "Li", -7))),
        NO_SEED,
    )
    second = mf.merge(
        listing(
            ("s/1.csv", "a2", "csv"), ("s/2.csv", "b", "csv"), ("s/3.png", "c", "image"), ("s/4.png", "d", "image")
        ),
        first,
        results(("s/1.csv", "birthts is not an integer: 'x'", None)),
        NO_SEED,
    )
    rows = second.set_index("key")
    assert rows.loc["s/1.csv", ["status", "has_row", "first_name", "birthts"]].tolist() == ["rejected", True, "Ann", 5]
    assert rows.loc["s/1.csv", "etag"] == mf.etag_digests(["a2"])[0] != mf.etag_digests(["a"])[0]
    assert rows.loc["s/2.csv", ["status", "first_name", "birthts"]].tolist() == ["ok", "Bo", -7]
    assert second["birthts"].dtype == "int64"


def seed(written: int, **rows: tuple[str, str, int]) -> mf.Seed:
    """A stored output's rows (user_id=(first, last, birthts)), written `written` seconds after the first file."""
    frame = pd.DataFrame(
        {
            "first_name": [v[0] for v in rows.values()],
            "last_name": [v[1] for v in rows.values()],
            "birthts": pd.array([v[2] for v in rows.values()], dtype="int64"),
        },
        index=pd.Index(list(rows), name="user_id"),
    )
    return mf.Seed(rows=frame, written=written * 1_000_000_000)


def test_the_seed_gives_a_users_row_to_the_newest_rejected_csv_older_than_the_output() -> None:
    merged = mf.merge(
        listing(("a/1.csv", "a", "csv"), ("b/1.csv", "b", "csv"), ("s/2.csv", "c", "csv")),
        mf.empty(),
        results(("a/1.csv", "bad", None), ("b/1.csv", "bad", None), ("s/2.csv", "bad", None)),
        seed(5, **{"1": ("Old", "Row", 9)}),
    )
    rows = merged.set_index("key")
    assert rows.loc["b/1.csv", ["has_row", "first_name", "birthts"]].tolist() == [True, "Old", 9]
    assert not rows.loc["a/1.csv", "has_row"]  # one file at most gets a row
    assert not rows.loc["s/2.csv", "has_row"]  # no row of its user in the output


def test_the_seed_is_not_given_to_a_file_modified_after_the_output() -> None:
    # a/1.csv was valid, then deleted; b/1.csv was added later with garbage: it never had content.
    merged = mf.merge(
        listing(("s/0.csv", "z", "csv"), ("b/1.csv", "b", "csv")),
        mf.empty(),
        results(("s/0.csv", "", ("Z", "Z", 0)), ("b/1.csv", "bad", None)),
        seed(0, **{"1": ("Old", "Row", 9)}),
    )
    assert derive(merged)["user_id"].tolist() == ["0"]


def test_the_seed_row_belongs_to_a_valid_file_that_holds_its_values() -> None:
    # Older a/5.csv is valid and gave the output its row; newer b/5.csv was never valid.
    merged = mf.merge(
        listing(("a/5.csv", "a", "csv"), ("b/5.csv", "b", "csv")),
        mf.empty(),
        results(("a/5.csv", "", ("Al", "Ba", 3)), ("b/5.csv", "bad", None)),
        seed(9, **{"5": ("Al", "Ba", 3)}),
    )
    rows = merged.set_index("key")
    assert not rows.loc["b/5.csv", "has_row"]
    assert [c.winner for c in conflicts(merged)] == ["a/5.csv"]
    # The valid file differs from the row: the row was the newer rejected file's last valid content.
    merged = mf.merge(
        listing(("a/5.csv", "a", "csv"), ("b/5.csv", "b", "csv")),
        mf.empty(),
        results(("a/5.csv", "", ("New", "Ba", 3)), ("b/5.csv", "bad", None)),
        seed(9, **{"5": ("Al", "Ba", 3)}),
    )
    assert merged.set_index("key").loc["b/5.csv", ["has_row", "first_name"]].tolist() == [True, "Al"]


@pytest.mark.parametrize("name", ["NA", "null", "NaN", "None", "a,b", 'q"uote', "new\nline", "  spaced  ", "ünï"])
def test_serialization_round_trips_awkward_strings(name: str) -> None:
    merged = mf.merge(
        listing((f"s/{name}.csv", "e", "csv")), mf.empty(), results((f"s/{name}.csv", "", (name, name, 1))), NO_SEED
    )
    frame, header = mf.from_bytes(mf.to_bytes(merged, mf.ManifestHeader(3, "etag-x")), NOW)
    assert header == mf.ManifestHeader(3, "etag-x")
    pd.testing.assert_frame_equal(frame, merged)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


VALID = mf.to_bytes(mf.empty(), mf.ManifestHeader(1, "x"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{}\n",
        b"\xff\xfe\n",
        b'{"format": 1, "version": 1, "output_etag": "x"}\n' + ",".join(mf.COLUMNS).encode() + b"\n",  # format 1
        gz(b""),
        gz(b"{}\n"),
        gz(b"[1]\n"),
        gz(b'{"format": 2, "version": 1, "output_etag": "x"}\nkey\n1\n'),
        gz(b'{"format": 2, "version": "one", "output_etag": "x"}\n' + ",".join(mf.COLUMNS).encode() + b"\n"),
        VALID[:-9],  # truncated: the gzip trailer is missing
        VALID[:12] + b"\x00" * 8 + VALID[20:],  # damaged deflate stream
    ],
)
def test_unusable_manifests_are_refused(data: bytes) -> None:
    with pytest.raises(mf.ManifestError):
        mf.from_bytes(data, NOW)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        (("A", "B", 10**19 - 1), "values no valid file could hold"),  # after NOW
        (("A", "B", -9_000_000_000_000_000_000), "values no valid file could hold"),
        (("", "B", 1), "values no valid file could hold"),
    ],
)
def test_manifest_rows_pass_the_checks_a_source_file_passes(values: tuple[str, str, int], problem: str) -> None:
    merged = mf.merge(listing(("s/1.csv", "e", "csv")), mf.empty(), results(("s/1.csv", "", values)))
    with pytest.raises(mf.ManifestError, match=problem):
        mf.from_bytes(mf.to_bytes(merged, mf.ManifestHeader(1, "x")), NOW)


def test_a_manifest_value_out_of_any_integer_range_makes_it_unusable() -> None:
    merged = mf.merge(listing(("s/1.csv", "e", "csv")), mf.empty(), results(("s/1.csv", "", ("A", "B", 1))))
    text = gzip.decompress(mf.to_bytes(merged, mf.ManifestHeader(1, "x")))
    with pytest.raises(mf.ManifestError, match="OverflowError"):
        mf.from_bytes(gz(text.replace(b",A,B,1", b",A,B,99999999999999999999")), NOW)


def test_serialization_in_slices_round_trips_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bl, "SLICE_ROWS", 3)
    rows = [(f"s/{i}.csv", f"e{i}", "csv") for i in range(7)]
    merged = mf.merge(
        listing(*rows), mf.empty(), results(*((k, "", ("A", k, i)) for i, (k, _, _) in enumerate(rows))), NO_SEED
    )
    data = mf.to_bytes(merged, mf.ManifestHeader(2, "etag-y"))
    assert gzip.decompress(data).count(b"key,etag") == 1
    frame, _ = mf.from_bytes(data, NOW)
    pd.testing.assert_frame_equal(frame, merged)
    assert mf.to_bytes(merged, mf.ManifestHeader(2, "etag-y")) == data  # deterministic: no timestamp inside


def manifest_of(keys: list[str], name: str = "A") -> pd.DataFrame:
    rows = [(key, f"e-{key}-{name}", "csv") for key in keys]
    return mf.merge(listing(*rows), mf.empty(), results(*((k, "", (name, "B", 1)) for k, _, _ in rows)), NO_SEED)


def test_a_commit_encodes_only_the_blocks_of_the_rows_it_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks without a changed row are copied from the previous encoding; the result reads back as the
    manifest, equal to encoding it afresh."""
    monkeypatch.setattr(bl, "BLOCK_ROWS", 8)
    encoded: list[bytes] = []
    member = mf._member
    monkeypatch.setattr(mf, "_member", lambda data: encoded.append(data) or member(data))
    encoder = mf.Encoder(keep=True)
    before = manifest_of([f"s/{i:04d}.csv" for i in range(400)])
    first = encoder.encode(before, mf.ManifestHeader(1, "x"))
    blocks = len(encoded) - 1  # the first member is the header
    assert blocks > 10 and gzip.decompress(first).count(b"key,etag") == 1

    changed = {"s/0007.csv", "s/0100.csv", "s/0399.csv", "s/0200a.csv"}  # one added, one removed
    kept = before[~before["key"].isin(changed)]
    fresh = manifest_of(["s/0007.csv", "s/0100.csv", "s/0200a.csv"], name="Z")
    after = pd.concat([kept, fresh]).sort_values("key", ignore_index=True)
    encoded.clear()
    data = encoder.encode(after, mf.ManifestHeader(2, "y"), previous=before, changed=changed)
    assert 1 < len(encoded) <= 1 + 2 * len(changed)  # the header and the blocks of the changed rows
    frame, header = mf.from_bytes(data, NOW)
    assert header == mf.ManifestHeader(2, "y")
    pd.testing.assert_frame_equal(frame, after)
    afresh = mf.to_bytes(after, mf.ManifestHeader(2, "y"))
    assert gzip.decompress(data).partition(b"\n")[2] == gzip.decompress(afresh).partition(b"\n")[2]  # the CSV

    encoded.clear()  # not the manifest it encoded last: every block is encoded
    encoder.encode(after, mf.ManifestHeader(3, "z"), previous=before, changed=changed)
    assert len(encoded) == 1 + len(bl.block_ends(after["key"].to_numpy(dtype=object)))


def test_a_reader_parses_only_the_blocks_it_has_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits read one after the other: the rows of known blocks are reused, the result equals a
    whole read, and every user whose rows changed is named."""
    monkeypatch.setattr(bl, "BLOCK_ROWS", 4)
    parsed: list[int] = []
    read_csv = pd.read_csv
    monkeypatch.setattr(pd, "read_csv", lambda *a, **k: (frame := read_csv(*a, **k), parsed.append(len(frame)))[0])
    encoder, decoder = mf.Encoder(keep=True), mf.Decoder()
    keys = [f"s/{i:04d}.csv" for i in range(200)]
    manifest = manifest_of(keys)
    data = encoder.encode(manifest, mf.ManifestHeader(1, "x"))
    first = decoder.decode(data, NOW)
    assert first.previous is None  # the first read is whole
    last = first.frame
    rng = np.random.default_rng(7)
    for version in range(2, 8):
        gone = set(rng.choice(manifest["key"].to_numpy(), 3, replace=False).tolist())
        edited = set(rng.choice(manifest["key"].to_numpy(), 3, replace=False).tolist()) - gone
        added = {f"s/{version}-{i}.csv" for i in range(3)}
        kept = manifest[~manifest["key"].isin(gone | edited)]
        after = pd.concat([kept, manifest_of(sorted(edited | added), name=f"V{version}")])
        after = after.sort_values("key", ignore_index=True)
        data = encoder.encode(after, mf.ManifestHeader(version, "x"), previous=manifest, changed=gone | edited | added)
        parsed.clear()
        decoded = decoder.decode(data, NOW)
        assert decoded.previous is last
        assert 0 < sum(parsed) <= 9 * 3 * 4  # at most the blocks of the nine changed rows were parsed
        pd.testing.assert_frame_equal(decoded.frame, after)
        pd.testing.assert_frame_equal(decoded.frame, mf.from_bytes(data, NOW)[0])
        assert decoded.header == mf.ManifestHeader(version, "x")
        changed_users = {k.rpartition("/")[2].rpartition(".")[0] for k in gone | edited | added}
        assert decoded.changed_users is not None and changed_users <= set(decoded.changed_users.tolist())
        manifest, last = after, decoded.frame


def test_a_manifest_without_a_block_list_is_read_whole() -> None:
    manifest = manifest_of([f"s/{i}.csv" for i in range(5)])
    text = gzip.decompress(mf.to_bytes(manifest, mf.ManifestHeader(4, "e")))
    older = gz(b'{"format": 2, "version": 4, "output_etag": "e"}\n' + text.partition(b"\n")[2])
    decoder = mf.Decoder()
    for _ in range(2):
        decoded = decoder.decode(older, NOW)
        assert decoded.previous is None and decoded.header == mf.ManifestHeader(4, "e")
        pd.testing.assert_frame_equal(decoded.frame, manifest)


AWKWARD = ["NA", "null", "", "a,b", 'q"uote', "new\nline", "cr\rlf", "  spaced  ", "ünï", "1e5", "True"]


@pytest.mark.parametrize("block_rows", [1, 3, 64])
def test_the_output_is_written_as_pandas_writes_csv(monkeypatch: pytest.MonkeyPatch, block_rows: int) -> None:
    monkeypatch.setattr(bl, "BLOCK_ROWS", block_rows)
    monkeypatch.setattr(bl, "SLICE_ROWS", block_rows)
    table = pd.DataFrame(
        {
            "user_id": [f"u{i:03d}" for i in range(len(AWKWARD) ** 2)],
            "first_name": [a for a in AWKWARD for _ in AWKWARD],
            "last_name": [b for _ in AWKWARD for b in AWKWARD],
            "birthts": [(-1) ** i * 10**i for i in range(len(AWKWARD) ** 2)],
            "img_path": [f"s/{a}.png" for a in AWKWARD for _ in AWKWARD],
        }
    )
    expected = table.to_csv(index=False, lineterminator="\n").encode()
    writer = Writer(keep=True)
    assert to_csv_bytes(table) == writer.write(table) == expected
    changed = table.copy()
    changed.loc[5, "first_name"] = 'Changed, "quoted"'
    rows = changed.drop(index=[7, 8]).reset_index(drop=True)
    assert writer.write(rows, table, {"u005", "u007", "u008"}) == rows.to_csv(index=False, lineterminator="\n").encode()


def test_etag_digests_are_stable_64_bit_values() -> None:
    digests = mf.etag_digests(["abc", '"d41d8cd98f00b204e9800998ecf8427e"', "abc", "\udcff"])
    assert digests.dtype == "int64" and len(digests) == 4
    assert digests[0] == digests[2] != digests[1] != digests[3]
    # Pinned: a stored manifest written by another release must compare equal.
    assert digests[0] == int.from_bytes(bytes.fromhex("d8bb14d833d59559"), "little", signed=True)
    assert len(mf.etag_digests([])) == 0


def test_diff_finds_new_changed_and_refetched_objects_and_shares_strings() -> None:
    previous = mf.merge(
        listing(("s/1.csv", "a", "csv"), ("s/2.csv", "b", "csv"), ("s/3.csv", "c", "csv"), ("s/1.png", "p", "image")),
        mf.empty(),
        results(("s/1.csv", "", ("A", "B", 1)), ("s/2.csv", "", ("A", "B", 2)), ("s/3.csv", "future", None)),
        NO_SEED,
    )
    diff = mf.Diff(previous, refetch=(previous["key"] == "s/3.csv").to_numpy())
    page = listing(*((f"s/{n}.csv", etag, "csv") for n, etag in [(1, "a"), (2, "b2"), (3, "c"), (4, "d")]))
    fresh_key = page["key"].iloc[0]
    shared, changed = diff.compare(page)
    assert changed.tolist() == [False, True, True, True]
    reused = shared["key"].iloc[0]
    assert reused == fresh_key and reused is previous["key"].iloc[0] and reused is not fresh_key
    assert shared["user_id"].iloc[0] is previous["user_id"].iloc[0]
    assert page["key"].iloc[0] is fresh_key  # the page itself is left as it was
    pd.testing.assert_frame_equal(shared, page)
    assert mf.Diff(mf.empty(), np.zeros(0, dtype=bool)).compare(page)[1].all()


def test_compare_counts_added_updated_removed_and_unchanged_users() -> None:
    def table(*rows: tuple[str, str, int, str]) -> pd.DataFrame:
        frame = pd.DataFrame(rows, columns=["user_id", "first_name", "birthts", "img_path"])
        return frame.assign(last_name="L")[OUTPUT_COLUMNS].astype({"birthts": "int64"})

    old = table(("1", "A", 1, ""), ("2", "B", 2, "s/2.png"), ("3", "C", 3, ""), ("4", "D", 4, ""))
    new = table(("1", "A", 1, ""), ("2", "B", 2, ""), ("3", "C", 30, ""), ("5", "E", 5, ""), ("6", "F", 6, ""))
    assert compare(old, new) == Changes(added=2, updated=2, removed=1, unchanged=1)
    assert compare(old.iloc[:0], new) == Changes(added=5, updated=0, removed=0, unchanged=0)
    assert compare(old, old.iloc[:0]) == Changes(added=0, updated=0, removed=4, unchanged=0)
    assert compare(new, new.copy()) == compare(new, new) == Changes(added=0, updated=0, removed=0, unchanged=5)
