"""Input rules for one user CSV."""

from __future__ import annotations

import pytest

from service.parsing import MAX_CSV_BYTES, Rejected, UserRecord, parse_user_csv

NOW = 1_780_000_000_000  # 2026-05-28


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
        (b"x" * (MAX_CSV_BYTES + 1), "larger than"),
    ],
)
def test_rejected_files_name_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(Rejected, match=reason):
        parse_user_csv(data, NOW)
