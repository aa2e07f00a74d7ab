"""Case-parallel work for the data stages: worker processes, bounded memory, progress on screen.

Processes, not threads: reading a case is partly Python. At most ``2 x workers`` cases are in flight,
each returning a small summary in input order, so outputs do not depend on ``workers``. Workers start
from a ``forkserver`` (``fork`` could copy torch's or OpenMP's threads locked), each with
``cpu_count // workers`` compute threads.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from tumorseg.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

LOG_EVERY_S = 10.0
"""Seconds between progress log lines when the output is not a terminal."""

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def worker_count(requested: int) -> int:
    """``requested`` workers, where 0 means one per available core."""
    if requested > 0:
        return requested
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Progress:
    """Cases done of total, rate and time left: a ``tqdm`` bar on a terminal ``stream`` (default
    stderr), else a log line every :data:`LOG_EVERY_S` seconds (DVC and Prefect capture the output)."""

    def __init__(self, total: int, what: str, *, unit: str = "cases", stream=None) -> None:
        self.total = total
        self.what = what
        self.unit = unit
        self.done = 0
        self.start = time.perf_counter()
        self._last_log = self.start
        stream = stream if stream is not None else sys.stderr
        self._bar = None
        if total > 0 and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=f" {unit}", file=stream, dynamic_ncols=True)

    def line(self) -> str:
        """``preprocess: 40/100 cases (40%), 2.1 cases/s, 28 s left``."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        share = 100.0 * self.done / self.total if self.total else 100.0
        left_text = f"{left:.0f} s left" if left == left else "time left unknown"
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit} ({share:.0f}%), "
            f"{rate:.2f} {self.unit}/s, {left_text}"
        )

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_log >= LOG_EVERY_S and self.done < self.total:
            self._last_log = now
            log.info(self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.total > 0:
            log.info(self.line())


def _start_worker(threads: int, log_level: int) -> None:
    """Worker initializer: ``threads`` compute threads for numpy/OpenMP and torch, the caller's log level."""
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def map_cases(
    function: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    what: str,
    unit: str = "cases",
    setting: str | None = None,
) -> Iterator[R]:
    """``map(function, items)`` over ``workers`` processes (1: this process, 0: one per core), in order.

    ``function`` is picklable (module-level, or a partial of one); at most ``2 x workers`` of its results
    are held at once. ``what`` and ``unit`` name the stage and ``items`` in progress lines; ``setting``
    is the params.yaml key that sets ``workers``, if there is one (named when a worker dies). The first
    exception cancels queued cases, lets running ones finish, and is raised here.
    """
    progress = Progress(len(items), what, unit=unit)
    workers = min(worker_count(workers), len(items))
    try:
        if workers <= 1:
            for item in items:
                result = function(item)
                progress.advance()
                yield result
            return
        threads = max(1, worker_count(0) // workers)
        context = multiprocessing.get_context("forkserver")
        level = logging.getLogger("tumorseg").getEffectiveLevel()
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_start_worker, initargs=(threads, level)
        ) as pool:
            pending: deque[Future[R]] = deque()
            queue = iter(items)
            try:
                for item in queue:
                    pending.append(pool.submit(function, item))
                    if len(pending) >= 2 * workers:
                        yield pending.popleft().result()
                        progress.advance()
                while pending:
                    yield pending.popleft().result()
                    progress.advance()
            except BaseException as exc:
                for future in pending:
                    future.cancel()
                if isinstance(exc, BrokenProcessPool):
                    fewer = f"set {setting} lower" if setting else "close other programs"
                    raise DataError(
                        f"{what}: a worker process died (killed, out of memory?); free memory or "
                        f"{fewer}, then run again"
                    ) from None
                raise
    finally:
        progress.close()
