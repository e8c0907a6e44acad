"""Serving on every core: WORKERS processes that answer on one port, each of them a replica.

A Python process answers requests on one core. To use more, `serve` runs gunicorn with aiohttp's
worker class, as aiohttp's deployment docs recommend, rather than a process manager of its own:
gunicorn's master starts the workers, replaces one that dies or stops answering its heartbeat, and
stops them all on SIGINT or SIGTERM (each worker shuts its application down as `serve` does with one
process).

Each worker listens on the one port with a socket of its own (SO_REUSEPORT), and the kernel spreads
new connections evenly over them. On one shared socket, the worker that wakes first would accept a
whole burst of connections (asyncio accepts all that wait) and keep them while the others idle.

Each worker builds its application after the fork, so each one is a replica with a name of its own
(host and process id), its own connections to the store, lease, follower and schedule; the bucket
keeps them consistent (README, "Scaling out").
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

WORKER_CLASS = "aiohttp.GunicornWebWorker"
_MEMORY_DIR = "/dev/shm"  # noqa: S108 - a directory gunicorn creates its own files in


class ServiceLog(Logger):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn's own messages (workers booting and exiting, signals) go through the service's log
    handler, so that LOG_FORMAT applies to them too: its loggers keep no handler of their own."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            log.handlers.clear()
            log.propagate = True


def reserve(host: str, port: int) -> socket.socket:
    """HOST:PORT (its first address) held for the workers' sockets: bound with SO_REUSEPORT, as theirs
    are, and not listening, so that no connection waits on it. It is bound without SO_REUSEPORT first,
    which fails while anything else listens on the port, another group of SO_REUSEPORT sockets included;
    then the port is known (the one chosen for port 0), and held until the master exits, so that a
    restarted worker finds it."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        address = probe.getsockname()
    held = socket.socket(family, socket.SOCK_STREAM)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(address)
    except OSError:
        held.close()
        raise
    return held


def leave_interrupts_to_the_master(worker: Any) -> None:
    """Ctrl-C reaches every process of the terminal's foreground group, and the master, on its SIGINT,
    tells each worker to stop (SIGQUIT). A worker that acted on both could get the second signal while
    it closes its event loop, and Python would print a traceback for it: so a worker ignores SIGINT."""
    worker.loop.remove_signal_handler(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Workers(BaseApplication):  # type: ignore[misc]
    """gunicorn configured in code, from the service's settings only (no command line, no config file)."""

    def __init__(
        self,
        held: socket.socket,
        workers: int,
        make_runner: Callable[[], web.AppRunner],
        on_listening: Callable[[], None],
    ) -> None:
        self._held = held  # open for as long as the master runs: see `reserve`
        self._make_runner = make_runner
        host, port = held.getsockname()[:2]

        def announce(arbiter: Any, worker: Any) -> None:
            """In the first worker, once its socket listens (gunicorn binds it before this hook): from
            then on, a connection waits for a worker rather than being refused."""
            if worker.age == 1:
                on_listening()

        self._options: dict[str, object] = {
            "bind": [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"],
            "reuse_port": True,  # each worker binds a socket of its own to the held address
            "workers": workers,
            "worker_class": WORKER_CLASS,
            "logger_class": ServiceLog,
            "post_fork": announce,
            "post_worker_init": leave_interrupts_to_the_master,
            # gunicorn's control socket (a file under $HOME) serves a tool the service does not use;
            # the image's user has no home to put it in.
            "control_socket_disable": True,
        }
        if os.path.isdir(_MEMORY_DIR):
            # The workers' heartbeat files: gunicorn's docs advise a memory file system, since their
            # updates can block a worker on a disk-backed one (a container's overlay file system).
            self._options["worker_tmp_dir"] = _MEMORY_DIR
        super().__init__()

    def load_config(self) -> None:
        for name, value in self._options.items():
            self.cfg.set(name, value)

    def load(self) -> Callable[[], Awaitable[web.AppRunner]]:
        """What each worker serves, called there after the fork: aiohttp's worker awaits it and serves
        the runner it returns (with the service's access log and keep-alive, as with one process)."""
        make_runner = self._make_runner

        async def runner() -> web.AppRunner:
            return make_runner()

        return runner
