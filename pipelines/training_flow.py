"""The training pipeline as one Prefect flow: source -> ingest -> [new data?] -> validate -> preprocess
-> split -> (tune) -> train -> compress -> evaluate -> register -> promote.

Every task calls the function its ``tumorseg`` command (DVC stage) calls, so ``dvc repro`` and this
flow write the same artefacts. Stages are cached like DVC (:mod:`pipelines.stage_cache`); file-system
steps retry on ``OSError`` only; ``register`` and ``promote`` act on the registry's current state and
always run, and ``promote``, the only step that moves ``champion``, runs only after every other step
succeeded. Scheduled runs stop after ``ingest`` when the raw data's hash is the champion's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.data_flows import (
    IO_RETRIES,
    ingest_task,
    load_params,
    preprocess_task,
    source_task,
    split_task,
    tracking_uri,
    validate_task,
)
from pipelines.stage_cache import StageSpec, cached_task, dvc_stage_specs, with_source_folder
from tumorseg.params import Params, as_params

log = logging.getLogger(__name__)

# The one stage ``dvc.yaml`` does not run (``dvc repro`` trains with what tune last wrote).
TUNE_STAGE = StageSpec(
    "tune",
    ("tune", "data_loader", "augment", "model", "loss", "sliding_window", "train", "trainer"),
    (
        "${paths.preprocessed}",
        "${paths.split}",
        "src/tumorseg/tuning",
        "src/tumorseg/training",
        "src/tumorseg/models",
        "src/tumorseg/data/datamodule.py",
    ),
    ("${tune.best_params_file}",),
)


def stage_specs() -> dict[str, StageSpec]:
    """Each stage's params keys, dependencies and outputs, read from ``dvc.yaml``, plus ``tune``."""
    return {**dvc_stage_specs(), "tune": TUNE_STAGE}


# ``dvc repro`` compresses the champion ``promote`` settled on; the flow compresses the checkpoint it
# just trained (before evaluation), so that checkpoint takes the promotion record's place in the key.
FLOW_COMPRESS_INPUT = {"${paths.reports}/promotion.json": "${train.out_dir}/checkpoints/best.ckpt"}


def _cached(task_fn: Any, stage: str, params: dict[str, Any], source: Path | None = None) -> Any:
    """The task with its stage's cache policy; ``source`` replaces ``${data.source}``."""
    specs = stage_specs()
    spec = specs[stage] if stage in specs else specs[f"{stage}@3d"]  # dvc.yaml's foreach: the volumes
    spec = with_source_folder(spec, stage, source, "${data.source}")
    if stage == "compress":
        spec = dataclasses.replace(spec, deps=tuple(FLOW_COMPRESS_INPUT.get(d, d) for d in spec.deps))
    return cached_task(task_fn, spec, params)


# ---------------------------------------------------------------------------- tasks
@task(name="check-new-data", cache_policy=NO_CACHE)
def check_new_data_task(params: dict) -> dict[str, Any]:
    """Compare the ingested raw data with the champion's (:func:`tumorseg.retrain.decide_retrain`)."""
    from tumorseg.retrain import decide_retrain

    decision = decide_retrain(params, tracking_uri=tracking_uri(params))
    create_markdown_artifact(
        key="retrain-decision",
        markdown=f"**{'retrain' if decision.retrain else 'no new data'}**: {decision.reason}",
        description="Data-triggered retraining: raw data hash vs. the champion's",
    )
    return decision.to_dict()


@task(name="monitor-drift", cache_policy=NO_CACHE)
def monitor_task(params: dict, folder: str) -> dict[str, Any]:
    """The drift of the predictions in ``folder`` (:func:`tumorseg.monitoring.monitor.monitor_folder`),
    logged to MLflow and published as the ``drift`` artifact. A folder without predictions yet is
    reported, not an error: the schedule must not fail before the first prediction."""
    from tumorseg.errors import DataError
    from tumorseg.monitoring.monitor import monitor_folder

    try:
        report = monitor_folder(folder, params, tracking_uri=tracking_uri(params))
    except DataError as exc:
        text = f"drift not monitored: {exc}"
        create_markdown_artifact(key="drift", markdown=text, description=f"Drift of {folder}")
        return {"drifted": False, "one_line": text, "cases": 0, "flagged": 0}
    create_markdown_artifact(
        key="drift",
        markdown=report.markdown(),
        description=f"Drift of the predictions in {folder} against the serving model's training data",
    )
    return {
        "drifted": report.drifted,
        "one_line": report.one_line(),
        "cases": report.cases,
        "flagged": report.flagged,
        "mlflow_run_id": report.mlflow_run_id,
    }


