"""Wait for a condition instead of sleeping a fixed time and hoping it was long enough.

A fixed ``time.sleep`` is too short on a loaded machine (a flaky failure) and too long on a fast one
(a slow suite). ``wait_until`` returns as soon as the condition holds and fails the test, naming what
it waited for, once the deadline passes. Test modules import it as ``from polling import wait_until``:
pytest puts this folder on ``sys.path`` because it holds tests/conftest.py (the tests folders are not
packages).
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], object], what: str, timeout_s: float = 30.0, every_s: float = 0.02
) -> None:
    """Call ``condition`` every ``every_s`` seconds until it returns a true value.

    Args:
        condition: checked at once, then after each pause; must not change what it observes.
        what: the condition in words, for the failure message ("the result expired").
        timeout_s: how long to keep trying; generous, since it only costs time when the test fails.
        every_s: the pause between checks.

    Raises:
        AssertionError: ``condition`` was still false after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting until {what}")
        time.sleep(every_s)
