"""Faults during ``tumorseg train``. A real SIGKILL (an OOM kill, a pre-empted node): ``last.ckpt`` is
always a whole checkpoint, the MLflow run the dead process left RUNNING is marked FAILED on the next
start, and ``--resume`` continues from the last checkpoint to the same end, in the same MLflow run.
A full disk while checkpointing: one line naming the checkpoint folder, no half-written checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_data import tiny_overrides

from polling import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN = """
import json, sys
from tumorseg.config import read_params
from tumorseg.training.train import train
result = train(read_params(sys.argv[1]), overrides=json.loads(sys.argv[2]), resume=sys.argv[3] == "resume",
               tracking_uri=sys.argv[4])
print("DONE", result.global_step, result.mlflow_run_id)
"""


def _step(checkpoint: Path) -> int:
    """The checkpoint's global step; loading it fails if it is not a whole checkpoint."""
    return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"])


def _runs(uri: str) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


@pytest.mark.slow
def test_sigkilled_training_leaves_a_whole_checkpoint_a_failed_run_and_resumes(
    tiny_dataset: Path, real_params: dict
) -> None:
    import mlflow

    from tumorseg import tracking

    overrides = tiny_overrides(
        tiny_dataset,
        **{
            "train.max_epochs": 3,
            "train.steps_per_epoch": 40,
            "train.checkpoint_every_n_steps": 2,
            "mlflow.enabled": True,
            "mlflow.log_model": False,
        },
    )
    uri = f"sqlite:///{tiny_dataset}/mlflow.db"
    last = tiny_dataset / "models" / "checkpoints" / "last.ckpt"

    def start(mode: str) -> subprocess.Popen[str]:
        command = [
            sys.executable,
            "-c",
            TRAIN,
            str(REPO_ROOT / "params.yaml"),
            json.dumps(overrides),
            mode,
            uri,
        ]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    reached, run_id = 0, None
    for mode in ("new", "resume"):  # killed twice: in the first run, then in its resumption
        process = start(mode)
        target = reached + 4
        wait_until(
            lambda t=target: last.is_file() and _step(last) >= t, f"a checkpoint at step {target}", 240
        )
        os.kill(process.pid, signal.SIGKILL)  # the process gets no chance to end its run or its write
        process.wait(timeout=60)
        step = _step(last)  # a whole checkpoint (written to a temporary file, then renamed)
        assert step >= reached + 4
        reached = step
        runs = _runs(uri)
        assert len(runs) == 1 and runs[0].info.status == "RUNNING"
        assert run_id in (None, runs[0].info.run_id)  # the resumption logs to the same run
        run_id = runs[0].info.run_id
        # the next start finds the run's process gone and marks the run FAILED, saying why
        experiment = runs[0].info.experiment_id
        name = mlflow.MlflowClient(uri).get_experiment(experiment).name
        assert tracking.fail_orphaned_runs(uri, name) == [run_id]
        failed = _runs(uri)[0]
        assert (
            failed.info.status == "FAILED"
            and "ended without ending the run" in failed.data.tags[tracking.ORPHAN_TAG]
        )
        assert tracking.fail_orphaned_runs(uri, name) == []

    finished = start("resume")
    out, _ = finished.communicate(timeout=600)
    assert finished.returncode == 0
    assert out.split()[-2:] == ["120", run_id]  # 3 x 40 steps, as an uninterrupted run ends
    runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and _step(last) == 120


def test_a_run_whose_process_is_alive_or_elsewhere_is_not_touched(tmp_path: Path) -> None:
    import mlflow

    from tumorseg import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "e")
    client = mlflow.MlflowClient(uri)
    mine = client.create_run(experiment).info.run_id
    tracking.tag_process(client, mine)  # this very process: alive
    elsewhere = client.create_run(experiment).info.run_id
    client.set_tag(elsewhere, tracking.PROCESS_TAGS[0], "another-host")
    client.set_tag(elsewhere, tracking.PROCESS_TAGS[1], "1")
    untagged = client.create_run(experiment).info.run_id
    reused = client.create_run(experiment).info.run_id  # this pid, but another start time: pid reused
    tracking.tag_process(client, reused)
    client.set_tag(reused, tracking.PROCESS_TAGS[2], "12.0")
    assert tracking.fail_orphaned_runs(uri, "e") == [reused]
    status = {r: client.get_run(r).info.status for r in (mine, elsewhere, untagged, reused)}
    assert status == {mine: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING", reused: "FAILED"}
    assert tracking.fail_orphaned_runs(uri, "missing experiment") == []


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_checkpoint(
    tiny_dataset: Path, real_params: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from lightning.fabric.plugins.io import torch_io

    from tumorseg.errors import DataError
    from tumorseg.training.train import train

    def full(checkpoint: object, path: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", full)  # what Lightning writes checkpoints with
    with pytest.raises(DataError) as caught:
        train(real_params, overrides=tiny_overrides(tiny_dataset))
    message = str(caught.value)
    assert "\n" not in message and "no space left on the device" in message
    assert message.startswith(str(tiny_dataset / "models" / "checkpoints"))
    assert not list((tiny_dataset / "models" / "checkpoints").glob("*.ckpt"))