@task(name="tune", cache_policy=NO_CACHE)
def tune_task(params: dict) -> dict[str, Any]:
    from tumorseg.tuning.study import run_study

    result = run_study(params, tracking_uri=tracking_uri(params))
    create_markdown_artifact(
        key="tuning",
        markdown=f"{result.one_line()}\n\nBest overrides:\n\n```yaml\n{yaml.safe_dump(result.best_overrides)}```",
        description="Optuna search: best trial",
    )
    return {"best_value": result.best_value, "best_overrides": result.best_overrides}


@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=IO_RETRIES["retry_condition_fn"])
def train_task(params: dict) -> dict[str, Any]:
    """``tumorseg train`` (params already merged with the best-params file)."""
    from tumorseg.training.train import train

    result = train(params, tracking_uri=tracking_uri(params))
    create_table_artifact(
        key="training",
        table=[{"region": r, "best_val_dice": round(v, 4)} for r, v in result.best_val_dice.items()],
        description=result.one_line(),
    )
    return {
        "best_val_dice": result.best_val_dice,
        "epochs": result.epochs,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "mlflow_run_id": result.mlflow_run_id,
    }


@task(name="compress", **IO_RETRIES)
def compress_task(params: Params | dict[str, Any]) -> str:
    """``tumorseg compress`` when the compression stage is installed (it is optional in this flow)."""
    params = as_params(params)
    try:
        from tumorseg.compression.stage import run_compress_stage
    except ImportError:
        log.warning("tumorseg.compression.stage is not available; compression skipped")
        return "skipped: tumorseg.compression.stage not available"

    checkpoint = Path(params.train.out_dir) / "checkpoints" / "best.ckpt"
    # the model this run just trained, not the served champion (compress.model's default)
    result = run_compress_stage(params, tracking_uri=tracking_uri(params), model_uri=str(checkpoint))
    text = result.one_line() if hasattr(result, "one_line") else str(result)
    create_markdown_artifact(key="compression", markdown=text, description="Model compression")
    return text


@task(name="evaluate", **IO_RETRIES)
def evaluate_task(params: dict, params_path: str = "params.yaml") -> dict[str, Any]:
    """``tumorseg evaluate-model``: test split in the source geometry, registered as ``challenger``
    (``data.source`` resolves against ``params_path``'s folder)."""
    from tumorseg.registry.evaluate_stage import run_evaluate_stage

    result = run_evaluate_stage(params, tracking_uri=tracking_uri(params), source=params_path)
    m = result.evaluation.metrics
    create_table_artifact(
        key="test-metrics",
        table=[
            {
                "region": region,
                "dice": m.get(f"dice_{region}"),
                "dice_ci": f"[{m.get(f'dice_{region}_ci_low')}, {m.get(f'dice_{region}_ci_high')}]",
                "hd95_mm": m.get(f"hd95_{region}"),
            }
            for region in ("WT", "TC", "ET")
        ]
        + [{"region": "mean", "dice": m.get("dice_mean"), "dice_ci": "", "hd95_mm": None}],
        description=result.one_line(),
    )
    registered = result.registered.to_dict() if result.registered is not None else None
    return {"metrics": m, "registered": registered, "one_line": result.one_line()}


@task(name="register", cache_policy=NO_CACHE, **IO_RETRIES)
def register_task(params: dict, evaluation: dict[str, Any], raw_md5: str) -> dict[str, Any] | None:
    """Record on the registered version what the flow knows: the raw data it was trained on."""
    from tumorseg.retrain import record_raw_data_hash

    registered = evaluation.get("registered")
    if registered is None:
        create_markdown_artifact(key="registered-model", markdown="registry off: no version registered")
        return None
    record_raw_data_hash(params, registered["version"], raw_md5, tracking_uri=tracking_uri(params))
    create_markdown_artifact(
        key="registered-model",
        markdown=(
            f"Registered **{registered['name']} version {registered['version']}** as `challenger` "
            f"(run `{registered['run_id']}`, raw data `{raw_md5}`).\n\n{evaluation['one_line']}"
        ),
        description="Model registry",
    )
    return registered


@task(name="promote", cache_policy=NO_CACHE, **IO_RETRIES)
def promote_task(params: dict) -> dict[str, Any]:
    """``tumorseg promote``: the champion/challenger gate."""
    from tumorseg.registry.promote import promote

    result = promote(params, tracking_uri=tracking_uri(params))
    lines = result.lines()
    create_markdown_artifact(
        key="promotion-decision",
        markdown=f"**{result.action}**\n\n" + "\n".join(f"- {line.strip()}" for line in lines),
        description="Champion/challenger promotion decision",
    )
    return {
        "action": result.action,
        "champion": result.champion,
        "challenger": result.challenger,
        "lines": lines,
    }


