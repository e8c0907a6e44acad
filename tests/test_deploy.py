"""Deployment files: Dockerfile, .dockerignore, docker-compose.yml and .env.example.

No Docker engine is needed (or called): the files are parsed and checked against the code they deploy.
Compose's variable interpolation is emulated so that the environment each container would get can be
fed to `service.config.load_settings`, which proves the values validate, and the image's HEALTHCHECK
command is run against a local HTTP server.
"""

from __future__ import annotations

import http.server
import json
import os
import posixpath
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import _parser as cli_parser
from service.config import Settings, load_settings, variables

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CREDENTIALS = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER")


# --- Dockerfile ---------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name!r}: expected one {keyword}, found {len(found)}"
        return found[0]

    def index(self, keyword: str, pattern: str) -> int:
        """Position of the first `keyword` instruction whose arguments match `pattern`."""
        for position, instruction in enumerate(self.instructions):
            if instruction.keyword == keyword and re.search(pattern, instruction.args):
                return position
        raise AssertionError(f"stage {self.name!r} has no {keyword} matching {pattern!r}")

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for token in shlex.split(instruction.args):
                name, sep, value = token.partition("=")
                assert sep, f"use the ENV key=value form: {instruction.args!r}"
                values[name] = value
        return values


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions grouped by stage; comment lines dropped and `\\` continuations joined, as Docker does."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending.strip(), "the Dockerfile ends inside a line continuation"
    stages: list[Stage] = []
    for line in filter(str.strip, logical):
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            assert len(words) in (1, 3), f"unexpected FROM line: {line!r}"
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    named = {stage.name: stage for stage in parsed if stage.name}
    assert [stage.name for stage in parsed] == ["graphiql-assets", "builder", "runtime"]
    return {**named, "final": parsed[-1]}


def _python_code(command: str) -> list[str]:
    """The snippets passed to `python -c` / `python3 -c` in a shell command."""
    words = shlex.split(command)
    return [
        words[i + 2]
        for i in range(len(words) - 2)
        if re.fullmatch(r"(\S*/)?python3?", words[i]) and words[i + 1] == "-c"
    ]


