"""Case-parallel map: worker processes, results in order, errors surface, progress is shown."""

from __future__ import annotations

import io
import logging
import os

import pytest

from tumorseg.data import parallel
from tumorseg.data.parallel import Progress, map_cases
from tumorseg.errors import DataError


def square_and_pid(value: int) -> tuple[int, int]:
    return value * value, os.getpid()


def fail_on_three(value: int) -> int:
    if value == 3:
        raise DataError(f"case {value}: unreadable")
    return value


def test_two_workers_give_the_same_results_in_order_from_other_processes() -> None:
    items = list(range(12))
    serial = list(map_cases(square_and_pid, items, workers=1, what="test"))
    pooled = list(map_cases(square_and_pid, items, workers=2, what="test"))
    assert [r for r, _ in pooled] == [r for r, _ in serial] == [i * i for i in items]
    assert {pid for _, pid in serial} == {os.getpid()}
    pids = {pid for _, pid in pooled}
    assert os.getpid() not in pids and len(pids) == 2


def test_a_worker_error_reaches_the_caller_as_itself() -> None:
    with pytest.raises(DataError, match="case 3: unreadable"):
        list(map_cases(fail_on_three, list(range(8)), workers=2, what="test"))


def test_progress_lines_give_done_total_rate_and_time_left(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parallel, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="tumorseg.data.parallel"):
        list(map_cases(square_and_pid, list(range(4)), workers=1, what="preprocess"))
    lines = [r.getMessage() for r in caplog.records]
    assert (
        lines[0].startswith("preprocess: 1/4 cases (25%), ")
        and "cases/s" in lines[0]
        and "s left" in lines[0]
    )
    assert lines[-1].startswith("preprocess: 4/4 cases (100%)")


def test_a_terminal_gets_a_bar_instead_of_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    with caplog.at_level(logging.INFO, logger="tumorseg.data.parallel"):
        progress = Progress(3, "ingest", stream=screen)
        for _ in range(3):
            progress.advance()
        progress.close()
    assert "ingest" in screen.getvalue() and "3/3" in screen.getvalue()
    assert not caplog.records


@pytest.mark.parametrize(
    ("setting", "advice"), [("preprocess.workers", "set preprocess.workers lower"), (None, "")]
)
def test_a_worker_killed_mid_case_is_one_line_naming_the_setting_if_there_is_one(
    setting: str | None, advice: str
) -> None:
    with pytest.raises(DataError, match="a worker process died") as raised:
        list(map_cases(os._exit, [3, 3], workers=2, what="preprocess", setting=setting))
    assert advice in str(raised.value) and "then run again" in str(raised.value)
    assert setting is not None or ".workers" not in str(raised.value)  # no params key that does not exist
