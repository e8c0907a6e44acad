"""Shared helpers for the aggregator benchmarks: memory high-water marks, CPU time, tables."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 1024 * 1024
_peak = {"mib": 0.0}  # the highest VmHWM seen before a reset: resets also lower ru_maxrss


def _status_kib(name: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return None


def rss_mib() -> float:
    """The current resident set size (VmRSS), MiB; 0 when /proc is missing."""
    return (_status_kib("VmRSS") or 0) / 1024


def hwm_mib() -> float:
    """The RSS high-water mark since the last `reset_hwm()` (VmHWM), else the process peak."""
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else maxrss_mib()


def maxrss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak RSS of the whole process lifetime (getrusage ru_maxrss, KiB on Linux), MiB."""
    return resource.getrusage(who).ru_maxrss / 1024


def peak_mib() -> float:
    """This process's RSS peak so far, across `reset_hwm()` calls."""
    return max(_peak["mib"], hwm_mib())


def reset_hwm() -> bool:
    """Release freed memory, then reset VmHWM to the current RSS (Linux >= 4.0); False when not possible.

    The reset lowers getrusage's ru_maxrss too, so the peak before it is kept for `peak_mib()`.
    """
    _peak["mib"] = peak_mib()
    gc.collect()
    malloc_trim()
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def malloc_trim() -> None:
    """Give freed heap pages back to the OS so RSS figures start from what is really in use."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        return


def self_cpu() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pid_cpu(pid: int | None) -> float:
    """User + system CPU seconds of another process (0 when unknown or gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_pid(needle: str) -> int | None:
    """The pid of a process whose command line contains `needle`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and int(entry.name) != os.getpid():
            return int(entry.name)
    return None


def machine_line() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, load {load}"


@dataclass
class Phase:
    """One timed measurement: wall seconds, CPU of this process and of a server, RSS figures."""

    name: str
    seconds: float = 0.0
    cpu: float = 0.0
    server_cpu: float = 0.0
    rss_before: float = 0.0
    hwm: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


@contextmanager
def measure(name: str, server_pid: int | None = None) -> Iterator[Phase]:
    """Time the block; the phase's `hwm` is the RSS peak reached inside it (VmHWM reset first)."""
    phase = Phase(name)
    reset_hwm()
    phase.rss_before = rss_mib()
    cpu0, server0 = self_cpu(), pid_cpu(server_pid)
    began = time.perf_counter()
    try:
        yield phase
    finally:
        phase.seconds = time.perf_counter() - began
        phase.cpu = self_cpu() - cpu0
        phase.server_cpu = pid_cpu(server_pid) - server0
        phase.hwm = hwm_mib()


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(widths[0]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(values)]
        return "| " + " | ".join(parts) + " |"

    if title:
        print(f"\n{title}")
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print(line(row))


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"
