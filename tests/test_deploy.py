"""Deployment files: Dockerfile, .dockerignore, docker-compose.yml, .env.example and deploy/nginx.conf.

No Docker engine is needed (or called): the files are parsed and checked against the code they deploy.
Compose's variable interpolation is emulated so that the environment each container would get can be
fed to `service.config.load_settings`, which proves the values validate, and the image's HEALTHCHECK
command is run against a local HTTP server.
"""

from __future__ import annotations

import ast
import http.server
import importlib.metadata
import json
import os
import posixpath
import re
import secrets
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from service.cli import _parser as cli_parser
from service.config import Settings, load_settings, variables
from service.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
RUNTIME_LOCK = ROOT / "requirements.lock"
TEST_LOCK = ROOT / "requirements-test.lock"
CREDENTIALS = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")
EVENTS_TOKEN = "EVENTS_TOKEN"  # required too: shared by MinIO's webhook target and the service
MINIO_IMAGE = re.compile(r"(quay\.io/)?minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ")
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


def test_builder_installs_the_locked_dependencies_before_the_sources(stages: dict[str, Stage]) -> None:
    stage = stages["builder"]
    copy_lock = stage.index("COPY", rf"^{RUNTIME_LOCK.name}\s")
    install_deps = stage.index("RUN", rf"^pip install --require-hashes -r {re.escape(RUNTIME_LOCK.name)}$")
    copy_pyproject = stage.index("COPY", r"(^|\s)pyproject\.toml\s")
    copy_sources = stage.index("COPY", r"^service\s")
    install_package = stage.index("RUN", r"^pip install --no-deps \.\s")
    assert copy_lock < install_deps < copy_pyproject < copy_sources < install_package
    # setuptools reads the `readme` file while building the package metadata.
    readme = re.escape(PYPROJECT["project"]["readme"])
    assert stage.index("COPY", rf"(^|\s){readme}\s") < install_package
    assert "pip check" in stage.instructions[install_package].args
    runs = " ".join(run.args for stage in stages.values() for run in stage.all("RUN"))
    assert "[test]" not in runs and "pip install -e" not in runs, "no test extra, no editable install"


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


# --- Dependency locks ---------------------------------------------------------------------------------

_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def read_lock(path: Path) -> dict[str, Version]:
    """Canonical distribution name -> pinned version, from a compiled lock (`name==version`, then hashes)."""
    pins: dict[str, Version] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "--hash=")):
            continue
        match = _PIN.match(line)
        assert match, f"{path.name}: not an exact pin: {raw!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{path.name}: {name} is pinned twice"
        pins[name] = Version(match[2])
    return pins


def declared(*extras: str) -> list[Requirement]:
    """The runtime dependencies of pyproject.toml, plus those of the given extras."""
    project = PYPROJECT["project"]
    texts = project["dependencies"] + [text for extra in extras for text in project["optional-dependencies"][extra]]
    return [Requirement(text) for text in texts]


@pytest.mark.parametrize(("lock", "extras"), [(RUNTIME_LOCK, ()), (TEST_LOCK, ("test",))])
def test_lock_pins_every_declared_dependency_within_its_range(lock: Path, extras: tuple[str, ...]) -> None:
    pins = read_lock(lock)
    for requirement in declared(*extras):
        assert requirement.marker is None, f"{requirement}: the locks are compiled for one platform only"
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {lock.name}: compile the locks again (README, Development)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock.name} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )


def test_the_image_installs_the_tested_versions() -> None:
    runtime, tested = read_lock(RUNTIME_LOCK), read_lock(TEST_LOCK)
    differ = {
        name: (str(version), str(tested.get(name))) for name, version in runtime.items() if tested.get(name) != version
    }
    assert not differ, f"{RUNTIME_LOCK.name} and {TEST_LOCK.name} disagree (runtime, tested): {differ}"
    assert "pytest" in tested and "pytest" not in runtime, "the runtime lock must not hold the test extra"


