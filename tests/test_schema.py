"""The committed schema.graphql is the one the code generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.schema import build_schema

ROOT = Path(__file__).resolve().parents[1]


def test_committed_schema_matches_the_code() -> None:
    committed = (ROOT / "schema.graphql").read_text()
    assert committed == build_schema().as_str() + "\n", "run: python -m service schema > schema.graphql"


def test_schema_command_prints_it() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "service", "schema"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert printed == (ROOT / "schema.graphql").read_text()


def test_contract_names() -> None:
    sdl = build_schema().as_str()
    for line in (
        "users(filter: UserFilter = null, limit: Int = null, offset: Int! = 0): [User!]!",
        "stats(filter: UserFilter = null): Stats!",
        "user(userId: ID!): User",
        "reprocess: ProcessingRun!",
        "lastRun: ProcessingRun",
        "isImageExists: Boolean",
        "birthts: Long!",
        "rejectedCount: Int!",
        "rejectedFiles(limit: Int = null, offset: Int! = 0): RejectedFilePage!",
        "totalCount: Int!",
    ):
        assert line in sdl, line
