"""Input rules for one user CSV."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.parsing import MAX_CSV_BYTES, MIN_BIRTHTS, Rejected, UserRecord, _trim_after_quotes, parse_user_csv

NOW = 1_780_000_000_000  # 2026-05-28
LONG = "x" * (200 * 1024)  # over the csv module's default field limit (128 KiB), well under MAX_CSV_BYTES


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b"first_name, last_name, birthts\nSusan, Lee, 612302400000\n",
            UserRecord("Susan", "Lee", 612302400000),
        ),
        (b"first_name,last_name,birthts\r\nA,B,1\r\n", UserRecord("A", "B", 1)),
        (b"\xef\xbb\xbffirst_name,last_name,birthts\nA,B,1", UserRecord("A", "B", 1)),
        (b'first_name, last_name, birthts\nBo, "Smith, Jr.", -5\n', UserRecord("Bo", "Smith, Jr.", -5)),
        (b"birthts,extra,LAST_NAME,first_name\n7,x,Doe,Jane\n", UserRecord("Jane", "Doe", 7)),
        (b"\n\nfirst_name,last_name,birthts\n\n  A  ,  B  ,  +3  \n\n", UserRecord("A", "B", 3)),
        ('first_name,last_name,birthts\nZoë,"Mül\nler",0\n'.encode(), UserRecord("Zoë", "Mül\nler", 0)),
        (f"first_name,last_name,birthts\nA,B,{NOW}\n".encode(), UserRecord("A", "B", NOW)),
        (f"first_name,last_name,birthts\nA,{LONG},1\n".encode(), UserRecord("A", LONG, 1)),
        (f'first_name,last_name,birthts\nA,"{LONG}",1\n'.encode(), UserRecord("A", LONG, 1)),
        # Blanks after a closing quote are trimmed like any other blanks around a value.
        (b'first_name, last_name, birthts\n"Smith, Jr." , B , 1\n', UserRecord("Smith, Jr.", "B", 1)),
        (b'"first_name" \t,"last_name"  ,"birthts"\r\n"A"\t,"B" ,"1"  \r\n', UserRecord("A", "B", 1)),
        (b'first_name,last_name,birthts\nA,"x, "" ,y" ,1\n', UserRecord("A", 'x, " ,y', 1)),
        (b'first_name,last_name,birthts\nA,"Mu\nller" ,1\n', UserRecord("A", "Mu\nller", 1)),
        # A trailing comma names no column: the row need not fill it (but may).
        (b"first_name, last_name, birthts,\na, b, 1\n", UserRecord("a", "b", 1)),
        (b"first_name,last_name,birthts,,\na,b,1,\n", UserRecord("a", "b", 1)),
        (b"first_name,,last_name,birthts\na,,b,1\n", UserRecord("a", "b", 1)),
    ],
)
def test_valid_files(data: bytes, expected: UserRecord) -> None:
    assert parse_user_csv(data, NOW) == expected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "file is empty"),
        (b"\n \n", "file is empty"),
        (b"first_name, last_name, birthts\n", "no data row"),
        (b"first_name,last_name,birthts\nA,B,1\nC,D,2\n", "2 data rows"),
        (b"first_name,last_name\nA,B\n", "header lacks birthts"),
        (b"name,birthts\nA,1\n", "header lacks first_name, last_name"),
        (b"first_name,last_name,birthts,birthts\nA,B,1,2\n", "header repeats birthts"),
        (b"first_name,last_name,birthts\nA,B\n", "the data row has 2 fields"),
        (b"first_name,last_name,birthts\nA,B,1.5\n", "not an integer"),
        (b"first_name,last_name,birthts\nA,B,1_000\n", "not an integer"),
        (b"first_name,last_name,birthts\nA,B,\n", "not an integer"),
        (b"first_name,last_name,birthts\nA,B,99999999999999999999999\n", "not an integer"),
        (f"first_name,last_name,birthts\nA,B,{NOW + 1}\n".encode(), "in the future"),
        (b"first_name,last_name,birthts\nA,B,-9999999999999\n", "before 1800"),
        (b"first_name,last_name,birthts\n,B,1\n", "first_name is empty"),
        (b"first_name,last_name,birthts\nA,,1\n", "last_name is empty"),
        (b"first_name,last_name,birthts\n\xff,B,1\n", "not valid UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not valid UTF-8"),
        (b"first_name,last_name,birthts\nA\x00,B,1\n", "NUL"),
        (b'first_name,last_name,birthts\n"A,B,1\n', "malformed CSV"),
        (b'first_name,last_name,birthts\n"A"x,B,1\n', "malformed CSV"),
        (b'first_name,last_name,birthts\n"A" x,B,1\n', "malformed CSV"),
        (b'first_name,last_name,birthts\nA,"B" "C",1\n', "malformed CSV"),
        (b'first_name,last_name,birthts\nA,"x, "" ,y"z,1\n', "malformed CSV"),
        (b"first_name,last_name,birthts,\nA,B\n", "the data row has 2 fields, the header has 3"),
        (b"first_name,last_name,birthts,extra\nA,B,1\n", "the data row has 3 fields, the header has 4"),
        (b"x" * (MAX_CSV_BYTES + 1), "larger than"),
    ],
)
def test_rejected_files_name_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(Rejected, match=reason):
        parse_user_csv(data, NOW)


def test_the_field_limit_covers_the_largest_file() -> None:
    assert csv.field_size_limit() >= MAX_CSV_BYTES
    value = "y" * (MAX_CSV_BYTES - 100)
    data = f"first_name,last_name,birthts\nA,{value},1\n".encode()
    assert len(data) <= MAX_CSV_BYTES
    assert parse_user_csv(data, NOW).last_name == value


NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1).filter(
    lambda name: name.strip() != ""
)
BLANKS = st.text(st.sampled_from(" \t"), max_size=3)


def quoted(value: str, after: str) -> str:
    return '"' + value.replace('"', '""') + '"' + after


THREE_BLANKS = st.tuples(BLANKS, BLANKS, BLANKS)


@given(st.builds(UserRecord, NAMES, NAMES, st.integers(MIN_BIRTHTS, NOW)), THREE_BLANKS, THREE_BLANKS, st.booleans())
def test_quoted_values_with_blanks_after_them(
    record: UserRecord, header_blanks: tuple[str, ...], blanks: tuple[str, ...], trailing_comma: bool
) -> None:
    names = zip(("first_name", "last_name", "birthts"), header_blanks, strict=True)
    header = ",".join(quoted(name, blank) for name, blank in names)
    values = zip((record.first_name, record.last_name, str(record.birthts)), blanks, strict=True)
    row = ", ".join(quoted(value, blank) for value, blank in values)
    data = f"{header}{',' if trailing_comma else ''}\r\n{row}\r\n".encode()
    expected = UserRecord(record.first_name.strip(), record.last_name.strip(), record.birthts)
    assert parse_user_csv(data, NOW) == expected


def strict(text: str) -> list[list[str]] | None:
    try:
        return list(csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True))
    except csv.Error:
        return None


def lenient(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=False))


def stripped(rows: list[list[str]]) -> list[list[str]]:
    return [[cell.strip() for cell in row] for row in rows]


CSV_TEXT = st.text(st.sampled_from('"", \t\r\na'), max_size=40)


@given(CSV_TEXT)
def test_trimming_changes_nothing_that_strict_mode_accepts(text: str) -> None:
    if strict(text) is not None:
        assert _trim_after_quotes(text) == text


@given(CSV_TEXT)
def test_trimming_only_removes_blanks_after_closing_quotes(text: str) -> None:
    # Whatever the trimmed text means to strict mode, the untrimmed text means the same to the lenient
    # reader once values are trimmed (strict mode still refuses the rest: it is reported malformed).
    rows = strict(_trim_after_quotes(text))
    if rows is not None:
        assert stripped(rows) == stripped(lenient(text))