def test_base_images_are_pinned_versions(stages: dict[str, Stage]) -> None:
    names = {name for name in stages if name != "final"}
    for stage in stages.values():
        if stage.base in names:
            continue  # FROM an earlier stage
        repository, _, tag = stage.base.partition("@")[0].rpartition(":")
        assert repository and "/" not in tag, f"{stage.base}: no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{stage.base}: tag is not a version"
    assert stages["graphiql-assets"].base.startswith("node:20")
    # The virtualenv made in the builder symlinks to the builder's interpreter: same image at runtime.
    assert stages["builder"].base == stages["final"].base
    assert re.fullmatch(r"python:(\d+\.\d+)-slim-bookworm", stages["final"].base)
    minimum = re.fullmatch(r">=\s*(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum, "requires-python is expected to be a lower bound"
    image_version = stages["final"].base.split(":")[1].split("-")[0]
    assert tuple(map(int, image_version.split("."))) >= tuple(map(int, minimum.groups()))


def test_graphiql_assets_stage_fetches_with_the_repo_script(stages: dict[str, Stage]) -> None:
    stage = stages["graphiql-assets"]
    install = stage.instructions[stage.index("RUN", r"apt-get install")].args
    assert "--no-install-recommends" in install and re.search(r"\bpython3\b", install)
    assert "rm -rf /var/lib/apt/lists/*" in install
    copy = stage.one("COPY").args.split()
    assert copy[0] == "scripts/fetch_graphiql_assets.py" and (ROOT / copy[0]).is_file()
    fetch = stage.instructions[stage.index("RUN", r"fetch_graphiql_assets\.py")].args
    assert shlex.split(fetch) == ["python3", copy[1], "--dest", "/graphiql-assets"]


def test_builder_installs_dependencies_before_the_sources(stages: dict[str, Stage]) -> None:
    stage = stages["builder"]
    copy_pyproject = stage.index("COPY", r"^pyproject\.toml\s")
    install_deps = stage.index("RUN", r"pip install -r requirements\.txt")
    copy_sources = stage.index("COPY", r"^service\s")
    install_package = stage.index("RUN", r"pip install \.(\s|$)")
    assert copy_pyproject < install_deps < copy_sources < install_package
    # setuptools reads the `readme` file while building the package metadata.
    assert stage.index("COPY", rf"^{re.escape(PYPROJECT['project']['readme'])}\s") < install_package
    runs = " ".join(run.args for stage in stages.values() for run in stage.all("RUN"))
    assert "[test]" not in runs and "pip install -e" not in runs, "no test extra, no editable install"


def test_builder_requirements_are_the_pyproject_dependencies(stages: dict[str, Stage], tmp_path: Path) -> None:
    """Run the builder's inline Python that turns pyproject.toml into requirements.txt."""
    command = stages["builder"].instructions[stages["builder"].index("RUN", r"requirements\.txt")].args
    (code,) = _python_code(command)
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)
    written = (tmp_path / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert written == PYPROJECT["project"]["dependencies"]
    for option in PYPROJECT["project"]["optional-dependencies"]["test"]:
        assert option not in written


def test_all_inline_python_compiles(stages: dict[str, Stage]) -> None:
    snippets = [
        code for stage in stages.values() for instruction in stage.all("RUN") for code in _python_code(instruction.args)
    ]
    assert snippets
    for code in snippets:
        compile(code, "<Dockerfile>", "exec")


def test_runtime_stage_is_minimal_and_unprivileged(stages: dict[str, Stage]) -> None:
    final = stages["final"]
    for run in final.all("RUN"):
        for forbidden in ("apt-get install", "gcc", "g++", "build-essential", "pip install", "make "):
            assert forbidden not in run.args, f"the runtime stage must not run {forbidden!r}"
    setup = " ".join(run.args for run in final.all("RUN"))
    useradd = re.search(r"\buseradd\s([^&;]*)", setup)
    assert useradd, "the runtime stage must create its user"
    useradd_args = useradd.group(1).split()
    assert "--uid" in useradd_args and useradd_args[useradd_args.index("--uid") + 1] == "10001"
    user = final.one("USER").args.split(":")[0]
    assert user not in ("root", "0"), "the service must not run as root"
    assert user in ("10001", useradd_args[-1])
    assert re.search(r"mkdir -p /data\b", setup) and re.search(r"chown \S*10001\S* /data\b", setup)
    copies = [copy.args.split() for copy in final.all("COPY")]
    assert ["--from=builder", "/opt/venv", "/opt/venv"] in copies
    assert all(words[0].startswith("--from=") for words in copies), "nothing from the build context"
    env = final.env()
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["DATA_DIR"] == "/data"


def test_runtime_stage_serves_the_fetched_graphiql_assets(stages: dict[str, Stage]) -> None:
    copies = [copy.args.split() for copy in stages["final"].all("COPY")]
    (assets,) = [words for words in copies if words[0] == "--from=graphiql-assets"]
    assert assets[1] == "/graphiql-assets"  # the --dest of the fetch step
    assert stages["final"].env()["GRAPHIQL_ASSETS_DIR"] == assets[2] == "/opt/graphiql-assets"


def test_runtime_command_port_and_healthcheck(stages: dict[str, Stage]) -> None:
    final = stages["final"]
    command = json.loads(final.one("CMD").args)
    assert command == ["python", "-m", "service", "serve"]
    assert cli_parser().parse_args(command[3:]).handler.__name__ == "_serve"
    assert final.one("EXPOSE").args.split() == [str(Settings().port)] == ["8080"]
    healthcheck = final.one("HEALTHCHECK").args
    assert "/healthz" in healthcheck and "127.0.0.1" in healthcheck and "8080" in healthcheck
    assert not re.search(r"\b(curl|wget)\b", healthcheck), "python:*-slim has neither curl nor wget"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_healthcheck_command_really_probes_healthz(
    stages: dict[str, Stage], health_server: tuple[int, type[_Health]]
) -> None:
    healthcheck = stages["final"].one("HEALTHCHECK").args
    command = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :])
    assert command[0] == "python"

    def probe(port: int) -> int:
        env = {**os.environ, "PORT": str(port)}
        done = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30, check=False)
        return done.returncode

    port, handler = health_server
    assert probe(port) == 0
    handler.status = 503
    assert probe(port) != 0
    with socket.socket() as free:  # a port nothing listens on: connection refused
        free.bind(("127.0.0.1", 0))
        closed = free.getsockname()[1]
    assert probe(closed) != 0


