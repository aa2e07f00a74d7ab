"""Training callbacks: Lightning's own (checkpoints, early stopping, LR monitor) plus throughput.

Two :class:`~lightning.pytorch.callbacks.ModelCheckpoint` instances with distinct jobs:

- ``best.ckpt``: the best validation mean Dice (``val_dice_mean``), the model downstream
  stages use;
- ``last.ckpt``: refreshed every ``train.checkpoint_every_n_steps`` optimiser steps, mid-epoch
  included, so a killed run resumes close to where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint

from tumorseg.models.lightning_module import VAL_DICE_MEAN
from tumorseg.training.config import TrainConfig

BEST_NAME = "best"
LAST_NAME = "last"


class PatchThroughput(Callback):
    """Training patches per second, counting only the training phase of each epoch.

    The clock runs from one training batch end to the next (so data loading and the
    optimiser step are in, validation and checkpointing at epoch end are out) and the
    count is global (per-rank batch size x world size).

    Attributes:
        patches: patches trained on so far in this process's run.
        seconds: wall time of the training phase so far.
    """

    def __init__(self) -> None:
        self.patches = 0
        self.seconds = 0.0
        self._last: float | None = None

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last
        self._last = now
        self.patches += int(batch["image"].shape[0]) * trainer.world_size

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("train_patches_per_s", self.patches_per_s, on_epoch=True, sync_dist=True)


def build_callbacks(cfg: TrainConfig, checkpoint_dir: Path) -> dict[str, Callback]:
    """The run's callbacks by role: ``best``, ``last``, ``lr``, ``throughput`` and maybe ``early_stop``."""
    callbacks: dict[str, Callback] = {
        "best": ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename=BEST_NAME,
            monitor=VAL_DICE_MEAN,
            mode="max",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        "last": ModelCheckpoint(
            dirpath=checkpoint_dir,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            enable_version_counter=False,
        ),
        "lr": LearningRateMonitor(logging_interval="epoch"),
        "throughput": PatchThroughput(),
    }
    if cfg.early_stopping_patience > 0:
        callbacks["early_stop"] = EarlyStopping(
            monitor=VAL_DICE_MEAN,
            mode="max",
            patience=cfg.early_stopping_patience,
            min_delta=cfg.early_stopping_min_delta,
        )
    return callbacks
