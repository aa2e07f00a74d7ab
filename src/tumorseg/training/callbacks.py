"""Training callbacks: Lightning's own (checkpoints, early stopping, LR monitor) plus throughput and progress."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint

from tumorseg.models.lightning_module import VAL_DICE_MEAN
from tumorseg.training.config import TrainConfig

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0
"""Seconds between training progress lines (one more after each validation)."""


class PatchThroughput(Callback):
    """Training patches per second (per-rank batch x world size), timed from one batch end to the
    next: data loading and the optimiser step count, validation and epoch-end checkpointing do not."""

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


class TrainingProgress(Callback):
    """Rank-0 log lines (steps, epoch, mean loss since the last line, val Dice, time left) every
    ``every_s`` s and after each validation, for runs without Lightning's bar (DVC, Prefect)."""

    def __init__(self, every_s: float | None = None, label: str = "train") -> None:
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.label = label
        self._start = self._last = 0.0
        self._start_step = 0
        self._losses: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._start_step = trainer.global_step  # a resumed run counts its rate from here

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss))
        if time.perf_counter() - self._last >= self.every_s:
            self._report(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.global_step > 0:
            self._report(trainer)

    def line(self, trainer: L.Trainer) -> str:
        total = trainer.estimated_stepping_batches
        done = trainer.global_step
        elapsed = time.perf_counter() - self._start
        rate = elapsed / max(done - self._start_step, 1)
        parts = [
            f"{self.label}: step {done}/{total} ({100.0 * done / max(total, 1):.0f}%)",
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
        ]
        if self._losses:
            parts.append(f"loss {sum(self._losses) / len(self._losses):.3f}")
        dice = trainer.callback_metrics.get(VAL_DICE_MEAN)
        if dice is not None:
            parts.append(f"val Dice {float(dice):.3f}")
        parts.append(f"{rate:.2f} s/step, {max(total - done, 0) * rate / 60:.1f} min left")
        return ", ".join(parts)

    def _report(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            log.info(self.line(trainer))
        self._last = time.perf_counter()
        self._losses.clear()


def build_callbacks(
    cfg: TrainConfig, checkpoint_dir: Path, *, progress_lines: bool = True
) -> dict[str, Callback]:
    """The run's callbacks by role: ``best`` (``best.ckpt``, the best ``val_dice_mean``: what later
    stages load), ``last`` (``last.ckpt`` every ``checkpoint_every_n_steps``, to resume a killed run
    near where it stopped), ``lr``, ``throughput``, maybe ``progress`` (log lines, when Lightning's
    bar is off) and ``early_stop``."""
    callbacks: dict[str, Callback] = {
        "best": ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="best",
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
    if progress_lines:
        callbacks["progress"] = TrainingProgress()
    if cfg.early_stopping_patience > 0:
        callbacks["early_stop"] = EarlyStopping(
            monitor=VAL_DICE_MEAN,
            mode="max",
            patience=cfg.early_stopping_patience,
            min_delta=cfg.early_stopping_min_delta,
        )
    return callbacks
