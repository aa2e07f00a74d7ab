"""Prefect flows for the data stages: source -> ingest -> validate -> preprocess -> split.

One implementation, two drivers: each task below calls the very function that the
matching ``tumorseg`` command (and so the DVC stage in ``dvc.yaml``) calls. Flows
read params.yaml and only carry overrides (dotted keys, e.g. ``{"synth.cases": 8}``).

File-system steps retry on transient I/O errors (``OSError``); a user error
(:class:`~tumorseg.errors.TumorsegError`) is never retried, since it will not go away.

The helpers the other flows share live here too: :data:`IO_RETRIES`, :func:`load_params`,
:func:`tracking_uri`, and the validate/split bodies (:func:`validate_and_publish`,
:func:`split_and_publish`) that the 3-D and 2-D tasks both run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tumorseg.config import apply_overrides, read_params, section
from tumorseg.errors import DataError, TumorsegError


def _retry_io_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry OSErrors (flaky disks, NFS), never user errors."""
    try:
        state.result()
    except TumorsegError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": _retry_io_only}


def load_params(params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """params.yaml with the flow's overrides applied (the flow's only configuration)."""
    return apply_overrides(read_params(params_path), overrides)


def tracking_uri(params: dict[str, Any]) -> str:
    """The MLflow tracking URI the flows' tasks pass on (``mlflow.tracking_uri`` or ``paths.mlruns``)."""
    from tumorseg.tracking import params_tracking_uri

    return params_tracking_uri(params)


def validate_and_publish(
    ingested: Path,
    validated: Path,
    params: dict[str, Any],
    *,
    artifact_key: str,
    description: str,
    planar_cfg: Any = None,
) -> str:
    """Run ``tumorseg validate`` and publish its report as a Prefect artifact, then fail if it failed.

    The report is published before failing, so a rejected dataset is explained in the UI too. The
    3-D task (:func:`validate_task`) and the 2-D one (:mod:`pipelines.planar_flow`) differ only in
    their folders, artifact and the 2-D limits (``planar_cfg``, params.yaml ``validate_2d:``).

    Raises:
        DataError: the share of quarantined cases is above ``validate.max_invalid_fraction``.
    """
    from tumorseg.validation.suite import validate_dataset, validation_markdown

    result = validate_dataset(
        ingested, validated, section("validate", params), planar_cfg=planar_cfg, raise_on_failure=False
    )
    create_markdown_artifact(markdown=validation_markdown(result), key=artifact_key, description=description)
    if not result.passed:
        raise DataError(result.failure_message())
    return result.one_line()


def split_and_publish(
    preprocessed: Path,
    split_file: Path,
    params: dict[str, Any],
    *,
    unit: str,
    artifact_key: str,
    description: str,
) -> dict[str, int]:
    """Run ``tumorseg split`` and publish the train/val/test counts as a Prefect table artifact.

    Args:
        preprocessed: folder holding the preprocessed ``index.csv`` / ``manifest.csv``.
        split_file: the ``split.json`` to write.
        params: params.yaml with the flow's overrides (``split:`` is read).
        unit: what the counts count, the table's column name (``"cases"``, ``"images"``).
        artifact_key: the Prefect artifact key.
        description: the artifact's description.

    Returns:
        ``{"train": n, "val": n, "test": n}``.
    """
    from tumorseg.data.split import make_split

    split = make_split(preprocessed, split_file, section("split", params))
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
def ingest_task(params: dict, source: str) -> str:
    """Ingest the dataset folder ``source`` (:func:`tumorseg.data.source.source_folder`)."""
    from tumorseg.data.ingest import ingest

    paths = section("paths", params)
    summary = ingest(Path(source), Path(paths.ingested), section("ingest", params))
    return summary.one_line()


@task(name="validate", **IO_RETRIES)
def validate_task(params: dict) -> str:
    paths = section("paths", params)
    return validate_and_publish(
        Path(paths.ingested),
        Path(paths.validated),
        params,
        artifact_key="data-validation",
        description="Great Expectations validation of the ingested dataset",
    )


@task(name="preprocess", **IO_RETRIES)
def preprocess_task(params: dict) -> str:
    from tumorseg.data.preprocess import preprocess_dataset

    paths = section("paths", params)
    summary = preprocess_dataset(
        Path(paths.validated), Path(paths.preprocessed), section("preprocess", params)
    )
    return summary.one_line()


@task(name="split", **IO_RETRIES)
def split_task(params: dict) -> dict[str, int]:
    paths = section("paths", params)
    return split_and_publish(
        Path(paths.preprocessed),
        Path(paths.split),
        params,
        unit="cases",
        artifact_key="data-split",
        description="Patient-level stratified split",
    )


@flow(name="source")
def source_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> str:
    return source_task(load_params(params_path, overrides), params_path)


@flow(name="ingest")
def ingest_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> str:
    from tumorseg.data.source import source_folder

    params = load_params(params_path, overrides)
    return ingest_task(params, str(source_folder(params, params_path)))


@flow(name="validate")
def validate_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> str:
    return validate_task(load_params(params_path, overrides))


@flow(name="preprocess")
def preprocess_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> str:
    return preprocess_task(load_params(params_path, overrides))


@flow(name="split")
def split_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict[str, int]:
    return split_task(load_params(params_path, overrides))


@flow(name="data-pipeline")
def data_pipeline_flow(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The data stages in order, as ``dvc repro split@3d`` runs them.

    Args:
        params_path: params.yaml to read.
        overrides: dotted-key overrides, e.g. ``{"data.source": "/data/BraTS2021"}``.
    """
    from tumorseg.data.source import source_folder

    params = load_params(params_path, overrides)
    summary: dict[str, Any] = {}
    summary["source"] = source_task(params, params_path)
    summary["ingest"] = ingest_task(params, str(source_folder(params, params_path)))
    summary["validate"] = validate_task(params)
    summary["preprocess"] = preprocess_task(params)
    summary["split"] = split_task(params)
    return summary
