"""The ``@2d`` stages of ``dvc.yaml`` as one Prefect flow: source -> ingest -> validate -> preprocess ->
split -> train -> evaluate (detector choice, test metrics, challengers) -> promote (both 2-D names).

Every task calls the function its ``tumorseg`` command calls; caching follows
:mod:`pipelines.training_flow` (:mod:`pipelines.stage_cache`), and ``promote@2d`` always runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.data_flows import (
    IO_RETRIES,
    load_params,
    split_and_publish,
    tracking_uri,
    validate_and_publish,
)
from pipelines.stage_cache import cached_task, dvc_stage_specs, with_source_folder
from tumorseg.params import Params, as_params


def _cached(task_fn: Any, stage: str, params: dict[str, Any], source: Path | None = None) -> Any:
    """The task with its ``<stage>@2d`` cache policy; ``source`` replaces ``${data.source_2d}``."""
    spec = with_source_folder(dvc_stage_specs()[f"{stage}@2d"], stage, source, "${data.source_2d}")
    return cached_task(task_fn, spec, params)


# ---------------------------------------------------------------------------- tasks
@task(name="source@2d", **IO_RETRIES)
def source_2d_task(params: dict, params_path: str) -> str:
    """``tumorseg source --dims 2``: generate the images (``data.source_2d: synth_2d``) or check the folder."""
    from tumorseg.data.source import prepare_source

    return prepare_source(params, params_path, 2).one_line()


@task(name="ingest@2d", **IO_RETRIES)
def ingest_2d_task(params: Params | dict[str, Any], source: str) -> str:
    params = as_params(params, source)
    from tumorseg.data.ingest import ingest

    return ingest(Path(source), Path(params.paths.ingested_2d), params.ingest).one_line()


@task(name="validate@2d", **IO_RETRIES)
def validate_2d_task(params: Params | dict[str, Any]) -> str:
    params = as_params(params)
    from tumorseg.config import PlanarValidateConfig

    paths = params.paths
    planar_cfg: PlanarValidateConfig = params.validate_2d
    return validate_and_publish(
        Path(paths.ingested_2d),
        Path(paths.validated_2d),
        params,
        artifact_key="data-validation-2d",
        description="2-D data validation",
        planar_cfg=planar_cfg,
    )


@task(name="preprocess@2d", **IO_RETRIES)
def preprocess_2d_task(params: Params | dict[str, Any]) -> str:
    params = as_params(params)
    from tumorseg.data.preprocess import preprocess_dataset

    paths = params.paths
    return preprocess_dataset(
        Path(paths.validated_2d),
        Path(paths.preprocessed_2d),
        params.preprocess,
        params.preprocess_2d,
    ).one_line()


@task(name="split@2d", **IO_RETRIES)
def split_2d_task(params: Params | dict[str, Any]) -> dict[str, int]:
    params = as_params(params)
    paths = params.paths
    return split_and_publish(
        Path(paths.preprocessed_2d),
        Path(paths.split_2d),
        params,
        unit="images",
        artifact_key="data-split-2d",
        description="Patient-level 2-D split",
    )


@task(name="train@2d", **IO_RETRIES)
def train_2d_task(params: dict) -> dict[str, Any]:
    """``tumorseg train --dims 2``."""
    from tumorseg.training.train import train

    result = train(params, dims=2, tracking_uri=tracking_uri(params))
    create_markdown_artifact(key="training-2d", markdown=result.one_line(), description="2-D training")
    return {"best_val": result.best_val, "epochs": result.epochs, "mlflow_run_id": result.mlflow_run_id}


@task(name="evaluate@2d", **IO_RETRIES)
def evaluate_2d_task(params: dict) -> dict[str, Any]:
    """``tumorseg evaluate-model --dims 2``: detector choice, test metrics with CIs, challengers registered."""
    from tumorseg.registry.evaluate_stage import evaluate_planar

    result = evaluate_planar(params, tracking_uri=tracking_uri(params))
    det = result.metrics["detection"]
    rows = [(m, det[m]) for m in ("accuracy", "sensitivity", "specificity", "auc")]
    per_type = result.metrics["segmentation"]["per_tumour_type"]
    rows += [(f"dice {kind}", stats["dice"]) for kind, stats in per_type.items()]
    create_table_artifact(
        key="test-metrics-2d",
        table=[{"metric": m, "value": v["value"], "ci": f"[{v['ci_low']}, {v['ci_high']}]"} for m, v in rows],
        description=result.one_line(),
    )
    return {
        "one_line": result.one_line(),
        "registered": {kind: r.to_dict() for kind, r in result.registered.items()},
    }


@task(name="promote@2d", cache_policy=NO_CACHE, **IO_RETRIES)
def promote_2d_task(params: dict) -> dict[str, Any]:
    """``tumorseg promote --dims 2``: both 2-D models through the 3-D model's gate, one report."""
    from tumorseg.registry.promote import promote_planar

    results = promote_planar(params)
    decisions = {
        r.model_name: {"action": r.action, "champion": r.champion, "lines": r.lines()} for r in results
    }
    create_markdown_artifact(
        key="promotion-2d",
        markdown="\n".join(f"- **{n}**: {d['lines'][0]}" for n, d in decisions.items()),
        description="2-D champion/challenger decisions",
    )
    return decisions


# ---------------------------------------------------------------------------- the flow
@flow(name="planar-pipeline", log_prints=True)
def planar_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every ``@2d`` stage in order (``overrides``: ``{"train_2d.max_epochs": 2}``); returns
    ``{<stage>: <summary>}``. A failed step fails the run and no champion moves."""
    from tumorseg.data.source import source_folder

    params = load_params(params_path, overrides)
    folder = source_folder(params, params_path, 2)
    summary: dict[str, Any] = {}
    summary["source"] = _cached(source_2d_task, "source", params, folder)(params, params_path)
    summary["ingest"] = _cached(ingest_2d_task, "ingest", params, folder)(params, str(folder))
    summary["validate"] = _cached(validate_2d_task, "validate", params)(params)
    summary["preprocess"] = _cached(preprocess_2d_task, "preprocess", params)(params)
    summary["split"] = _cached(split_2d_task, "split", params)(params)
    summary["train"] = _cached(train_2d_task, "train", params)(params)
    summary["evaluate"] = _cached(evaluate_2d_task, "evaluate", params)(params)
    summary["promote"] = promote_2d_task(params)
    print(summary["evaluate"]["one_line"])
    for name, decision in summary["promote"].items():
        print(f"{name}: {decision['lines'][0]}")
    return summary
