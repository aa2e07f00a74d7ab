"""The 2-D LightningModule: one optimiser over segmentation, detection and tumour-type heads.

Loss per batch (tensors as in :mod:`tumorseg.data.planar_datamodule`)::

    seg_loss(seg_logits[has_mask], mask[has_mask])          images with a reference mask
    + detection_weight * BCE(class_logits[:, 0], tumour)    every image
    + type_weight * CE(class_logits[:, 1:][known], type)    images with a known tumour type

so images without masks still teach the detector. Validation scores whole images: Dice of the
thresholded mask (MONAI), ROC AUC of the tumour probability and type accuracy; ``val_dice_mean``
is the checkpoint monitor, as in 3-D. Single process only (no DDP path).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tumorseg.data.planar_datamodule import IMAGE_KEY, MASK_KEY
from tumorseg.models.lightning_module import VAL_DICE_MEAN, FactoryOptimisedModule
from tumorseg.models.planar_network import PlanarNetwork


class PlanarModule(FactoryOptimisedModule):
    """Multi-task training of a :class:`PlanarNetwork`.

    Args:
        seg_loss: ``loss(logits (B, 1, S, S), mask (B, 1, S, S))``.
        optimizer_factory, scheduler_factory: as for the 3-D module (:mod:`tumorseg.training.optim`).
        mask_threshold: sigmoid probability of a tumour pixel at validation.
        dice_ignore_empty: MONAI ``ignore_empty``; False scores an empty mask predicted empty as 1.
        config: resolved params sections stored in every checkpoint.
    """

    def __init__(
        self,
        network: PlanarNetwork,
        seg_loss: nn.Module,
        *,
        optimizer_factory: Any,
        scheduler_factory: Any = None,
        detection_weight: float = 0.5,
        type_weight: float = 0.5,
        mask_threshold: float = 0.5,
        dice_ignore_empty: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from monai.metrics import DiceMetric

        self.network = network
        self.seg_loss = seg_loss
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.detection_weight = detection_weight
        self.type_weight = type_weight
        self.mask_threshold = mask_threshold
        self.config = config or {}
        self.dice_metric = DiceMetric(
            include_background=True, reduction="none", ignore_empty=dice_ignore_empty
        )
        self._val_scores: list[torch.Tensor] = []
        self._val_truth: list[torch.Tensor] = []
        self._val_type_hits: list[torch.Tensor] = []
        self.mlflow_run_id: str | None = None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network(image)

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seg_logits, class_logits = self.network(batch[IMAGE_KEY])
        seg_logits, class_logits = seg_logits.float(), class_logits.float()
        with_mask = batch["has_mask"] > 0.5
        seg = (
            self.seg_loss(seg_logits[with_mask], batch[MASK_KEY][with_mask])
            if bool(with_mask.any())
            else seg_logits.sum() * 0.0
        )
        detection = F.binary_cross_entropy_with_logits(class_logits[:, 0], batch["tumour"].float())
        known = batch["type"] >= 0
        kind = (
            F.cross_entropy(class_logits[known, 1:], batch["type"][known])
            if bool(known.any())
            else class_logits.sum() * 0.0
        )
        return seg, detection, kind

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        seg, detection, kind = self._losses(batch)
        loss = seg + self.detection_weight * detection + self.type_weight * kind
        size = batch[IMAGE_KEY].shape[0]
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train_seg_loss", seg, on_step=False, on_epoch=True, batch_size=size)
        self.log("train_detect_loss", detection, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        seg_logits, class_logits = self.network(batch[IMAGE_KEY])
        with_mask = batch["has_mask"] > 0.5
        if bool(with_mask.any()):
            pred = (torch.sigmoid(seg_logits[with_mask].float()) > self.mask_threshold).float()
            self.dice_metric(y_pred=pred, y=batch[MASK_KEY][with_mask])
        self._val_scores.append(torch.sigmoid(class_logits[:, 0].float()).detach().cpu())
        self._val_truth.append(batch["tumour"].detach().cpu())
        known = batch["type"] >= 0
        if bool(known.any()):
            hits = class_logits[known, 1:].argmax(dim=1) == batch["type"][known]
            self._val_type_hits.append(hits.float().detach().cpu())

    def on_validation_epoch_end(self) -> None:
        dice = self.dice_metric.get_buffer()
        self.dice_metric.reset()
        if dice is not None and dice.numel():
            self.log(VAL_DICE_MEAN, float(torch.nanmean(dice.float())), prog_bar=True)
        scores = torch.cat(self._val_scores) if self._val_scores else torch.empty(0)
        truth = torch.cat(self._val_truth) if self._val_truth else torch.empty(0)
        auc = detection_auc(truth.numpy(), scores.numpy())
        if not math.isnan(auc):
            self.log("val_detect_auc", auc)
        if self._val_type_hits:
            self.log("val_type_accuracy", float(torch.cat(self._val_type_hits).mean()))
        self._val_scores.clear()
        self._val_truth.clear()
        self._val_type_hits.clear()


def detection_auc(truth: Any, scores: Any) -> float:
    """ROC AUC (scikit-learn) of ``scores`` for binary ``truth``; NaN unless both classes are present."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth) > 0.5
    if truth.size == 0 or truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, np.asarray(scores, dtype=np.float64)))
