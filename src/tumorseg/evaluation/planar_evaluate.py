"""The 2-D test split scored: the detector chosen on validation, then Dice and HD95 in pixels on the
source image where its file and geometry are known (``scored_on``), detection and tumour-type accuracy,
each with a patient-level bootstrap CI. Report files are named as the 3-D ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.data.manifest import atomic_write_text
from tumorseg.data.planar import TUMOUR_TYPES, PlanarGeometry, read_planar, restore_planar_mask
from tumorseg.errors import DataError
from tumorseg.evaluation.config import DetectConfig
from tumorseg.evaluation.metrics import PLANAR_OVERLAP, overlap_scores, segmentation_scores
from tumorseg.evaluation.pipeline_stage import METRICS_FILE, PER_CASE_FILE, PLOTS_DIR, SUMMARY_FILE
from tumorseg.evaluation.summary import clean_json, flatten_metrics, patient_mean_ci
from tumorseg.models.planar_detection import binary_detection_metrics, choose_detector
from tumorseg.models.predictor import binary_mask, score_preprocessed

log = logging.getLogger(__name__)


REPORT_FILES = {
    "metrics": METRICS_FILE,
    "summary": SUMMARY_FILE,
    "per_case": PER_CASE_FILE,
    "dice_plot": f"{PLOTS_DIR}/test_dice.csv",
    "size_plot": f"{PLOTS_DIR}/test_volumes.csv",
}
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


def _run_split(model: Any, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Network outputs of a split's images: tumour maps, classifier outputs, binary masks, areas."""
    from tumorseg.data.datamodule import load_sample  # Lightning: only when scoring

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
            **dict.fromkeys((*PLANAR_OVERLAP, "pixel_accuracy_empty"), math.nan),
            "scored_on": "",
            "ref_px": math.nan,
            "pred_px": math.nan,
        }
        if record["has_mask"]:
            pred, ref, row["scored_on"] = source_masks(record, test["masks"][i], test["refs"][i])
            row["dice"], row["hd95_px"] = segmentation_scores(pred, ref)
            row.update(overlap_scores(pred, ref))
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
            **{f"{name}_tumour": ci(tumour, name) for name in (*PLANAR_OVERLAP, "pixel_accuracy_empty")},
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
        files["metrics"], json.dumps({"test": flatten_metrics(clean_json(metrics))}, indent=2) + "\n"
    )
    atomic_write_text(files["summary"], json.dumps(clean_json(metrics), indent=2) + "\n")
    atomic_write_text(files["per_case"], per_case.to_csv(index=False))
    masked = per_case[per_case["has_mask"]]
    atomic_write_text(files["dice_plot"], masked[["case_id", "dice", "hd95_px"]].to_csv(index=False))
    atomic_write_text(files["size_plot"], masked[["case_id", "ref_px", "pred_px"]].to_csv(index=False))
    return files
