"""A run killed mid-epoch resumes from ``last.ckpt`` and finishes with the same epochs and steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_data import tiny_overrides

from tumorseg.training.train import train


class Killed(Exception):
    """Stands in for the process dying (OOM kill, pre-emption, Ctrl-C)."""


class KillAtStep(L.Callback):
    """Raise right after optimiser step ``step``, before Lightning's own checkpoint hooks run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


def test_killed_run_resumes_mid_epoch_and_finishes_the_same(tiny_dataset: Path, real_params: dict) -> None:
    import mlflow

    overrides = tiny_overrides(
        tiny_dataset,
        **{
            "train.max_epochs": 3,
            "train.steps_per_epoch": 4,
            "train.checkpoint_every_n_steps": 2,
            "mlflow.enabled": True,
            "mlflow.log_model": False,
        },
    )
    uri = f"sqlite:///{tiny_dataset}/mlflow.db"
    with pytest.raises(Killed):
        train(real_params, overrides=overrides, callbacks=[KillAtStep(7)], tracking_uri=uri)
    last = tiny_dataset / "models" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and state["epoch"] == 1  # saved mid-way through the second epoch
    assert not state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]

    resumed = train(real_params, overrides=overrides, resume=True, tracking_uri=uri)
    assert resumed.epochs == 3 and resumed.global_step == 12
    assert resumed.best_epoch is not None
    # the resumed run keeps logging to the interrupted run's MLflow run
    assert resumed.mlflow_run_id == state["tumorseg_mlflow_run_id"]
    client = mlflow.MlflowClient(uri)
    assert client.get_run(resumed.mlflow_run_id).info.status == "FINISHED"
    history = client.get_metric_history(resumed.mlflow_run_id, "val_dice_mean")
    assert sorted(m.step for m in history) == [3, 7, 11]  # epochs 0 (before the kill), 1 and 2
    # the CSV log keeps the epoch logged before the kill
    log = (tiny_dataset / "models" / "logs" / "metrics.csv").read_text()
    assert log.count("\n0.0,") + log.count("\n0,") >= 1

    fresh_overrides = {**overrides, "train.out_dir": str(tiny_dataset / "fresh"), "mlflow.enabled": False}
    fresh = train(real_params, overrides=fresh_overrides)
    assert (fresh.epochs, fresh.global_step) == (resumed.epochs, resumed.global_step)


def test_resume_without_a_checkpoint_starts_afresh(tiny_dataset: Path, real_params: dict) -> None:
    result = train(real_params, overrides=tiny_overrides(tiny_dataset), resume=True)
    assert result.epochs == 1 and result.global_step == 4
