"""The console of a tumorseg command: known-harmless dependency noise filtered, nothing else."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

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


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="torchvision installed: no notice to drop"
)
def test_the_onnx_exporters_torchvision_notices_are_dropped_and_its_other_warnings_kept(
    tmp_path: Path,
) -> None:
    """A real dynamo export in a fresh process: torch prints a torchvision notice per detection op
    unless the command's logging drops them; the same logger's other records still pass."""
    script = (
        "import sys, logging, torch\n"
        "if sys.argv[1] == 'on':\n"
        "    from tumorseg.cli import configure_logging\n"
        "    configure_logging(verbose=False)\n"
        "elif sys.argv[1] == 'info':\n"
        "    logging.basicConfig(level=logging.INFO)\n"
        f"torch.onnx.export(torch.nn.Conv2d(1, 2, 3), (torch.zeros(1, 1, 8, 8),), r'{tmp_path}/x.onnx', dynamo=True)\n"
        "logging.getLogger('torch.onnx._internal.exporter._registration').warning('another notice')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def stderr(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "torchvision is not installed" in stderr("off")  # torch does print them: the test can fail
    quiet = stderr("on")
    assert "torchvision" not in quiet and "another notice" in quiet
    # nor the graph passes' INFO lines (onnxscript's constant folding, onnx_ir's pass manager), which
    # logging at INFO without tumorseg's settings shows
    assert "onnx_ir" in stderr("info")
    assert "onnx_ir" not in quiet and "onnxscript" not in quiet


@pytest.mark.parametrize(
    ("logger", "message"),
    [
        ("mlflow.store.db.utils", "Creating initial MLflow database tables..."),
        ("mlflow.store.db.utils", "Updating database tables"),
        ("matplotlib.font_manager", "Matplotlib is building the font cache; this may take a moment."),
    ],
)
def test_one_off_dependency_notices_are_dropped_and_the_same_loggers_warnings_kept(
    logger: str, message: str
) -> None:
    configure_logging(verbose=False)
    filters = logging.getLogger(logger).filters
    notice = logging.LogRecord(logger, logging.INFO, __file__, 1, message, None, None)
    other = logging.LogRecord(logger, logging.WARNING, __file__, 1, "could not open the store", None, None)
    assert not all(f.filter(notice) for f in filters)
    assert all(f.filter(other) for f in filters)


def test_registering_a_version_prints_no_mlflow_notes_but_passes_other_output_on(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mlflow.register_model`` prints "Registered model ... already exists" and "Created version ..."
    on stderr for each version; the log line of the caller says what was registered instead."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tumorseg.registry import register

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "model/MLmodel")
    uri = f"runs:/{run.info.run_id}/model"
    capfd.readouterr()
    assert register.register_version(client, uri, "quiet", "a test model", {}) == "1"
    assert register.register_version(client, uri, "quiet", None, {"k": "v"}) == "2"
    printed = capfd.readouterr().err
    assert "already exists" not in printed and "Created version" not in printed, printed
    assert client.get_model_version("quiet", "2").tags == {"k": "v"}

    real = mlflow.register_model

    def warns(*args: object, **kwargs: object) -> object:
        print("a warning MLflow printed", file=sys.stderr)
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "register_model", warns)
    assert register.register_version(client, uri, "quiet", None, {}) == "3"
    assert "a warning MLflow printed" in capfd.readouterr().err


def test_mlflow_draws_no_progress_bar_for_an_artifact_download(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "model/weights.txt")

    def download(folder: str) -> str:
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="model/weights.txt", dst_path=str(tmp_path / folder)
        )
        return capfd.readouterr().err

    capfd.readouterr()
    assert "Downloading artifacts" in download("a")  # MLflow does draw one: the test can fail
    configure_logging(verbose=False)
    assert "Downloading artifacts" not in download("b")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # the user's setting wins
    configure_logging(verbose=False)
    assert "Downloading artifacts" in download("c")