def test_runtime_lock_has_a_hash_for_every_pin() -> None:
    """The image installs with `--require-hashes`: a pin without hashes would stop the build."""
    text = RUNTIME_LOCK.read_text(encoding="utf-8")
    hashed = re.findall(r"^(\S+)==\S+(?: \\\n\s+--hash=sha256:[0-9a-f]{64})+", text, flags=re.MULTILINE)
    assert len(hashed) == len(read_lock(RUNTIME_LOCK))


def _imported_modules(*folders: str) -> dict[str, set[str]]:
    """Top-level module of every absolute import in the folders' Python files -> the files importing it.

    The standard library and the repository's own modules (the package, test and bench helpers) are left out.
    """
    files = [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]
    local = {"service"} | {path.stem for path in files}
    imported: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    imported.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return imported


@pytest.mark.parametrize(("folders", "extras"), [(("service",), ()), (("tests", "bench", "scripts"), ("test",))])
def test_every_imported_package_is_declared(folders: tuple[str, ...], extras: tuple[str, ...]) -> None:
    """A module that is only there as someone else's dependency can vanish with any upgrade of that one."""
    names = {canonicalize_name(requirement.name) for requirement in declared(*extras)}
    providers = importlib.metadata.packages_distributions()
    imported = _imported_modules(*folders)
    assert {"aiohttp", "pandas", "strawberry"} <= set(imported) or "pytest" in imported, "the scan found nothing"
    for module, files in sorted(imported.items()):
        distributions = {canonicalize_name(name) for name in providers.get(module, [])}
        assert distributions, f"{module} (imported by {sorted(files)}) is not installed"
        assert distributions & names, (
            f"{module} (imported by {sorted(files)}) comes from {sorted(distributions)}, not declared in pyproject.toml"
        )


def _pip_installs(text: str) -> list[list[str]]:
    """The arguments of each `pip install` in shell text, one command at a time (`&&`, `;`, `|`, lines)."""
    installs = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        command: list[str] = []
        for token in [*lexer, ";"]:
            if not re.fullmatch(r"[;&|()]+", token):
                command.append(token)
                continue
            if len(command) > 1 and re.fullmatch(r"(\S*/)?pip3?", command[0]) and command[1] == "install":
                installs.append(command[2:])
            command = []
    return installs


def _from_a_lock(arguments: list[str]) -> bool:
    pairs = set(pairwise(arguments))
    return "--no-deps" in arguments or bool(pairs & {("-r", RUNTIME_LOCK.name), ("-c", TEST_LOCK.name)})


def test_every_install_resolves_from_a_lock(stages: dict[str, Stage]) -> None:
    readme = "\n".join(re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL))
    sources = {
        "README.md": readme,
        ".ci/run": (ROOT / ".ci" / "run").read_text(encoding="utf-8"),
        "Dockerfile": "\n".join(run.args for stage in stages.values() for run in stage.all("RUN")),
    }
    for source, text in sources.items():
        installs = _pip_installs(text)
        assert installs, f"no pip install found in {source}"
        for arguments in installs:
            assert _from_a_lock(arguments), (
                f"{source}: `pip install {shlex.join(arguments)}` resolves unpinned versions"
            )
    for source in ("README.md", ".ci/run"):
        assert ["-c", TEST_LOCK.name, "-e", ".[test]"] in _pip_installs(sources[source]), source


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


@pytest.fixture(scope="module")
def dot_env(example_env: dict[str, str]) -> dict[str, str]:
    """A .env made as the example says: copied, with a password and an events token like `openssl rand -hex 24`
    gives."""
    return {**example_env, "MINIO_ROOT_PASSWORD": secrets.token_hex(24), EVENTS_TOKEN: secrets.token_hex(24)}


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
        "MAX_PAGE_SIZE", "PUBLISHED_ADDRESS",
    } <= config_variables()  # fmt: skip


def test_compose_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"minio", "init", "init-events", "service", "nginx"}


