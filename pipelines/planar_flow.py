"""The 2-D pipeline as one Prefect flow.

``synth_2d`` (embedded Figshare-style and Kaggle-style data) -> ``ingest_2d`` -> ``validate_2d`` ->
``preprocess_2d`` -> ``split_2d`` -> ``train_2d`` -> ``evaluate_2d`` (detector choice, test metrics,
``tumorseg-2d`` and ``tumorseg-detect`` challengers) -> ``promote_2d`` (the champion/challenger gate
for both names).

One implementation, two drivers: every task calls the function its ``tumorseg`` command (the DVC
stage of the same name in ``dvc.yaml``) calls. Caching follows :mod:`pipelines.training_flow`: a
stage's key hashes the params keys its DVC stage lists, its dependency contents and its code
(:mod:`pipelines.stage_cache`), so a rerun with nothing changed skips finished stages; ``promote_2d``
acts on the registry's current state and always runs. File-system steps retry on ``OSError`` only.
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
from pipelines.stage_cache import cached_task, dvc_stage_specs
from tumorseg.config import section


def _cached(task_fn: Any, stage: str, params: dict[str, Any]) -> Any:
    """The task with its stage's cache policy (:func:`pipelines.stage_cache.cached_task`)."""
    return cached_task(task_fn, dvc_stage_specs()[stage], params)


# ---------------------------------------------------------------------------- tasks
@task(name="synth_2d", **IO_RETRIES)
def synth_2d_task(params: dict) -> int:
    """``tumorseg synth --layout figshare`` and ``--layout kaggle`` into ``paths.raw_2d``."""
    from tumorseg.data.planar_synth import synthesize_planar_dataset

    raw = Path(section("paths", params).raw_2d)
    cfg = section("synth_2d", params)
    return sum(len(synthesize_planar_dataset(raw / layout, layout, cfg)) for layout in ("figshare", "kaggle"))


@task(name="ingest_2d", **IO_RETRIES)
def ingest_2d_task(params: dict) -> str:
    from tumorseg.data.ingest import ingest

    paths = section("paths", params)
    return ingest(Path(paths.raw_2d), Path(paths.ingested_2d), section("ingest", params)).one_line()


@task(name="validate_2d", **IO_RETRIES)
def validate_2d_task(params: dict) -> str:
    from tumorseg.validation.planar_checks import PlanarValidateConfig

    paths = section("paths", params)
    planar_cfg: PlanarValidateConfig = section("validate_2d", params)
    return validate_and_publish(
        Path(paths.ingested_2d),
        Path(paths.validated_2d),
        params,
        artifact_key="data-validation-2d",
        description="2-D data validation",
        planar_cfg=planar_cfg,
    )


@task(name="preprocess_2d", **IO_RETRIES)
def preprocess_2d_task(params: dict) -> str:
    from tumorseg.data.preprocess import preprocess_dataset

    paths = section("paths", params)
    return preprocess_dataset(
        Path(paths.validated_2d),
        Path(paths.preprocessed_2d),
        section("preprocess", params),
        section("preprocess_2d", params),
    ).one_line()


@task(name="split_2d", **IO_RETRIES)
def split_2d_task(params: dict) -> dict[str, int]:
    paths = section("paths", params)
    return split_and_publish(
        Path(paths.preprocessed_2d),
        Path(paths.split_2d),
        params,
        unit="images",
        artifact_key="data-split-2d",
        description="Patient-level 2-D split",
    )


@task(name="train_2d", **IO_RETRIES)
def train_2d_task(params: dict) -> dict[str, Any]:
    """``tumorseg train-2d``."""
    from tumorseg.planar.train import train_planar

    result = train_planar(params, tracking_uri=tracking_uri(params))
    create_markdown_artifact(key="training-2d", markdown=result.one_line(), description="2-D training")
    return {"best_val": result.best_val, "epochs": result.epochs, "mlflow_run_id": result.mlflow_run_id}


