"""Dataset-level summaries of per-case scores: statistics, bootstrap CIs, tumour detection, clean JSON.

Per region (whatever the table holds, in its order) and metric: mean, median, sample std and a
percentile-bootstrap CI of the mean (``default_rng(seed)``, the same resampled case sets for every
metric and region). Detection treats "the reference has a whole tumour" as positive; sensitivity
and specificity where their class exists, ROC AUC of the predicted WT volume when both do. 2-D
images resample patients, not images (:func:`patient_mean_ci`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

SUMMARY_METRICS: tuple[str, ...] = (
    "dice",
    "iou",
    "precision",
    "sensitivity",
    "specificity",
    "hd95",
    "assd",
    "lesion_dice",
    "lesion_hd95",
    "volume_ref_ml",
    "volume_pred_ml",
)


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def bootstrap_mean_ci(
    values: np.ndarray, indices: np.ndarray, ci_level: float
) -> tuple[float | None, float | None]:
    """Percentile-bootstrap CI ``(low, high)`` of the mean of ``(N,)`` values; (None, None) without cases.

    ``indices`` is ``(B, N)`` resampled case indices, shared across metrics so CIs are paired.
    """
    if values.size == 0:
        return None, None
    return percentile_ci(values[indices].mean(axis=1), ci_level)


def percentile_ci(means: Any, ci_level: float) -> tuple[float, float]:
    """The central ``ci_level`` interval of bootstrap ``means``."""
    alpha = (1.0 - ci_level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def patient_mean_ci(
    values: np.ndarray, patient_ids: np.ndarray, *, resamples: int, ci_level: float, seed: int
) -> dict[str, Any]:
    """Mean with a patient-level percentile-bootstrap CI: ``value``, ``ci_low``, ``ci_high`` and counts."""
    from tumorseg.models.planar_detection import patient_bootstrap_indices

    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n_images": 0, "n_patients": 0}
    means = [values[idx].mean() for idx in patient_bootstrap_indices(patient_ids, resamples, seed)]
    low, high = percentile_ci(means, ci_level)
    return {
        "value": float(values.mean()),
        "ci_low": low,
        "ci_high": high,
        "n_images": int(values.size),
        "n_patients": int(len(np.unique(np.asarray(patient_ids).astype(str)))),
    }


def describe(values: np.ndarray, indices: np.ndarray, ci_level: float) -> dict[str, Any]:
    """Mean, median, sample std and bootstrap CI of one metric over cases (None where undefined)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "ci_low": None, "ci_high": None}
    low, high = bootstrap_mean_ci(values, indices, ci_level)
    return {
        "n": int(values.size),
        "mean": _finite_or_none(values.mean()),
        "median": _finite_or_none(np.median(values)),
        "std": _finite_or_none(values.std(ddof=1)) if values.size > 1 else 0.0,
        "ci_low": low,
        "ci_high": high,
    }


def region_order(per_case: pd.DataFrame) -> list[str]:
    """The regions of a long table in the order they first appear (the convention's own order)."""
    return list(dict.fromkeys(per_case["region"].astype(str))) if "region" in per_case else []


def region_statistics(
    per_case: pd.DataFrame, *, resamples: int, ci_level: float, seed: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{region: {metric: describe(...)}}`` over the long table's :data:`SUMMARY_METRICS` columns."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for region in region_order(per_case):
        rows = per_case[per_case["region"] == region].sort_values("case_id")
        if rows.empty:
            continue
        # same seed and case count: the same resampled case sets for every region and metric
        n = len(rows)
        indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
        out[region] = {
            metric: describe(rows[metric].to_numpy(dtype=np.float64), indices, ci_level)
            for metric in SUMMARY_METRICS
            if metric in rows.columns
        }
    return out


def detection_summary(per_case: pd.DataFrame, min_volume_ml: float) -> dict[str, Any]:
    """Case-level "tumour present" detection: positive when predicted WT volume > ``min_volume_ml``."""
    wt = per_case[per_case["region"] == "WT"]
    truth = wt["volume_ref_ml"].to_numpy(dtype=np.float64) > 0
    score = wt["volume_pred_ml"].to_numpy(dtype=np.float64)
    called = score > min_volume_ml
    tp = int(np.sum(truth & called))
    fn = int(np.sum(truth & ~called))
    fp = int(np.sum(~truth & called))
    tn = int(np.sum(~truth & ~called))
    roc_auc = None
    if truth.any() and (~truth).any():
        from sklearn.metrics import roc_auc_score

        roc_auc = float(roc_auc_score(truth, score))
    return {
        "threshold_ml": float(min_volume_ml),
        "positives": int(truth.sum()),
        "negatives": int((~truth).sum()),
        "tp": tp,
        "fn": fn,
        "fp": fp,
        "tn": tn,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "roc_auc": roc_auc,
    }


def build_summary(
    per_case: pd.DataFrame,
    *,
    resamples: int,
    ci_level: float,
    seed: int,
    detection_min_volume_ml: float,
    tumour_types: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``{"n_cases", "bootstrap", "regions", "detection", "per_tumour_type"?}``, written as JSON.

    ``tumour_types`` (case id -> type) adds ``per_tumour_type`` statistics for the cases it names.
    """
    stats_kwargs = {"resamples": resamples, "ci_level": ci_level, "seed": seed}
    summary: dict[str, Any] = {
        "n_cases": int(per_case["case_id"].nunique()),
        "bootstrap": {"resamples": resamples, "ci_level": ci_level, "seed": seed, "statistic": "mean"},
        "regions": region_statistics(per_case, **stats_kwargs),
        "detection": detection_summary(per_case, detection_min_volume_ml),
    }
    if tumour_types:
        types = per_case["case_id"].map(tumour_types)
        summary["per_tumour_type"] = {
            str(kind): {
                "n_cases": int(group["case_id"].nunique()),
                "regions": region_statistics(group, **stats_kwargs),
            }
            for kind, group in per_case[types.notna()].groupby(types[types.notna()], sort=True)
        }
    return summary


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of nested metrics as ``a.b.value`` keys (MLflow metric names)."""
    from tumorseg.tracking import flatten

    return {
        name: float(value)
        for name, value in flatten(metrics, prefix).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    }


def clean_json(value: Any) -> Any:
    """``value`` as plain JSON: str keys, lists, floats rounded to 6 digits (non-finite -> None)."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