# --- .dockerignore ------------------------------------------------------------------------------------


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line, with the semantics of Docker's patternmatcher (`**`, `!`)."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1].replace("[!", "[^"), end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex)))
    return rules


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context (a rule matching a parent counts too)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in _dockerignore_rules():
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".env",
        "data/datalake/src-data/1000.csv",
        "artifacts/report.json",
        "tests/test_config.py",
        "bench/results.json",
        "service/_graphiql_assets/manifest.json",
        "service/__pycache__/cli.cpython-311.pyc",
        ".venv/bin/python",
        ".mypy_cache/3.11/cache.db",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "user_datalake_service.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_excludes(path: str) -> None:
    assert dockerignored(path)


def test_dockerignore_keeps_what_the_build_copies(stages: dict[str, Stage]) -> None:
    sources = [
        word
        for stage in stages.values()
        for copy in stage.all("COPY")
        if not copy.args.startswith("--from=")
        for word in copy.args.split()[:-1]
    ]
    assert {"pyproject.toml", "service", "scripts/fetch_graphiql_assets.py"} <= set(sources)
    for source in sources:
        assert not dockerignored(source), f"{source} is copied but excluded by .dockerignore"
        assert (ROOT / source).exists(), f"{source} is copied but missing from the repository"
    assert not dockerignored("service/cli.py") and not dockerignored("service/__main__.py")


# --- docker-compose.yml and .env.example ---------------------------------------------------------------


class MissingVariable(Exception):
    pass


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_]\w*))"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `$$`."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        is_set = name in env and (env[name] != "" or not op.startswith(":"))
        if op.endswith("-"):
            return env[name] if is_set else arg
        if op.endswith("?"):
            if not is_set:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return env[name]
        if op.endswith("+"):
            return arg if is_set else ""
        return env.get(name, "")

    return _INTERPOLATION.sub(substitute, value)


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(item, env) for key, item in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose reads .env: comments, blank lines, optional quotes."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_]\w*", name.strip()), f"bad line in {path.name}: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        else:
            value = value.split(" #")[0].strip()
        values[name.strip()] = value
    return values


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    parsed = yaml.safe_load(compose_text)
    assert isinstance(parsed, dict)
    return parsed


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    assert all(isinstance(value, str) for value in env.values()), "quote environment values"
    return dict(env)


def container_port(mapping: str) -> int:
    return int(str(mapping).split(":")[-1].split("/")[0])


def config_variables() -> set[str]:
    """The names service/config.py reads: one for each field of `Settings`."""
    return set(variables())


def test_config_variable_scan_finds_the_documented_names() -> None:
    assert {
        "MINIO_ENDPOINT", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "MINIO_SECURE", "DATA_DIR", "BUCKET",
        "SRC_PREFIX", "OUTPUT_KEY", "FETCH_CONCURRENCY", "HOST", "PORT", "SCHEDULE", "API_TOKEN",
        "MAX_PAGE_SIZE",
    } <= config_variables()  # fmt: skip


def test_compose_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"minio", "init", "service"}


def test_minio_service(compose: dict[str, Any]) -> None:
    minio = compose["services"]["minio"]
    assert re.fullmatch(r"(quay\.io/)?minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", minio["image"]), (
        "pin MinIO to a RELEASE tag"
    )
    command = minio["command"]
    assert (shlex.split(command) if isinstance(command, str) else command) == [
        "server", "/data", "--console-address", ":9001",
    ]  # fmt: skip
    assert minio["volumes"] == ["minio-data:/data"]
    assert "minio-data" in compose["volumes"]
    test = minio["healthcheck"]["test"]
    assert test[:1] in (["CMD"], ["CMD-SHELL"]) and "mc" in " ".join(test) and "ready" in test
    assert not re.search(r"\b(curl|wget)\b", " ".join(test)), "not in the MinIO image on every arch"
    assert set(environment(minio)) == set(CREDENTIALS)


