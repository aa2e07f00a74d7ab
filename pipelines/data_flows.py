"""Prefect flows for the data stages: source -> ingest -> validate -> preprocess -> split.

Each task calls the function its ``tumorseg`` command (and DVC stage) calls; flows read params.yaml
and only carry dotted-key overrides (``{"synth.cases": 8}``). Also the helpers the other flows share:
:data:`IO_RETRIES`, :func:`load_params`, :func:`tracking_uri` and the validate/split bodies.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tumorseg.errors import DataError, TumorsegError
from tumorseg.params import Params, as_params

if TYPE_CHECKING:
    from tumorseg.params import Params


def _retry_io_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry OSErrors (flaky disks, NFS), never user errors (they stay)."""
    try:
        state.result()
    except Exception as exc:
        return isinstance(exc, OSError) and not isinstance(exc, TumorsegError)
    return False


IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": _retry_io_only}


def load_params(params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """params.yaml with the flow's overrides applied and validated (the flow's only configuration)."""
    from tumorseg.params import load_params as load

    return load(params_path, overrides)


def tracking_uri(params: dict[str, Any]) -> str:
    """The MLflow tracking URI the flows' tasks pass on (``mlflow.tracking_uri`` or ``paths.mlruns``)."""
    from tumorseg.tracking import params_tracking_uri

    return params_tracking_uri(params)


def validate_and_publish(
    ingested: Path,
    validated: Path,
    params: Params | dict[str, Any],
    *,
    artifact_key: str,
    description: str,
    planar_cfg: Any = None,
) -> str:
    """Run ``tumorseg validate``, publish its report as a Prefect artifact, then fail if it failed
    (so a rejected dataset is explained in the UI too). ``planar_cfg``: the 2-D limits, if any.

    Raises:
        DataError: the share of quarantined cases is above ``validate.max_invalid_fraction``.
    """
    params = as_params(params)
    from tumorseg.validation.suite import validate_dataset, validation_markdown

    result = validate_dataset(
        ingested, validated, params.validate, planar_cfg=planar_cfg, raise_on_failure=False
    )
    create_markdown_artifact(markdown=validation_markdown(result), key=artifact_key, description=description)
    if not result.passed:
        raise DataError(result.failure_message())
    return result.one_line()


def split_and_publish(
    preprocessed: Path,
    split_file: Path,
    params: Params | dict[str, Any],
    *,
    unit: str,
    artifact_key: str,
    description: str,
) -> dict[str, int]:
    """Run ``tumorseg split``; publish ``{"train": n, "val": n, "test": n}`` as a table (column ``unit``)."""
    params = as_params(params)
    from tumorseg.data.split import make_split

    split = make_split(preprocessed, split_file, params.split)
    counts = {name: len(split.cases(name)) for name in ("train", "val", "test")}
    create_table_artifact(
        table=[{"split": k, unit: v} for k, v in counts.items()], key=artifact_key, description=description
    )
    return counts


@task(name="source", **IO_RETRIES)
def source_task(params: dict, params_path: str = "params.yaml") -> str:
    """``data.source``: generate the embedded data (``synth``) or check the user's folder (read only)."""
    from tumorseg.data.source import prepare_source

    return prepare_source(params, params_path).one_line()


@task(name="ingest", **IO_RETRIES)
def ingest_task(params: Params | dict[str, Any], source: str) -> str:
    """Ingest the dataset folder ``source`` (:func:`tumorseg.data.source.source_folder`)."""
    params = as_params(params, source)
    from tumorseg.data.ingest import ingest

    paths = params.paths
    summary = ingest(Path(source), Path(paths.ingested), params.ingest)
    return summary.one_line()


@task(name="validate", **IO_RETRIES)
def validate_task(params: Params | dict[str, Any]) -> str:
    params = as_params(params)
    paths = params.paths
    return validate_and_publish(
        Path(paths.ingested),
        Path(paths.validated),
        params,
        artifact_key="data-validation",
        description="Great Expectations validation of the ingested dataset",
    )


@task(name="preprocess", **IO_RETRIES)
def preprocess_task(params: Params | dict[str, Any]) -> str:
    params = as_params(params)
    from tumorseg.data.preprocess import preprocess_dataset

    paths = params.paths
    summary = preprocess_dataset(Path(paths.validated), Path(paths.preprocessed), params.preprocess)
    return summary.one_line()


@task(name="split", **IO_RETRIES)
def split_task(params: Params | dict[str, Any]) -> dict[str, int]:
    params = as_params(params)
    paths = params.paths
    return split_and_publish(
        Path(paths.preprocessed),
        Path(paths.split),
        params,
        unit="cases",
        artifact_key="data-split",
        description="Patient-level stratified split",
    )


@flow(name="data-pipeline")
def data_pipeline_flow(
    params_path: str = "params.yaml", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The data stages in order, as ``dvc repro split@3d`` runs them (``{"data.source": "/my/data"}``)."""
    from tumorseg.data.source import source_folder

    params = load_params(params_path, overrides)
    return {
        "source": source_task(params, params_path),
        "ingest": ingest_task(params, str(source_folder(params, params_path))),
        "validate": validate_task(params),
        "preprocess": preprocess_task(params),
        "split": split_task(params),
    }
