"""Segmentation losses built by name from params.yaml's ``loss:`` section.

Inputs are logits ``(B, C, *spatial)``; targets are ``(B, R, *spatial)`` 0/1 region masks
(``model.output: regions``: WT, TC, ET overlap, so each channel is an independent sigmoid)
or ``(B, 1, *spatial)`` canonical labels (``model.output: labels``: softmax over the labels).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tumorseg.errors import ConfigError
from tumorseg.models.config import LossConfig


class DiceBCELoss(nn.Module):
    """(Dice +) binary cross-entropy over independent sigmoid channels, on 0/1 masks of any dtype.

    Hand-written: MONAI's ``DiceCELoss`` applies *softmax* cross-entropy to several channels, which is
    wrong for overlapping WT/TC/ET regions. Without ``dice`` it is plain BCE (``loss.name: bce``).
    """

    def __init__(
        self, dice: nn.Module | None = None, lambda_dice: float = 1.0, lambda_bce: float = 1.0
    ) -> None:
        super().__init__()
        self.dice = dice
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        if self.dice is None:
            return self.bce(logits, target)
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * self.bce(logits, target)


class CrossEntropyOnLabels(nn.Module):
    """Cross-entropy on ``(B, 1, *spatial)`` labels (torch wants ``(B, *spatial)`` longs)."""

    def __init__(self) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, target[:, 0].long())


def build_loss(cfg: LossConfig, output: Literal["regions", "labels"]) -> nn.Module:
    """The loss for ``cfg.name`` and ``output`` (ConfigError for ``bce`` with labels, ``ce`` with regions)."""
    from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss

    regions = output == "regions"
    if cfg.name == "bce" and not regions:
        raise ConfigError("loss.name: bce needs model.output: regions; use ce (or dice_ce) for labels")
    if cfg.name == "ce" and regions:
        raise ConfigError("loss.name: ce needs model.output: labels; use bce (or dice_ce) for regions")
    act = {"sigmoid": True} if regions else {"softmax": True, "to_onehot_y": True}
    dice_kwargs = dict(
        include_background=regions or cfg.include_background,
        squared_pred=cfg.squared_pred,
        smooth_nr=cfg.smooth_nr,
        smooth_dr=cfg.smooth_dr,
        batch=cfg.batch,
        **act,
    )
    if cfg.name == "dice":
        return DiceLoss(**dice_kwargs)
    if cfg.name == "dice_focal":
        return DiceFocalLoss(
            **dice_kwargs, gamma=cfg.focal_gamma, lambda_dice=cfg.lambda_dice, lambda_focal=cfg.lambda_ce
        )
    if cfg.name == "bce":
        return DiceBCELoss()
    if cfg.name == "ce":
        return CrossEntropyOnLabels()
    # dice_ce
    if regions:
        return DiceBCELoss(DiceLoss(**dice_kwargs), cfg.lambda_dice, cfg.lambda_ce)
    return DiceCELoss(**dice_kwargs, lambda_dice=cfg.lambda_dice, lambda_ce=cfg.lambda_ce)


def with_deep_supervision(loss: nn.Module, weight_mode: str) -> nn.Module:
    """Wrap ``loss`` for DynUNet deep-supervision outputs ``(B, heads, C, *spatial)``."""
    from monai.losses import DeepSupervisionLoss

    return DeepSupervisionLoss(loss, weight_mode=weight_mode)
