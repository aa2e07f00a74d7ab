"""Test instrumentation: pause points at the writes that publish an output (the crash-consistency
tests), and a record of the one-line errors commands give (the count of bad inputs tried).

Every place where a stage makes a write visible (the rename of an atomic write, a folder swap, an
MLflow alias move) calls :func:`write_point` first. Outside the tests nothing is set and the call is
one dictionary lookup. tests/integration/test_crash_consistency.py sets:

- ``TUMORSEG_WRITE_LOG``: a file; every point reached appends ``WRITE <time> <pid> <name>``, and a
  command's start ``START <time> <pid> <command>``;
- ``TUMORSEG_PAUSE_AT=N`` (with the log): the N-th point reached, counted over the process and its
  workers, appends ``PAUSED <time> <pid> <name>`` and sleeps until the process is killed. The test SIGKILLs
  the process group there: the stage dies just before that write becomes visible.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

ERROR_LOG_ENV = "TUMORSEG_ERROR_LOG"
"""A file that every one-line error of a ``tumorseg`` command is appended to as a JSON line (the test
suite's ``--reliability-out`` sets it; unset otherwise)."""
LOG_ENV = "TUMORSEG_WRITE_LOG"
PAUSE_ENV = "TUMORSEG_PAUSE_AT"
WRITE, PAUSED, START = "WRITE", "PAUSED", "START"
"""The kinds of line in the log: ``<kind> <unix time> <pid> <name>``; only WRITE lines are counted."""


def write_point(name: object) -> None:
    """Record the write point ``name``; pause here for good when it is the one asked for."""
    log = os.environ.get(LOG_ENV)
    if not log:
        return
    wanted = int(os.environ.get(PAUSE_ENV) or 0)
    with _locked(log) as fh:  # workers of one stage count through the same file
        reached = sum(1 for line in fh if line.startswith(WRITE)) + 1
        _append(fh, WRITE, name)
        pause = reached == wanted
        if pause:
            _append(fh, PAUSED, name)
    while pause:  # killed here by the test; never returns
        time.sleep(3600)


def started(command: str) -> None:
    """Record that a ``tumorseg`` command started (not a write point: the tests time kills from it)."""
    log = os.environ.get(LOG_ENV)
    if log:
        with _locked(log) as fh:
            _append(fh, START, command)


@contextmanager
def _locked(path: str) -> Iterator[TextIO]:
    import fcntl

    with open(path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        yield fh


def _append(fh: TextIO, kind: str, name: object) -> None:
    label = " ".join(str(name).split())  # one line per point, whatever the path holds
    fh.write(f"{kind} {time.time():.3f} {os.getpid()} {label}\n")
    fh.flush()


def record_error(command: str, message: str) -> None:
    """Append ``{"command", "error"}`` to ``$TUMORSEG_ERROR_LOG`` when it is set."""
    path = os.environ.get(ERROR_LOG_ENV)
    if path:
        import json

        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"command": command, "error": message}) + "\n")
