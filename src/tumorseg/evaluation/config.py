"""Evaluation-layer params.yaml sections: light pydantic models (no torch import), read by the root config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tumorseg.config import Section


class DetectConfig(Section):
    """``detect:`` how the tumour / no-tumour detector is chosen on the validation split.

    Attributes:
        method: ``auto`` (the better on validation), ``classifier`` (the CNN's tumour probability) or
            ``area_rule`` (the segmentation's predicted tumour area).
        selection_metric: what ``auto`` compares: ``auc`` (ties: accuracy) or ``accuracy``.
        threshold: ``youden`` (maximises sensitivity + specificity on validation), ``accuracy`` (maximises
            validation accuracy) or ``fixed``.
    """

    method: Literal["auto", "classifier", "area_rule"] = "auto"
    selection_metric: Literal["auc", "accuracy"] = "auc"
    threshold: Literal["youden", "accuracy", "fixed"] = "youden"
    fixed_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    model_name: str = Field("tumorseg-detect", min_length=1, max_length=256)


class EvaluatePlanarConfig(Section):
    """``evaluate_2d:`` test metrics of the 2-D models (patient-level bootstrap CIs); registration."""

    bootstrap_resamples: int = Field(2000, ge=100)
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 42
    register_models: bool = True
    model_name: str = Field("tumorseg-2d", min_length=1, max_length=256)
