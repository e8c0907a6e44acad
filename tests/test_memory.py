"""Returning free heap memory to the system."""

from __future__ import annotations

import platform
import sys

from service.memory import release_free_heap


def test_release_free_heap_works_where_the_c_library_can() -> None:
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert release_free_heap() is expected
    assert release_free_heap() is expected  # and again: nothing is used up
