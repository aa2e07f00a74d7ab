"""The ``@2d`` stages of ``dvc.yaml`` as one Prefect flow: source -> ingest -> validate -> preprocess ->
split -> train -> evaluate (detector choice, test metrics, challengers) -> promote (both 2-D names) ->
compress (``compress_2d``: the new 2-D champion's deployment variants and ``tumorseg-2d@edge``).

Every task calls the function its ``tumorseg`` command calls; caching follows
:mod:`pipelines.training_flow` (:mod:`pipelines.stage_cache`), and ``promote@2d`` always runs.
``compress_2d`` runs when ``flow.compress`` is on and the segmenter's champion has no compression yet
(it moved in this run, or an earlier compression failed or compressed another version: the report's
``source_version``): the edge model follows the champion. A changed ``compress:`` setting alone is
applied by ``tumorseg compress --dims 2`` (or ``dvc repro compress_2d``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from pipelines.stage_cache import cached_task, dvc_stage_specs, with_source_folder


def _cached(task_fn: Any, stage: str, params: dict[str, Any], source: Path | None = None) -> Any:
    """The task as ``<stage>@2d``, with that stage's cache policy; ``source`` replaces ``${data.source_2d}``."""
    spec = with_source_folder(dvc_stage_specs()[f"{stage}@2d"], stage, source, "${data.source_2d}")
    return cached_task(task_fn.with_options(name=spec.name), spec, params)


# ---------------------------------------------------------------------------- tasks
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


@task(name="compress@2d", cache_policy=NO_CACHE, **IO_RETRIES)
def compress_2d_task(params: dict) -> dict[str, Any]:
    """``tumorseg compress --dims 2``: the 2-D champion's variants, gated on test Dice, edge registered."""
    from tumorseg.compression.stage import run_compress_stage

    result = run_compress_stage(params, tracking_uri=tracking_uri(params), dims=2)
    text = result.one_line()
    create_markdown_artifact(key="compression-2d", markdown=text, description="2-D model compression")
    return {
        "one_line": text,
        "edge": result.edge.name if result.edge else None,
        "registered": result.registered,
    }


def _compressed_version(params: Any) -> str | None:
    """The 2-D model version the last ``compress --dims 2`` compressed (its report), or None."""
    import json

    report = Path(params.paths.reports_2d) / "compression.json"
    try:
        return str(json.loads(report.read_text())["source_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------- the flow
@flow(name="planar-pipeline", log_prints=True)
def planar_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every ``@2d`` stage in order (``overrides``: ``{"train_2d.max_epochs": 2}``); returns
    ``{<stage>: <summary>}``. A failed step fails the run and no champion moves."""
    from tumorseg.data.source import source_folder

    params = load_params(params_path, overrides)
    folder = source_folder(params, params_path, 2)
    summary: dict[str, Any] = {}
    summary["source"] = _cached(source_task, "source", params, folder)(params, params_path, 2)
    summary["ingest"] = _cached(ingest_task, "ingest", params, folder)(params, str(folder), 2)
    summary["validate"] = _cached(validate_task, "validate", params)(params, 2)
    summary["preprocess"] = _cached(preprocess_task, "preprocess", params)(params, 2)
    summary["split"] = _cached(split_task, "split", params)(params, 2)
    summary["train"] = _cached(train_2d_task, "train", params)(params)
    summary["evaluate"] = _cached(evaluate_2d_task, "evaluate", params)(params)
    summary["promote"] = promote_2d_task(params)
    print(summary["evaluate"]["one_line"])
    for name, decision in summary["promote"].items():
        print(f"{name}: {decision['lines'][0]}")
    champion = summary["promote"].get(params.evaluate_2d.model_name, {}).get("champion")
    if not params.flow.compress:
        summary["compress"] = "skipped: flow.compress is off"
    elif champion is None:
        summary["compress"] = "skipped: no 2-D champion"
    elif _compressed_version(params) == str(champion):
        summary["compress"] = f"skipped: the 2-D champion (version {champion}) is compressed already"
    else:
        summary["compress"] = compress_2d_task(params)
        print(summary["compress"]["one_line"])
    return summary
