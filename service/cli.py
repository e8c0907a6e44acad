"""Command line: process, demo-data, serve, schema, config."""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TextIO

from aiohttp import web

from . import logs
from .aggregator import Aggregator, Progress
from .config import Settings, describe, load_settings
from .demo import has_objects, write_demo_data
from .errors import ConfigError, ServiceError, StorageError
from .report import RunReport
from .stores import open_store


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # here, where a closed pipe can still be handled, not at interpreter exit
    except BrokenPipeError:
        # The reader went away (`... | head`): as the Python docs advise for SIGPIPE, point stdout at
        # devnull so the final flush cannot fail again, and exit without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        logs.configure(settings.log_format)
        return int(args.handler(settings, args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"error: {exc.for_log()}", file=sys.stderr)
        return 1
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    epilog, layout = _settings_epilog(), argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m service", description=__doc__, epilog=epilog, formatter_class=layout
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary, epilog=epilog, formatter_class=layout)

    process = command("process", "run one aggregation and print its report")
    process.add_argument("--json", action="store_true", help="print the report as JSON")
    process.set_defaults(handler=_process)
    demo = command("demo-data", "write a synthetic source dataset into the store")
    demo.add_argument("--users", type=int, required=True)
    demo.add_argument("--image-ratio", type=float, default=0.7)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--with-bad-files", action="store_true")
    demo.add_argument(
        "--if-empty", action="store_true", help="write nothing when the source prefix already holds objects"
    )
    demo.set_defaults(handler=_demo)
    command("serve", "serve GraphQL and REST, aggregating on the schedule").set_defaults(handler=_serve)
    command("schema", "print the GraphQL schema (SDL)").set_defaults(handler=_schema)
    command("config", "print the settings in effect, one NAME=value a line").set_defaults(handler=_config)
    return parser


def _settings_epilog() -> str:
    """Every command reads the same environment: say which variables, and where their values show."""
    defaults = "\n".join(f"  {line}" for line in describe(Settings()))
    return (
        "settings come from these environment variables, shown with their defaults (empty: unset);\n"
        f"README.md explains them, and `python -m service config` prints the values in effect:\n{defaults}"
    )


def _process(settings: Settings, args: argparse.Namespace) -> int:
    report = asyncio.run(_run_once(settings, _ProgressLine(sys.stderr)))
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0


async def _run_once(settings: Settings, progress: _ProgressLine) -> RunReport:
    store = open_store(settings)
    try:
        await store.ensure_bucket()
        result = await Aggregator.from_settings(store, settings).run(progress)
        return replace(result.report, run_id=1, trigger="cli")
    finally:
        progress.close()
        await store.close()


