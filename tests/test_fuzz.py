"""Fuzzing the running service: schemathesis over the GraphQL schema, Hypothesis over the REST routes.

The service runs as it does in production (`python -m service serve`, a subprocess on a free port)
on an embedded local store seeded with a few users and a bad file. Whatever the generated request,
the answer is never a 5xx, never "Internal error.", and the server logs no unexpected error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3server import free_ports

from service.schema import build_schema

REPO = Path(__file__).resolve().parent.parent
NEVER = "0 0 1 1 *"
LEAK_MARKERS = ("Traceback", 'File "', str(REPO / "service"))
FILTER_PARAMS = ("is_image_exists", "min_age", "max_age", "name_contains")
# Each GraphQL operation gets this many positive and as many negative examples: 6 operations, ~20 s.
EXAMPLES = 30


@dataclass(frozen=True)
class Server:
    url: str
    log: Path


def seed(data_dir: Path) -> None:
    src = data_dir / "datalake" / "src-data"
    (src / "img").mkdir(parents=True)
    for i, year in enumerate((1950, 1980, 1999, 2004, 2012)):
        born = int(datetime(year, 3, 1 + i, tzinfo=UTC).timestamp() * 1000)
        (src / f"{1000 + i}.csv").write_text(f"first_name,last_name,birthts\nF{i},L{i},{born}\n")
        if i % 2 == 0:
            (src / "img" / f"{1000 + i}.png").write_bytes(b"\x89PNG")
    (src / "bad.csv").write_text("first_name\nonly\n")
    # A header cell with a line break: the rejection reason quotes the header, and reasons are logged.
    forged = "2098-01-01 00:00:00,000 ERROR service.runner: forged by a source file"
    (src / "forge.csv").write_text(f'"x\n{forged}",y\nA,B\n')


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    seed(root / "data")
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "API_TOKEN", "GRAPHQL_"))}
    env |= {"DATA_DIR": str(root / "data"), "HOST": "127.0.0.1", "PORT": str(port), "SCHEDULE": NEVER}
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(f"{url}/readyz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield Server(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# The schema from the code (schema.graphql is generated from it). `schemathesis.pytest.from_fixture`
# would load it from the running server, but schemathesis 4.32 sets `Node._nodeid`, which pytest 9.2
# no longer has: the lazy loader fails before any example runs.
schema = schemathesis.graphql.from_file(build_schema().as_str())


def assert_clean(text: str) -> None:
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{marker!r} in {text[:500]!r}"


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_graphql_operations_never_fail_on_the_server(case: Any, server: Server) -> None:
    response = case.call(base_url=f"{server.url}/graphql", timeout=10)
    text = response.text
    assert response.status_code < 500, (response.status_code, case.body, text[:300])
    assert_clean(text)
    if response.status_code != 200:
        assert 400 <= response.status_code < 500
        return
    body = json.loads(text)
    assert isinstance(body, dict) and set(body) <= {"data", "errors", "extensions"}, text[:300]
    messages = [error["message"] for error in body.get("errors") or ()]
    assert all(message != "Internal error." for message in messages), (case.body, messages)
    if not messages:
        assert isinstance(body["data"], dict)


# -- REST -------------------------------------------------------------------------------------------

digits = st.text(alphabet="0123456789", min_size=1, max_size=5)
values = st.one_of(
    digits,
    st.sampled_from(["true", "false", "True", "False", "1", "0", "", "-1", "1.5", "١", "²", "\x00"]),
    st.text(max_size=20),
)
names = st.one_of(st.sampled_from(FILTER_PARAMS), st.text(min_size=1, max_size=12))
# Repeated parameters are left out: test_hostile.py shows that they are silently read as the first.
queries = st.lists(st.tuples(names, values), max_size=4, unique_by=lambda pair: pair[0])


def expected_error(pairs: list[tuple[str, str]]) -> bool:
    """Whether the REST contract refuses these parameters (independently of the service's code)."""
    seen = dict(pairs)
    if any(name not in FILTER_PARAMS for name in seen):
        return True
    flag = seen.get("is_image_exists")
    if flag is not None and flag not in ("true", "false", "True", "False", "1", "0"):
        return True
    ages = {}
    for name in ("min_age", "max_age"):
        value = seen.get(name)
        if value is None:
            continue
        if not (value.isascii() and value.isdigit()) or int(value) > 1000:
            return True
        ages[name] = int(value)
    name = seen.get("name_contains")
    if name is not None and not 1 <= len(name) <= 100:
        return True
    return len(ages) == 2 and ages["min_age"] > ages["max_age"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=queries, path=st.sampled_from(["/data", "/stats"]))
def test_rest_filters_are_answered_or_refused_naming_the_parameter(
    server: Server, pairs: list[tuple[str, str]], path: str
) -> None:
    query = urllib.parse.urlencode(pairs)
    status, text = get(f"{server.url}{path}?{query}")
    assert_clean(text)
    body = json.loads(text)
    if expected_error(pairs):
        assert status == 400, (query, status, text[:300])
        shown = [name for name, _ in pairs if name in body["error"] or repr(name)[1:-1] in body["error"]]
        assert shown, (query, body)  # the message names the parameter (escaped when unprintable)
    else:
        assert status == 200, (query, status, text[:300])
        if path == "/stats":
            assert body["count"] == body["with_image"] + body["without_image"]
        else:
            assert [row["user_id"] for row in body] == sorted(row["user_id"] for row in body)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user_id=st.text(min_size=1, max_size=40))
def test_image_route_answers_any_id_with_an_image_or_a_404(server: Server, user_id: str) -> None:
    status, text = get(f"{server.url}/images/{urllib.parse.quote(user_id, safe='')}")
    assert status in (200, 404), (user_id, status, text[:200])
    if status == 200:
        assert user_id in {"1000", "1002", "1004"}
    assert_clean(text)


def test_the_server_logged_no_unexpected_error(server: Server) -> None:
    # Runs after the fuzzing above (same module-scoped server): nothing reached the error log.
    status, _ = get(f"{server.url}/healthz")
    assert status == 200
    log = server.log.read_text(errors="replace")
    assert "GraphiQL:" in log  # the log is the server's
    lines = log.splitlines()
    level = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (ERROR|CRITICAL) ")
    assert not [line for line in lines if line.startswith("Traceback") or level.match(line)], log[-3000:]
    assert not [line for line in lines if "Internal error" in line], log[-3000:]


def test_a_request_path_cannot_forge_log_lines(server: Server) -> None:
    # Runs after the log check above: the forged line would be an INFO line of service.runner.
    forged = "2099-01-01 00:00:00,000 INFO service.runner: run 999 (forged) succeeded"
    status, _ = get(f"{server.url}/images/forge%0A{urllib.parse.quote(forged, safe='')}")
    assert status == 404
    deadline = time.monotonic() + 5
    while "/images/forge" not in (log := server.log.read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "/images/forge" in log  # the request was logged
    assert not any(line.startswith("2099-01-01") for line in log.splitlines()), log[-500:]


def test_a_source_file_cannot_forge_log_lines(server: Server) -> None:
    log = server.log.read_text(errors="replace")
    assert "rejected src-data/forge.csv" in log  # the start-up run logged the rejection
    assert not any(line.startswith("2098-01-01") for line in log.splitlines()), log[-800:]
