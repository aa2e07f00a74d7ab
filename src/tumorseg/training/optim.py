"""Optimisers and learning-rate schedules chosen by name in params.yaml's ``train:`` section.

The factories are :func:`functools.partial` objects over module-level functions, so the
LightningModule holding them pickles into ``ddp_spawn`` workers.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from tumorseg.training.config import TrainConfig


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``train.optimizer`` over ``params`` (parameters, or groups whose
    ``lr_scale`` multiplies ``train.lr``)."""
    from monai.optimizers import Novograd

    params = list(params)
    if params and isinstance(params[0], dict):
        params = [
            {**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": cfg.lr * g.get("lr_scale", 1.0)}
            for g in params
        ]

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "novograd": Novograd}[cfg.optimizer]
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig
) -> dict[str, Any] | None:
    """Lightning ``lr_scheduler`` config for ``train.scheduler`` (None: constant LR).

    ``cosine`` and ``poly`` step per optimiser step after a linear warm-up of ``warmup_epochs``;
    ``plateau`` steps after each validation on the mean Dice.
    """
    from torch.optim.lr_scheduler import LinearLR, PolynomialLR, ReduceLROnPlateau, SequentialLR

    if cfg.scheduler == "none":
        return None
    if cfg.scheduler == "plateau":
        scheduler = ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
        return {
            "scheduler": scheduler,
            "monitor": "val_dice_mean",
            "interval": "epoch",
            "frequency": cfg.val_every_n_epochs,
        }
    # a warm-up longer than the run (e.g. `-S train.max_epochs=1`) is cut to the run
    warmup = min(int(round(total_steps * cfg.warmup_epochs / cfg.max_epochs)), max(total_steps - 1, 0))
    if cfg.scheduler == "cosine":
        from monai.optimizers import WarmupCosineSchedule

        scheduler = WarmupCosineSchedule(
            optimizer, warmup_steps=warmup, t_total=total_steps, end_lr=cfg.min_lr, warmup_multiplier=0.01
        )
    else:
        poly = PolynomialLR(optimizer, total_iters=max(total_steps - warmup, 1), power=cfg.poly_power)
        if warmup > 0:
            ramp = LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
            scheduler = SequentialLR(optimizer, [ramp, poly], milestones=[warmup])
        else:
            scheduler = poly
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}


def optimizer_factory(cfg: TrainConfig) -> partial:
    """``params -> optimizer`` for :class:`~tumorseg.models.lightning_module.SegmentationModule`."""
    return partial(make_optimizer, cfg=cfg)


def scheduler_factory(cfg: TrainConfig) -> partial:
    """``(optimizer, total_steps) -> lr_scheduler config`` for the LightningModule."""
    return partial(make_scheduler, cfg=cfg)
