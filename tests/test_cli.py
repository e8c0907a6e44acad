"""The command line, run as a user runs it: a subprocess with environment variables."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.aggregator import UNREADABLE_PREFIX
from service.cli import _parser, format_report
from service.config import MASK, variables
from service.report import REJECTED_SAMPLE, Outcome, RejectedFile, RunReport

ROOT = Path(__file__).resolve().parents[1]
NEVER = "0 0 1 1 *"


def cli(
    *args: str, env: dict[str, str], wrap: Callable[[list[str]], list[str]] = list
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wrap([sys.executable, "-m", "service", *args]),
        check=False,
        capture_output=True,
        text=True,
        env=own_environment(env),
        cwd=ROOT,
        timeout=120,
    )


def own_environment(env: dict[str, str]) -> dict[str, str]:
    """The test's environment without the settings it may have set, plus `env`."""
    return {k: v for k, v in os.environ.items() if k not in variables()} | env


def test_demo_data_then_process(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path)}
    written = cli("demo-data", "--users", "300", "--image-ratio", "0.5", "--seed", "7", "--with-bad-files", env=env)
    assert written.returncode == 0, written.stderr
    assert "wrote 300 users" in written.stdout
    assert len(list((tmp_path / "datalake" / "src-data").glob("*.csv"))) == 300 + 7

    first = cli("process", env=env)
    assert first.returncode == 0, first.stderr
    assert "users 300" in first.stdout and "added 300" in first.stdout
    assert "src-data/bad-two-rows.csv: 2 data rows, expected exactly one" in first.stdout
    assert "\r" not in first.stderr  # no progress bar in a pipe

    second = cli("process", "--json", env=env)
    report = json.loads(second.stdout)
    # Only the file rejected for a future birthts is read again (its time may come); nothing is written.
    assert (report["fetched"], report["unchanged"], report["output_written"]) == (1, 300, False)
    assert len(report["rejected"]) == report["rejected_count"] == 7
    output = (tmp_path / "datalake" / "processed_data" / "output.csv").read_text()
    assert output.splitlines()[0] == "user_id,first_name,last_name,birthts,img_path"
    assert len(output.splitlines()) == 301


def test_demo_data_if_empty_writes_only_into_an_empty_source_prefix(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path)}
    output = tmp_path / "datalake" / "processed_data" / "output.csv"
    output.parent.mkdir(parents=True)
    output.write_text("user_id,first_name,last_name,birthts,img_path\n")  # outside the prefix: not counted
    first = cli("demo-data", "--users", "20", "--if-empty", env=env)
    assert first.returncode == 0, first.stderr
    assert "wrote 20 users" in first.stdout

    source = tmp_path / "datalake" / "src-data"
    (source / "1000.csv").unlink()
    (source / "1001.csv").write_text("first_name,last_name,birthts\nEdited,Name,0\n")
    before = {path: path.read_bytes() for path in source.rglob("*") if path.is_file()}
    again = cli("demo-data", "--users", "20", "--if-empty", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "datalake/src-data/ already holds objects: no demo data written (--if-empty)\n"
    assert {path: path.read_bytes() for path in source.rglob("*") if path.is_file()} == before

    without = cli("demo-data", "--users", "20", env=env)  # without the option, the demo data is written again
    assert "wrote 20 users" in without.stdout and (source / "1000.csv").exists()


def test_same_seed_same_data(tmp_path: Path) -> None:
    for name in ("a", "b"):
        cli("demo-data", "--users", "50", "--seed", "3", env={"DATA_DIR": str(tmp_path / name)})

    def data(root: Path) -> list[tuple[str, bytes]]:  # the objects, not the store's own `.tmp` files
        files = sorted(p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.relative_to(root).parts)
        return [(str(p.relative_to(root)), p.read_bytes()) for p in files]

    assert data(tmp_path / "a") == data(tmp_path / "b") != []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FETCH_CONCURRENCY": "lots"}, "FETCH_CONCURRENCY"),
        ({"MINIO_ENDPOINT": "localhost:9000"}, "MINIO_ACCESS_KEY"),
        ({"MINIO_ENDPOINT": "http://x"}, "MINIO_ENDPOINT"),
        ({"SRC_PREFIX": "./src-data/"}, "SRC_PREFIX"),
    ],
)
def test_bad_configuration_stops_with_the_variable_name(tmp_path: Path, env: dict[str, str], message: str) -> None:
    result = cli("process", env={"DATA_DIR": str(tmp_path), **env})
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unreachable_store_is_a_one_line_failure() -> None:
    def process(secret: str) -> subprocess.CompletedProcess[str]:
        env = {
            "MINIO_ENDPOINT": "127.0.0.1:9",  # discard port: nothing listens
            "MINIO_ACCESS_KEY": "key",
            "MINIO_SECRET_KEY": secret,
        }
        return cli("process", env=env)

    secret = "super-secret-value-" * 4
    result = process(secret)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert secret not in result.stderr + result.stdout
    # No message holds the secret, so none is edited to hide it: a one-letter secret garbles nothing.
    assert process("s").stderr == result.stderr
    # The words are true: TLS is off (aiohttp's own text says "ssl:default"), and the message part (it
    # goes into run reports) names no endpoint; the part in brackets, for the log, does.
    assert result.stderr == (
        "error: cannot create bucket 'datalake' after 4 attempts: ClientConnectorError: connection refused "
        "[bucket 'datalake' at 127.0.0.1:9: cannot connect to 127.0.0.1:9 (connection refused)]\n"
    )


