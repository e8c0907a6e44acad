"""Classifying source object keys: user CSV, user image, or something to ignore."""

from __future__ import annotations

import enum
import unicodedata
from typing import NamedTuple

CSV_EXTENSIONS = frozenset({"csv"})
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg"})
_SOURCE_EXTENSIONS = CSV_EXTENSIONS | IMAGE_EXTENSIONS


class Kind(enum.StrEnum):
    CSV = "csv"
    IMAGE = "image"
    IGNORED = "ignored"


class Classified(NamedTuple):  # a tuple: classify runs once per listed object, a million times a run
    kind: Kind
    user_id: str


_IGNORED = Classified(Kind.IGNORED, "")


def classify(key: str) -> Classified:
    """`<prefix>**/<user_id>.csv` is a user file, `<user_id>.png|jpg|jpeg` an image, anything else ignored."""
    name = key.rpartition("/")[2]
    stem, dot, ext = name.rpartition(".")
    ext = ext.lower()
    if not dot or not stem or stem.startswith(".") or _has_control(key):
        return _IGNORED
    if ext in CSV_EXTENSIONS:
        return Classified(Kind.CSV, stem)
    if ext in IMAGE_EXTENSIONS:
        return Classified(Kind.IMAGE, stem)
    return _IGNORED


def ignored_reason(key: str) -> str | None:
    """Why `classify` ignores `key` although its extension makes it a user file or image, else None.

    For the run report: a producer that writes `.1000.csv` should learn why user 1000 is missing. Keys
    that are no source file at all (`notes.txt`) get None and stay silently ignored. The rules repeat
    `classify`'s, which stays a single inline test because it runs for every listed object.
    """
    stem, dot, ext = key.rpartition("/")[2].rpartition(".")
    if not dot or ext.lower() not in _SOURCE_EXTENSIONS:
        return None
    if not stem:
        return "no user id before the extension"
    if stem.startswith("."):
        return "hidden file (the name starts with '.')"
    if _has_control(key):
        return "the key contains control characters, invisible format characters or undecodable bytes"
    return None


def _has_control(text: str) -> bool:
    # Control and format characters, and the surrogates that stand for undecodable file-name bytes.
    if text.isascii():
        return not text.isprintable()
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in text)
