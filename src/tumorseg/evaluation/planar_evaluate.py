"""``tumorseg evaluate-model --dims 2``: choose the detector on validation, score the test split, register.

The test split (patient-level held out) is only scored, each figure with a patient-level bootstrap CI:
Dice and HD95 in pixels (2-D sources carry no spacing) on the source image where its file and geometry
are known (``scored_on``), detection and tumour-type accuracy. Empty masks as in 3-D: both empty ->
Dice 1, HD95 0; one empty -> Dice 0, HD95 the image diagonal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from tumorseg.config import Section
from tumorseg.data.manifest import atomic_write_text
from tumorseg.data.planar import TUMOUR_TYPES, PlanarGeometry, read_planar, restore_planar_mask
from tumorseg.errors import DataError
from tumorseg.models.planar_detection import (
    binary_detection_metrics,
    choose_detector,
    patient_bootstrap_indices,
)
from tumorseg.models.planar_predictor import binary_mask, score_preprocessed
from tumorseg.tracking import flatten

log = logging.getLogger(__name__)


class DetectConfig(Section):
    """``detect:`` how the tumour / no-tumour detector is chosen on the validation split.

    Attributes:
        method: ``auto`` (the better on validation), ``classifier`` (the CNN's tumour probability) or
            ``area_rule`` (the segmentation's predicted tumour area).
        selection_metric: what ``auto`` compares: ``auc`` (ties: accuracy) or ``accuracy``.
        threshold: ``youden`` (maximises sensitivity + specificity on validation) or ``fixed``.
    """

    method: Literal["auto", "classifier", "area_rule"] = "auto"
    selection_metric: Literal["auc", "accuracy"] = "auc"
    threshold: Literal["youden", "fixed"] = "youden"
    fixed_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    model_name: str = Field("tumorseg-detect", min_length=1, max_length=256)


class EvaluatePlanarConfig(Section):
    """``evaluate_2d:`` test metrics of the 2-D models (patient-level bootstrap CIs); registration."""

    bootstrap_resamples: int = Field(2000, ge=100)
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 42
    register_models: bool = True
    model_name: str = Field("tumorseg-2d", min_length=1, max_length=256)


REPORT_FILES = {
    "metrics": "metrics.json",
    "summary": "test_summary.json",
    "per_case": "test_per_case.csv",
    "dice_plot": "plots/test_dice.csv",
    "size_plot": "plots/test_volumes.csv",
}
VERSION_FILE = "model_version.json"
RECORD_COLUMNS = ("case_id", "patient_id", "source", "has_tumour", "tumour_type", "has_mask")
"""Columns of ``test_per_case.csv`` copied from the split record."""


@dataclass
class PlanarEvaluation:
    """What the 2-D evaluation measured (``metrics`` as in ``test_summary.json``, one ``per_case`` row per
    image), wrote, and registered (``{"segmentation": RegisteredVersion, "detection": ...}`` or empty)."""

    metrics: dict[str, Any]
    per_case: pd.DataFrame
    registered: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def one_line(self) -> str:
        seg = self.metrics["segmentation"].get("dice_tumour") or {}
        det = self.metrics["detection"]

        def v(m: dict[str, Any] | None) -> str:
            return "n/a" if not m or m.get("value") is None else f"{m['value']:.3f}"

        text = (
            f"test Dice {v(seg)}; detector {det['method']}: accuracy {v(det.get('accuracy'))}, "
            f"sensitivity {v(det.get('sensitivity'))}, specificity {v(det.get('specificity'))}, AUC {v(det.get('auc'))} "
            f"({det['n_images']} images)"
        )
        if self.registered:
            text += "; registered " + ", ".join(f"{r.name} v{r.version}" for r in self.registered.values())
        return text


def segmentation_scores(
    pred: np.ndarray, ref: np.ndarray, penalty: float | None = None
) -> tuple[float, float]:
    """Dice and HD95 (pixels, MONAI) of 2-D binary masks; ``penalty``: HD95 when one mask is empty."""
    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    if penalty is None:
        penalty = float(np.hypot(*pred.shape))
    if not pred.any() and not ref.any():
        return 1.0, 0.0
    if not pred.any() or not ref.any():
        return 0.0, float(penalty)
    from monai.metrics import compute_hausdorff_distance

    dice = 2.0 * float(np.sum(pred & ref)) / float(pred.sum() + ref.sum())
    import torch

    pred_t, ref_t = torch.as_tensor(pred[None, None]), torch.as_tensor(ref[None, None])
    hd95 = compute_hausdorff_distance(pred_t, ref_t, include_background=True, percentile=95)
    return dice, float(hd95.reshape(-1)[0])


def patient_mean_ci(
    values: np.ndarray, patient_ids: np.ndarray, *, resamples: int, ci_level: float, seed: int
) -> dict[str, Any]:
    """Mean with a patient-level percentile-bootstrap CI: ``value``, ``ci_low``, ``ci_high`` and counts."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n_images": 0, "n_patients": 0}
    means = [values[idx].mean() for idx in patient_bootstrap_indices(patient_ids, resamples, seed)]
    alpha = (1.0 - ci_level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {
        "value": float(values.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "n_images": int(values.size),
        "n_patients": int(len(np.unique(np.asarray(patient_ids).astype(str)))),
    }


def _run_split(model: Any, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Network outputs of a split's images: tumour maps, classifier outputs, binary masks, areas."""
    from tumorseg.data.planar_datamodule import load_sample  # Lightning: only when scoring

    samples = [load_sample(r) for r in records]
    images = np.stack([s["image"][0] for s in samples]) if samples else np.zeros((0, 1, 1), np.float32)
    maps, classes = score_preprocessed(model, images)
    settings = model.settings
    cleaned = [binary_mask(m, settings.mask_threshold, settings.min_component_px) for m in maps]
    masks = np.stack(cleaned) if cleaned else maps
    return {
        "classes": classes,
        "masks": masks,
        "areas": masks.reshape(len(masks), -1).sum(axis=1).astype(np.float64) if len(masks) else np.zeros(0),
        "refs": np.stack([s["mask"][0] for s in samples]) if samples else images,
        "truth": np.array([r["has_tumour"] for r in records], dtype=bool),
    }


def source_masks(
    record: dict[str, Any], grid_pred: np.ndarray, grid_ref: np.ndarray
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(prediction, reference, "source" | "grid")``: the restored prediction and the original file's
    mask (all zero when it has none) where the original can be read, else both on the preprocessed grid."""
    path = Path(record.get("source_path") or "")
    if not record.get("geometry") or not path.is_file():
        return grid_pred, grid_ref, "grid"
    try:
        original = read_planar(path)
    except DataError as exc:
        log.warning("%s: scored on the preprocessed grid (%s)", record["case_id"], exc)
        return grid_pred, grid_ref, "grid"
    pred = restore_planar_mask(grid_pred, PlanarGeometry.from_json(record["geometry"]))
    ref = original.mask if original.mask is not None else np.zeros(pred.shape, dtype=np.uint8)
    if ref.shape != pred.shape:
        return grid_pred, grid_ref, "grid"
    return pred, ref, "source"


def reference_digest(record: dict[str, Any]) -> str:
    """sha256 of a test image's preprocessed and original files and labels (the gate pairs versions on it)."""
    digest = hashlib.sha256(Path(record["npz"]).read_bytes())
    source = Path(record.get("source_path") or "")
    if source.is_file():
        digest.update(source.read_bytes())
    digest.update(f"{record['has_tumour']}|{record['tumour_type']}|{record['has_mask']}".encode())
    return digest.hexdigest()


def detect_and_score(
    model: Any, records: dict[str, list[dict[str, Any]]], det_cfg: DetectConfig
) -> tuple[pd.DataFrame, np.ndarray]:
    """Choose the detector on validation (sets ``model.detector``); the test table and probabilities."""
    val = _run_split(model, records["val"])
    model.detector = choose_detector(
        val["truth"],
        val["classes"][:, 0],
        val["areas"],
        method=det_cfg.method,
        selection_metric=det_cfg.selection_metric,
        threshold_rule=det_cfg.threshold,
        fixed_threshold=det_cfg.fixed_threshold,
    )
    test = _run_split(model, records["test"])
    probability = model.detector.probability(test["classes"][:, 0], test["areas"])
    called = probability >= model.detector.threshold
    return _per_case_table(records["test"], test, probability, called), probability


def _per_case_table(
    records: list[dict[str, Any]], test: dict[str, np.ndarray], probability: np.ndarray, called: np.ndarray
) -> pd.DataFrame:
    """One row per test image: the detector's call and type; Dice/HD95 and areas where a mask exists."""
    rows = []
    for i, record in enumerate(records):
        row = {
            **{key: record[key] for key in RECORD_COLUMNS},
            "probability": float(probability[i]),
            "predicted": bool(called[i]),
            "correct": float(bool(called[i]) == record["has_tumour"]),
            "classifier_probability": float(test["classes"][i, 0]),
            "area_px": float(test["areas"][i]),
            "predicted_type": TUMOUR_TYPES[int(np.argmax(test["classes"][i, 1:]))],
            "dice": math.nan,
            "hd95_px": math.nan,
            "scored_on": "",
            "ref_px": math.nan,
            "pred_px": math.nan,
        }
        if record["has_mask"]:
            pred, ref, row["scored_on"] = source_masks(record, test["masks"][i], test["refs"][i])
            row["dice"], row["hd95_px"] = segmentation_scores(pred, ref)
            row["ref_px"], row["pred_px"] = float(np.count_nonzero(ref)), float(np.count_nonzero(pred))
        rows.append(row)
    return pd.DataFrame(rows)


def test_metrics(
    per_case: pd.DataFrame, probability: np.ndarray, detector: Any, stats: dict[str, Any]
) -> dict[str, Any]:
    """Segmentation, detection and tumour-type figures of the test split, each with a patient-level CI."""

    def ci(frame: pd.DataFrame, column: str = "dice") -> dict[str, Any]:
        return patient_mean_ci(frame[column], frame["patient_id"], **stats)

    masked = per_case[per_case["has_mask"]]
    tumour = masked[masked["has_tumour"]]
    typed = per_case[per_case["has_tumour"] & per_case["tumour_type"].isin(TUMOUR_TYPES)]
    hits = (typed["predicted_type"] == typed["tumour_type"]).astype(float)
    truth, patients = per_case["has_tumour"].to_numpy(), per_case["patient_id"].to_numpy()
    detection = binary_detection_metrics(truth, probability, detector.threshold, patients, **stats)
    return {
        "n_test_images": int(len(per_case)),
        "n_test_patients": int(per_case["patient_id"].nunique()),
        "segmentation": {
            "dice_tumour": ci(tumour),
            "hd95_px_tumour": ci(tumour, "hd95_px"),
            "dice_all": ci(masked),
            "tumour_free_empty_rate": ci(masked[~masked["has_tumour"]]),
            "per_tumour_type": {
                kind: {"n_images": int(len(group)), "dice": ci(group), "hd95_px": ci(group, "hd95_px")}
                for kind, group in tumour.groupby("tumour_type", sort=True)
            },
        },
        "detection": {"method": detector.method, "validation": detector.validation, **detection},
        "type_classification": {
            "accuracy": patient_mean_ci(hits, typed["patient_id"], **stats),
            "confusion": {  # true type -> predicted type -> images
                kind: {p: int((group["predicted_type"] == p).sum()) for p in TUMOUR_TYPES}
                for kind, group in typed.groupby("tumour_type", sort=True)
            },
        },
        "bootstrap": {**stats, "unit": "patient"},
    }


def write_reports(reports: Path, metrics: dict[str, Any], per_case: pd.DataFrame) -> dict[str, Path]:
    """The evaluation's files, named as the 3-D evaluation's, so one DVC stage declares both."""
    files = {key: reports / name for key, name in REPORT_FILES.items()}
    files["dice_plot"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        files["metrics"], json.dumps({"test": flat_metrics(clean_json(metrics))}, indent=2) + "\n"
    )
    atomic_write_text(files["summary"], json.dumps(clean_json(metrics), indent=2) + "\n")
    atomic_write_text(files["per_case"], per_case.to_csv(index=False))
    masked = per_case[per_case["has_mask"]]
    atomic_write_text(files["dice_plot"], masked[["case_id", "dice", "hd95_px"]].to_csv(index=False))
    atomic_write_text(files["size_plot"], masked[["case_id", "ref_px", "pred_px"]].to_csv(index=False))
    return files


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of the nested metrics as ``a.b.value`` keys (MLflow metric names)."""
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
