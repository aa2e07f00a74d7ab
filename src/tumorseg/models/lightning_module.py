"""The LightningModule: loss, whole-volume validation with MONAI metrics, optimiser hooks.

The network, loss and optimiser/scheduler factories are built elsewhere and passed in. Validation
predicts each whole volume with sliding windows and scores the label set's regions with MONAI's
:class:`~monai.metrics.DiceMetric`; its buffers are all-gathered across DDP ranks and cases that
the ``DistributedSampler`` padded in twice are dropped by case index, so every rank logs the
validation Dice of a single-process run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from tumorseg.data.conventions import GLIOMA, LabelSet
from tumorseg.data.transforms import CASE_INDEX_KEY, IMAGE_KEY, LABEL_KEY
from tumorseg.models.config import SlidingWindowConfig
from tumorseg.models.inference import labels_to_regions, make_inferer, predict_labels

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
"""``params -> optimizer``."""
SchedulerFactory = Callable[[torch.optim.Optimizer, int], dict[str, Any] | None]
"""``(optimizer, total training steps) -> Lightning lr_scheduler config`` (or None)."""

CONFIG_CHECKPOINT_KEY = "tumorseg_config"
"""Checkpoint entry holding the resolved params sections needed to rebuild the network."""

RUN_ID_CHECKPOINT_KEY = "tumorseg_mlflow_run_id"
"""Checkpoint entry holding the MLflow run id, so a resumed run keeps logging to the same run."""

VAL_DICE_MEAN = "val_dice_mean"


class FactoryOptimisedModule(L.LightningModule):
    """Hooks the 3-D and 2-D modules share: optimiser from factories, config and run id in checkpoints.

    Subclasses set ``network``, ``optimizer_factory``, ``scheduler_factory``, ``config``, ``mlflow_run_id``.
    """

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.network.parameters())
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 1
        scheduler = self.scheduler_factory(optimizer, max(total_steps, 1))
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_CHECKPOINT_KEY] = self.config
        checkpoint[RUN_ID_CHECKPOINT_KEY] = self.mlflow_run_id


class SegmentationModule(FactoryOptimisedModule):
    """Brain-tumour segmentation training and validation.

    Args:
        network: maps ``(B, 4, *patch)`` to logits ``(B, C, *patch)``, C the output channels of
            ``label_set``; DynUNet with deep supervision returns ``(B, heads, C, *patch)`` while training.
        loss: ``loss(logits, target)``; target is ``(B, R, *patch)`` regions or ``(B, 1, *patch)``
            labels (a :class:`~monai.losses.DeepSupervisionLoss` for deep supervision).
        roi_size: training patch, used as the validation sliding window.
        config: resolved params sections stored in every checkpoint.
        dice_ignore_empty: MONAI ``ignore_empty``; False scores an empty region predicted empty
            as 1 and any false positive on it as 0 (the BraTS convention).
        spacing_mm: voxel spacing (measures ``sliding_window.min_component_mm3``).
    """

    def __init__(
        self,
        network: nn.Module,
        loss: nn.Module,
        *,
        output: str,
        roi_size: tuple[int, ...],
        sliding_window: SlidingWindowConfig,
        optimizer_factory: OptimizerFactory,
        scheduler_factory: SchedulerFactory | None = None,
        config: dict[str, Any] | None = None,
        dice_ignore_empty: bool = False,
        spacing_mm: tuple[float, ...] = (1.0, 1.0, 1.0),
        label_set: LabelSet = GLIOMA,
    ) -> None:
        super().__init__()
        from monai.metrics import Cumulative, DiceMetric

        self.network = network
        self.loss = loss
        self.output = output
        self.roi_size = tuple(roi_size)
        self.sliding_window = sliding_window
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.config = config or {}
        self.spacing_mm = tuple(spacing_mm)
        self.label_set = label_set
        self.inferer = make_inferer(sliding_window, self.roi_size)
        self.dice_metric = DiceMetric(
            include_background=True, reduction="none", ignore_empty=dice_ignore_empty
        )
        self.val_case_index = Cumulative()
        self.mlflow_run_id: str | None = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, *spatial)`` for a batch of patches or slices."""
        return self.network(image)

    def _target(self, label: torch.Tensor) -> torch.Tensor:
        """Internal labels ``(B, 1, *spatial)`` -> the loss target for this output mode."""
        return labels_to_regions(label, self.label_set) if self.output == "regions" else label

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        image, label = batch[IMAGE_KEY], batch[LABEL_KEY]
        logits = self.network(image).float()  # loss in float32 under bf16/16-mixed autocast too
        if logits.dim() == image.dim() + 1:  # deep supervision: (B, heads, C, *spatial)
            logits = list(torch.unbind(logits, dim=1))
        loss = self.loss(logits, self._target(label))
        size = image.shape[0]
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=size
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        image, label = batch[IMAGE_KEY], batch[LABEL_KEY]
        logits, pred = predict_labels(
            self.network,
            image,
            self.inferer,
            self.output,
            self.sliding_window.threshold,
            min_component_mm3=self.sliding_window.min_component_mm3,
            spacing_mm=self.spacing_mm,
            label_set=self.label_set,
        )
        loss = self.loss(logits.float(), self._target(label))
        self.log("val_loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=image.shape[0])
        self.dice_metric(
            y_pred=labels_to_regions(pred, self.label_set), y=labels_to_regions(label, self.label_set)
        )
        self.val_case_index.extend(batch[CASE_INDEX_KEY].reshape(-1, 1).to(torch.float32))

    def on_validation_epoch_end(self) -> None:
        dice = self.dice_metric.get_buffer()  # (N_all_ranks, R), synced across ranks
        index = self.val_case_index.get_buffer()
        self.dice_metric.reset()
        self.val_case_index.reset()
        if dice is None:
            return
        per_region = aggregate_case_dice(dice, index, self.label_set.region_names)
        for name, value in per_region.items():
            # Identical on every rank already (synced buffers); sync_dist averages equal values.
            self.log(f"val_dice_{name}", value, on_epoch=True, prog_bar=name == "mean", sync_dist=True)


def aggregate_case_dice(
    dice: torch.Tensor, case_index: torch.Tensor | None = None, names: tuple[str, ...] = GLIOMA.region_names
) -> dict[str, float]:
    """Mean Dice per region over cases, plus their mean.

    Args:
        dice: ``(N, R)`` per-case Dice of each train region (NaN where MONAI ignored an empty region).
        case_index: ``(N, 1)`` case positions; repeated cases (DDP padding) count once.
        names: the label set's train regions (WT, TC, ET for glioma).

    Returns:
        ``{"WT": ..., "TC": ..., "ET": ..., "mean": ...}``; NaN means skipped, not zero.
    """
    dice = dice.detach().float().cpu().reshape(-1, len(names))
    if case_index is not None:
        index = case_index.detach().cpu().reshape(-1).long()
        keep = [int(torch.nonzero(index == i)[0]) for i in torch.unique(index)]
        dice = dice[keep]
    per_region = {name: float(torch.nanmean(dice[:, i])) for i, name in enumerate(names)}
    finite = [v for v in per_region.values() if not math.isnan(v)]
    per_region["mean"] = float(sum(finite) / len(finite)) if finite else float("nan")
    return per_region
