"""Fine-tuning a pruned network back to accuracy with training's own LightningModule, loss, data and
optimiser, plus distillation from the fp32 network (Hinton et al. 2015), a cosine schedule without
warm-up, and the weights of the best validation ``val_dice_mean`` kept (the test split only scores).
Volumes (``dims=3``) and the 2-D model (``dims=2``) differ only in data and module: :data:`RECIPES`.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tumorseg.compression.config import PruningConfig
from tumorseg.config import section
from tumorseg.errors import DataError
from tumorseg.params import Params, as_params
from tumorseg.training.callbacks import TrainingProgress

log = logging.getLogger(__name__)

DISTILLATION_LOSSES = ("mse", "kl")


@dataclass
class FineTuneResult:
    """What a fine-tune did: ``best_step`` whose weights were kept (0: the pruned ones) and their
    ``best_val_dice`` (None without validation); ``curve``: ``[step, val mean Dice]`` per validation."""

    steps: int
    best_step: int
    best_val_dice: float | None
    curve: list[list[float]] = field(default_factory=list)
    train_loss: float | None = None
    seconds: float = 0.0


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, kind: str, output: str, temperature: float = 1.0
) -> torch.Tensor:
    """How far the student's logits ``(B, C, *spatial)`` are from the teacher's (a scalar, 0 when equal).

    Here because neither MONAI nor torch distils sigmoid region outputs. ``kind``: ``mse`` (logit
    matching, Ba & Caruana 2014) or ``kl`` of the probabilities softened by ``temperature`` T (binary per
    voxel for ``regions``, softmax over C for ``labels``), times T^2 to keep gradients' size.
    """
    import torch.nn.functional as F

    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind != "kl":
        raise ValueError(f"unknown distillation loss {kind!r}; use one of {DISTILLATION_LOSSES}")
    t = temperature
    if output == "regions":
        # Binary KL(p_t || p_s) per voxel = BCE(s, p_t) - H(p_t); the entropy term makes it 0 at agreement.
        target = torch.sigmoid(teacher / t)
        cross = F.binary_cross_entropy_with_logits(student / t, target)
        entropy = F.binary_cross_entropy_with_logits(teacher / t, target)
        return (cross - entropy) * t * t
    log_student = F.log_softmax(student / t, dim=1)
    log_teacher = F.log_softmax(teacher / t, dim=1)
    voxels = student.numel() // student.shape[1]
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="sum") / voxels * t * t


def _distilling_module_class() -> type:
    """:class:`SegmentationModule` with a distillation term (built lazily: Lightning imports slowly)."""
    from tumorseg.data.transforms import IMAGE_KEY
    from tumorseg.models.lightning_module import SegmentationModule

    class DistillingSegmentationModule(SegmentationModule):
        """``loss = task loss + weight * distillation_loss(student, teacher)`` (no teacher: task loss); with
        classifier heads the task loss includes their terms and the segmentation logits are distilled."""

        def __init__(
            self,
            *args: Any,
            teacher: nn.Module | None = None,
            weight: float = 0.0,
            kind: str = "mse",
            temperature: float = 1.0,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.teacher = teacher.requires_grad_(False) if teacher is not None and weight > 0 else None
            self.distill_weight = weight
            self.distill_kind = kind
            self.temperature = temperature

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            if self.teacher is None:
                return super().training_step(batch, batch_idx)
            image = batch[IMAGE_KEY]
            outputs = self.network(image)
            self.teacher.eval()  # Lightning puts every submodule in train mode
            with torch.no_grad():
                soft = self.teacher(image)
            if self.heads is not None:  # images: (segmentation, class logits); the segmentation is distilled
                (logits, class_logits), soft = outputs, soft[0]
                detection, kind = self.heads.losses(class_logits.float(), batch)
                classes = self.heads.detection_weight * detection + self.heads.type_weight * kind
            else:
                logits, classes = outputs, 0.0
            logits = logits.float()
            task = self._segmentation_loss(logits, batch) + classes
            # deep supervision (B, heads, C, *spatial): distil the main head
            main = logits[:, 0] if logits.dim() == image.dim() + 1 else logits
            distill = distillation_loss(
                main, soft.float(), kind=self.distill_kind, output=self.output, temperature=self.temperature
            )
            loss = task + self.distill_weight * distill
            size = image.shape[0]
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
            self.log("train_task_loss", task, on_step=False, on_epoch=True, batch_size=size)
            self.log("train_distill_loss", distill, on_step=False, on_epoch=True, batch_size=size)
            return loss

    return DistillingSegmentationModule


def best_weights_callback(network: nn.Module, result: FineTuneResult) -> Any:
    """Lightning callback recording the validation curve and keeping the best weights in memory (not
    ``ModelCheckpoint``: the weights before the first step are candidates too, and no disk round trip)."""
    import lightning as L

    class BestValidationWeights(L.Callback):
        def __init__(self) -> None:
            self.best: dict[str, torch.Tensor] | None = None

        def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            value = trainer.callback_metrics.get("val_dice_mean")
            if value is None or math.isnan(float(value)):
                return
            step = int(trainer.global_step)
            score = float(value)
            result.curve.append([step, round(score, 6)])
            log.info("fine-tune: step %d validation Dice mean %.4f", step, score)
            if result.best_val_dice is None or score > result.best_val_dice:
                result.best_val_dice, result.best_step = score, step
                self.best = copy.deepcopy(network.state_dict())

    return BestValidationWeights()


def _with_repeated_tumour_free(
    records: list[dict[str, Any]], preprocessed_dir: str, repeat: int
) -> list[dict[str, Any]]:
    """``records`` with each tumour-free case (``has_tumour`` in ``index.csv``) listed ``repeat`` times."""
    import pandas as pd

    from tumorseg.data.preprocess import INDEX_NAME

    index_file = Path(preprocessed_dir) / INDEX_NAME
    if not index_file.is_file():
        raise DataError(f"{index_file}: missing; rerun `tumorseg preprocess` (needed by tumour_free_repeat)")
    index = pd.read_csv(index_file, dtype=str, keep_default_na=False)
    free = set(index.loc[index["has_tumour"] == "False", "case_id"])
    extra = [dict(record) for record in records if record["case_id"] in free for _ in range(repeat - 1)]
    cases = len({r["case_id"] for r in extra})
    log.info("fine-tune: %d tumour-free training cases drawn %dx as often", cases, repeat)
    return records + extra


def fine_tune(
    network: nn.Module,
    trained: Any,
    params: Params | dict[str, Any],
    *,
    steps: int,
    cfg: PruningConfig,
    teacher: nn.Module | None = None,
    source: str = "params.yaml",
    dims: int = 3,
) -> FineTuneResult:
    """Train the pruned ``network`` in place for ``steps`` optimiser steps with the model's own recipe.

    Loss, augmentation, sampling and optimiser come from the sections stored with ``trained`` (a
    volume model, or a 2-D model for ``dims=2``), the data from ``params``, lr, schedule, validation and
    distillation from ``cfg``. Pruning masks stay applied; the ``teacher`` is copied and frozen; no
    checkpoint or logger is written. DataError: no training cases, or validation asked for without
    validation cases.
    """
    params = as_params(params, source)
    if steps <= 0:
        return FineTuneResult(steps=0, best_step=0, best_val_dice=None)
    import lightning as L

    start = time.perf_counter()
    recipe = RECIPES[dims]
    val_every = cfg.val_every
    train_cfg = _fine_tune_train_config(
        section(recipe.train_section, trained.config), cfg.fine_tune_lr, cfg.fine_tune_schedule
    )
    records, val_records = recipe.records(params, cfg, source)
    distill = dict(weight=cfg.distill_weight, kind=cfg.distill_loss, temperature=cfg.distill_temperature)
    frozen = copy.deepcopy(teacher).eval() if teacher is not None and cfg.distill_weight > 0 else None
    module = recipe.module(network, trained, train_cfg, cfg.fine_tune_schedule == "cosine", frozen, distill)
    datamodule = recipe.datamodule(trained, train_cfg, records, val_records, steps)
    result = FineTuneResult(steps=steps, best_step=steps, best_val_dice=None)
    # the best-weights callback first (read back below), then progress lines with the time left
    callbacks = [best_weights_callback(network, result)] if val_every > 0 else []
    callbacks.append(TrainingProgress(label="fine-tune"))
    L.seed_everything(train_cfg.seed, workers=True, verbose=False)
    with tempfile.TemporaryDirectory(prefix="tumorseg-finetune-") as tmp:
        trainer = _fine_tune_trainer(params.trainer.accelerator, steps, val_every, callbacks, tmp)
        _fit(trainer, module, datamodule, network, result, val_every)
    network.cpu().eval()
    if val_every > 0 and callbacks[0].best is not None:
        network.load_state_dict(callbacks[0].best)
    result.seconds = time.perf_counter() - start
    return result


def _fine_tune_train_config(train_cfg: Any, lr: float, schedule: str) -> Any:
    """The model's own ``train`` (``train_2d``) section with the fine-tune's learning rate and schedule
    (no warm-up)."""
    scheduler = "cosine" if schedule == "cosine" else "none"
    return train_cfg.model_copy(
        update={"lr": lr, "scheduler": scheduler, "warmup_epochs": 0.0, "min_lr": 0.0}
    )


def _fine_tune_records(
    paths: Any, val_every: int, val_cases: int, tumour_free_repeat: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and validation case records of the fine-tune (``paths.split``'s ``train`` and ``val``)."""
    from tumorseg.data.datamodule import case_records, read_split

    split = read_split(paths.split)
    if not split.get("train"):
        raise DataError(f"{paths.split}: no 'train' cases to fine-tune the pruned network on")
    val_ids = list(split.get("val", []))
    if val_every > 0 and not val_ids:
        raise DataError(
            f"{paths.split}: no 'val' cases to choose the fine-tuned weights on; "
            "set compress.pruning.val_every: 0 or rerun `tumorseg split` with a val share"
        )
    if val_cases > 0:
        val_ids = val_ids[:val_cases]
    records = case_records(paths.preprocessed, split["train"])
    if tumour_free_repeat > 1:
        records = _with_repeated_tumour_free(records, paths.preprocessed, tumour_free_repeat)
    val_records = case_records(paths.preprocessed, val_ids) if val_every > 0 else []
    return records, val_records


