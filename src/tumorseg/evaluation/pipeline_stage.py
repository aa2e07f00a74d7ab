"""The pipeline's ``evaluate`` stage: the trained model on the test split, scored in the source geometry.

Unlike the scores training computes on the preprocessed grid, this stage measures what users get:
each test case is predicted from its **source** files (paths from the validated manifest) with the
same :class:`~tumorseg.models.predictor.SegmentationPredictor` as ``tumorseg predict`` (preprocessing,
sliding window, optional TTA, restoration to the source grid and label convention), written as
NIfTI to a temporary folder and scored by :func:`~tumorseg.evaluation.evaluate.evaluate_folders`
against the source segmentations, exactly as ``tumorseg evaluate`` would score them.

Outputs (under ``paths.reports``; the DVC stage declares them):

- ``metrics.json``: ``{"test": {"dice_WT", "dice_TC", "dice_ET", "dice_mean", "hd95_WT", ...,
  "<metric>_<region>_ci_low/_ci_high", "n_cases", "detection_*"}}`` (DVC metrics);
- ``test_per_case.csv`` (one row per case and region), ``test_summary.json`` (statistics with
  bootstrap CIs), ``test_per_case_plots/`` (box plots, best/median/worst overlays);
- ``plots/test_dice.csv`` (per-case Dice and HD95 per region) and ``plots/test_volumes.csv``
  (reference vs predicted volumes), the data of ``dvc plots``;
- ``model_version.json``: the registered version (``version`` null, with the reason, when MLflow or
  the registry is off), the dependency that makes DVC rerun ``promote``.

Then (:func:`run_evaluate_stage`) the test metrics and reports are logged to the training run
(its id is stored in the checkpoint) and the model is registered as a new version with alias
``challenger`` (:mod:`tumorseg.registry.register`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.config import EvaluateConfig, section
from tumorseg.data.layouts import CaseFiles
from tumorseg.data.manifest import atomic_write_text
from tumorseg.data.source import source_folder
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CASE_FILE = "test_per_case.csv"
SUMMARY_FILE = "test_summary.json"
PLOTS_DIR = "plots"
MODEL_VERSION_FILE = "model_version.json"
FLAT_METRICS: tuple[str, ...] = (
    "dice",
    "hd95",
    "lesion_dice",
    "lesion_hd95",
    "iou",
    "sensitivity",
    "precision",
)
"""Metrics copied into ``metrics.json`` per region (with their CIs); the CSV has them all."""


@dataclass
class TestEvaluation:
    """The test split scored in the source geometry.

    Attributes:
        per_case: long table (case x region) of :func:`evaluate_folders`.
        summary: its JSON summary (means, medians, bootstrap CIs, detection).
        metrics: the flat ``metrics.json`` ``test`` entry.
        case_dice: ``{case_id: {"WT", "TC", "ET"}}`` Dice, the paired evidence for promotion.
        reference_sha256: ``{case_id: sha256 of the reference segmentation}``.
        label_convention: convention of the references.
        files: report files written, by name.
    """

    __test__ = False  # a result type, not a pytest test class

    per_case: pd.DataFrame
    summary: dict[str, Any]
    metrics: dict[str, Any]
    case_dice: dict[str, dict[str, float]]
    reference_sha256: dict[str, str]
    label_convention: str
    files: dict[str, Path] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """What is stored with a registered model version (``evaluation.json``)."""
        return {
            "label_convention": self.label_convention,
            "case_ids": sorted(self.case_dice),
            "regions": list(self.summary.get("regions", {})),
            "case_dice": self.case_dice,
            "reference_sha256": self.reference_sha256,
            "metrics": self.metrics,
            "summary": self.summary,
        }


def split_cases(
    params: dict[str, Any], split: str = "test", *, source: str = "params.yaml"
) -> list[CaseFiles]:
    """The source files of a split's cases, from the validated manifest (reference segmentation required).

    Raises:
        DataError: the split is empty, or a case is not ``ok`` in the manifest or has no segmentation.
    """
    from tumorseg.data.datamodule import read_split
    from tumorseg.data.layouts import case_from_manifest_row
    from tumorseg.data.manifest import STATUS_OK, read_manifest

    paths = section("paths", params, source=source)
    case_ids = read_split(paths.split).get(split, [])
    if not case_ids:
        raise DataError(f"{paths.split}: no {split!r} cases; rerun `tumorseg split` with a {split} share")
    manifest = read_manifest(paths.validated)
    rows = {row["case_id"]: row for row in manifest.to_dict(orient="records") if row["status"] == STATUS_OK}
    cases: list[CaseFiles] = []
    for case_id in case_ids:
        if case_id not in rows:
            raise DataError(
                f"{paths.validated}/manifest.csv: {split} case {case_id} is missing or quarantined; "
                "rerun `tumorseg preprocess` and `tumorseg split`"
            )
        case = case_from_manifest_row(rows[case_id])
        if not case.has_seg:
            raise DataError(f"{case_id}: no reference segmentation in the manifest; a {split} case needs one")
        cases.append(case)
    return cases


def _link_reference(case: CaseFiles, ref_dir: Path) -> None:
    """``ref_dir/<case_id>.nii[.gz]`` -> the source segmentation (read-only use; the source is never copied)."""
    seg = Path(case.paths["seg"])
    suffix = ".nii.gz" if seg.name.endswith(".nii.gz") else ".nii"
    target = ref_dir / f"{case.case_id}{suffix}"
    try:
        os.symlink(seg.resolve(), target)
    except OSError:  # file systems without symlinks: a copy, in the temporary folder only
        import shutil

        shutil.copyfile(seg, target)


def evaluate_cases(
    predictor: Any,
    cases: list[CaseFiles],
    out_csv: Path,
    *,
    cfg: EvaluateConfig,
    summary_path: Path,
    images_dir: Path | None = None,
    tumour_types_file: Path | None = None,
    make_plots: bool | None = None,
) -> Any:
    """Predict ``cases`` from their source files and score them against their segmentations.

    Args:
        predictor: a :class:`~tumorseg.models.predictor.SegmentationPredictor`.
        cases: cases with a reference segmentation.
        out_csv: per-case CSV to write (plots go to ``<stem>_plots/``).
        cfg: the ``evaluate`` section.
        summary_path: JSON summary to write.
        images_dir: source images for the overlay figures.
        tumour_types_file: a ``synth_meta.json`` giving per-tumour-type statistics.
        make_plots: None follows ``cfg.plots``.

    Returns:
        The :class:`~tumorseg.evaluation.evaluate.EvaluationResult`.
    """
    from tumorseg.evaluation.evaluate import evaluate_folders
    from tumorseg.models.predictor import predict_dataset

    conventions = {case.label_convention for case in cases}
    labels = conventions.pop() if len(conventions) == 1 else "auto"
    with tempfile.TemporaryDirectory(prefix="tumorseg-eval-") as tmp:
        pred_dir, ref_dir = Path(tmp) / "pred", Path(tmp) / "ref"
        pred_dir.mkdir()
        ref_dir.mkdir()
        if tumour_types_file is not None and tumour_types_file.is_file():
            os.symlink(tumour_types_file.resolve(), ref_dir / "synth_meta.json")
        by_id = {case.case_id: case for case in cases}

        def link_reference(prediction: Any, _files: list[Path]) -> None:
            _link_reference(by_id[prediction.case_id], ref_dir)
            log.info("%s: %s", prediction.case_id, prediction.volumes_text())

        predict_dataset(None, pred_dir, predictor, cases=cases, on_case=link_reference)
        result = evaluate_folders(
            pred_dir,
            ref_dir,
            out_csv,
            labels=labels,
            cfg=cfg,
            summary_path=summary_path,
            images_dir=images_dir,
            make_plots=make_plots,
            case_conventions={case.case_id: case.label_convention for case in cases},
        )
    # The temporary folders are gone: record where the cases really came from.
    result.summary["pred_dir"] = "test-split predictions in the source geometry (temporary)"
    result.summary["ref_dir"] = "source segmentations of the validated manifest"
    atomic_write_text(summary_path, json.dumps(result.summary, indent=2, allow_nan=False) + "\n")
    return result


def _finite(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else round(float(value), 6)


def flat_metrics(per_case: pd.DataFrame, summary: dict[str, Any], cfg: EvaluateConfig) -> dict[str, Any]:
    """The ``metrics.json`` entry: per-region means and CIs, the mean Dice over regions, detection.

    ``dice_mean`` is the mean over cases of each case's mean over the scored regions (WT, TC and ET
    for BraTS 2021/2023; the promotion gate's statistic); its CI is a percentile bootstrap with the
    same resampled case sets as the summary.
    """
    from tumorseg.evaluation.summary import describe, region_order

    metrics: dict[str, Any] = {}
    regions = summary["regions"]
    names = region_order(per_case)
    for metric in FLAT_METRICS:
        for region in names:
            stats = regions.get(region, {}).get(metric)
            if stats is None:
                continue
            metrics[f"{metric}_{region}"] = _finite(stats["mean"])
            metrics[f"{metric}_{region}_ci_low"] = _finite(stats["ci_low"])
            metrics[f"{metric}_{region}_ci_high"] = _finite(stats["ci_high"])
    wide = per_case.pivot(index="case_id", columns="region", values="dice").sort_index()
    per_case_mean = wide[names].mean(axis=1).to_numpy(dtype=np.float64)
    n = per_case_mean.size
    indices = np.random.default_rng(cfg.seed).integers(0, n, size=(cfg.bootstrap_resamples, n))
    stats = describe(per_case_mean, indices, cfg.ci_level)
    metrics["dice_mean"] = _finite(stats["mean"])
    metrics["dice_mean_ci_low"] = _finite(stats["ci_low"])
    metrics["dice_mean_ci_high"] = _finite(stats["ci_high"])
    detection = summary.get("detection", {})
    for key in ("sensitivity", "specificity", "roc_auc"):
        if detection.get(key) is not None:
            metrics[f"detection_{key}"] = _finite(detection[key])
    metrics["n_cases"] = int(summary["n_cases"])
    return metrics


def write_plot_data(per_case: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """``test_dice.csv`` (case_id, dice_/hd95_ per region, dice_mean) and ``test_volumes.csv`` for DVC plots."""
    from tumorseg.evaluation.summary import region_order

    names = region_order(per_case)
    dice = per_case.pivot(index="case_id", columns="region", values="dice")[names]
    hd95 = per_case.pivot(index="case_id", columns="region", values="hd95")[names]
    table = pd.concat([dice.add_prefix("dice_"), hd95.add_prefix("hd95_")], axis=1)
    table["dice_mean"] = dice.mean(axis=1)
    volumes = pd.concat(
        [
            per_case.pivot(index="case_id", columns="region", values=column)[names].add_prefix(prefix)
            for column, prefix in (("volume_ref_ml", "ref_ml_"), ("volume_pred_ml", "pred_ml_"))
        ],
        axis=1,
    )
    files = {"test_dice": folder / "test_dice.csv", "test_volumes": folder / "test_volumes.csv"}
    atomic_write_text(files["test_dice"], table.round(6).reset_index().to_csv(index=False))
    atomic_write_text(files["test_volumes"], volumes.round(4).reset_index().to_csv(index=False))
    return files


def write_test_metrics(metrics: dict[str, Any], path: Path) -> None:
    """Put ``metrics`` under ``"test"`` in ``metrics.json``, keeping its other top-level keys."""
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            current = {}
    current = current if isinstance(current, dict) else {}
    current["test"] = metrics
    atomic_write_text(path, json.dumps(current, indent=2) + "\n")


def evaluate_test_split(
    predictor: Any, params: dict[str, Any], *, source: str = "params.yaml", split: str = "test"
) -> TestEvaluation:
    """Predict and score a split, and write every report file (module docstring) except the version file."""
    paths = section("paths", params, source=source)
    cfg: EvaluateConfig = section("evaluate", params, source=source)
    cases = split_cases(params, split, source=source)
    reports = Path(paths.reports)
    reports.mkdir(parents=True, exist_ok=True)
    raw = source_folder(params, source)
    result = evaluate_cases(
        predictor,
        cases,
        reports / PER_CASE_FILE,
        cfg=cfg,
        summary_path=reports / SUMMARY_FILE,
        images_dir=raw if raw.is_dir() else None,
        tumour_types_file=raw / "synth_meta.json",
    )
    per_case = result.per_case
    metrics = flat_metrics(per_case, result.summary, cfg)
    write_test_metrics(metrics, reports / METRICS_FILE)
    files = {"metrics": reports / METRICS_FILE, "per_case": result.csv_path, "summary": result.summary_path}
    files.update(write_plot_data(per_case, reports / PLOTS_DIR))
    for path in result.plot_paths:
        files[f"plot_{path.stem}"] = path
    from tumorseg.evaluation.summary import region_order

    wide = per_case.pivot(index="case_id", columns="region", values="dice")[region_order(per_case)]
    case_dice = {
        case_id: {region: float(value) for region, value in row.items()}
        for case_id, row in wide.to_dict(orient="index").items()
    }
    return TestEvaluation(
        per_case=per_case,
        summary=result.summary,
        metrics=metrics,
        case_dice=case_dice,
        reference_sha256={case.case_id: reference_digest(case) for case in cases},
        label_convention=result.summary["label_convention"],
        files=files,
    )


def reference_digest(case: CaseFiles) -> str:
    """sha256 of the reference segmentation file (promotion pairs cases only on identical references)."""
    from tumorseg.data.layouts import read_bytes

    return read_bytes(Path(case.paths["seg"]))[1]


# ---------------------------------------------------------------------------- the stage
@dataclass
class EvaluateStageResult:
    """What the evaluate stage did.

    Attributes:
        evaluation: the test-split evaluation.
        run_id: MLflow run the metrics were logged to (None without MLflow).
        registered: the registered version (None when the registry is off).
    """

    evaluation: TestEvaluation
    run_id: str | None = None
    registered: Any = None

    def one_line(self) -> str:
        m = self.evaluation.metrics
        text = (
            f"test ({m['n_cases']} cases, source geometry): Dice WT {m['dice_WT']:.3f} TC {m['dice_TC']:.3f} "
            f"ET {m['dice_ET']:.3f} mean {m['dice_mean']:.3f} "
            f"[{m['dice_mean_ci_low']:.3f}, {m['dice_mean_ci_high']:.3f}]"
        )
        if self.registered is not None:
            text += f"; registered {self.registered.name} version {self.registered.version} as challenger"
        return text


def run_evaluate_stage(
    params: dict[str, Any],
    *,
    checkpoint: str | Path | None = None,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    register: bool | None = None,
) -> EvaluateStageResult:
    """The DVC ``evaluate`` stage (and its Prefect task): evaluate, log to the training run, register.

    Args:
        params: the params.yaml dict.
        checkpoint: trained checkpoint; default ``<train.out_dir>/checkpoints/best.ckpt``.
        source: the params file: named in error messages, and ``data.source`` resolves against its
            folder (:func:`tumorseg.data.source.source_folder`).
        tracking_uri: MLflow store; default ``mlflow.tracking_uri``, ``$MLFLOW_TRACKING_URI``, then
            the SQLite store under ``paths.mlruns``.
        register: register the model as a new ``challenger`` version; None follows ``registry.enabled``.

    Raises:
        DataError / ConfigError: missing checkpoint, data or split; bad params (one line).
    """
    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.models.predictor import PredictConfig, SegmentationPredictor
    from tumorseg.registry.config import RegistryConfig
    from tumorseg.training.config import MlflowConfig, TrainConfig

    paths = section("paths", params, source=source)
    train_cfg: TrainConfig = section("train", params, source=source)
    predict_cfg: PredictConfig = section("predict", params, source=source)
    registry_cfg: RegistryConfig = section("registry", params, source=source)
    mlflow_cfg: MlflowConfig = section("mlflow", params, source=source)
    checkpoint = Path(checkpoint or Path(train_cfg.out_dir) / "checkpoints" / "best.ckpt")
    trained = load_trained_network(checkpoint)
    # Reports are about the model, not about extra outputs: no probability/uncertainty maps here.
    predictor = SegmentationPredictor(
        trained, predict_cfg.model_copy(update={"probabilities": False, "uncertainty": False})
    )
    evaluation = evaluate_test_split(predictor, params, source=source)
    result = EvaluateStageResult(evaluation)
    version_file = Path(paths.reports) / MODEL_VERSION_FILE
    if not mlflow_cfg.enabled:
        log.info("mlflow.enabled is false: test metrics not logged, model not registered")
        _write_unregistered(version_file, registry_cfg.model_name, "mlflow.enabled is false")
        return result

    from tumorseg.registry.loading import prepare_mlflow
    from tumorseg.registry.register import log_test_evaluation, register_model
    from tumorseg.tracking import params_tracking_uri

    prepare_mlflow()
    uri = params_tracking_uri(params, tracking_uri, source=source)
    result.run_id = log_test_evaluation(
        evaluation, checkpoint=checkpoint, tracking_uri=uri, experiment=mlflow_cfg.experiment
    )
    if registry_cfg.enabled if register is None else register:
        result.registered = register_model(
            trained,
            evaluation,
            run_id=result.run_id,
            tracking_uri=uri,
            cfg=registry_cfg,
            predict_settings=predictor.cfg.model_dump(mode="json"),
            params=params,
            source=source,
        )
        atomic_write_text(version_file, json.dumps(result.registered.to_dict(), indent=2) + "\n")
    else:
        reason = (
            "registry.enabled is false" if register is None else "registration turned off (--no-register)"
        )
        _write_unregistered(version_file, registry_cfg.model_name, reason)
    return result


def _write_unregistered(path: Path, name: str, reason: str) -> None:
    """``model_version.json`` saying no version was registered (the DVC stage always has its output)."""
    record = {
        "name": name,
        "version": None,
        "run_id": None,
        "model_uri": None,
        "alias": None,
        "reason": reason,
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