# ---------------------------------------------------------------------------- the flow
@flow(name="training-pipeline", log_prints=True)
def training_flow(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    *,
    only_if_new_data: bool = False,
    tune: bool | None = None,
) -> dict[str, Any]:
    """The whole training chain (see the module docstring).

    Args:
        overrides: dotted-key overrides (``{"train.max_epochs": 2}``).
        only_if_new_data: stop early, recording "no new data", when the raw data is what the
            champion was trained on (scheduled runs), unless ``monitor.folder``'s predictions have
            drifted and ``monitor.retrain_on_drift`` is set.
        tune: run the Optuna search first (None: ``flow.tune``).

    Returns:
        ``{"status": "no_new_data" | "completed", "decision": ..., <stage>: <summary>}``; a failed
        step fails the flow run (and ``champion`` stays where it was).
    """
    from tumorseg.data.source import source_folder
    from tumorseg.retrain import raw_data_hash

    params = load_params(params_path, overrides)
    cfg = params.flow
    summary: dict[str, Any] = {"status": "completed"}
    folder = source_folder(params, params_path)
    summary["source"] = _cached(source_task, "source", params, folder)(params, params_path)
    summary["ingest"] = _cached(ingest_task, "ingest", params, folder)(params, str(folder))
    raw_md5 = raw_data_hash(params.paths.ingested)
    if params.monitor.folder:
        summary["drift"] = monitor_task(params, params.monitor.folder)
        print(summary["drift"]["one_line"])
    if only_if_new_data:
        decision = check_new_data_task(params)
        summary["decision"] = decision
        drifted = bool(summary.get("drift", {}).get("drifted")) and params.monitor.retrain_on_drift
        if not decision["retrain"] and drifted:
            decision["retrain"] = True
            decision["reason"] += (
                f"; retraining on drift (monitor.retrain_on_drift): {summary['drift']['one_line']}"
            )
        if not decision["retrain"]:
            summary["status"] = "no_new_data"
            print(decision["reason"])
            return summary
    summary["validate"] = _cached(validate_task, "validate", params)(params)
    summary["preprocess"] = _cached(preprocess_task, "preprocess", params)(params)
    summary["split"] = _cached(split_task, "split", params)(params)
    if cfg.tune if tune is None else tune:
        summary["tune"] = _cached(tune_task, "tune", params)(params)
    from tumorseg.tuning.best import with_best_params

    trained_params = with_best_params(params, explicit=overrides, source=params_path)
    summary["train"] = _cached(train_task, "train", trained_params)(trained_params)
    if cfg.compress:
        summary["compress"] = _cached(compress_task, "compress", trained_params)(trained_params)
    evaluation = _cached(evaluate_task, "evaluate", trained_params)(trained_params, params_path)
    summary["evaluate"] = evaluation["one_line"]
    summary["register"] = register_task(trained_params, evaluation, raw_md5)
    summary["promote"] = promote_task(trained_params)
    for line in summary["promote"]["lines"]:
        print(line)
    return summary


# ---------------------------------------------------------------------------- smoke run
def smoke_params(workspace: str | Path, params_path: str | Path = "params.yaml") -> Path:
    """Write ``workspace/params.yaml`` for the smoke run: the project's params, every path inside
    ``workspace``, and ``flow.smoke.overrides`` (tiny data and network). Returns its path."""
    workspace = Path(workspace).resolve()
    params = load_params(params_path)
    smoke = params.flow.smoke.overrides
    folders = ("ingested", "validated", "preprocessed", "reports", "mlruns")
    overrides = {
        **{f"paths.{key}": str(workspace / key) for key in folders},
        "paths.split": str(workspace / "split.json"),
        "train.out_dir": str(workspace / "models"),
        "mlflow.tracking_uri": f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}",
        "flow.cache_dir": str(workspace / ".prefect-cache"),
        "data.source": "synth",  # generated into <workspace>/data/synth
        "tune.best_params_file": str(workspace / "reports" / "best_params.yaml"),
        "tune.storage": f"sqlite:///{workspace / 'mlruns' / 'optuna.db'}",
        "compress.out_dir": str(workspace / "models" / "compressed"),
        **smoke,
    }
    params = params.with_overrides(overrides)
    workspace.mkdir(parents=True, exist_ok=True)
    out = workspace / "params.yaml"
    out.write_text(yaml.safe_dump(params.raw, sort_keys=False))
    return out


def run_smoke(params_path: str | Path = "params.yaml", workspace: str | Path | None = None) -> dict[str, Any]:
    """The whole flow on tiny generated data in ``workspace`` (default: a new temporary folder, kept)."""
    folder = Path(workspace) if workspace else Path(tempfile.mkdtemp(prefix="tumorseg-smoke-"))
    smoke = smoke_params(folder, params_path)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    summary = training_flow(params_path=str(smoke))
    summary["workspace"] = str(folder)
    return summary