def test_an_unknown_store_host_is_named_as_such() -> None:
    env = {"MINIO_ENDPOINT": "no-such-host.invalid:9000", "MINIO_ACCESS_KEY": "k", "MINIO_SECRET_KEY": "s"}
    result = cli("process", env=env | {"MINIO_RETRIES": "0", "MINIO_TIMEOUT": "10"})
    assert result.returncode == 1
    message, _, where = result.stderr.partition(" [")
    # getaddrinfo's own words (they vary with the resolver), not "unknown error -2" for its EAI_ number
    assert message.startswith("error: cannot create bucket 'datalake': ClientConnectorDNSError: ")
    assert "unknown error" not in result.stderr and "ssl:default" not in result.stderr
    assert where.startswith("bucket 'datalake' at no-such-host.invalid:9000: cannot connect to no-such-host.invalid")


def test_the_text_report_names_a_sample_of_many_rejected_files() -> None:
    now = datetime.now(UTC)
    sample = tuple(RejectedFile(f"src-data/{i:05d}.csv", "empty file") for i in range(REJECTED_SAMPLE))
    report = RunReport(1, "cli", now, now, Outcome.SUCCEEDED, rejected_count=3_000, rejected=sample)
    lines = format_report(report).splitlines()
    assert "rejected files: 3000" in lines
    unnamed = 3_000 - REJECTED_SAMPLE
    assert lines[-1] == f"  ... and {unnamed} more (the report names the first {REJECTED_SAMPLE} by key)"
    assert len(lines) < REJECTED_SAMPLE + 10


def user_file(tmp_path: Path, user_id: int, first_name: str) -> Path:
    path = tmp_path / "datalake" / "src-data" / f"{user_id}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"first_name,last_name,birthts\n{first_name},Last,{user_id}\n")
    return path


