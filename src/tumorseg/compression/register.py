"""Logging the compression report to a ``compress`` MLflow run and registering the edge model.

The edge model is registered as a *new* version of the compressed model (``registry.model_name``, or
``evaluate_2d.model_name`` for the 2-D one) with alias ``compress.alias``; existing versions and
other aliases are never modified. A promotion that moved the champion while compress ran leaves the
alias where it was (the new version is tagged ``compression.superseded``). Here, not in :mod:`tumorseg.registry`: that package is upstream of
compression, and the DVC ``compress`` stage depends on ``src/tumorseg/compression``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.compression.config import CompressConfig
from tumorseg.compression.report import CompressionResult, VariantResult
from tumorseg.params import Params, as_params

if TYPE_CHECKING:
    from tumorseg.compression.dims import ModelKind

RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "torch.export": "PyTorch, torch.export program"}
RUNTIME_ARTIFACTS = {"onnxruntime": "onnx", "torch.export": "program"}
"""Pyfunc artifact key of each runtime's file (what ``models.package.load_artifacts`` reads)."""
RUNTIME_EXTRA_PACKAGES = {"onnxruntime": ("onnxruntime",), "torch.export": ()}
"""Distributions a runtime's file needs beyond the pyfunc's own requirements."""

log = logging.getLogger(__name__)


def log_compress_run(
    outcome: CompressionResult,
    trained: Any,
    run_cfg: Any,
    params: dict[str, Any],
    cfg: CompressConfig,
    uri: str,
    source: str,
    kind: ModelKind,
    drift_profile: Any = None,
) -> tuple[str, dict[str, str] | None]:
    """Log the report to a ``compress`` MLflow run (the ``kind``'s experiment); register the edge model
    (new version + alias) with the source model's ``drift_profile`` (it was trained on the same data)."""
    params = as_params(params, source)
    import mlflow

    from tumorseg import tracking

    experiment = kind.experiment(params)
    tracking.disable_telemetry()
    experiment_id = tracking.ensure_experiment(uri, experiment)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    tracking.reap_orphaned_runs(uri, experiment)  # a killed compress's run: FAILED, not RUNNING
    tags = {"tumorseg.stage": "compress", **({"tumorseg.branch": "2d"} if kind.dims == 2 else {})}
    run_id = tracking.create_run(client, experiment_id, run_name="compress", tags=tags)
    for key, value in tracking.flatten(cfg.model_dump(mode="json"), "compress.").items():
        client.log_param(run_id, key, str(value)[:500])
    _log_metrics(client, run_id, outcome)
    client.log_artifact(run_id, str(outcome.files["report_json"]))
    client.log_artifact(run_id, str(outcome.files["report_md"]))
    registered = None
    if cfg.register_edge and outcome.edge is not None:
        registered = register_edge(
            outcome, trained, run_cfg, params, cfg, uri, run_id, source, kind, drift_profile=drift_profile
        )
    client.set_terminated(run_id)
    return run_id, registered


def _log_metrics(client: Any, run_id: str, outcome: CompressionResult) -> None:
    """Each variant's measurements (``<variant>.<metric>``) and the edge's ratios to fp32 (``edge.*``)."""
    for result in outcome.variants:
        for metric, value in (
            ("latency_s", result.latency_s),
            ("fp32_alongside_latency_s", result.baseline_latency_s),
            ("inference_s", result.inference_s),
            ("file_mb", result.file_mb),
            ("parameters", result.parameters),
            ("dice_mean", result.dice.get("mean")),
            ("dice_drop", result.dice_drop),
            ("detection_accuracy", result.detection_accuracy),
            ("onnx_max_abs_diff", result.onnx_max_abs_diff),
        ):
            if value is not None:
                client.log_metric(run_id, f"{result.name}.{metric}", float(value))
    for key, value in outcome.report["edge_vs_fp32"].items():
        if value is not None:
            client.log_metric(run_id, f"edge.{key}", float(value))


