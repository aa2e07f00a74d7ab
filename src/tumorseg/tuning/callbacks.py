"""Lightning callbacks a tuning trial adds to ``train()``.

Pruning itself uses Optuna's maintained :class:`optuna_integration.PyTorchLightningPruningCallback`
(it imports ``lightning.pytorch`` and works with Lightning 2.6): after every validation it
reports ``val_dice_mean`` for the epoch and raises :class:`optuna.TrialPruned` when the median
pruner says the trial is worse than the others at that epoch.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class TrialRunLink(Callback):
    """Make the trial's MLflow run (created by ``train()``) a child of the study's parent run.

    MLflow nests runs through the ``mlflow.parentRunId`` tag; ``train()`` creates its own run, so the
    tag is set here once the logger's run exists, together with the trial number. The run id is also
    stored on the Optuna trial, which links the two stores both ways.

    Attributes:
        run_id: the trial's MLflow run, once fitting started (None before, or without MLflow).
    """

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
