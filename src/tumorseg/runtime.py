"""Process-wide settings for inference: how the C allocator treats the large arrays of each case.

Why: predicting one 240x240x155 case allocates and frees arrays of tens to hundreds of MiB (the
decoded modalities, the network's activations for a batch of windows, MONAI's blending buffers).
glibc serves blocks above its mmap threshold with fresh ``mmap`` calls and returns freed memory to
the system, so every case pays the page faults of touching that memory anew: on a 2-core VM a
quarter of ``predict``'s wall time (``python -m benchmarks.predict --glibc-default-memory``
against the default). Keeping freed memory in the heap makes the next case reuse
the same pages; the price is that the process keeps its peak memory until it exits, which is what
a serving process or a batch of cases needs anyway.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
"""glibc ``mallopt`` parameters (``<malloc.h>``)."""

MMAP_THRESHOLD = 1 << 30
"""Blocks up to 1 GiB come from the heap (reused), not from a fresh ``mmap`` each time."""
TRIM_THRESHOLD = (1 << 31) - 1
"""Freed heap memory is kept for reuse rather than returned to the system (mallopt takes an int)."""
TOP_PAD = 256 << 20
"""Grow the heap in 256 MiB steps: fewer system calls while a case's arrays are first allocated."""

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); once per process.

    Returns:
        Whether the setting is in effect: False where the C library has no ``mallopt`` (macOS,
        Windows, musl), which keep their own allocator's behaviour.
    """
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
            _applied = all(
                mallopt(option, value) == 1
                for option, value in (
                    (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                    (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                    (M_TOP_PAD, TOP_PAD),
                )
            )
    log.debug("keep freed memory for reuse: %s", _applied)
    return _applied