@task(name="evaluate_2d", **IO_RETRIES)
def evaluate_2d_task(params: dict) -> dict[str, Any]:
    """``tumorseg evaluate-2d``: detector choice, test metrics with CIs, challengers registered."""
    from tumorseg.planar.evaluate import evaluate_planar

    result = evaluate_planar(params, tracking_uri=tracking_uri(params))
    det = result.metrics["detection"]
    create_table_artifact(
        key="test-metrics-2d",
        table=[
            {"metric": m, "value": det[m]["value"], "ci": f"[{det[m]['ci_low']}, {det[m]['ci_high']}]"}
            for m in ("accuracy", "sensitivity", "specificity", "auc")
        ]
        + [
            {
                "metric": f"dice {kind}",
                "value": stats["dice"]["value"],
                "ci": f"[{stats['dice']['ci_low']}, {stats['dice']['ci_high']}]",
            }
            for kind, stats in result.metrics["segmentation"]["per_tumour_type"].items()
        ],
        description=result.one_line(),
    )
    return {
        "one_line": result.one_line(),
        "registered": {kind: r.to_dict() for kind, r in result.registered.items()},
    }


@task(name="promote_2d", cache_policy=NO_CACHE, **IO_RETRIES)
def promote_2d_task(params: dict) -> dict[str, Any]:
    """``tumorseg promote --name`` for both 2-D models (the same gate as the 3-D model)."""
    from tumorseg.config import apply_overrides
    from tumorseg.registry.promote import promote

    reports = Path(section("paths", params).reports)
    names = {
        "promotion_2d.json": section("evaluate_2d", params).model_name,
        "promotion_detect.json": section("detect", params).model_name,
    }
    decisions: dict[str, Any] = {}
    for report, name in names.items():
        result = promote(
            apply_overrides(params, {"registry.model_name": name}),
            tracking_uri=tracking_uri(params),
            report_file=reports / report,
        )
        decisions[name] = {"action": result.action, "champion": result.champion, "lines": result.lines()}
    create_markdown_artifact(
        key="promotion-2d",
        markdown="\n".join(f"- **{n}**: {d['lines'][0]}" for n, d in decisions.items()),
        description="2-D champion/challenger decisions",
    )
    return decisions


# ---------------------------------------------------------------------------- the flow
@flow(name="planar-pipeline", log_prints=True)
def planar_flow(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    *,
    generate_data: bool = True,
) -> dict[str, Any]:
    """synth_2d -> ingest_2d -> validate_2d -> preprocess_2d -> split_2d -> train_2d -> evaluate_2d -> promote_2d.

    Args:
        params_path: params.yaml to read.
        overrides: dotted-key overrides (``{"train_2d.max_epochs": 2}``).
        generate_data: run ``synth_2d`` first; False for real data in ``paths.raw_2d``.

    Returns:
        ``{<stage>: <summary>}``; a failed step fails the run and no champion moves.
    """

    params = load_params(params_path, overrides)
    summary: dict[str, Any] = {}
    if generate_data:
        summary["synth_2d"] = _cached(synth_2d_task, "synth_2d", params)(params)
    summary["ingest_2d"] = _cached(ingest_2d_task, "ingest_2d", params)(params)
    summary["validate_2d"] = _cached(validate_2d_task, "validate_2d", params)(params)
    summary["preprocess_2d"] = _cached(preprocess_2d_task, "preprocess_2d", params)(params)
    summary["split_2d"] = _cached(split_2d_task, "split_2d", params)(params)
    summary["train_2d"] = _cached(train_2d_task, "train_2d", params)(params)
    summary["evaluate_2d"] = _cached(evaluate_2d_task, "evaluate_2d", params)(params)
    summary["promote_2d"] = promote_2d_task(params)
    print(summary["evaluate_2d"]["one_line"])
    for name, decision in summary["promote_2d"].items():
        print(f"{name}: {decision['lines'][0]}")
    return summary
