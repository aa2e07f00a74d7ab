"""Resolve ``--model``: a ``tumorseg train`` checkpoint, a folder with an ``MLmodel`` file, or an MLflow URI
(``models:/tumorseg@champion``, ``models:/tumorseg/3``, ``runs:/<run_id>/model``...). An MLflow model
is the registered pyfunc (rebuilt from its artifacts, without the wrapper, so any version loads
whatever class path its code file names) or a training run's PyTorch model with its ``config.yaml``.
A package folder (``weights.pt`` + ``config.json``) loads too. :func:`model_files` finds a model's
files without torch or, on a local SQLite store with a cached version, without the MLflow client.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tumorseg import yamlio
from tumorseg.config import without_retired
from tumorseg.errors import DataError

if TYPE_CHECKING:
    from tumorseg.models.checkpoint import PlanarModel

from tumorseg.tracking import disable_telemetry, sqlite_path

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
FIRST_STEPS = "run `dvc repro` (it registers a challenger) and `tumorseg promote` first"


@dataclass
class LoadedModel:
    """A model for :class:`~tumorseg.models.predictor.SegmentationPredictor`, its origin in words and,
    for a registered model, its version and stored ``predict`` settings."""

    trained: Any
    uri: str
    description: str
    version: str | None = None
    predict_settings: dict[str, Any] | None = None
    drift_profile: Any = None
    """Its :class:`~tumorseg.monitoring.drift.Profile` (None: registered without one)."""


def prepare_mlflow() -> None:
    """Before MLflow is used from a command: no telemetry, no download progress bars (user settings win)."""
    disable_telemetry()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def is_mlflow_uri(uri: str) -> bool:
    """``scheme:/...`` URIs (``models:/``, ``runs:/``, ``file://``, ``s3://``...), not Windows drive paths."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", uri) is not None


def load_model(uri: str, *, tracking_uri: str) -> LoadedModel:
    """Load the model ``uri`` names; DataError (one line, with what to run first) when there is none."""
    prepare_mlflow()
    path = Path(uri).expanduser()
    if not is_mlflow_uri(uri):
        if path.is_file():
            from tumorseg.models.checkpoint import load_trained_network

            return LoadedModel(load_trained_network(path), uri, f"checkpoint {path}")
        if path.is_dir() and (path / "MLmodel").is_file():
            trained, settings, profile = _from_model_dir(path, uri)
            return LoadedModel(
                trained, uri, f"MLflow model folder {path}", predict_settings=settings, drift_profile=profile
            )
        if path.is_dir() and (path / "weights.pt").is_file():  # a package (models/package.py)
            from tumorseg.models.package import CONFIG_FILE, WEIGHTS_FILE, load_package

            trained = load_package(
                path / WEIGHTS_FILE, path / CONFIG_FILE, description=f"model package {path}"
            )
            return LoadedModel(trained, uri, f"model package {path}")
        raise DataError(
            f"{uri}: no such checkpoint or MLflow model; pass a best.ckpt path, a folder with an MLmodel "
            "file or weights.pt + config.json, or a URI such as models:/tumorseg@champion"
        )
    return _from_mlflow(uri, tracking_uri)


@dataclass
class DownloadedModel:
    """An MLflow model copied to ``folder`` (removed with the block), with the version and run a
    ``models:/`` URI resolved to and an ``MlflowClient`` on its store."""

    folder: Path
    client: Any
    description: str
    version: str | None = None


@contextmanager
def downloaded_model(
    uri: str, tracking_uri: str, *, first_steps: str = FIRST_STEPS
) -> Iterator[DownloadedModel]:
    """Resolve and download an MLflow model URI for the 3-D and 2-D loaders, which read it in the block;
    MLflow errors become a one-line :class:`DataError` naming the URI, the store and ``first_steps``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    db = sqlite_path(tracking_uri)
    if uri.startswith(("models:/", "runs:/")) and db is not None and not db.is_file():
        # MLflow would silently create an empty store here; there is nothing to load from it.
        raise DataError(f"{uri}: no MLflow store at {db}; {first_steps}")
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version, description = None, uri
    match = MODELS_URI.match(uri)
    try:
        if match:
            name, alias, number = match["name"], match["alias"], match["version"]
            get_version = client.get_model_version_by_alias if alias else client.get_model_version
            found = get_version(name, alias or number)
            version = str(found.version)
            description = f"{uri} (version {version}, run {found.run_id})"
            try:
                cached = cached_version(tracking_uri, name, version, found.run_id or "", client)
            except OSError:  # no writable cache folder (a read-only home): download as without one
                cached = None
            if cached is not None:
                yield DownloadedModel(cached, client, description, version)
                return
            artifact_uri = client.get_model_version_download_uri(name, version)
        else:
            artifact_uri = uri
        with tempfile.TemporaryDirectory(prefix="tumorseg-load-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=tracking_uri
            )
            yield DownloadedModel(Path(local), client, description, version)
    except MlflowException as exc:
        message = str(exc.message).strip().splitlines()[0]
        store = db if db is not None else tracking_uri
        if match:
            raise DataError(
                f"{uri}: not found in the MLflow store {store} ({message}); {first_steps}"
            ) from None
        raise DataError(f"{uri}: cannot be loaded from {store} ({message})") from None


MODEL_CACHE_ENV = "TUMORSEG_MODEL_CACHE"
"""Folder of the resolved-model cache (default ``$XDG_CACHE_HOME/tumorseg/models``, else
``~/.cache/tumorseg/models``); an empty value turns the cache off."""


def model_cache_root() -> Path | None:
    """Where registered model versions are kept once downloaded (None: no cache)."""
    configured = os.environ.get(MODEL_CACHE_ENV)
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tumorseg" / "models"


def cache_folder(tracking_uri: str, name: str, version: str, run_id: str) -> Path | None:
    """Where version ``name/version`` of the store ``tracking_uri``, logged by run ``run_id``, is cached
    (None: no cache). The run id is part of the key: a store deleted and rebuilt at the same place
    numbers its versions from 1 again, and its version 1 is another model."""
    import hashlib

    root = model_cache_root()
    if root is None:
        return None
    store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    return root / store / name / f"{version}-{run_id or 'norun'}"


def cached_version(tracking_uri: str, name: str, version: str, run_id: str, client: Any) -> Path | None:
    """The local copy of model version ``name/version`` (of run ``run_id``) of the store
    ``tracking_uri``, downloaded on first use. A registered version's artifacts never change, so the
    copy stays valid; it is written beside its final place and renamed in, so an interrupted download
    is never taken for a model."""
    import mlflow

    folder = cache_folder(tracking_uri, name, version, run_id)
    if folder is None:
        return None
    if (folder / "MLmodel").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{version}-", dir=folder.parent) as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, version),
            dst_path=tmp,
            tracking_uri=tracking_uri,
        )
        try:
            os.replace(local, folder)
        except OSError:  # another process filled it first
            if not (folder / "MLmodel").is_file():
                raise
    return folder


def _from_mlflow(uri: str, tracking_uri: str) -> LoadedModel:
    with downloaded_model(uri, tracking_uri) as model:
        if not (model.folder / "MLmodel").is_file():
            raise DataError(f"{uri}: not an MLflow model (no MLmodel file)")
        trained, settings, profile = _from_model_dir(model.folder, uri, client=model.client)
    return LoadedModel(
        trained,
        uri,
        model.description,
        version=model.version,
        predict_settings=settings,
        drift_profile=profile,
    )


def _from_model_dir(folder: Path, uri: str, *, client: Any = None) -> tuple[Any, dict[str, Any] | None, Any]:
    """A tumorseg pyfunc (weights or compressed program + config.json) or a training run's PyTorch model,
    its stored ``predict`` settings and drift profile (None where it has none)."""
    from mlflow.models import Model

    from tumorseg.models.package import load_artifacts

    meta = Model.load(str(folder / "MLmodel"))
    artifacts = meta.flavors.get("python_function", {}).get("artifacts") or {}
    if "config" in artifacts and {"onnx", "program", "weights"} & set(artifacts):
        trained = load_artifacts({key: folder / entry["path"] for key, entry in artifacts.items()})
        predict = artifacts.get("predict")
        settings = json.loads((folder / predict["path"]).read_text()) if predict is not None else None
        from tumorseg.monitoring.drift import load_profile

        return (
            trained,
            settings,
            load_profile({key: folder / entry["path"] for key, entry in artifacts.items()}),
        )
    if "pytorch" in meta.flavors and meta.run_id:
        import mlflow

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
            config = yamlio.safe_load(Path(config_file).read_text())
        network = mlflow.pytorch.load_model(str(folder), map_location="cpu").eval()
        # a model registered before a key was retired still loads
        config = {k: without_retired(k, v) if isinstance(v, dict) else v for k, v in config.items()}
        cfg = load_training_config(config, source=f"{uri} config.yaml")
        trained = TrainedNetwork(network, cfg.model, cfg.data_loader, cfg.sliding_window, cfg.to_dict())
        return trained, None, None
    raise DataError(
        f"{uri}: not a tumorseg model (neither weights.pt + config.json nor a training run's PyTorch model)"
    )


FIRST_STEPS_2D = (
    "run `tumorseg train --dims 2`, `tumorseg evaluate-model --dims 2` and `tumorseg promote --dims 2` first"
)


def load_planar_model(uri: str, *, tracking_uri: str) -> PlanarModel:
    """Load the 2-D model ``uri`` names; DataError (one line, with what to run first) when there is none."""
    from tumorseg.models.checkpoint import load_planar_checkpoint
    from tumorseg.models.package import from_folder

    prepare_mlflow()
    if not is_mlflow_uri(uri):
        path = Path(uri).expanduser()
        if path.is_file():
            return load_planar_checkpoint(path)
        if path.is_dir():
            return from_folder(path, f"model folder {path}")
        raise DataError(
            f"{uri}: no such 2-D model; pass a 2-D best.ckpt, a model folder, or a URI such as "
            "models:/tumorseg-2d@champion"
        )
    with downloaded_model(uri, tracking_uri, first_steps=FIRST_STEPS_2D) as model:
        return from_folder(model.folder, model.description)


# ---------------------------------------------------------------------------- without the MLflow client
@dataclass
class ResolvedVersion:
    """A ``models:/`` URI resolved to its version number and training run."""

    name: str
    version: str
    run_id: str


def resolve_in_sqlite(uri: str, tracking_uri: str) -> ResolvedVersion | None:
    """Resolve ``models:/name@alias`` or ``models:/name/N`` by reading MLflow's SQLite store directly
    (read-only): importing the MLflow client and opening its store cost 1-2 s, a query 1 ms.

    Reads the ``registered_model_aliases`` and ``model_versions`` tables of MLflow 3's schema; None on
    anything else (another store, another schema, no such alias, a version not READY, several
    workspaces), and the caller asks the MLflow client, which knows every case and its error message.
    """
    import sqlite3

    match = MODELS_URI.match(uri)
    db = sqlite_path(tracking_uri)
    if match is None or db is None or not db.is_file():
        return None
    name, alias, number = match["name"], match["alias"], match["version"]
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            if alias:
                rows = connection.execute(
                    "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, alias)
                ).fetchall()
                if len(rows) != 1:
                    return None
                number = str(rows[0][0])
            rows = connection.execute(
                "SELECT run_id, status, current_stage FROM model_versions WHERE name = ? AND version = ?",
                (name, int(number)),
            ).fetchall()
    except (sqlite3.Error, ValueError):
        return None
    if len(rows) != 1 or rows[0][1] != "READY" or rows[0][2] == "Deleted_Internal":
        return None
    return ResolvedVersion(name, str(number), str(rows[0][0] or ""))


def model_artifacts(folder: Path) -> dict[str, Path] | None:
    """The pyfunc artifacts of an MLflow model folder by key, read from its ``MLmodel`` (YAML) without
    MLflow; None when it has none."""
    try:
        meta = yamlio.safe_load((folder / "MLmodel").read_text())
        artifacts = meta["flavors"]["python_function"]["artifacts"]
        return {key: folder / entry["path"] for key, entry in artifacts.items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


@dataclass
class ModelFiles:
    """A model's files by artifact key (``config``, ``weights``, ``network_onnx``...) and its origin in
    words, found without loading it."""

    artifacts: dict[str, Path]
    description: str


def model_files(uri: str, *, tracking_uri: str) -> ModelFiles | None:
    """The files of the model ``uri`` names without importing torch, and MLflow only to fill the cache.

    A ``models:/`` URI on a local SQLite store is resolved on every call (a promotion applies at once)
    with :func:`resolve_in_sqlite`; the version's files come from the cache, downloaded there by the
    MLflow client the first time. A folder is an MLflow model folder or a package (``config.json``...).
    None when the model is not found this way (a checkpoint, another store, no cache): the caller
    loads it with :func:`load_model`, which explains any error.
    """
    from tumorseg.models.package import CONFIG_FILE, WEIGHTS_FILE  # file names only: no torch

    if not is_mlflow_uri(uri):
        path = Path(uri).expanduser()
        if path.is_dir() and (path / "MLmodel").is_file():
            artifacts = model_artifacts(path)
            return ModelFiles(artifacts, f"MLflow model folder {path}") if artifacts else None
        if path.is_dir() and (path / CONFIG_FILE).is_file():
            from tumorseg.models.onnx_predictor import ONNX_ARTIFACT, ONNX_FILE

            names = {"config": CONFIG_FILE, "weights": WEIGHTS_FILE, ONNX_ARTIFACT: ONNX_FILE}
            files = {key: path / name for key, name in names.items() if (path / name).is_file()}
            return ModelFiles(files, f"model package {path}")
        return None
    resolved = resolve_in_sqlite(uri, tracking_uri)
    if resolved is None:
        return None
    folder = cache_folder(tracking_uri, resolved.name, resolved.version, resolved.run_id)
    if folder is None:
        return None
    if not (folder / "MLmodel").is_file():
        import mlflow

        prepare_mlflow()
        client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
        try:
            cached_version(tracking_uri, resolved.name, resolved.version, resolved.run_id, client)
        except Exception:  # noqa: BLE001 - load_model repeats the download and names its error
            return None
    artifacts = model_artifacts(folder)
    description = f"{uri} (version {resolved.version}, run {resolved.run_id})"
    return ModelFiles(artifacts, description) if artifacts else None