def test_a_file_the_service_may_not_read_is_rejected_and_the_run_goes_on(
    tmp_path: Path, obeying_file_modes: Callable[[list[str]], list[str]]
) -> None:
    env = {"DATA_DIR": str(tmp_path)}
    for user_id in (1, 2, 3):
        user_file(tmp_path, user_id, "Before")
    first = cli("process", "--json", env=env, wrap=obeying_file_modes)
    assert first.returncode == 0, first.stderr
    closed = user_file(tmp_path, 2, "After")
    closed.chmod(0)  # changed, and no longer readable
    user_file(tmp_path, 4, "New")

    second = cli("process", "--json", env=env, wrap=obeying_file_modes)

    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["rejected"] == [
        {"key": "src-data/2.csv", "reason": f"{UNREADABLE_PREFIX}cannot read 'src-data/2.csv': permission denied"}
    ]
    assert (report["outcome"], report["added"], report["users"]) == ("succeeded", 1, 4)
    output = (tmp_path / "datalake" / "processed_data" / "output.csv").read_text().splitlines()
    assert output[1:] == ["1,Before,Last,1,", "2,Before,Last,2,", "3,Before,Last,3,", "4,New,Last,4,"]
    assert str(tmp_path) not in second.stdout

    closed.chmod(0o644)  # fixed: the file's ETag does not change, but it is read again
    third = json.loads(cli("process", "--json", env=env, wrap=obeying_file_modes).stdout)
    assert (third["rejected"], third["updated"]) == ([], 1)
    output = (tmp_path / "datalake" / "processed_data" / "output.csv").read_text().splitlines()
    assert output[2] == "2,After,Last,2,"


def test_config_prints_the_settings_in_effect_with_secrets_masked(tmp_path: Path) -> None:
    secret = "s3cr3t-value"
    env = {"MINIO_ENDPOINT": "minio:9000", "MINIO_ACCESS_KEY": "k", "MINIO_SECRET_KEY": secret, "PORT": "9090"}
    result = cli("config", env=env | {"DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.partition("=")[0] for line in lines] == variables()
    assert {"MINIO_ENDPOINT=minio:9000", f"MINIO_SECRET_KEY={MASK}", "PORT=9090", "API_TOKEN="} <= set(lines)
    assert secret not in result.stdout

    wrong = cli("config", env={"PORT": "http"})
    assert (wrong.returncode, wrong.stdout) == (2, "")
    assert wrong.stderr == "configuration error: PORT must be an integer, got 'http'\n"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_help_lists_the_settings_and_points_to_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(subcommands()) == {"process", "demo-data", "serve", "schema", "config"}
    for command in [[], *([name] for name in subcommands())]:
        with pytest.raises(SystemExit):
            _parser().parse_args([*command, "--help"])
        shown = capsys.readouterr().out
        assert "python -m service config" in shown, command
        listed = [line.split("=")[0].strip() for line in shown.split("in effect:\n", 1)[1].splitlines()]
        assert listed == variables(), command
    assert subcommands()["serve"].format_help().count("PORT=8080") == 1


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line_naming_the_settings(tmp_path: Path, busy_port: int, workers: str) -> None:
    env = {"DATA_DIR": str(tmp_path), "HOST": "127.0.0.1", "PORT": str(busy_port), "SCHEDULE": NEVER}
    result = cli("serve", env=env | {"WORKERS": workers})
    assert result.returncode == 1
    assert result.stdout == ""  # no banner: nothing listens
    assert "Traceback" not in result.stderr
    assert "gunicorn" not in result.stderr  # no worker started, no retries logged
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{busy_port} (HOST, PORT): address already in use"
    )


def test_workers_are_named_by_process_not_by_replica_id(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path), "PORT": "0", "WORKERS": "2", "REPLICA_ID": "node-a"}
    result = cli("serve", env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("configuration error: REPLICA_ID names one process, but WORKERS=2 starts")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda signum: signum.name)