class _ProgressLine:
    """A one-line progress display on a terminal; silent in pipes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._last = -1.0

    def __call__(self, progress: Progress) -> None:
        if not self._enabled:
            return
        now = asyncio.get_running_loop().time()
        if now - self._last < 0.1:
            return
        self._last = now
        self._stream.write(f"\rlisted {progress.listed:,}  fetched {progress.fetched:,}/{progress.to_fetch:,}")
        self._stream.flush()

    def close(self) -> None:
        if self._enabled and self._last >= 0:
            self._stream.write("\n")


def format_report(report: RunReport) -> str:
    written = "written" if report.output_written else "unchanged"
    rebuild = ", full rebuild" if report.full_rebuild else ""
    lines = [
        f"run {report.outcome.value} in {report.duration_seconds:.2f}s "
        f"(output version {report.output_version}, {written}{rebuild})",
        f"listed {report.listed}, fetched {report.fetched}, ignored {report.ignored}",
        f"users {report.users} (with image {report.images}): added {report.added}, updated {report.updated}, "
        f"removed {report.removed}, unchanged {report.unchanged}",
    ]
    lines += [f"warning: {warning}" for warning in report.warnings]
    lines.append(f"rejected files: {report.rejected_count}")
    lines += [f"  {rejected.key}: {rejected.reason}" for rejected in report.rejected]
    unnamed = report.rejected_count - len(report.rejected)
    if unnamed:
        lines.append(f"  ... and {unnamed} more (the report names the first {len(report.rejected)} by key)")
    if report.conflicts:
        lines.append(f"conflicts: {len(report.conflicts)}")
        lines += [
            f"  user {c.user_id} ({c.kind}): {', '.join(c.keys)} -> {c.winner or 'none valid'}"
            for c in report.conflicts
        ]
    return "\n".join(lines)


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    if args.users < 0 or not 0 <= args.image_ratio <= 1:
        raise ConfigError("--users must be >= 0 and --image-ratio between 0 and 1")
    asyncio.run(_write_demo(settings, args))
    return 0


async def _write_demo(settings: Settings, args: argparse.Namespace) -> None:
    """With --if-empty, a loader that runs on every start (compose's `init`) never overwrites edits."""
    store = open_store(settings)
    where = f"{settings.bucket}/{settings.src_prefix}"
    try:
        if args.if_empty:
            await store.ensure_bucket()
            if await has_objects(store, settings.src_prefix):
                print(f"{where} already holds objects: no demo data written (--if-empty)")
                return
        summary = await write_demo_data(
            store, settings.src_prefix, users=args.users, image_ratio=args.image_ratio, seed=args.seed,
            with_bad_files=args.with_bad_files, concurrency=settings.fetch_concurrency,
        )  # fmt: skip
    finally:
        await store.close()
    print(f"wrote {summary.users} users ({summary.images} images, {summary.bad_files} bad files) under {where}")


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    if settings.workers > 1:
        return _serve_workers(settings)
    asyncio.run(_serve_until_stopped(settings))
    return 0


async def _serve_until_stopped(settings: Settings) -> None:
    """Listen, then print where, then serve until SIGINT or SIGTERM, then shut down gracefully."""
    stopped = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
    runner = _app_runner(settings)
    await runner.setup()
    try:
        port = await _listen(runner, settings.host, settings.port)
        print(_banner(settings, port), flush=True)
        await stopped.wait()
    finally:
        await runner.cleanup()


def _serve_workers(settings: Settings) -> int:
    """WORKERS processes on one port, run by gunicorn (see `service.workers`). The port is reserved here:
    a port in use is the same one line as with one process, at once (gunicorn would retry it for 5 s),
    and the URL is printed once the first worker listens."""
    if settings.replica_id is not None:
        raise ConfigError(
            f"REPLICA_ID names one process, but WORKERS={settings.workers} starts several: leave REPLICA_ID "
            "unset, and each worker is named by its host and process id"
        )
    from .workers import Workers, reserve  # gunicorn: only this path needs it

    importlib.import_module(".app", __package__)  # before the fork: the workers share it, none imports it
    try:
        held = reserve(settings.host, settings.port)
    except OSError as exc:
        raise _cannot_listen(settings.host, settings.port, exc) from None
    banner = _banner(settings, int(held.getsockname()[1]))
    make_runner = functools.partial(_app_runner, settings)
    Workers(held, settings.workers, make_runner, on_listening=lambda: print(banner, flush=True)).run()
    return 0  # not reached: gunicorn's master ends the process when it stops


def _app_runner(settings: Settings) -> web.AppRunner:
    """The application as it is served, by `serve` itself or by each worker."""
    from .app import create_app  # the schema: only this command needs it

    # keepalive_timeout: web.run_app's, which served before
    return web.AppRunner(create_app(settings), access_log_class=logs.AccessLogger, keepalive_timeout=75.0)


def _banner(settings: Settings, port: int) -> str:
    shown = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    where = f"GraphiQL: http://{_address(shown, port)}/graphql   REST: /data /stats"
    return where if settings.workers == 1 else f"{where}   ({settings.workers} worker processes)"


async def _listen(runner: web.AppRunner, host: str, port: int) -> int:
    """Bind HOST:PORT and return the port (the one chosen when PORT is 0); failing, one line that says
    which settings to change."""
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        raise _cannot_listen(host, port, exc) from None
    return int(runner.addresses[0][1])


def _cannot_listen(host: str, port: int, exc: OSError) -> ServiceError:
    reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or type(exc).__name__
    return ServiceError(f"cannot listen on {_address(host, port)} (HOST, PORT): {reason.lower()}")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _schema(settings: Settings, args: argparse.Namespace) -> int:
    from .schema import build_schema

    print(build_schema().as_str())
    return 0


def _config(settings: Settings, args: argparse.Namespace) -> int:
    print("\n".join(describe(settings)))
    return 0
