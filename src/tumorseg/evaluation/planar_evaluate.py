"""``tumorseg evaluate-model --dims 2``: choose the detector on validation, score the held-out test split, register.

1. Load the best 2-D checkpoint and run it on the validation and test images (preprocessed grid).
2. On **validation**: fit and choose the detector (:func:`~tumorseg.models.planar_detection.choose_detector`).
3. On **test** (patient-level held out; never used to choose anything):

   - segmentation, images with a reference mask: Dice and HD95 per image **in the source image's own
     pixels** (the predicted mask restored with the preprocessing geometry, the reference read from
     the original file), summarised over tumour images, per tumour type and over tumour-free images,
     each mean with a patient-level bootstrap CI. HD95 is in pixels: the 2-D sources carry no pixel
     spacing. Where the manifest lacks the original file or geometry, the preprocessed grid is used
     (``scored_on`` says which);
   - detection: accuracy, sensitivity, specificity and ROC AUC with patient-level CIs;
   - tumour type: accuracy of the classifier's type on tumour images with a known type.

4. Write, in ``paths.reports_2d`` and under the 3-D evaluation's names, ``metrics.json`` (DVC metrics:
   the flat headline), ``test_summary.json`` (every figure with its CI), ``test_per_case.csv`` and
   ``plots/test_dice.csv``, ``plots/test_volumes.csv`` (tumour areas in pixels); log the metrics to the
   training run, and register both models, packaged, as challengers (``model_version.json``).

Rules for empty masks, as in the 3-D evaluation: both empty -> Dice 1, HD95 0; exactly one empty ->
Dice 0, HD95 the image diagonal (the largest distance possible in it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from tumorseg.config import Section, section
from tumorseg.data.manifest import atomic_write_text
from tumorseg.data.planar import TUMOUR_TYPES
from tumorseg.training.planar_train import load_planar_training_config

log = logging.getLogger(__name__)


class DetectConfig(Section):
    """``detect:`` how the tumour / no-tumour detector is chosen on the validation split.

    Attributes:
        method: ``auto`` (the better of the two on validation), ``classifier`` (the CNN's tumour
            probability) or ``area_rule`` (the segmentation's predicted tumour area).
        selection_metric: what ``auto`` compares on validation: ``auc`` (ties: accuracy) or ``accuracy``.
        threshold: ``youden`` (the validation threshold maximising sensitivity + specificity) or
            ``fixed`` (``fixed_threshold`` on the probability).
        fixed_threshold: probability threshold with ``threshold: fixed``.
        model_name: registered model name of the detector.
    """

    method: Literal["auto", "classifier", "area_rule"] = "auto"
    selection_metric: Literal["auc", "accuracy"] = "auc"
    threshold: Literal["youden", "fixed"] = "youden"
    fixed_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    model_name: str = Field("tumorseg-detect", min_length=1, max_length=256)


class EvaluatePlanarConfig(Section):
    """``evaluate_2d:`` held-out test metrics of the 2-D models and their registration.

    Attributes:
        bootstrap_resamples: patient-level percentile-bootstrap resamples for every CI.
        ci_level: CI level.
        seed: bootstrap seed.
        register_models: register both models as ``challenger`` versions.
        model_name: registered model name of the segmentation model.
    """

    bootstrap_resamples: int = Field(2000, ge=100)
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 42
    register_models: bool = True
    model_name: str = Field("tumorseg-2d", min_length=1, max_length=256)


METRICS_FILE = "metrics.json"
SUMMARY_FILE = "test_summary.json"
PER_CASE_FILE = "test_per_case.csv"
VERSION_FILE = "model_version.json"
DICE_PLOT_FILE = "plots/test_dice.csv"
SIZE_PLOT_FILE = "plots/test_volumes.csv"


@dataclass
class PlanarEvaluation:
    """What the 2-D evaluation measured and wrote.

    Attributes:
        metrics: the nested metrics written to ``test_summary.json``.
        per_case: one row per test image.
        registered: ``{"segmentation": RegisteredVersion, "detection": ...}`` (empty when not registered).
        files: the reports written.
    """

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
    """Dice and HD95 (pixels) of a 2-D binary prediction against its reference (MONAI's Hausdorff).

    ``penalty``: HD95 when exactly one mask is empty (default: the image diagonal).
    """
    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    if penalty is None:
        penalty = float(np.hypot(*pred.shape))
    if not pred.any() and not ref.any():
        return 1.0, 0.0
    if not pred.any() or not ref.any():
        return 0.0, float(penalty)
    import torch
    from monai.metrics import compute_hausdorff_distance

    dice = 2.0 * float(np.sum(pred & ref)) / float(pred.sum() + ref.sum())
    hd95 = compute_hausdorff_distance(
        torch.as_tensor(pred[None, None]),
        torch.as_tensor(ref[None, None]),
        include_background=True,
        percentile=95,
    )
    return dice, float(hd95.reshape(-1)[0])


def patient_mean_ci(
    values: np.ndarray, patient_ids: np.ndarray, *, resamples: int, ci_level: float, seed: int
) -> dict[str, Any]:
    """Mean with a patient-level percentile-bootstrap CI (``{"value", "ci_low", "ci_high", "n_images", "n_patients"}``)."""
    from tumorseg.models.planar_detection import patient_bootstrap_indices

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
    from tumorseg.data.planar_datamodule import load_sample
    from tumorseg.models.planar_predictor import binary_mask, score_preprocessed

    samples = [load_sample(r) for r in records]
    images = np.stack([s["image"][0] for s in samples]) if samples else np.zeros((0, 1, 1), np.float32)
    maps, classes = score_preprocessed(model, images)
    settings = model.settings
    masks = (
        np.stack([binary_mask(m, settings.mask_threshold, settings.min_component_px) for m in maps])
        if len(maps)
        else maps
    )
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
    """``(prediction, reference, "source" | "grid")``: both on the original image when it can be read.

    The prediction is restored with the record's preprocessing geometry
    (:func:`~tumorseg.data.planar.restore_planar_mask`); the reference is the original file's own
    mask (a tumour-free image without one: all zero). Otherwise both stay on the preprocessed grid.
    """
    from tumorseg.data.planar import PlanarGeometry, read_planar, restore_planar_mask
    from tumorseg.errors import DataError

    path = Path(record.get("source_path") or "")
    if not record.get("geometry") or not path.is_file():
        return grid_pred, grid_ref, "grid"
    try:
        original = read_planar(path)
    except DataError as exc:
        log.warning("%s: scored on the preprocessed grid (%s)", record["case_id"], exc)
        return grid_pred, grid_ref, "grid"
    geometry = PlanarGeometry.from_json(record["geometry"])
    pred = restore_planar_mask(grid_pred, geometry)
    ref = original.mask if original.mask is not None else np.zeros(pred.shape, dtype=np.uint8)
    if ref.shape != pred.shape:
        return grid_pred, grid_ref, "grid"
    return pred, ref, "source"


def reference_digest(record: dict[str, Any]) -> str:
    """sha256 of a test image's preprocessed and original files and its labels (the gate pairs versions on it)."""
    digest = hashlib.sha256(Path(record["npz"]).read_bytes())
    source = Path(record.get("source_path") or "")
    if source.is_file():
        digest.update(source.read_bytes())
    digest.update(f"{record['has_tumour']}|{record['tumour_type']}|{record['has_mask']}".encode())
    return digest.hexdigest()


def evaluate_planar(
    params: dict[str, Any],
    *,
    checkpoint: str | Path | None = None,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    register: bool | None = None,
) -> PlanarEvaluation:
    """The ``evaluate_2d`` stage (see the module docstring).

    Args:
        params: the params dict.
        checkpoint: default ``<train_2d.out_dir>/checkpoints/best.ckpt``.
        source: params file name for messages.
        tracking_uri: MLflow store (default from ``mlflow:`` / ``paths.mlruns``).
        register: override ``evaluate_2d.register_models``.

    Raises:
        DataError: no checkpoint, no split, or a test split without images.
    """
    from tumorseg.errors import DataError
    from tumorseg.models.planar_detection import choose_detector
    from tumorseg.models.planar_package import load_planar_checkpoint, save_planar_package
    from tumorseg.training.planar_train import planar_split_records

    cfg = load_planar_training_config(params, source=source)
    ev = section("evaluate_2d", params, source=source)
    det_cfg = section("detect", params, source=source)
    predict_cfg = section("predict_2d", params, source=source)
    ckpt = Path(checkpoint) if checkpoint else Path(cfg.train.out_dir) / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        raise DataError(f"{ckpt}: no 2-D checkpoint; run `tumorseg train --dims 2` first")
    model = load_planar_checkpoint(ckpt)
    model.predict_settings = predict_cfg.model_dump(mode="json")
    records = planar_split_records(cfg, source)
    if not records["test"]:
        raise DataError(f"{source}: paths.split_2d: {cfg.paths.split} has no test images to evaluate")

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
    stats = {"resamples": ev.bootstrap_resamples, "ci_level": ev.ci_level, "seed": ev.seed}

    per_case = _per_case_table(records["test"], test, probability, called)

    metrics = _test_metrics(per_case, probability, model.detector, stats)
    masked = per_case[per_case["has_mask"]]
    result = PlanarEvaluation(
        _clean(metrics), per_case, files=_write_reports(Path(cfg.paths.reports), metrics, per_case)
    )

    run_id = _log_to_run(cfg, ckpt, result, tracking_uri)
    if (ev.register_models if register is None else register) and cfg.mlflow.enabled and run_id is not None:
        from tumorseg.registry.planar_register import register_planar_models
        from tumorseg.tracking import data_version, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri, cfg.paths.mlruns)
        digests = {r["case_id"]: reference_digest(r) for r in records["test"]}
        evidence = {
            "segmentation": {
                "regions": ["tumour"],
                "case_dice": {r.case_id: {"tumour": float(r.dice)} for r in masked.itertuples()},
                "reference_sha256": {c: digests[c] for c in masked["case_id"]},
            },
            "detection": {
                "regions": ["correct"],
                "case_dice": {r.case_id: {"correct": float(r.correct)} for r in per_case.itertuples()},
                "reference_sha256": digests,
            },
        }
        with tempfile.TemporaryDirectory(prefix="tumorseg-2d-package-") as folder:
            result.registered = register_planar_models(
                save_planar_package(model, folder),
                {"metrics": result.metrics, "evidence": evidence},
                run_id=run_id,
                tracking_uri=uri,
                names={"segmentation": ev.model_name, "detection": det_cfg.model_name},
                config=model.config,
                data_md5=data_version(cfg.paths.preprocessed)["data_md5"],
                synthetic=section("data", params, source=source).is_synth(2),
            )
    versions = {kind: r.to_dict() for kind, r in result.registered.items()}
    result.files["versions"] = Path(cfg.paths.reports) / VERSION_FILE
    atomic_write_text(result.files["versions"], json.dumps(versions, indent=2) + "\n")
    log.info(result.one_line())
    return result


def _per_case_table(
    records: list[dict[str, Any]], test: dict[str, np.ndarray], probability: np.ndarray, called: np.ndarray
) -> pd.DataFrame:
    """One row per test image: the detector's call, the type, and Dice/HD95 and tumour areas where a
    reference mask exists (scored on the source image where it can be read)."""
    rows = []
    for i, record in enumerate(records):
        type_probs = test["classes"][i, 1:]
        row = {
            "case_id": record["case_id"],
            "patient_id": record["patient_id"],
            "source": record["source"],
            "has_tumour": record["has_tumour"],
            "tumour_type": record["tumour_type"],
            "has_mask": record["has_mask"],
            "probability": float(probability[i]),
            "predicted": bool(called[i]),
            "correct": float(bool(called[i]) == record["has_tumour"]),
            "classifier_probability": float(test["classes"][i, 0]),
            "area_px": float(test["areas"][i]),
            "predicted_type": TUMOUR_TYPES[int(np.argmax(type_probs))],
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


def _test_metrics(
    per_case: pd.DataFrame, probability: np.ndarray, detector: Any, stats: dict[str, Any]
) -> dict[str, Any]:
    """Segmentation, detection and tumour-type figures of the test split, each with a patient-level CI."""
    from tumorseg.models.planar_detection import binary_detection_metrics

    masked = per_case[per_case["has_mask"]]
    tumour = masked[masked["has_tumour"]]
    free = masked[~masked["has_tumour"]]
    segmentation: dict[str, Any] = {
        "dice_tumour": patient_mean_ci(tumour["dice"], tumour["patient_id"], **stats),
        "hd95_px_tumour": patient_mean_ci(tumour["hd95_px"], tumour["patient_id"], **stats),
        "dice_all": patient_mean_ci(masked["dice"], masked["patient_id"], **stats),
        "tumour_free_empty_rate": patient_mean_ci(free["dice"], free["patient_id"], **stats),
        "per_tumour_type": {
            kind: {
                "n_images": int(len(group)),
                "dice": patient_mean_ci(group["dice"], group["patient_id"], **stats),
                "hd95_px": patient_mean_ci(group["hd95_px"], group["patient_id"], **stats),
            }
            for kind, group in tumour.groupby("tumour_type", sort=True)
        },
    }
    detection = {
        "method": detector.method,
        "validation": detector.validation,
        **binary_detection_metrics(
            per_case["has_tumour"].to_numpy(),
            probability,
            detector.threshold,
            per_case["patient_id"].to_numpy(),
            **stats,
        ),
    }
    typed = per_case[per_case["has_tumour"] & per_case["tumour_type"].isin(TUMOUR_TYPES)]
    hits = (typed["predicted_type"] == typed["tumour_type"]).astype(float)
    metrics = {
        "n_test_images": int(len(per_case)),
        "n_test_patients": int(per_case["patient_id"].nunique()),
        "segmentation": segmentation,
        "detection": detection,
        "type_classification": {
            "accuracy": patient_mean_ci(hits, typed["patient_id"], **stats),
            "confusion": {  # true type -> predicted type -> images
                kind: {p: int((group["predicted_type"] == p).sum()) for p in TUMOUR_TYPES}
                for kind, group in typed.groupby("tumour_type", sort=True)
            },
        },
        "bootstrap": {**stats, "unit": "patient"},
    }

    return metrics


def _write_reports(reports: Path, metrics: dict[str, Any], per_case: pd.DataFrame) -> dict[str, Path]:
    """The evaluation's files, named as the 3-D evaluation's, so one DVC stage declares both."""
    files = {
        "metrics": reports / METRICS_FILE,
        "summary": reports / SUMMARY_FILE,
        "per_case": reports / PER_CASE_FILE,
        "dice_plot": reports / DICE_PLOT_FILE,
        "size_plot": reports / SIZE_PLOT_FILE,
    }
    files["dice_plot"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(files["metrics"], json.dumps({"test": flat_metrics(_clean(metrics))}, indent=2) + "\n")
    atomic_write_text(files["summary"], json.dumps(_clean(metrics), indent=2) + "\n")
    atomic_write_text(files["per_case"], per_case.to_csv(index=False))
    masked = per_case[per_case["has_mask"]]
    atomic_write_text(files["dice_plot"], masked[["case_id", "dice", "hd95_px"]].to_csv(index=False))
    atomic_write_text(files["size_plot"], masked[["case_id", "ref_px", "pred_px"]].to_csv(index=False))
    return files


def _log_to_run(cfg: Any, checkpoint: Path, result: PlanarEvaluation, tracking_uri: str | None) -> str | None:
    """Flat test metrics (``test_2d/...``) and the reports on the training run; returns its id."""
    if not cfg.mlflow.enabled:
        return None
    from mlflow import MlflowClient

    from tumorseg.registry.register import checkpoint_or_new_run
    from tumorseg.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri, cfg.paths.mlruns)
    client = MlflowClient(uri)
    run_id = checkpoint_or_new_run(
        client, checkpoint, tracking_uri=uri, experiment=cfg.train.experiment, run_name="evaluate-2d"
    )
    for key, value in flat_metrics(result.metrics).items():
        client.log_metric(run_id, f"test_2d/{key}", value)
    for path in result.files.values():
        client.log_artifact(run_id, str(path), artifact_path="evaluation_2d")
    return run_id


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of the nested metrics as ``a.b.value`` keys (MLflow metric names)."""
    from tumorseg.tracking import flatten

    return {
        name: float(value)
        for name, value in flatten(metrics, prefix).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    }


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
