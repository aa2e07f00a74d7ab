"""The test split scored in the source geometry (the scoring half of the ``evaluate`` stage).

Unlike training's scores on the preprocessed grid, this measures what users get: each test case is
predicted from its source files as ``tumorseg predict`` does and scored against its source
segmentation as ``tumorseg evaluate`` does. Reports go to ``paths.reports``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.config import EvaluateConfig
from tumorseg.data.layouts import CaseFiles, case_from_manifest_row, read_bytes
from tumorseg.data.manifest import STATUS_OK, atomic_write_text, read_manifest
from tumorseg.data.source import source_folder
from tumorseg.errors import DataError
from tumorseg.evaluation.summary import describe, region_order
from tumorseg.params import Params, as_params

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CASE_FILE = "test_per_case.csv"
SUMMARY_FILE = "test_summary.json"
PLOTS_DIR = "plots"
MODEL_VERSION_FILE = "model_version.json"
FLAT_METRICS = ("dice", "hd95", "lesion_dice", "lesion_hd95", "iou", "sensitivity", "precision")
"""Metrics copied into ``metrics.json`` per region (with their CIs); the CSV has them all."""


@dataclass
class TestEvaluation:
    """The test split scored in the source geometry: ``per_case`` (case x region) and its ``summary``;
    ``case_dice`` ``{case_id: {region: Dice}}`` is the paired evidence for promotion."""

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
    params: Params | dict[str, Any], split: str = "test", *, source: str = "params.yaml"
) -> list[CaseFiles]:
    """The source files of a split's cases, from the validated manifest; DataError for an empty split or
    a case that is not ``ok`` or has no reference segmentation."""
    params = as_params(params, source)
    from tumorseg.data.datamodule import read_split

    paths = params.paths
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
    """``ref_dir/<case_id>.nii[.gz]`` -> the source segmentation (read-only; the source is never copied)."""
    seg = Path(case.paths["seg"])
    suffix = ".nii.gz" if seg.name.endswith(".nii.gz") else ".nii"
    target = ref_dir / f"{case.case_id}{suffix}"
    try:
        os.symlink(seg.resolve(), target)
    except OSError:  # file systems without symlinks: a copy, in the temporary folder only
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
    log_volumes: bool = True,
) -> Any:
    """Predict ``cases`` from their source files and score them against their segmentations into
    ``out_csv`` (plots in ``<stem>_plots/``, over ``images_dir``); ``tumour_types_file``: a
    ``synth_meta.json`` for per-type statistics; ``log_volumes``: a line per case with its predicted
    region volumes. Returns the ``EvaluationResult``."""
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
            if log_volumes:
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
    """The ``metrics.json`` entry: per-region means and CIs, detection, and ``dice_mean``: the mean over
    cases of each case's mean Dice over regions (the promotion gate's statistic), bootstrapped."""
    metrics: dict[str, Any] = {}
    regions = summary["regions"]
    names = region_order(per_case)
    for metric in FLAT_METRICS:
        for region in names:
            stats = regions.get(region, {}).get(metric)
            if stats is not None:
                metrics[f"{metric}_{region}"] = _finite(stats["mean"])
                metrics[f"{metric}_{region}_ci_low"] = _finite(stats["ci_low"])
                metrics[f"{metric}_{region}_ci_high"] = _finite(stats["ci_high"])
    per_case_mean = _by_case(per_case, "dice").sort_index().mean(axis=1).to_numpy(dtype=np.float64)
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


def _by_case(per_case: pd.DataFrame, values: str) -> pd.DataFrame:
    """The ``values`` column of the long table as one row per case, one column per region (scoring order)."""
    return per_case.pivot(index="case_id", columns="region", values=values)[region_order(per_case)]


def write_plot_data(per_case: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """``test_dice.csv`` (dice_/hd95_ per region, dice_mean) and ``test_volumes.csv`` for DVC plots."""
    dice = _by_case(per_case, "dice")
    table = pd.concat([dice.add_prefix("dice_"), _by_case(per_case, "hd95").add_prefix("hd95_")], axis=1)
    table["dice_mean"] = dice.mean(axis=1)
    ref, pred = _by_case(per_case, "volume_ref_ml"), _by_case(per_case, "volume_pred_ml")
    volumes = pd.concat([ref.add_prefix("ref_ml_"), pred.add_prefix("pred_ml_")], axis=1)
    files = {"test_dice": folder / "test_dice.csv", "test_volumes": folder / "test_volumes.csv"}
    atomic_write_text(files["test_dice"], table.round(6).reset_index().to_csv(index=False))
    atomic_write_text(files["test_volumes"], volumes.round(4).reset_index().to_csv(index=False))
    return files


def write_test_metrics(metrics: dict[str, Any], path: Path) -> None:
    """Put ``metrics`` under ``"test"`` in ``metrics.json``, keeping its other top-level keys."""
    current: Any = {}
    if path.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            current = json.loads(path.read_text())
    current = current if isinstance(current, dict) else {}
    current["test"] = metrics
    atomic_write_text(path, json.dumps(current, indent=2) + "\n")


def evaluate_test_split(
    predictor: Any, params: Params | dict[str, Any], *, source: str = "params.yaml", split: str = "test"
) -> TestEvaluation:
    """Predict and score a split, and write every report file (module docstring) except the version file."""
    params = as_params(params, source)
    paths = params.paths
    cfg: EvaluateConfig = params.evaluate
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
    case_dice = {
        case_id: {region: float(value) for region, value in row.items()}
        for case_id, row in _by_case(per_case, "dice").to_dict(orient="index").items()
    }
    digests = {case.case_id: reference_digest(case) for case in cases}
    convention = result.summary["label_convention"]
    return TestEvaluation(per_case, result.summary, metrics, case_dice, digests, convention, files)


def choose_component_confidence(
    predictor: Any, params: Params | dict[str, Any], *, source: str = "params.yaml", split: str = "val"
) -> Any:
    """The component-confidence threshold (:func:`~tumorseg.models.postprocess.choose_min_confidence`)
    that maximises the mean Dice of ``split``'s preprocessed cases, predicted by ``predictor`` (which
    must keep every component: ``min_component_confidence`` 0); None when the split is empty."""
    params = as_params(params, source)
    from tumorseg.data.datamodule import case_records, read_split
    from tumorseg.data.parallel import Progress
    from tumorseg.data.transforms import load_preprocessed_case
    from tumorseg.models.postprocess import CaseComponents, choose_min_confidence, whole_tumour_probability

    paths = params.paths
    case_ids = read_split(paths.split).get(split, [])
    if not case_ids:
        log.info("%s: no %s cases; no component-confidence threshold chosen", paths.split, split)
        return None
    label_set = predictor.label_set
    spacing = tuple(float(v) for v in predictor.preprocess_cfg.target_spacing_mm)
    cases = []
    progress = Progress(len(case_ids), f"component confidence on {split}")
    for record in case_records(paths.preprocessed, case_ids):
        case = load_preprocessed_case(record["path"])
        probabilities, _ = predictor.infer(case["image"])
        labels = predictor.labels_from_probabilities(probabilities, spacing)
        tumour = whole_tumour_probability(probabilities, predictor.output)
        truth = label_set.regions(case["label"][0])
        cases.append(CaseComponents.of(record["case_id"], labels, tumour, label_set.regions(labels), truth))
        progress.advance()
    progress.close()
    return choose_min_confidence(cases)


def store_component_confidence(
    trained: Any, predict_cfg: Any, params: Params | dict[str, Any], *, source: str = "params.yaml"
) -> dict[str, Any]:
    """Settle the component-confidence threshold the model is evaluated and served with, store it in
    ``trained.config`` (``postprocess``, where every engine that later runs the model finds it) and return
    that record: ``predict.min_component_confidence`` when set, else chosen on the validation split
    (:func:`choose_component_confidence`; 0 without validation cases)."""
    from tumorseg.models.postprocess import CONFIDENCE_KEY, POSTPROCESS_KEY
    from tumorseg.models.predictor import SegmentationPredictor

    if predict_cfg.min_component_confidence is not None:
        record = {
            CONFIDENCE_KEY: float(predict_cfg.min_component_confidence),
            "chosen_on": "predict.min_component_confidence",
        }
    else:
        keep_all = predict_cfg.model_copy(
            update={"probabilities": False, "uncertainty": False, "min_component_confidence": 0.0}
        )
        choice = choose_component_confidence(SegmentationPredictor(trained, keep_all), params, source=source)
        if choice is None:
            record = {CONFIDENCE_KEY: 0.0, "chosen_on": "nothing (no validation cases)"}
        else:
            log.info("%s", choice.one_line())
            record = choice.to_dict()
    trained.config = {**trained.config, POSTPROCESS_KEY: record}
    return record


def reference_digest(case: CaseFiles) -> str:
    """sha256 of the reference segmentation file (promotion pairs cases only on identical references)."""
    return read_bytes(Path(case.paths["seg"]))[1]
