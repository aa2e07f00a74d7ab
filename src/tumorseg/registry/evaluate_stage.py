"""The ``evaluate`` stages: score the test split (:mod:`tumorseg.evaluation`), log it to the training
run and register the model as a challenger.

Scoring is the evaluation's job, registering the registry's: this module composes the two, so the
evaluation layer never imports the registry. ``run_evaluate_stage`` is ``evaluate@3d`` (the volumes),
``evaluate_planar`` ``evaluate@2d`` (the segmenter and the detector of the images).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tumorseg.config import section
from tumorseg.data.manifest import atomic_write_text
from tumorseg.errors import DataError
from tumorseg.evaluation.pipeline_stage import MODEL_VERSION_FILE, TestEvaluation, evaluate_test_split
from tumorseg.evaluation.planar_evaluate import (
    VERSION_FILE,
    PlanarEvaluation,
    clean_json,
    detect_and_score,
    flat_metrics,
    reference_digest,
    test_metrics,
    write_reports,
)
from tumorseg.models.planar_package import load_planar_checkpoint, save_planar_package
from tumorseg.registry.loading import prepare_mlflow
from tumorseg.registry.planar_register import register_planar_models
from tumorseg.registry.register import checkpoint_or_new_run, log_test_evaluation, register_model
from tumorseg.tracking import data_version, params_tracking_uri, resolve_tracking_uri
from tumorseg.training.planar_train import load_planar_training_config, planar_split_records

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the stage
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
    params: dict[str, Any],
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
    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.models.predictor import SegmentationPredictor

    paths = section("paths", params, source=source)
    train_cfg = section("train", params, source=source)
    predict_cfg = section("predict", params, source=source)
    registry_cfg = section("registry", params, source=source)
    mlflow_cfg = section("mlflow", params, source=source)
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
    record = {"name": name, **dict.fromkeys(("version", "run_id", "model_uri", "alias")), "reason": reason}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------------- images
def evaluate_planar(
    params: dict[str, Any],
    *,
    checkpoint: str | Path | None = None,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    register: bool | None = None,
) -> PlanarEvaluation:
    """The ``evaluate_2d`` stage; ``checkpoint`` defaults to ``<train_2d.out_dir>/checkpoints/best.ckpt``,
    ``register`` to ``evaluate_2d.register_models``. DataError: no checkpoint or no test images."""
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

    per_case, probability = detect_and_score(model, records, det_cfg)
    stats = {"resamples": ev.bootstrap_resamples, "ci_level": ev.ci_level, "seed": ev.seed}
    metrics = test_metrics(per_case, probability, model.detector, stats)
    files = write_reports(Path(cfg.paths.reports), metrics, per_case)
    result = PlanarEvaluation(clean_json(metrics), per_case, files=files)
    run_id = _log_to_run(cfg, ckpt, result, tracking_uri)
    if (ev.register_models if register is None else register) and cfg.mlflow.enabled and run_id is not None:
        with tempfile.TemporaryDirectory(prefix="tumorseg-2d-package-") as folder:
            result.registered = register_planar_models(
                save_planar_package(model, folder),
                {"metrics": result.metrics, "evidence": _evidence(per_case, records["test"])},
                run_id=run_id,
                tracking_uri=resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri, cfg.paths.mlruns),
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


def _log_to_run(cfg: Any, checkpoint: Path, result: PlanarEvaluation, tracking_uri: str | None) -> str | None:
    """Flat test metrics (``test_2d/...``) and the reports on the training run; returns its id."""
    if not cfg.mlflow.enabled:
        return None
    prepare_mlflow()  # no telemetry, no download progress bars: as the 3-D stage
    from mlflow import MlflowClient

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
