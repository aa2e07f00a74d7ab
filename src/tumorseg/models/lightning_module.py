"""The LightningModule (network, loss and optimiser factories passed in) and whole-case validation.

Volumes are validated whole with sliding windows; the Dice buffers are all-gathered across DDP ranks
and cases the ``DistributedSampler`` padded in twice are dropped by case index, so every rank logs
the Dice of a single-process run. Images (2-D, single process) add :class:`ClassifierHeads`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from tumorseg.data.conventions import GLIOMA, LabelSet
from tumorseg.data.datamodule import MASK_KEY
from tumorseg.data.transforms import CASE_INDEX_KEY, IMAGE_KEY, LABEL_KEY
from tumorseg.models.checkpoint import CONFIG_CHECKPOINT_KEY
from tumorseg.models.config import SlidingWindowConfig
from tumorseg.models.inference import labels_to_regions, make_inferer, predict_labels

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
"""``params -> optimizer``."""
SchedulerFactory = Callable[[torch.optim.Optimizer, int], dict[str, Any] | None]
"""``(optimizer, total training steps) -> Lightning lr_scheduler config`` (or None)."""


RUN_ID_CHECKPOINT_KEY = "tumorseg_mlflow_run_id"
"""Checkpoint entry holding the MLflow run id, so a resumed run keeps logging to the same run."""

VAL_DICE_MEAN = "val_dice_mean"


@dataclass
class ClassifierHeads:
    """The 2-D model's optional classifier: a tumour-present logit and tumour-type logits.

    With heads the network returns ``(seg logits (B, 1, S, S), class logits (B, 1 + T))`` and the
    loss per batch (keys of :mod:`tumorseg.data.datamodule`) is::

        seg_loss(seg_logits[has_mask], mask[has_mask])          images with a reference mask
        + detection_weight * BCE(class_logits[:, 0], tumour)    every image
        + type_weight * CE(class_logits[:, 1:][known], type)    images with a known tumour type

    so images without masks still teach the detector. ``mask_threshold`` is the sigmoid probability
    of a tumour pixel at validation.
    """

    detection_weight: float = 0.5
    type_weight: float = 0.5
    mask_threshold: float = 0.5
    _scores: list[torch.Tensor] = field(default_factory=list, repr=False)
    _truth: list[torch.Tensor] = field(default_factory=list, repr=False)
    _type_hits: list[torch.Tensor] = field(default_factory=list, repr=False)

    def losses(self, class_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``(detection BCE, type CE)``; the type term is a zero with a graph when no type is known."""
        detection = F.binary_cross_entropy_with_logits(class_logits[:, 0], batch["tumour"].float())
        known = batch["type"] >= 0
        if not bool(known.any()):
            return detection, class_logits.sum() * 0.0
        return detection, F.cross_entropy(class_logits[known, 1:], batch["type"][known])

    def collect(self, class_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self._scores.append(torch.sigmoid(class_logits[:, 0].float()).detach().cpu())
        self._truth.append(batch["tumour"].detach().cpu())
        known = batch["type"] >= 0
        if bool(known.any()):
            hits = class_logits[known, 1:].argmax(dim=1) == batch["type"][known]
            self._type_hits.append(hits.float().detach().cpu())

    def epoch_metrics(self) -> dict[str, float]:
        """``val_detect_auc`` (when both classes occurred) and ``val_type_accuracy``; clears the epoch."""
        scores = torch.cat(self._scores) if self._scores else torch.empty(0)
        truth = torch.cat(self._truth) if self._truth else torch.empty(0)
        metrics = {"val_detect_auc": detection_auc(truth.numpy(), scores.numpy())}
        if math.isnan(metrics["val_detect_auc"]):
            del metrics["val_detect_auc"]
        if self._type_hits:
            metrics["val_type_accuracy"] = float(torch.cat(self._type_hits).mean())
        for buffer in (self._scores, self._truth, self._type_hits):
            buffer.clear()
        return metrics


class SegmentationModule(L.LightningModule):
    """Brain-tumour segmentation training and validation, with optional classifier heads.

    Args:
        network: ``(B, C_in, *patch)`` -> logits ``(B, C, *patch)``, C the output channels of
            ``label_set``; DynUNet with deep supervision returns ``(B, heads, C, *patch)`` while
            training; with ``heads``, the pair described in :class:`ClassifierHeads`.
        loss: ``loss(logits, target)``; target is ``(B, R, *patch)`` regions or ``(B, 1, *patch)``
            labels (a :class:`~monai.losses.DeepSupervisionLoss` for deep supervision).
        roi_size: training patch, the validation sliding window of volumes.
        config: resolved params sections stored in every checkpoint.
        dice_ignore_empty: MONAI ``ignore_empty``; False (BraTS) scores an empty region predicted
            empty as 1 and any false positive on it as 0.
        spacing_mm: voxel spacing (measures ``sliding_window.min_component_mm3``).
        heads: images: validated in one pass, the mask thresholded, only ``val_dice_mean``.
        channels_last: train 3-D weights and batches as ``torch.channels_last_3d`` (faster oneDNN
            convolutions on CPU; the state dict is unchanged).
        lr_scales: parameter name -> learning-rate factor (a transferred encoder trains slower);
            parameters with ``requires_grad`` off (frozen) are left out of the optimiser.
    """

    def __init__(
        self,
        network: nn.Module,
        loss: nn.Module,
        *,
        optimizer_factory: OptimizerFactory,
        scheduler_factory: SchedulerFactory | None = None,
        config: dict[str, Any] | None = None,
        dice_ignore_empty: bool = False,
        output: str = "regions",
        roi_size: tuple[int, ...] = (),
        sliding_window: SlidingWindowConfig | None = None,
        spacing_mm: tuple[float, ...] = (1.0, 1.0, 1.0),
        label_set: LabelSet = GLIOMA,
        heads: ClassifierHeads | None = None,
        channels_last: bool = False,
        lr_scales: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        from monai.metrics import Cumulative, DiceMetric

        self.network = network
        self.loss = loss
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.config = config or {}
        self.output = output
        self.roi_size = tuple(roi_size)
        self.sliding_window = sliding_window
        self.spacing_mm = tuple(spacing_mm)
        self.label_set = label_set
        self.heads = heads
        self.channels_last = channels_last
        self.lr_scales = dict(lr_scales or {})
        self.inferer = make_inferer(sliding_window, self.roi_size) if sliding_window is not None else None
        self.dice_metric = DiceMetric(
            include_background=True, reduction="none", ignore_empty=dice_ignore_empty
        )
        self.val_case_index = Cumulative()
        self.mlflow_run_id: str | None = None

    def forward(self, image: torch.Tensor) -> Any:
        return self.network(image)

    def on_fit_start(self) -> None:
        if self.channels_last:  # 3-D weights once (a slice LSTM's 2-D ones stay); each batch in training_step
            for tensor in (*self.network.parameters(), *self.network.buffers()):
                if tensor.dim() == 5:
                    tensor.data = tensor.data.contiguous(memory_format=torch.channels_last_3d)

    def configure_optimizers(self) -> Any:
        trainable = [(n, p) for n, p in self.network.named_parameters() if p.requires_grad]
        if self.lr_scales:  # groups by factor: {"params", "lr_scale"} (make_optimizer sets their lr)
            groups: dict[float, list[nn.Parameter]] = {}
            for name, parameter in trainable:
                groups.setdefault(self.lr_scales.get(name, 1.0), []).append(parameter)
            optimizer = self.optimizer_factory([{"params": ps, "lr_scale": k} for k, ps in groups.items()])
        else:
            optimizer = self.optimizer_factory([p for _, p in trainable])
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 1
        scheduler = self.scheduler_factory(optimizer, max(total_steps, 1))
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_CHECKPOINT_KEY] = self.config
        checkpoint[RUN_ID_CHECKPOINT_KEY] = self.mlflow_run_id

    def _target(self, label: torch.Tensor) -> torch.Tensor:
        """Internal labels ``(B, 1, *spatial)`` -> the loss target for this output mode."""
        return labels_to_regions(label, self.label_set) if self.output == "regions" else label

    def _segmentation_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Volumes: every case has a reference; images: only those with ``has_mask``."""
        if self.heads is None:
            if logits.dim() == batch[IMAGE_KEY].dim() + 1:  # deep supervision: (B, heads, C, *spatial)
                return self.loss(list(torch.unbind(logits, dim=1)), self._target(batch[LABEL_KEY]))
            return self.loss(logits, self._target(batch[LABEL_KEY]))
        with_mask = batch["has_mask"] > 0.5
        if not bool(with_mask.any()):
            return logits.sum() * 0.0
        return self.loss(logits[with_mask], batch[MASK_KEY][with_mask])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        image = batch[IMAGE_KEY]
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        logits, class_logits = self.network(image) if self.heads is not None else (self.network(image), None)
        # loss in float32 under bf16/16-mixed autocast too
        loss = seg = self._segmentation_loss(logits.float(), batch)
        if self.heads is not None:
            detection, kind = self.heads.losses(class_logits.float(), batch)
            loss = seg + self.heads.detection_weight * detection + self.heads.type_weight * kind
        size = image.shape[0]
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=size
        )
        if self.heads is not None:
            self.log("train_seg_loss", seg, on_step=False, on_epoch=True, batch_size=size)
            self.log("train_detect_loss", detection, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        image = batch[IMAGE_KEY]
        if self.heads is not None:
            seg_logits, class_logits = self.network(image)
            with_mask = batch["has_mask"] > 0.5
            if bool(with_mask.any()):
                pred = (torch.sigmoid(seg_logits[with_mask].float()) > self.heads.mask_threshold).float()
                self.dice_metric(y_pred=pred, y=batch[MASK_KEY][with_mask])
            self.heads.collect(class_logits, batch)
            return
        label = batch[LABEL_KEY]
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
        if self.heads is not None:
            if dice is not None and dice.numel():
                self.log(VAL_DICE_MEAN, float(torch.nanmean(dice.float())), prog_bar=True)
            for name, value in self.heads.epoch_metrics().items():
                self.log(name, value)
            return
        if dice is None:
            return
        per_region = aggregate_case_dice(dice, index, self.label_set.region_names)
        for name, value in per_region.items():
            # Identical on every rank already (synced buffers); sync_dist averages equal values.
            self.log(f"val_dice_{name}", value, on_epoch=True, prog_bar=name == "mean", sync_dist=True)


def aggregate_case_dice(
    dice: torch.Tensor, case_index: torch.Tensor | None = None, names: tuple[str, ...] = GLIOMA.region_names
) -> dict[str, float]:
    """``{"WT": ..., "TC": ..., "ET": ..., "mean": ...}``: mean Dice per region (``names``) over cases,
    plus their mean, from ``(N, R)`` per-case Dice; NaN means skipped (by MONAI, or every case), not
    zero. Cases repeated in the ``(N, 1)`` ``case_index`` (DDP padding) count once."""
    dice = dice.detach().float().cpu().reshape(-1, len(names))
    if case_index is not None:
        index = case_index.detach().cpu().reshape(-1).long()
        keep = [int(torch.nonzero(index == i)[0]) for i in torch.unique(index)]
        dice = dice[keep]
    per_region = {name: float(torch.nanmean(dice[:, i])) for i, name in enumerate(names)}
    finite = [v for v in per_region.values() if not math.isnan(v)]
    per_region["mean"] = float(sum(finite) / len(finite)) if finite else float("nan")
    return per_region


def detection_auc(truth: Any, scores: Any) -> float:
    """ROC AUC (scikit-learn) of ``scores`` for binary ``truth``; NaN unless both classes are present."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth) > 0.5
    if truth.size == 0 or truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, np.asarray(scores, dtype=np.float64)))