def _optimisation(train_cfg: Any, scheduled: bool) -> dict[str, Any]:
    """The optimiser and (``scheduled``) schedule factories of a ``train``/``train_2d`` section."""
    from tumorseg.training.optim import optimizer_factory, scheduler_factory

    return {
        "optimizer_factory": optimizer_factory(train_cfg),
        "scheduler_factory": scheduler_factory(train_cfg) if scheduled else None,
    }


class _Volumes:
    """``dims=3``: training's patches of the preprocessed volumes and its module (loss by name, deep
    supervision, sliding-window validation)."""

    train_section = "train"

    def records(
        self, params: Params, cfg: PruningConfig, source: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return _fine_tune_records(params.paths, cfg.val_every, cfg.val_cases, cfg.tumour_free_repeat)

    def module(
        self,
        network: nn.Module,
        trained: Any,
        train_cfg: Any,
        scheduled: bool,
        teacher: nn.Module | None,
        distill: dict[str, Any],
    ) -> Any:
        """The model's own LightningModule around ``network``, distilling from ``teacher``."""
        from tumorseg.models.losses import build_loss, with_deep_supervision

        stored = trained.config
        loss = build_loss(section("loss", stored), trained.model.output)
        if trained.model.name == "dynunet" and trained.model.dynunet.deep_supervision:
            loss = with_deep_supervision(loss, section("loss", stored).deep_supervision_weights)
        return _distilling_module_class()(
            network,
            loss,
            output=trained.model.output,
            roi_size=trained.roi_size,
            sliding_window=trained.sliding_window,
            config=stored,
            dice_ignore_empty=train_cfg.dice_ignore_empty,
            spacing_mm=trained.spacing_mm,
            teacher=teacher,
            **_optimisation(train_cfg, scheduled),
            **distill,
        )

    def datamodule(
        self,
        trained: Any,
        train_cfg: Any,
        records: list[dict[str, Any]],
        val_records: list[dict[str, Any]],
        steps: int,
    ) -> Any:
        from tumorseg.data.datamodule import SegmentationDataModule

        return SegmentationDataModule(
            records,
            val_records,
            trained.data_loader,
            section("augment", trained.config),
            patches_per_epoch=steps * trained.data_loader.batch_size,
            seed=train_cfg.seed,
        )


class _Images:
    """``dims=2``: the 2-D trainer's image draws and multi-task module (``train_2d`` stored with the
    model). Only the segmenter is pruned, so the classifier stays frozen: the detector's scores are
    the fp32 model's."""

    train_section = "train_2d"

    def records(
        self, params: Params, cfg: PruningConfig, source: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``paths.split_2d``'s ``train`` (tumour-free images ``tumour_free_repeat`` x) and ``val``."""
        from tumorseg.training.config import load_planar_training_config
        from tumorseg.training.train import planar_split_records

        split = planar_split_records(load_planar_training_config(params, source=source), source)
        records = split["train"]
        repeat = cfg.tumour_free_repeat - 1
        records = records + [dict(r) for r in records if not r["has_tumour"] for _ in range(repeat)]
        val_records = split["val"][: cfg.val_cases or None] if cfg.val_every > 0 else []
        return records, val_records

    def module(
        self,
        network: nn.Module,
        trained: Any,
        train_cfg: Any,
        scheduled: bool,
        teacher: nn.Module | None,
        distill: dict[str, Any],
    ) -> Any:
        from tumorseg.models.lightning_module import ClassifierHeads
        from tumorseg.models.losses import build_loss

        network.classifier.requires_grad_(False)  # left out of the optimiser
        return _distilling_module_class()(
            network,
            build_loss(train_cfg.loss, "regions"),  # one tumour channel, as the 2-D trainer
            config=trained.config,
            dice_ignore_empty=train_cfg.dice_ignore_empty,
            heads=ClassifierHeads(train_cfg.detection_weight, train_cfg.type_weight),
            teacher=teacher,
            **_optimisation(train_cfg, scheduled),
            **distill,
        )

    def datamodule(
        self,
        trained: Any,
        train_cfg: Any,
        records: list[dict[str, Any]],
        val_records: list[dict[str, Any]],
        steps: int,
    ) -> Any:
        from tumorseg.data.datamodule import PlanarDataModule

        return PlanarDataModule(
            records,
            val_records,
            train_cfg.augment,
            batch_size=train_cfg.batch_size,
            draws_per_epoch=steps * train_cfg.batch_size,
            num_workers=train_cfg.num_workers,
            seed=train_cfg.seed,
        )


RECIPES: dict[int, _Volumes | _Images] = {3: _Volumes(), 2: _Images()}
"""What a fine-tune trains on and with, by ``dims``."""


def _fine_tune_trainer(accelerator: str, steps: int, val_every: int, callbacks: list[Any], root: str) -> Any:
    """A ``Trainer`` for exactly ``steps`` steps, validating every ``val_every``; no logger or checkpoint."""
    import lightning as L

    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        max_epochs=1,
        limit_val_batches=None if val_every > 0 else 0,  # None: all (1.0 would print a note)
        val_check_interval=min(val_every, steps) if val_every > 0 else None,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def _fit(
    trainer: Any, module: Any, datamodule: Any, network: nn.Module, result: FineTuneResult, val_every: int
) -> None:
    """Validate the pruned weights (step 0), train, validate the last step; record the mean training loss."""
    if val_every > 0:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # step 0: the pruned weights
    network.train()  # Lightning keeps the mode it is given; a pruned copy arrives in eval mode
    trainer.fit(module, datamodule=datamodule)
    value = trainer.callback_metrics.get("train_loss")
    result.train_loss = float(value) if value is not None else None
    if val_every > 0 and result.curve and result.curve[-1][0] < result.steps:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the last step, if not yet
