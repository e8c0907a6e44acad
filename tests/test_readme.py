"""The README's commands and examples work: each one is run here, or (the test command) by CI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from support import NEVER, ClientFactory, seed, wait_ready

from service.app import create_app
from service.cli import _parser
from service.config import Settings, variables
from service.local_store import LocalStore

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCKS if lang == language]


def commands() -> list[str]:
    joined = "\n".join(blocks("sh")).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(c for c in commands() if "pytest" in c)
    assert test_command in ci.splitlines()


def test_python_commands_parse_with_the_real_cli() -> None:
    found = 0
    for command in commands():
        for part in command.split("&&"):
            words = shlex.split(part)
            if "-m" in words and "service" in words:
                args = words[words.index("service") + 1 :]
                _parser().parse_args(args)  # SystemExit on an unknown command or flag
                found += 1
            elif words and words[-1].endswith("fetch_graphiql_assets.py"):
                assert (ROOT / words[-1].removeprefix(".venv/bin/python ")).exists()
    assert found >= 5


@pytest.fixture
async def client(aiohttp_client: ClientFactory, tmp_path: Path) -> TestClient[Any, Any]:
    store = LocalStore(tmp_path, "datalake")
    await seed(store)
    client = await aiohttp_client(create_app(Settings(schedule=NEVER), store=store))
    await wait_ready(client)
    return client


async def test_the_graphql_example_runs(client: TestClient[Any, Any]) -> None:
    (query,) = blocks("graphql")
    body = await (await client.post("/graphql", json={"query": query})).json()
    assert "errors" not in body and body["data"]["stats"]["count"] >= 1


async def test_the_curl_examples_run(client: TestClient[Any, Any]) -> None:
    curls = [c for c in commands() if c.startswith("curl")]
    assert len(curls) == 5
    for command in curls:
        words = shlex.split(command)
        url = next(w for w in words if w.startswith("localhost:8080"))
        path = url.removeprefix("localhost:8080")
        method = "POST" if "-X" in words or "-d" in words else "GET"
        data = words[words.index("-d") + 1] if "-d" in words else None
        headers = {"Content-Type": "application/json"} if data else {}
        response = await client.request(method, path, data=data, headers=headers)
        assert response.status == 200, (command, await response.text())
        body = await response.json()
        assert not (isinstance(body, dict) and body.get("errors")), (command, body)


def test_every_setting_is_documented() -> None:
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split(" | ")[0])}
    assert documented == set(variables())
