"""Classifying source keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.keys import Kind, classify, ignored_reason


@pytest.mark.parametrize(
    ("key", "kind", "user_id"),
    [
        ("src-data/1000.csv", Kind.CSV, "1000"),
        ("src-data/0001.CSV", Kind.CSV, "0001"),
        ("src-data/2024/05/1000.csv", Kind.CSV, "1000"),
        ("src-data/1000.png", Kind.IMAGE, "1000"),
        ("src-data/a/1000.JPEG", Kind.IMAGE, "1000"),
        ("src-data/1000.jpg", Kind.IMAGE, "1000"),
        ("src-data/user one.csv", Kind.CSV, "user one"),
        ("src-data/ünï.csv", Kind.CSV, "ünï"),
        ("src-data/1000.backup.csv", Kind.CSV, "1000.backup"),
        ("src-data/README.txt", Kind.IGNORED, ""),
        ("src-data/.DS_Store", Kind.IGNORED, ""),
        ("src-data/.csv", Kind.IGNORED, ""),
        ("src-data/1000", Kind.IGNORED, ""),
        ("src-data/1000.gif", Kind.IGNORED, ""),
        ("src-data/bad\x07name.csv", Kind.IGNORED, ""),
    ],
)
def test_classify(key: str, kind: Kind, user_id: str) -> None:
    found = classify(key)
    assert (found.kind, found.user_id) == (kind, user_id)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("src-data/.1000.csv", "hidden file"),
        ("src-data/a/.1000.PNG", "hidden file"),
        ("src-data/..csv", "hidden file"),
        ("src-data/.csv", "no user id"),
        ("src-data/x/.jpeg", "no user id"),
        ("src-data/bad\x07name.csv", "control characters"),
        ("src-data/line\nbreak.png", "control characters"),
        ("src-data/zero\u200bwidth.csv", "invisible format characters"),
        ("src-data/dir\x1b[2J/1000.csv", "control characters"),
        ("src-data/undecodable\udcff.csv", "undecodable bytes"),
    ],
)
def test_ignored_source_files_say_why(key: str, reason: str) -> None:
    assert classify(key).kind is Kind.IGNORED
    found = ignored_reason(key)
    assert found is not None and reason in found
    assert found.isprintable()  # the key itself, which may hold control characters, is not repeated


@pytest.mark.parametrize(
    "key",
    [
        "src-data/1000.csv",
        "src-data/1000.JPG",
        "src-data/notes.txt",
        "src-data/.DS_Store",
        "src-data/.hidden",
        "src-data/1000",
        "src-data/1000.csv.bak",
        "src-data/bad\x07name.txt",
        "src-data/.1000.gif",
    ],
)
def test_accepted_keys_and_other_files_have_no_reason(key: str) -> None:
    assert ignored_reason(key) is None


NAME_PARTS = st.text(st.sampled_from(["a", "0", ".", " ", "\x07", "\u200b", "é", "\udcff"]), max_size=4)
EXTENSIONS = st.sampled_from(["csv", "CSV", "png", "Jpg", "jpeg", "txt", "gif", ""])


@given(st.sampled_from(["", "src-data/", "src-data/.git/", "src-data/\x7f/"]), NAME_PARTS, EXTENSIONS)
def test_a_reason_exactly_when_a_source_file_is_ignored(directory: str, stem: str, extension: str) -> None:
    key = f"{directory}{stem}.{extension}"
    looks_like_source = extension.lower() in ("csv", "png", "jpg", "jpeg")
    ignored = classify(key).kind is Kind.IGNORED
    assert (ignored_reason(key) is not None) == (looks_like_source and ignored)
