"""The console of a tumorseg command: known-harmless dependency noise filtered, nothing else."""

from __future__ import annotations

import logging
import warnings

import pytest

from tumorseg.cli import configure_logging


@pytest.mark.parametrize(
    "message",
    [
        "Experiment logs directory models/2d/logs/ exists and is not empty. Previous log files in this "
        "directory will be deleted when the new ones are saved!",
        "Checkpoint directory /work/models/checkpoints exists and is not empty.",
        "Found 111 module(s) in eval mode at the start of training. This may lead to unexpected behavior.",
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and ...`",
    ],
)
def test_known_harmless_warnings_are_not_shown(message: str) -> None:
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        configure_logging(verbose=False)
        warnings.warn(message, UserWarning, stacklevel=1)
    assert shown == []


def test_other_warnings_and_lightning_lines_still_show_but_its_tips_do_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        configure_logging(verbose=False)
        warnings.warn("The dataloader does not have many workers", UserWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["The dataloader does not have many workers"]
    lightning = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert logging.getLogger("lightning").propagate is False  # its own handler prints it, once
    record = logging.LogRecord(lightning.name, logging.INFO, __file__, 1, "GPU available: False", None, None)
    tip = logging.LogRecord(
        lightning.name, logging.INFO, __file__, 1, "\N{ELECTRIC LIGHT BULB} Tip: ...", None, None
    )
    assert all(f.filter(record) for f in lightning.filters)
    assert not all(f.filter(tip) for f in lightning.filters)
