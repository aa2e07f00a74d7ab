"""The ``evaluate`` stage: score the test split (:mod:`tumorseg.evaluation`), log it to the training run
and register the model as a challenger. This module composes the two, so the evaluation layer never
imports the registry. ``run_evaluate_stage`` is ``evaluate@3d`` (volumes), ``evaluate_planar``
``evaluate@2d`` (the images' segmenter and detector).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.data.manifest import atomic_write_text
from tumorseg.errors import DataError
from tumorseg.evaluation.pipeline_stage import (
    METRICS_FILE,
    MODEL_VERSION_FILE,
    TestEvaluation,
    evaluate_test_split,
    store_component_confidence,
)
from tumorseg.evaluation.planar_evaluate import (
    PlanarEvaluation,
    detect_and_score,
    reference_digest,
    test_metrics,
    write_reports,
)
from tumorseg.evaluation.summary import clean_json, flatten_metrics
from tumorseg.models.checkpoint import load_planar_checkpoint
from tumorseg.models.package import save_package
from tumorseg.models.postprocess import POSTPROCESS_KEY
from tumorseg.params import Params, as_params
from tumorseg.registry.loading import prepare_mlflow
from tumorseg.registry.register import (
    log_test_evaluation,
    register_model,
    register_planar_models,
)
from tumorseg.tracking import data_version, params_tracking_uri, resolve_tracking_uri
from tumorseg.training.config import load_planar_training_config
from tumorseg.training.train import planar_split_records

log = logging.getLogger(__name__)


@dataclass
class EvaluateStageResult:
    """What the evaluate stage did: ``run_id`` None without MLflow, ``registered`` None without a registry."""

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
    params: Params | dict[str, Any],
    *,
    checkpoint: str | Path | None = None,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    register: bool | None = None,
) -> EvaluateStageResult:
    """The DVC ``evaluate`` stage (and its Prefect task): evaluate, log to the training run, register.

    Args:
        checkpoint: default ``<train.out_dir>/checkpoints/best.ckpt``.
        source: the params file, named in messages; ``data.source`` resolves against its folder.
        register: register a new ``challenger`` version; None follows ``registry.enabled``.
    """
    params = as_params(params, source)
    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.models.predictor import SegmentationPredictor

    paths = params.paths
    train_cfg = params.train
    predict_cfg = params.predict
    registry_cfg = params.registry
    mlflow_cfg = params.mlflow
    checkpoint = _checkpoint(checkpoint, train_cfg.out_dir)
    trained = load_trained_network(checkpoint)
    chosen = store_component_confidence(trained, predict_cfg, params, source=source)
    # Reports are about the model, not about extra outputs: no probability/uncertainty maps here.
    predictor = SegmentationPredictor(
        trained, predict_cfg.model_copy(update={"probabilities": False, "uncertainty": False})
    )
    evaluation = evaluate_test_split(predictor, params, source=source)
    _write_postprocess(Path(paths.reports), chosen)
    result = EvaluateStageResult(evaluation)
    profile, drift_metrics = (
        _drift_reference(params, source, evaluation) if params.monitor.enabled else (None, {})
    )
    version_file = Path(paths.reports) / MODEL_VERSION_FILE
    if not mlflow_cfg.enabled:
        log.info("mlflow.enabled is false: test metrics not logged, model not registered")
        _write_unregistered(version_file, registry_cfg.model_name, "mlflow.enabled is false")
        return result

    prepare_mlflow()
    uri = params_tracking_uri(params, tracking_uri, source=source)
    result.run_id = log_test_evaluation(
        evaluation.metrics,
        evaluation.files,
        checkpoint=checkpoint,
        tracking_uri=uri,
        experiment=mlflow_cfg.experiment,
        tags={"tumorseg.checkpoint": str(checkpoint)},
    )
    if drift_metrics:
        log_test_evaluation(
            drift_metrics,
            {},
            checkpoint=checkpoint,
            tracking_uri=uri,
            experiment=mlflow_cfg.experiment,
            prefix="",
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
            drift_profile=profile,
        )
        atomic_write_text(version_file, json.dumps(result.registered.to_dict(), indent=2) + "\n")
    else:
        reason = (
            "registry.enabled is false" if register is None else "registration turned off (--no-register)"
        )
        _write_unregistered(version_file, registry_cfg.model_name, reason)
    return result


def _write_postprocess(reports: Path, choice: dict[str, Any]) -> None:
    """The component-confidence record (chosen on validation or set in params) under ``"postprocess"`` in
    ``metrics.json``, where ``dvc metrics show`` lists it."""
    path = reports / METRICS_FILE
    current = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_text(path, json.dumps({**current, POSTPROCESS_KEY: choice}, indent=2) + "\n")


def _drift_reference(params: Params, source: str, evaluation: TestEvaluation) -> tuple[Any, dict[str, float]]:
    """The reference profile of the training split (stored with the model) and how the drift check does
    on the test split as it is and as other scanners would deliver it
    (:mod:`tumorseg.monitoring.scanner_changes`), written under ``"drift"`` in ``metrics.json``."""
    from tumorseg.data.source import source_folder
    from tumorseg.evaluation.pipeline_stage import METRICS_FILE, split_cases
    from tumorseg.monitoring.drift import DriftMonitor, build_profile
    from tumorseg.monitoring.scanner_changes import scanner_change_metrics

    cfg = params.monitor
    per_case = evaluation.per_case
    volumes = {
        str(region): [float(v) for v in rows["volume_pred_ml"]] for region, rows in per_case.groupby("region")
    }
    where = f"train split of {source_folder(params, source)}"
    profile = build_profile(
        split_cases(params, "train", source=source),
        limit=cfg.profile_cases,
        source=where,
        predicted_volumes_ml=volumes,
    )
    found = scanner_change_metrics(
        DriftMonitor.from_params(profile, cfg), split_cases(params, "test", source=source)
    )
    for case_id, reasons in found.pop("drift_false_alarms").items():
        log.info("drift check: test case %s outside the reference: %s", case_id, "; ".join(reasons))
    metrics = {key: float(value) for key, value in found.items()}
    path = Path(params.paths.reports) / METRICS_FILE
    current = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_text(path, json.dumps({**current, "drift": metrics}, indent=2) + "\n")
    log.info(
        "drift check (%d test cases): false alarms %.0f %%, changed scanners flagged %s",
        metrics["drift_cases"],
        100 * metrics["drift_false_alarm_rate"],
        ", ".join(
            f"{k.removeprefix('drift_detected_')} {100 * v:.0f} %"
            for k, v in metrics.items()
            if k.startswith("drift_detected_")
        ),
    )
    return profile, metrics


def _planar_drift_reference(
    params: Params, records: dict[str, list[dict[str, Any]]], reports: Path
) -> tuple[Any, dict[str, float]]:
    """:func:`_drift_reference` for the 2-D branch: the training images' profile, and the check on the
    held-out images as they are and changed (:func:`~tumorseg.monitoring.scanner_changes.planar_change_metrics`)."""
    from tumorseg.data.planar import read_planar
    from tumorseg.evaluation.pipeline_stage import METRICS_FILE
    from tumorseg.monitoring.drift import IMAGE, DriftMonitor, Profile, planar_features
    from tumorseg.monitoring.scanner_changes import planar_change_metrics

    def files(split: str) -> list[Path]:
        paths = [Path(r["source_path"]) for r in records[split] if r.get("source_path")]
        return [p for p in paths if p.is_file()]

    train = files("train")
    if len(train) < 3:
        log.warning("drift: %d readable 2-D training images; no profile stored", len(train))
        return None, {}
    picks = np.linspace(0, len(train) - 1, min(len(train), params.monitor.profile_cases)).round().astype(int)
    cases = []
    for i in sorted(set(picks.tolist())):
        read = read_planar(train[i])
        cases.append(planar_features(read.case_id, read.image, read.fmt))
    profile = Profile(cases, {}, f"train split of {params.data.source_2d}", kind=IMAGE)
    found = planar_change_metrics(DriftMonitor.from_params(profile, params.monitor), files("test"))
    for case_id, reasons in found.pop("drift_false_alarms").items():
        log.info("drift check: test image %s outside the reference: %s", case_id, "; ".join(reasons))
    metrics = {key: float(value) for key, value in found.items()}
    path = reports / METRICS_FILE
    current = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_text(path, json.dumps({**current, "drift": metrics}, indent=2) + "\n")
    return profile, metrics


def _checkpoint(checkpoint: str | Path | None, out_dir: str | Path) -> Path:
    """``checkpoint``, by default the best checkpoint of the training run in ``out_dir``."""
    return Path(checkpoint) if checkpoint else Path(out_dir) / "checkpoints" / "best.ckpt"


def _write_unregistered(path: Path, name: str, reason: str) -> None:
    """``model_version.json`` saying no version was registered (the DVC stage always has its output)."""
    record = {"name": name, **dict.fromkeys(("version", "run_id", "model_uri", "alias")), "reason": reason}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def evaluate_planar(
    params: Params | dict[str, Any],
    *,
    checkpoint: str | Path | None = None,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    register: bool | None = None,
) -> PlanarEvaluation:
    """The ``evaluate_2d`` stage; ``checkpoint`` defaults to ``<train_2d.out_dir>/checkpoints/best.ckpt``,
    ``register`` to ``evaluate_2d.register_models``. DataError: no checkpoint or no test images."""
    params = as_params(params, source)
    cfg = load_planar_training_config(params, source=source)
    ev = params.evaluate_2d
    det_cfg = params.detect
    predict_cfg = params.predict_2d
    ckpt = _checkpoint(checkpoint, cfg.train.out_dir)
    if not ckpt.is_file():
        raise DataError(f"{ckpt}: no 2-D checkpoint; run `tumorseg train --dims 2` first")
    model = load_planar_checkpoint(ckpt)
    model.predict_settings = predict_cfg.model_dump(mode="json")
    records = planar_split_records(cfg, source)
    if not records["test"]:
        raise DataError(f"{source}: paths.split_2d: {cfg.paths.split} has no test images to evaluate")

    per_case, probability = detect_and_score(model, records, det_cfg)
    stats = {"resamples": ev.bootstrap_resamples, "ci_level": ev.ci_level, "seed": ev.seed}
    metrics = test_metrics(per_case, probability, model.detector, stats)
    files = write_reports(Path(cfg.paths.reports), metrics, per_case)
    result = PlanarEvaluation(clean_json(metrics), per_case, files=files)
    profile, drift_metrics = (
        _planar_drift_reference(params, records, Path(cfg.paths.reports))
        if params.monitor.enabled
        else (None, {})
    )
    run_id = None
    uri = resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri, cfg.paths.mlruns)
    if cfg.mlflow.enabled:
        prepare_mlflow()
        run_id = log_test_evaluation(
            flatten_metrics(result.metrics),
            result.files,
            checkpoint=ckpt,
            tracking_uri=uri,
            experiment=cfg.train.experiment,
            prefix="test_2d/",
            folder=lambda _key: "evaluation_2d",
            run_name="evaluate-2d",
        )
        if drift_metrics:
            log_test_evaluation(
                drift_metrics,
                {},
                checkpoint=ckpt,
                tracking_uri=uri,
                experiment=cfg.train.experiment,
                prefix="drift_2d/",
            )
    if (ev.register_models if register is None else register) and run_id is not None:
        with tempfile.TemporaryDirectory(prefix="tumorseg-2d-package-") as folder:
            result.registered = register_planar_models(
                save_package(model, folder),
                {"metrics": result.metrics, "evidence": _evidence(per_case, records["test"])},
                run_id=run_id,
                tracking_uri=uri,
                names={"segmentation": ev.model_name, "detection": det_cfg.model_name},
                config=model.config,
                data_md5=data_version(cfg.paths.preprocessed)["data_md5"],
                synthetic=params.data.is_synth(2),
                drift_profile=profile,
            )
    versions = {kind: r.to_dict() for kind, r in result.registered.items()}
    result.files["versions"] = Path(cfg.paths.reports) / MODEL_VERSION_FILE
    atomic_write_text(result.files["versions"], json.dumps(versions, indent=2) + "\n")
    log.debug(result.one_line())  # the command prints it; Prefect tasks publish it
    return result


def _evidence(per_case: pd.DataFrame, test_records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-image scores the promotion gate pairs: ``tumour`` Dice, and ``correct`` (0/1) for the detector."""
    digests = {r["case_id"]: reference_digest(r) for r in test_records}

    def scores(rows: pd.DataFrame, region: str, column: str) -> dict[str, Any]:
        return {
            "regions": [region],
            "case_dice": {r.case_id: {region: float(getattr(r, column))} for r in rows.itertuples()},
            "reference_sha256": {c: digests[c] for c in rows["case_id"]},
        }

    return {
        "segmentation": scores(per_case[per_case["has_mask"]], "tumour", "dice"),
        "detection": scores(per_case, "correct", "correct"),
    }
