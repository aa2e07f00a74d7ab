"""Prefect flows for the data stages: source -> ingest -> validate -> preprocess -> split.

Each task calls the function its ``tumorseg`` command (and DVC stage) calls; flows read params.yaml
and only carry dotted-key overrides (``{"synth.cases": 8}``). A task's ``dims`` picks the dataset, as
``--dims`` does: 3 volumes (``paths.*``), 2 images (``paths.*_2d``, run as the ``@2d`` tasks of
:mod:`pipelines.planar_flow`). Also the helpers the other flows share: :data:`IO_RETRIES`,
:func:`load_params`, :func:`tracking_uri`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tumorseg.errors import DataError, TumorsegError
from tumorseg.params import Params, as_params


def _retry_io_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry OSErrors (flaky disks, NFS), never user errors (they stay)."""
    try:
        state.result()
    except Exception as exc:
        return isinstance(exc, OSError) and not isinstance(exc, TumorsegError)
    return False


IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": _retry_io_only}

ARTIFACTS: dict[tuple[int, str], tuple[str, str]] = {
    (3, "validate"): ("data-validation", "Great Expectations validation of the ingested dataset"),
    (3, "split"): ("data-split", "Patient-level stratified split"),
    (2, "validate"): ("data-validation-2d", "2-D data validation"),
    (2, "split"): ("data-split-2d", "Patient-level 2-D split"),
}
"""(``dims``, stage) -> the key and description of the Prefect artifact the stage publishes."""


def load_params(params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """params.yaml with the flow's overrides applied and validated (the flow's only configuration)."""
    from tumorseg.params import load_params as load

    return load(params_path, overrides)


def tracking_uri(params: dict[str, Any]) -> str:
    """The MLflow tracking URI the flows' tasks pass on (``mlflow.tracking_uri`` or ``paths.mlruns``)."""
    from tumorseg.tracking import params_tracking_uri

    return params_tracking_uri(params)


def dims_paths(params: Params, dims: int) -> dict[str, Path]:
    """The folders of the ``dims`` dataset: ``paths.ingested`` ... or their ``_2d`` twins."""
    suffix = "_2d" if dims == 2 else ""
    keys = ("ingested", "validated", "preprocessed", "split")
    return {key: Path(getattr(params.paths, key + suffix)) for key in keys}


@task(name="source", **IO_RETRIES)
def source_task(params: dict, params_path: str = "params.yaml", dims: int = 3) -> str:
    """``data.source`` (``data.source_2d``): generate the embedded data or check the user's folder."""
    from tumorseg.data.source import prepare_source

    return prepare_source(params, params_path, dims).one_line()


@task(name="ingest", **IO_RETRIES)
def ingest_task(params: Params | dict[str, Any], source: str, dims: int = 3) -> str:
    """Ingest the dataset folder ``source`` (:func:`tumorseg.data.source.source_folder`)."""
    params = as_params(params, source)
    from tumorseg.data.ingest import ingest

    return ingest(Path(source), dims_paths(params, dims)["ingested"], params.ingest).one_line()


@task(name="validate", **IO_RETRIES)
def validate_task(params: Params | dict[str, Any], dims: int = 3) -> str:
    """``tumorseg validate``, its report published before a failure is raised (so a rejected dataset
    is explained in the UI too).

    Raises:
        DataError: the share of quarantined cases is above ``validate.max_invalid_fraction``.
    """
    params = as_params(params)
    from tumorseg.validation.suite import validate_dataset, validation_markdown

    paths = dims_paths(params, dims)
    planar_cfg = params.validate_2d if dims == 2 else None
    result = validate_dataset(
        paths["ingested"], paths["validated"], params.validate, planar_cfg=planar_cfg, raise_on_failure=False
    )
    key, description = ARTIFACTS[dims, "validate"]
    create_markdown_artifact(markdown=validation_markdown(result), key=key, description=description)
    if not result.passed:
        raise DataError(result.failure_message())
    return result.one_line()


@task(name="preprocess", **IO_RETRIES)
def preprocess_task(params: Params | dict[str, Any], dims: int = 3) -> str:
    params = as_params(params)
    from tumorseg.data.preprocess import preprocess_dataset

    paths = dims_paths(params, dims)
    planar_cfg = params.preprocess_2d if dims == 2 else None
    return preprocess_dataset(
        paths["validated"], paths["preprocessed"], params.preprocess, planar_cfg
    ).one_line()


@task(name="split", **IO_RETRIES)
def split_task(params: Params | dict[str, Any], dims: int = 3) -> dict[str, int]:
    """``tumorseg split``; ``{"train": n, "val": n, "test": n}`` published as a table."""
    params = as_params(params)
    from tumorseg.data.split import make_split

    paths = dims_paths(params, dims)
    split = make_split(paths["preprocessed"], paths["split"], params.split)
    counts = {name: len(split.cases(name)) for name in ("train", "val", "test")}
    unit = "images" if dims == 2 else "cases"
    key, description = ARTIFACTS[dims, "split"]
    create_table_artifact(
        table=[{"split": k, unit: v} for k, v in counts.items()], key=key, description=description
    )
    return counts


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
