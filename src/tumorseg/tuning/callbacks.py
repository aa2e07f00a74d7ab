"""Lightning callbacks a tuning trial adds to ``train()``; pruning is Optuna's own
:class:`optuna_integration.PyTorchLightningPruningCallback` on ``val_dice_mean``."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class TrialRunLink(Callback):
    """Tag the trial's MLflow run (``train()`` creates it) as a child of the study's parent run, once the
    logger's run exists; its ``run_id`` (None without MLflow) is also stored on the Optuna trial."""

    def __init__(self, trial: Any, parent_run_id: str, study_name: str) -> None:
        self.trial = trial
        self.parent_run_id = parent_run_id
        self.study_name = study_name
        self.run_id: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.loggers import MLFlowLogger

        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                self.run_id = logger.run_id
                client = logger.experiment
                client.set_tag(self.run_id, "mlflow.parentRunId", self.parent_run_id)
                client.set_tag(self.run_id, "optuna.study_name", self.study_name)
                client.set_tag(self.run_id, "optuna.trial_number", str(self.trial.number))
                self.trial.set_user_attr("mlflow_run_id", self.run_id)