def test_serve_prints_where_it_listens_and_stops_on_a_signal(tmp_path: Path, signum: signal.Signals) -> None:
    env = own_environment({"DATA_DIR": str(tmp_path), "HOST": "127.0.0.1", "PORT": "0", "SCHEDULE": NEVER})
    command = [sys.executable, "-m", "service", "serve"]
    with subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            banner = proc.stdout.readline()  # printed once the port is bound: PORT=0 shows the one chosen
            url = banner.split()[1]
            assert url.startswith("http://127.0.0.1:") and not url.startswith("http://127.0.0.1:0/"), banner
            with urllib.request.urlopen(url.replace("/graphql", "/healthz"), timeout=30) as response:
                assert json.load(response) == {"status": "ok"}
            proc.send_signal(signum)
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert stdout == ""
    assert not [word for word in ("Traceback", "Unclosed", "destroyed") if word in stderr], stderr


def replicas_ready(url: str, count: int, within: float = 60.0) -> set[str]:
    """Ask `/readyz` on new connections until `count` replicas have said ready (each request goes to
    whichever worker accepts it first)."""
    ready: set[str] = set()
    deadline = time.monotonic() + within
    for _ in range(2_000):
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
                ready.add(json.load(response)["replica"])
        except urllib.error.HTTPError as exc:  # 503: not ready yet
            exc.close()
        if len(ready) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(ready) >= count, f"replicas ready after {within}s: {ready}"
    return ready


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda signum: signum.name)
def test_workers_answer_on_one_port_as_replicas_and_stop_together(tmp_path: Path, signum: signal.Signals) -> None:
    user_file(tmp_path, 1, "Ada")
    settings = {"DATA_DIR": str(tmp_path), "HOST": "127.0.0.1", "PORT": "0", "SCHEDULE": NEVER, "WORKERS": "2"}
    env = own_environment(settings | {"LOG_FORMAT": "json"})
    command = [sys.executable, "-m", "service", "serve"]
    with subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            banner = proc.stdout.readline()  # once the port is bound, before the workers start
            assert banner.endswith("   (2 worker processes)\n"), banner
            url = banner.split()[1].removesuffix("/graphql")
            replicas = replicas_ready(url, 2)
            workers = {int(replica.rpartition(":")[2]) for replica in replicas}
            assert {parent_of(pid) for pid in workers} == {proc.pid}  # two processes of this `serve`
            port = url.rpartition(":")[2]
            again = cli("serve", env=settings | {"PORT": port})  # the workers' sockets join no other group
            assert (again.returncode, again.stderr.splitlines()[-1]) == (
                1, f"error: cannot listen on 127.0.0.1:{port} (HOST, PORT): address already in use"
            )  # fmt: skip
            # SIGTERM goes to the master (as from `docker stop`); Ctrl-C in a terminal reaches every
            # process of the foreground group.
            for pid in [proc.pid, *(sorted(workers) if signum == signal.SIGINT else [])]:
                os.kill(pid, signum)
            stopping = time.monotonic()
            stdout, stderr = proc.communicate(timeout=45)
            stopped_in = time.monotonic() - stopping
        finally:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert stdout == "" and stopped_in < 30
    records = [json.loads(line) for line in stderr.splitlines()]  # gunicorn's lines too: LOG_FORMAT applies
    assert not [r for r in records if r["level"] in ("error", "critical") or "exception" in r], stderr
    messages = {r["message"] for r in records}
    assert {f"Worker exiting (pid: {pid})" for pid in workers} | {"Shutting down: Master"} <= messages
    assert not [word for word in ("Traceback", "Unclosed", "destroyed") if word in stderr], stderr
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived the master"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        pytest.param(args, 1, id=" ".join(args))
        for args in (["schema"], ["config"], ["demo-data", "--users", "3"], ["process", "--json"])
    ]
    + [pytest.param(["serve", "--help"], 0, id="serve --help")],  # argparse ignores a failed write of help
)
def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, args: list[str], code: int) -> None:
    """`python -m service schema | head -1`, with `head` gone before the first write: no traceback."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "service", *args], stdout=writer, stderr=subprocess.PIPE, text=True,
            env=own_environment({"DATA_DIR": str(tmp_path)}), cwd=ROOT, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr) == (code, "")