def register_edge(
    outcome: CompressionResult,
    trained: Any,
    run_cfg: Any,
    params: Params | dict[str, Any],
    cfg: CompressConfig,
    uri: str,
    run_id: str,
    source: str,
    kind: ModelKind,
    drift_profile: Any = None,
) -> dict[str, str]:
    """Log the edge model's file as the tumorseg pyfunc; register it as a new version with alias and tags."""
    params = as_params(params, source)
    import mlflow

    from tumorseg.faults import write_point
    from tumorseg.registry.register import register_version
    from tumorseg.tracking import fluent_store, registry_lock

    edge = outcome.edge
    assert edge is not None
    name = kind.model_name(params)
    model_uri = _log_edge_model(outcome, edge, trained, run_cfg, uri, run_id, kind, drift_profile)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    with fluent_store(uri), registry_lock(uri):  # not while a promotion reads and moves the aliases
        write_point(f"register {name}")
        number = register_version(client, model_uri, name, None, _edge_tags(outcome, edge))
        client.update_model_version(name, number, description=_edge_description(outcome, edge))
        superseded = _source_superseded(client, outcome)
        if superseded is None:
            write_point(f"alias {name}@{cfg.alias}")
            client.set_registered_model_alias(name, cfg.alias, number)
        else:
            client.set_model_version_tag(name, number, "compression.superseded", superseded)
            log.warning("compress: %s; @%s not moved to version %s", superseded, cfg.alias, number)
    client.set_tag(run_id, "tumorseg.registered_version", f"{name}/{number}")
    return {
        "name": name,
        "version": number,
        "alias": cfg.alias if superseded is None else "(none: its source was superseded)",
        "uri": f"models:/{name}/{number}",
    }


def _source_superseded(client: Any, outcome: CompressionResult) -> str | None:
    """Why the edge alias must not move: the compressed model was an alias (the champion) that now
    names another version (a promotion while compress ran); None when it still names the source."""
    from tumorseg.registry.loading import MODELS_URI

    source = MODELS_URI.match(str(outcome.report.get("source_model", "")).split(" ", 1)[0])
    compressed = outcome.report.get("source_version")
    if source is None or not source["alias"] or compressed is None:
        return None
    from mlflow.exceptions import MlflowException

    try:
        now = str(client.get_model_version_by_alias(source["name"], source["alias"]).version)
    except MlflowException:
        return f"{source['name']}@{source['alias']} no longer exists (it named version {compressed})"
    if now == str(compressed):
        return None
    return f"{source['name']}@{source['alias']} moved from version {compressed} to {now} while compressing"


def _log_edge_model(
    outcome: CompressionResult,
    edge: VariantResult,
    trained: Any,
    settings: Any,
    uri: str,
    run_id: str,
    kind: ModelKind,
    drift_profile: Any = None,
) -> str:
    """Log the edge file, the model's config and inference settings (``kind``'s files), the report and
    the drift profile to ``run_id``; return its model URI.

    The same pyfunc as the fp32 versions, so a client loads an edge version as it loads the champion.
    """
    import mlflow

    from tumorseg.tracking import fluent_store

    with tempfile.TemporaryDirectory(prefix="tumorseg-edge-") as tmp, fluent_store(uri):
        artifacts = {
            RUNTIME_ARTIFACTS[edge.runtime]: str(outcome.files[edge.name]),
            "compression": str(outcome.files["report_json"]),
        }
        if drift_profile is not None:
            from tumorseg.monitoring.drift import PROFILE_ARTIFACT, PROFILE_FILE

            profile_file = Path(tmp) / PROFILE_FILE
            profile_file.write_text(json.dumps(drift_profile.to_dict(), indent=1) + "\n")
            artifacts[PROFILE_ARTIFACT] = str(profile_file)
        extra = RUNTIME_EXTRA_PACKAGES[edge.runtime]
        with mlflow.start_run(run_id=run_id):
            info = kind.log_edge_model(artifacts, trained, settings, Path(tmp), extra)
    return info.model_uri


def _edge_tags(outcome: CompressionResult, edge: VariantResult) -> dict[str, str]:
    """Version tags: which variant of which source model, and how it compares with fp32."""
    ratio = outcome.report["edge_vs_fp32"]
    return {
        "compression.variant": edge.name,
        "compression.source": str(outcome.report.get("source_model")),
        "compression.speedup": f"{ratio['speedup']:.3f}",
        "compression.size_ratio": f"{ratio['size_ratio']:.3f}",
        "compression.dice_drop": f"{ratio['dice_drop']:.6f}",
        "runtime": edge.runtime,
        "test_dice_mean": f"{edge.dice['mean']:.6f}",
    }


def _edge_description(outcome: CompressionResult, edge: VariantResult) -> str:
    """The version's description: what it was made from and what it costs in accuracy."""
    ratio = outcome.report["edge_vs_fp32"]
    return (
        f"Edge deployment of {outcome.report.get('source_model')}: variant {edge.name} "
        f"({RUNTIME_NAMES[edge.runtime]}), "
        f"{ratio['speedup']:.2f}x the fp32 speed and {ratio['size_ratio']:.2f}x smaller on CPU, mean Dice drop "
        f"{ratio['dice_drop']:+.4f} on the test split. Not for clinical use."
    )
