"""Giving freed heap memory back to the operating system after a run's large temporaries.

pandas and numpy allocate their temporaries with the C library's malloc. glibc keeps what they free
in its heap for reuse and returns it to the system only when the top of the heap is free, so after a
run over a million objects tens of MiB stay resident without being used. `malloc_trim` releases those
pages. Other C libraries (musl) and other systems have no such call: there this does nothing.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]  # type: ignore[attr-defined]
    trim.restype = ctypes.c_int  # type: ignore[attr-defined]
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_free_heap() -> bool:
    """Return the heap's free pages to the system; False when the C library cannot."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
