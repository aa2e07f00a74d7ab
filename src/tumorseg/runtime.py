"""Process-wide allocator settings for inference: keep the large arrays of each case in the heap.

glibc serves big blocks with fresh ``mmap`` calls and returns them on free, so every 240x240x155
case pays the page faults of touching its arrays anew (a quarter of ``predict``'s wall time on a
2-core VM; ``python -m benchmarks.predict --glibc-default-memory``). Keeping freed memory lets the
next case reuse the same pages; the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# glibc ``mallopt`` parameters (``<malloc.h>``).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the (reused) heap
TRIM_THRESHOLD = (1 << 31) - 1  # never return freed heap memory (mallopt takes an int)
TOP_PAD = 256 << 20  # grow the heap in 256 MiB steps: fewer system calls
_SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse, once per process; whether it is in effect (False
    without ``mallopt``: macOS, Windows, musl)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _applied = all(mallopt(option, value) == 1 for option, value in _SETTINGS)
    log.debug("keep freed memory for reuse: %s", _applied)
    return _applied
