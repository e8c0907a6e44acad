"""Classifying source keys."""

from __future__ import annotations

import pytest

from service.keys import Kind, classify


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