def test_no_host_bind_mounts(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                assert volume.get("type") == "volume" and volume.get("source") in named, (name, volume)
            else:
                source = str(volume).split(":")[0]
                assert source in named, f"{name}: {volume!r} is not a named volume"
                assert not source.startswith((".", "/", "~", "$")), (name, volume)


def test_init_loads_demo_data_once_with_the_service_image(compose: dict[str, Any]) -> None:
    init, service = compose["services"]["init"], compose["services"]["service"]
    assert init["build"] == service["build"] == "."
    assert init["image"] == service["image"] and ":latest" not in service["image"]
    command = shlex.split(init["command"]) if isinstance(init["command"], str) else init["command"]
    assert command[:3] == ["python", "-m", "service"]
    args = cli_parser().parse_args(command[3:])
    assert args.handler.__name__ == "_demo" and args.users == 1000 and args.with_bad_files
    assert "--with-bad-files" in command, "spell options out (argparse also accepts prefixes)"
    assert init["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert init["restart"] == "no"


def test_service_ports_dependencies_and_restart(stages: dict[str, Stage], compose: dict[str, Any]) -> None:
    service = compose["services"]["service"]
    assert service["ports"] == ["8080:8080"]
    assert container_port(service["ports"][0]) == Settings().port
    assert stages["final"].one("EXPOSE").args == str(Settings().port)
    assert "PORT" not in environment(service), "the published port relies on the default PORT"
    assert service["depends_on"] == {
        "minio": {"condition": "service_healthy"},
        "init": {"condition": "service_completed_successfully"},
    }
    assert service["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", ["init", "service"])
def test_environment_is_the_documented_config(compose: dict[str, Any], example_env: dict[str, str], name: str) -> None:
    env = environment(compose["services"][name])
    unknown = set(env) - config_variables()
    assert not unknown, f"{name} gets variables service/config.py does not read: {sorted(unknown)}"
    settings = load_settings(resolve(env, example_env))
    host, _, port = (settings.minio_endpoint or "").partition(":")
    assert host in compose["services"] and host == "minio" and port == "9000"
    assert not settings.minio_secure
    assert settings.minio_access_key == example_env["MINIO_ROOT_USER"]
    assert settings.minio_secret_key == example_env["MINIO_ROOT_PASSWORD"]


def test_init_writes_where_the_service_reads(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    init, service = (
        load_settings(resolve(environment(compose["services"][name]), example_env)) for name in ("init", "service")
    )
    assert (init.minio_endpoint, init.bucket, init.src_prefix) == (
        service.minio_endpoint, service.bucket, service.src_prefix
    )  # fmt: skip
    minio_env = resolve(environment(compose["services"]["minio"]), example_env)
    assert (init.minio_access_key, init.minio_secret_key) == (
        minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"]
    )  # fmt: skip


def test_optional_variables_pass_through(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    env = environment(compose["services"]["service"])
    unset = {key: example_env[key] for key in CREDENTIALS}
    defaults = load_settings(resolve(env, unset))
    assert defaults.api_token is None and defaults.schedule == Settings().schedule
    custom = load_settings(resolve(env, {**unset, "API_TOKEN": "tok-123", "SCHEDULE": "0 * * * *"}))
    assert custom.api_token == "tok-123" and custom.schedule == "0 * * * *"


@pytest.mark.parametrize("missing", CREDENTIALS)
@pytest.mark.parametrize("blank", [False, True])
def test_missing_credentials_stop_compose_with_a_hint(
    compose: dict[str, Any], example_env: dict[str, str], missing: str, blank: bool
) -> None:
    env = {key: value for key, value in example_env.items() if key != missing}
    if blank:
        env[missing] = ""
    for name in ("minio", "init", "service"):
        with pytest.raises(MissingVariable, match=rf"{missing} .*\.env \(see \.env\.example\)"):
            resolve(environment(compose["services"][name]), env)


def test_no_secret_literals(compose: dict[str, Any], compose_text: str, example_env: dict[str, str]) -> None:
    required = re.compile(r"\$\{(?P<name>[A-Z_]+):\?[^}]+\}")
    optional = re.compile(r"\$\{(?P<name>[A-Z_]+):-\}")
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                match = required.fullmatch(value) or optional.fullmatch(value)
                assert match, f"{name}.{key} must be a bare ${{VAR:?...}} interpolation, got {value!r}"
                assert SECRET_NAME.search(match["name"]), (name, key, value)
    for key, value in example_env.items():
        if SECRET_NAME.search(key) and value:
            assert value not in compose_text, f"the example value of {key} is written in compose"


def test_env_example_defines_exactly_what_compose_interpolates(compose_text: str, example_env: dict[str, str]) -> None:
    used = {match["name"] or match["bare"] for match in _INTERPOLATION.finditer(compose_text) if not match["escaped"]}
    assert set(CREDENTIALS) <= used
    assert used == set(example_env), f"used {sorted(used)}, .env.example {sorted(example_env)}"
    example = ENV_EXAMPLE.read_text(encoding="utf-8")
    assert re.search(r"#.*change me.*\n(#.*\n)*MINIO_ROOT_PASSWORD=", example, re.IGNORECASE)
    assert len(example_env["MINIO_ROOT_USER"]) >= 3 and len(example_env["MINIO_ROOT_PASSWORD"]) >= 8
    assert ".env" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
