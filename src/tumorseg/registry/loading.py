"""Resolve ``--model``: a training checkpoint, a local MLflow model folder, or any MLflow model URI.

Accepted forms:

- ``models/checkpoints/best.ckpt``: a ``tumorseg train`` checkpoint;
- a folder holding an ``MLmodel`` file (a downloaded MLflow model);
- ``models:/tumorseg@champion``, ``models:/tumorseg/3``: the registry of the tracking store;
- ``runs:/<run_id>/model`` or any other MLflow artifact URI of a logged model.

MLflow models are either the registered pyfunc (``weights.pt`` + ``config.json``, see
:mod:`tumorseg.registry.pyfunc`), rebuilt here directly without going through the pyfunc wrapper,
or the PyTorch model a training run logs (``runs:/<id>/model``), whose settings come from the
run's ``config.yaml`` artifact.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.errors import DataError

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
FIRST_STEPS = "run `dvc repro` (it registers a challenger) and `tumorseg promote` first"


@dataclass
class LoadedModel:
    """A model ready for :class:`~tumorseg.models.predictor.SegmentationPredictor`.

    Attributes:
        trained: the network and its training settings.
        uri: what the user asked for.
        description: human-readable origin, e.g. ``models:/tumorseg@champion (version 3)``.
        version: registered model version, when the URI names one.
        predict_settings: the ``predict`` settings stored with a registered model, if any.
    """

    trained: Any
    uri: str
    description: str
    version: str | None = None
    predict_settings: dict[str, Any] | None = None


def prepare_mlflow() -> None:
    """Before MLflow is used from a command: no telemetry, no per-file download progress bars on stderr.

    Only defaults are set; a user's own environment settings win.
    """
    import os

    from tumorseg.tracking import disable_telemetry

    disable_telemetry()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def is_mlflow_uri(uri: str) -> bool:
    """``scheme:/...`` URIs (``models:/``, ``runs:/``, ``file://``, ``s3://``...), not Windows drive paths."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", uri) is not None


def load_model(uri: str, *, tracking_uri: str) -> LoadedModel:
    """Load the model ``uri`` names (see the module docstring).

    Args:
        uri: checkpoint path, MLflow model folder or MLflow model URI.
        tracking_uri: the MLflow store for ``models:/`` and ``runs:/`` URIs.

    Raises:
        DataError: one line: no such file, no such registered model / alias / version (with what
            to run first), or a file that is not a tumorseg model.
    """
    prepare_mlflow()
    path = Path(uri).expanduser()
    if not is_mlflow_uri(uri):
        if path.is_file():
            from tumorseg.models.checkpoint import load_trained_network

            return LoadedModel(load_trained_network(path), uri, f"checkpoint {path}")
        if path.is_dir() and (path / "MLmodel").is_file():
            trained, settings = _from_model_dir(path, uri)
            return LoadedModel(trained, uri, f"MLflow model folder {path}", predict_settings=settings)
        raise DataError(
            f"{uri}: no such checkpoint or MLflow model; pass a best.ckpt path, a folder with an MLmodel "
            "file, or a URI such as models:/tumorseg@champion"
        )
    return _from_mlflow(uri, tracking_uri)


def _store_text(tracking_uri: str) -> str:
    from tumorseg.tracking import sqlite_path

    db = sqlite_path(tracking_uri)
    return str(db) if db is not None else tracking_uri


@dataclass
class DownloadedModel:
    """An MLflow model copied to a local folder.

    Attributes:
        folder: the model's files (removed when :func:`downloaded_model`'s block ends).
        client: an ``MlflowClient`` on the store it came from.
        description: ``uri`` plus the version and run a ``models:/`` URI resolved to.
        version: the registered version (None for ``runs:/`` and other artifact URIs).
    """

    folder: Path
    client: Any
    description: str
    version: str | None = None


@contextmanager
def downloaded_model(
    uri: str, tracking_uri: str, *, first_steps: str = FIRST_STEPS
) -> Iterator[DownloadedModel]:
    """Resolve an MLflow model URI (``models:/name@alias``, ``models:/name/3``, ``runs:/...``) and download it.

    Shared by the 3-D and 2-D loaders; each reads the folder its own way inside the block. MLflow
    errors, there or in the block, become one-line :class:`DataError` naming the URI and the store.

    Args:
        uri: the model URI.
        tracking_uri: the MLflow store (tracking and registry).
        first_steps: what to run when the model is not there (appended to the message).

    Raises:
        DataError: no store at a SQLite path, no such model/version/alias, or a download failure.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from tumorseg.tracking import sqlite_path

    db = sqlite_path(tracking_uri)
    if uri.startswith(("models:/", "runs:/")) and db is not None and not db.is_file():
        # MLflow would silently create an empty store here; there is nothing to load from it.
        raise DataError(f"{uri}: no MLflow store at {db}; {first_steps}")
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version = None
    description = uri
    match = MODELS_URI.match(uri)
    try:
        if match:
            name, alias, number = match["name"], match["alias"], match["version"]
            found = (
                client.get_model_version_by_alias(name, alias)
                if alias
                else client.get_model_version(name, number)
            )
            version = str(found.version)
            description = f"{uri} (version {version}, run {found.run_id})"
            artifact_uri = client.get_model_version_download_uri(name, version)
        else:
            artifact_uri = uri
        with tempfile.TemporaryDirectory(prefix="tumorseg-load-") as tmp:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=tracking_uri
                )
            )
            yield DownloadedModel(local, client, description, version)
    except MlflowException as exc:
        message = str(exc.message).strip().splitlines()[0]
        if match:
            raise DataError(
                f"{uri}: not found in the MLflow store {_store_text(tracking_uri)} ({message}); {first_steps}"
            ) from None
        raise DataError(f"{uri}: cannot be loaded from {_store_text(tracking_uri)} ({message})") from None


def _from_mlflow(uri: str, tracking_uri: str) -> LoadedModel:
    with downloaded_model(uri, tracking_uri) as model:
        if not (model.folder / "MLmodel").is_file():
            raise DataError(f"{uri}: not an MLflow model (no MLmodel file)")
        trained, settings = _from_model_dir(model.folder, uri, client=model.client)
    return LoadedModel(trained, uri, model.description, version=model.version, predict_settings=settings)


def _from_model_dir(folder: Path, uri: str, *, client: Any = None) -> tuple[Any, dict[str, Any] | None]:
    """A tumorseg pyfunc (weights.pt, model.onnx or model.pt2 + config.json) or a training run's PyTorch model."""
    import yaml
    from mlflow.models import Model

    from tumorseg.models.package import load_artifacts

    meta = Model.load(str(folder / "MLmodel"))
    pyfunc = meta.flavors.get("python_function", {})
    artifacts = pyfunc.get("artifacts") or {}
    if "config" in artifacts and {"onnx", "program", "weights"} & set(artifacts):
        trained = load_artifacts({key: folder / entry["path"] for key, entry in artifacts.items()})
        settings = None
        if "predict" in artifacts:
            settings = json.loads((folder / artifacts["predict"]["path"]).read_text())
        return trained, settings
    if "pytorch" in meta.flavors and meta.run_id:
        import mlflow

        from tumorseg.config import without_retired
        from tumorseg.models.checkpoint import TrainedNetwork
        from tumorseg.training.config import load_training_config

        client = client or mlflow.MlflowClient()
        with tempfile.TemporaryDirectory(prefix="tumorseg-config-") as tmp:
            try:
                config_file = client.download_artifacts(meta.run_id, "config.yaml", tmp)
            except Exception as exc:  # the run may be gone or have no config: say which, in one line
                raise DataError(
                    f"{uri}: the PyTorch model's run {meta.run_id} has no readable config.yaml ({type(exc).__name__})"
                ) from None
            config = yaml.safe_load(Path(config_file).read_text())
        network = mlflow.pytorch.load_model(str(folder), map_location="cpu").eval()
        # a model registered before a key was retired still loads
        config = {k: without_retired(k, v) if isinstance(v, dict) else v for k, v in config.items()}
        cfg = load_training_config(config, source=f"{uri} config.yaml")
        return TrainedNetwork(network, cfg.model, cfg.data_loader, cfg.sliding_window, cfg.to_dict()), None
    raise DataError(
        f"{uri}: not a tumorseg model (neither weights.pt + config.json nor a training run's PyTorch model)"
    )