def test_minio_service(compose: dict[str, Any]) -> None:
    minio = compose["services"]["minio"]
    assert MINIO_IMAGE.fullmatch(minio["image"]), "pin MinIO to a RELEASE tag"
    command = minio["command"]
    assert (shlex.split(command) if isinstance(command, str) else command) == [
        "server", "/data", "--console-address", ":9001",
    ]  # fmt: skip
    assert minio["volumes"] == ["minio-data:/data", "minio-events:/events"]
    assert {"minio-data", "minio-events"} <= set(compose["volumes"])
    test = minio["healthcheck"]["test"]
    assert test[:1] in (["CMD"], ["CMD-SHELL"]) and "mc" in " ".join(test) and "ready" in test
    assert not re.search(r"\b(curl|wget)\b", " ".join(test)), "not in the MinIO image on every arch"
    assert set(environment(minio)) == set(CREDENTIALS) | {
        f"MINIO_NOTIFY_WEBHOOK_{name}_SERVICE" for name in ("ENABLE", "ENDPOINT", "AUTH_TOKEN", "QUEUE_DIR")
    }


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
    # Compose runs `init` on every `up`: only an empty source prefix gets the demo data.
    assert args.if_empty
    assert {"--with-bad-files", "--if-empty"} <= set(command), "spell options out (argparse also accepts prefixes)"
    assert init["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert init["restart"] == "no"


def test_service_ports_dependencies_and_restart(stages: dict[str, Stage], compose: dict[str, Any]) -> None:
    service = compose["services"]["service"]
    assert [int(port) for port in service["expose"]] == [Settings().port]
    assert stages["final"].one("EXPOSE").args == str(Settings().port)
    assert "PORT" not in environment(service), "nginx relies on the default PORT"
    assert service["depends_on"] == {
        "minio": {"condition": "service_healthy"},
        "init": {"condition": "service_completed_successfully"},
    }
    assert service["restart"] == "unless-stopped"


def test_the_service_scales(compose: dict[str, Any]) -> None:
    """`docker compose up --scale service=3`: a published host port would be taken by the first replica,
    a container name can be given once, and a fixed host name would name every replica alike (a replica
    is named by host name and process id, and the process id is the same in every container)."""
    service = compose["services"]["service"]
    assert not {"ports", "container_name", "hostname"} & set(service)
    assert "deploy" not in service, "the number of replicas is --scale's to choose"


def test_nginx_publishes_the_service(compose: dict[str, Any], dot_env: dict[str, str]) -> None:
    nginx = compose["services"]["nginx"]
    assert resolve(nginx["ports"], dot_env) == ["127.0.0.1:8080:8080"]
    assert nginx["depends_on"] == {"service": {"condition": "service_started"}}
    assert nginx["restart"] == "unless-stopped"
    assert not environment(nginx) and "build" not in nginx
    # `resolve` on an upstream server: open-source nginx has it from 1.27.3
    version = re.fullmatch(r"nginx:(\d+)\.(\d+)\.(\d+)-alpine", nginx["image"])
    assert version, f"pin nginx to a release: {nginx['image']}"
    assert tuple(map(int, version.groups())) >= (1, 27, 3)


@pytest.mark.parametrize("name", ["init", "service"])
def test_environment_is_the_documented_config(compose: dict[str, Any], dot_env: dict[str, str], name: str) -> None:
    env = environment(compose["services"][name])
    unknown = set(env) - config_variables()
    assert not unknown, f"{name} gets variables service/config.py does not read: {sorted(unknown)}"
    settings = load_settings(resolve(env, dot_env))
    host, _, port = (settings.minio_endpoint or "").partition(":")
    assert host in compose["services"] and host == "minio" and port == "9000"
    assert not settings.minio_secure
    assert settings.minio_access_key == dot_env["MINIO_ROOT_USER"]
    assert settings.minio_secret_key == dot_env["MINIO_ROOT_PASSWORD"]


def test_init_writes_where_the_service_reads(compose: dict[str, Any], dot_env: dict[str, str]) -> None:
    init, service = (
        load_settings(resolve(environment(compose["services"][name]), dot_env)) for name in ("init", "service")
    )
    assert (init.minio_endpoint, init.bucket, init.src_prefix) == (
        service.minio_endpoint, service.bucket, service.src_prefix
    )  # fmt: skip
    minio_env = resolve(environment(compose["services"]["minio"]), dot_env)
    assert (init.minio_access_key, init.minio_secret_key) == (
        minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"]
    )  # fmt: skip


def test_optional_variables_pass_through(compose: dict[str, Any], dot_env: dict[str, str]) -> None:
    env = environment(compose["services"]["service"])
    unset = {key: dot_env[key] for key in (*CREDENTIALS, EVENTS_TOKEN)}
    defaults = load_settings(resolve(env, unset))
    assert defaults.api_token is None and defaults.schedule == Settings().schedule
    assert defaults.published_address == "127.0.0.1" and defaults.workers == 1
    custom = load_settings(resolve(env, {**unset, "API_TOKEN": "tok-123", "SCHEDULE": "0 * * * *", "WORKERS": "2"}))
    assert custom.api_token == "tok-123" and custom.schedule == "0 * * * *" and custom.workers == 2


@pytest.mark.parametrize("missing", CREDENTIALS)
@pytest.mark.parametrize("blank", [False, True])
def test_missing_credentials_stop_compose_with_a_hint(
    compose: dict[str, Any], dot_env: dict[str, str], missing: str, blank: bool
) -> None:
    env = {key: value for key, value in dot_env.items() if key != missing}
    if blank:
        env[missing] = ""
    for name in ("minio", "init", "init-events", "service"):
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


def test_every_port_is_published_on_loopback_by_default(compose: dict[str, Any], dot_env: dict[str, str]) -> None:
    """A bare `8080:8080` publishes on every interface of the host, whatever API_TOKEN says."""
    for name, service in compose["services"].items():
        for mapping in resolve(service.get("ports", []), dot_env):
            address = str(mapping).rsplit(":", 2)[0]
            assert str(mapping).count(":") == 2 and address == "127.0.0.1", f"{name} publishes {mapping!r}"


@pytest.mark.parametrize("address", ["0.0.0.0", "192.0.2.10", "[::]", "127.0.0.1", "[::1]"])
def test_publishing_beyond_loopback_needs_an_api_token(
    compose: dict[str, Any], dot_env: dict[str, str], address: str
) -> None:
    service = compose["services"]["service"]
    chosen = {**dot_env, "PUBLISHED_ADDRESS": address}
    (mapping,) = resolve(compose["services"]["nginx"]["ports"], chosen)
    assert mapping == f"{address}:8080:8080"
    env = resolve(environment(service), chosen)
    assert env["PUBLISHED_ADDRESS"] == address, "the service must be told where its port is published"
    if address in ("127.0.0.1", "[::1]"):
        assert load_settings(env).api_token is None
    else:
        with pytest.raises(ConfigError, match=r"API_TOKEN .*PUBLISHED_ADDRESS"):
            load_settings(env)
    assert load_settings({**env, "API_TOKEN": "tok-123"}).published_address == address


def test_env_example_has_no_usable_password(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    """`cp .env.example .env && docker compose up` stops and says how to make a password."""
    assert example_env["MINIO_ROOT_PASSWORD"] == ""
    for name in ("minio", "init", "init-events", "service"):
        with pytest.raises(MissingVariable, match=r"MINIO_ROOT_PASSWORD .*openssl rand -hex 24"):
            resolve(environment(compose["services"][name]), example_env)
    # An older .env.example shipped this password: a .env copied from it stops the init and the service.
    published = {
        **example_env, "MINIO_ROOT_PASSWORD": "change-me-to-a-long-random-password", EVENTS_TOKEN: "tok-456"
    }  # fmt: skip
    for name in ("init", "service"):
        with pytest.raises(ConfigError, match="MINIO_SECRET_KEY"):
            load_settings(resolve(environment(compose["services"][name]), published))


def test_env_example_defines_exactly_what_compose_interpolates(compose_text: str, example_env: dict[str, str]) -> None:
    used = {match["name"] or match["bare"] for match in _INTERPOLATION.finditer(compose_text) if not match["escaped"]}
    assert set(CREDENTIALS) <= used
    assert used == set(example_env), f"used {sorted(used)}, .env.example {sorted(example_env)}"
    example = ENV_EXAMPLE.read_text(encoding="utf-8")
    assert re.search(r"#.*change me.*\n(#.*\n)*MINIO_ROOT_PASSWORD=", example, re.IGNORECASE)
    assert len(example_env["MINIO_ROOT_USER"]) >= 3
    assert ".env" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


# --- deploy/nginx.conf ---------------------------------------------------------------------------------


@dataclass
class Directive:
    """One nginx directive: `name args;`, or `name args { block }`."""

    name: str
    args: list[str]
    block: list[Directive] | None = None

    def all(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> Directive:
        found = self.all(name)
        assert len(found) == 1, f"{self.name} {self.args}: expected one {name}, found {len(found)}"
        return found[0]


_NGINX_TOKEN = re.compile(
    r"#[^\n]*|'(?P<single>[^']*)'|\"(?P<double>[^\"]*)\"|(?P<punct>[{};])|(?P<word>[^\s{};'\"#]+)"
)


def parse_nginx(text: str) -> Directive:
    """nginx's configuration syntax, as a root `Directive` whose block is the file; comments are dropped and
    a quoted argument loses its quotes (`''` is an empty argument)."""
    root = Directive("", [], [])
    stack, words = [root], []
    for match in _NGINX_TOKEN.finditer(text):
        if match.lastgroup is None:
            continue  # a comment
        token = match[match.lastgroup]
        if match.lastgroup != "punct":
            words.append(token)
        elif token == "}":
            assert not words and len(stack) > 1, f"unexpected }} after {words}"
            stack.pop()
        else:
            assert words, f"{token!r} without a directive"
            directive = Directive(words[0], words[1:], [] if token == "{" else None)
            parent = stack[-1].block
            assert parent is not None
            parent.append(directive)
            if token == "{":
                stack.append(directive)
            words = []
    assert len(stack) == 1 and not words, "unbalanced braces or a directive without ';'"
    return root


@pytest.fixture(scope="module")
def nginx_conf(compose: dict[str, Any]) -> Directive:
    """The file compose hands nginx, where the image's `http` block includes it."""
    (config,) = compose["services"]["nginx"]["configs"]
    assert re.fullmatch(r"/etc/nginx/conf\.d/[\w.-]+\.conf", config["target"]), config
    path = ROOT / compose["configs"][config["source"]]["file"]
    assert path.resolve().is_relative_to(ROOT) and path.is_file(), path
    return parse_nginx(path.read_text(encoding="utf-8"))


def test_the_nginx_parser_reads_blocks_quotes_and_comments() -> None:
    parsed = parse_nginx("a 1 '' \"x y\"; # c ; {\nb { c; d e; }\n")
    assert parsed.block == [
        Directive("a", ["1", "", "x y"]),
        Directive("b", [], [Directive("c", []), Directive("d", ["e"])]),
    ]
    for broken in ("a {", "a }", "a", "{ }"):
        with pytest.raises(AssertionError):
            parse_nginx(broken)


def test_nginx_balances_over_every_replica(
    compose: dict[str, Any], dot_env: dict[str, str], nginx_conf: Directive
) -> None:
    (upstream,) = nginx_conf.all("upstream")
    (server,) = upstream.all("server")
    host, _, port = server.args[0].rpartition(":")
    assert host == "service" and host in compose["services"]
    assert int(port) == Settings().port
    # Replicas come and go with --scale: their addresses are asked of Docker's DNS again and again.
    assert "resolve" in server.args[1:] and upstream.all("zone")
    assert nginx_conf.one("resolver").args[0] == "127.0.0.11"
    assert upstream.all("keepalive")
    (site,) = nginx_conf.all("server")
    (mapping,) = resolve(compose["services"]["nginx"]["ports"], dot_env)
    assert site.one("listen").args == [str(container_port(mapping))]
    (location,) = site.all("location")
    assert location.args == ["/"]
    assert location.one("proxy_pass").args == [f"http://{upstream.args[0]}"]


def _nginx_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, f"not an nginx time: {value!r}"
    return int(match[1]) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def test_nginx_passes_websockets_and_waits_for_runs(nginx_conf: Directive) -> None:
    location = nginx_conf.one("server").one("location")
    assert location.one("proxy_http_version").args == ["1.1"]  # needed for keep-alive and upgrades
    headers = {d.args[0].lower(): d.args[1] for d in location.all("proxy_set_header")}
    assert headers["upgrade"] == "$http_upgrade"
    (table,) = [d for d in nginx_conf.all("map") if d.args == ["$http_upgrade", headers["connection"]]]
    entries = {d.name: d.args for d in table.block or []}
    # An upgrade is passed on; any other request sends no Connection header, keeping the connection alive.
    assert entries == {"default": ["upgrade"], "": [""]}
    # A reprocess answers when its run is over: a first run of 1,000,000 users took 352 s.
    assert _nginx_seconds(location.one("proxy_read_timeout").args[0]) >= 600


# --- bucket events ------------------------------------------------------------------------------------


def _webhook_target(minio_env: Mapping[str, str]) -> str:
    """The one webhook target MinIO is given, by its ID (the part after `ENABLE_`)."""
    (variable,) = [name for name in minio_env if name.startswith("MINIO_NOTIFY_WEBHOOK_ENABLE_")]
    return variable.removeprefix("MINIO_NOTIFY_WEBHOOK_ENABLE_")


def test_minio_posts_bucket_events_to_the_service(compose: dict[str, Any], dot_env: dict[str, str]) -> None:
    minio_env = resolve(environment(compose["services"]["minio"]), dot_env)
    target = _webhook_target(minio_env)
    assert minio_env[f"MINIO_NOTIFY_WEBHOOK_ENABLE_{target}"] == "on"
    endpoint = minio_env[f"MINIO_NOTIFY_WEBHOOK_ENDPOINT_{target}"]
    host, port, path = re.fullmatch(r"http://([\w-]+):(\d+)(/\S*)", endpoint).groups()  # type: ignore[union-attr]
    assert host == "service" and int(port) == Settings().port and path == "/events"
    service = load_settings(resolve(environment(compose["services"]["service"]), dot_env))
    assert minio_env[f"MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_{target}"] == service.events_token == dot_env[EVENTS_TOKEN]
    # Undelivered events wait in a queue directory that outlives the container.
    queue = minio_env[f"MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_{target}"]
    assert f"minio-events:{queue}" in compose["services"]["minio"]["volumes"]


def test_init_events_subscribes_the_source_prefix(compose: dict[str, Any], dot_env: dict[str, str]) -> None:
    step, minio = compose["services"]["init-events"], compose["services"]["minio"]
    assert step["image"] == minio["image"] and MINIO_IMAGE.fullmatch(step["image"]), "the pinned image, with mc"
    assert step["entrypoint"] == ["/bin/sh", "-c"] and step["restart"] == "no"
    assert step["depends_on"] == {"init": {"condition": "service_completed_successfully"}}, "after the bucket exists"
    (script,) = step["command"]
    alias_line, event_line = (shlex.split(part) for part in script.replace("$$", "$").split("&&"))
    assert alias_line[:4] == ["mc", "alias", "set", "lake"] and alias_line[4] == "http://minio:9000"
    assert alias_line[5:] == ["$MINIO_ROOT_USER", "$MINIO_ROOT_PASSWORD"]
    assert set(environment(step)) == set(CREDENTIALS)
    assert event_line[:3] == ["mc", "event", "add"] and "--ignore-existing" in event_line
    service = load_settings(resolve(environment(compose["services"]["service"]), dot_env))
    target = _webhook_target(resolve(environment(minio), dot_env))
    assert event_line[-2:] == [f"lake/{service.bucket}", f"arn:minio:sqs::{target}:webhook"]
    assert set(event_line[event_line.index("--event") + 1].split(",")) == {"put", "delete"}
    assert event_line[event_line.index("--prefix") + 1] == service.src_prefix


def test_events_token_is_required(compose: dict[str, Any], dot_env: dict[str, str]) -> None:
    """An unauthenticated events route would let anyone make the service stat keys: compose stops first."""
    env = {**dot_env, EVENTS_TOKEN: ""}
    for name in ("minio", "service"):
        with pytest.raises(MissingVariable, match=r"EVENTS_TOKEN .*\.env \(see \.env\.example\)"):
            resolve(environment(compose["services"][name]), env)
    assert read_env_file(ENV_EXAMPLE)[EVENTS_TOKEN] == ""
