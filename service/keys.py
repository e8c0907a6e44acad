"""Classifying source object keys: user CSV, user image, or something to ignore."""

from __future__ import annotations

import enum
import unicodedata
from typing import NamedTuple

CSV_EXTENSIONS = frozenset({"csv"})
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg"})


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


def _has_control(text: str) -> bool:
    # Control and format characters, and the surrogates that stand for undecodable file-name bytes.
    if text.isascii():
        return not text.isprintable()
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in text)
