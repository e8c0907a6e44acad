"""Parsing and validating one user CSV: pure, no I/O."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

MAX_CSV_BYTES = 1024 * 1024
REQUIRED_COLUMNS = ("first_name", "last_name", "birthts")
# Earliest accepted birth date, 1800-01-01T00:00:00Z: older values are typos, not people.
MIN_BIRTHTS = -5_364_662_400_000
EARLIEST_BIRTH_YEAR = 1800
FUTURE_SUFFIX = " is in the future"
_INTEGER = re.compile(r"^[+-]?[0-9]{1,19}$")
# One field per match, so that a match starts only where a field starts, never inside quotes: a quoted
# field (group 1) with the blanks after its closing quote, or an unquoted field with its delimiter. Where a
# quoted field is malformed the matches lose step, but the strict parse still fails on that same field.
_FIELD = re.compile(r'( *"[^"]*(?:""[^"]*)*")[^\S\r\n]*(?=[,\r\n]|\Z)|[^,\r\n]*[,\r\n]?')

# The csv module refuses fields over 128 KiB by default, a process-wide limit. A field cannot be longer
# than the file, which is at most MAX_CSV_BYTES, so the limit is raised to that once, here, and never
# lowered: any other reader of CSV in the process can only accept more.
csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_BYTES))


@dataclass(frozen=True, slots=True)
class UserRecord:
    first_name: str
    last_name: str
    birthts: int


class Rejected(ValueError):
    """The file breaks an input rule; the message is the human-readable reason."""


def parse_user_csv(data: bytes, now_ms: int) -> UserRecord:
    """Parse one `<user_id>.csv`: a header naming the required columns and exactly one data row."""
    if len(data) > MAX_CSV_BYTES:
        raise Rejected(f"file is larger than {MAX_CSV_BYTES} bytes")
    rows = _rows(_decode(data))
    if not rows:
        raise Rejected("file is empty")
    header, body = rows[0], rows[1:]
    positions = _column_positions(header)
    if not body:
        raise Rejected("no data row after the header")
    if len(body) > 1:
        raise Rejected(f"{len(body)} data rows, expected exactly one")
    row = body[0]
    if len(row) < (width := _width(header)):
        raise Rejected(f"the data row has {len(row)} fields, the header has {width}")
    first, last, birth = (row[positions[name]] for name in REQUIRED_COLUMNS)
    for name, value in (("first_name", first), ("last_name", last)):
        if not value:
            raise Rejected(f"{name} is empty")
    return UserRecord(first_name=first, last_name=last, birthts=_birthts(birth, now_ms))


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Rejected(f"not valid UTF-8 (byte {exc.start})") from None


def _rows(text: str) -> list[list[str]]:
    if "\x00" in text:
        raise Rejected("contains NUL bytes (binary file?)")
    if '"' in text:
        text = _trim_after_quotes(text)
    try:
        parsed = list(csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True))
    except csv.Error as exc:
        raise Rejected(f"malformed CSV: {exc}") from None
    rows = [[cell.strip() for cell in row] for row in parsed]
    return [row for row in rows if any(row)]


def _trim_after_quotes(text: str) -> str:
    """`"Smith, Jr." ,` as `"Smith, Jr.",`: values are trimmed, but strict mode refuses blanks after a quote.

    Strict mode stays on because, unlike `strict=False`, it still refuses `"A"x` and an unclosed quote.
    """
    return _FIELD.sub(lambda field: field[0] if field[1] is None else field[1], text)


def _width(header: list[str]) -> int:
    """How many fields the data row needs: empty names at the end (a trailing comma, `a,b,c,`) need none."""
    width = len(header)
    while width and not header[width - 1]:
        width -= 1
    return width


def _column_positions(header: list[str]) -> dict[str, int]:
    names = [name.lower() for name in header]
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        shown = ", ".join(header)[:200]
        raise Rejected(f"header lacks {', '.join(missing)} (found: {shown})")
    duplicated = sorted({name for name in REQUIRED_COLUMNS if names.count(name) > 1})
    if duplicated:
        raise Rejected(f"header repeats {', '.join(duplicated)}")
    return {name: names.index(name) for name in REQUIRED_COLUMNS}


def _birthts(value: str, now_ms: int) -> int:
    if not _INTEGER.match(value):
        raise Rejected(f"birthts is not an integer: {value[:50]!r}")
    birthts = int(value)
    if birthts > now_ms:
        raise Rejected(f"birthts {birthts}{FUTURE_SUFFIX}")
    if birthts < MIN_BIRTHTS:
        raise Rejected(f"birthts {birthts} is before 1800-01-01")
    return birthts


def valid_values(
    first_names: npt.ArrayLike, last_names: npt.ArrayLike, birthts: npt.ArrayLike, now_ms: int
) -> npt.NDArray[np.bool_]:
    """Which (first_name, last_name, birthts) values a valid file could hold, vectorised.

    Values read back from a state file (the output, the manifest) pass this before they are used.
    """
    births = np.asarray(birthts, dtype=np.int64)
    valid: npt.NDArray[np.bool_] = (
        (np.asarray(first_names, dtype=object) != "")
        & (np.asarray(last_names, dtype=object) != "")
        & (births >= MIN_BIRTHTS)
        & (births <= now_ms)
    )
    return valid
