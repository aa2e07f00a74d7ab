"""MLflow set-up shared by training, evaluation and the model registry, and run provenance.

Tracking store, by precedence: an explicit URI (``mlflow.tracking_uri`` or an argument),
``$MLFLOW_TRACKING_URI``, else a local SQLite store ``<paths.mlruns>/mlflow.db`` whose artifacts
sit beside it (``mlflow ui --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db``), so runs never
scatter ``./mlruns`` folders. Nothing runs at import time; entry points resolve the URI.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tumorseg import yamlio
from tumorseg.params import Params, as_params

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "artifacts"

MODEL_REQUIREMENTS: tuple[str, ...] = ("torch", "monai", "numpy", "mlflow")  # to load a logged model


PARENT_TAG = "tumorseg.parent_model"
"""Run tag: the model a run started from (``train.init_from``), as loaded (URI, version, run)."""


def disable_telemetry() -> None:
    """Turn MLflow's usage telemetry off unless the user chose otherwise; call before importing MLflow."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def default_tracking_uri(mlruns_dir: str | Path = "mlruns") -> str:
    """``sqlite:///<absolute mlruns>/mlflow.db``."""
    return f"sqlite:///{Path(mlruns_dir).resolve() / DB_NAME}"


def resolve_tracking_uri(explicit: str | None = None, mlruns_dir: str | Path = "mlruns") -> str:
    """The tracking URI to use: explicit, else ``$MLFLOW_TRACKING_URI``, else the local SQLite store."""
    return explicit or os.environ.get(TRACKING_URI_ENV) or default_tracking_uri(mlruns_dir)


def params_tracking_uri(params: Params, explicit: str | None = None, *, source: str = "params.yaml") -> str:
    """:func:`resolve_tracking_uri` with ``mlflow.tracking_uri`` and ``paths.mlruns`` of ``params``."""
    params = as_params(params, source)

    mlflow_uri = params.mlflow.tracking_uri
    return resolve_tracking_uri(explicit or mlflow_uri, params.paths.mlruns)


@contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_model``) at ``uri`` for a block.

    The fluent API reads process-global URIs (also copied into environment variables); library code
    must not leave them behind, so the previous URIs and variables come back however the block ends.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_before = tracking_utils._tracking_uri  # the unresolved setting (None: unset)
    registry_before = registry_utils._registry_uri
    with environ_restored(MLFLOW_URI_VARIABLES):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            tracking_utils.set_tracking_uri(tracking_before)
            registry_utils._registry_uri = registry_before


MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # set by mlflow.set_*_uri


@contextmanager
def environ_restored(names: Iterable[str]) -> Iterator[None]:
    """Put the environment variables ``names`` back as they were when the block ends (unset if unset)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sqlite_path(tracking_uri: str) -> Path | None:
    """Database file of a ``sqlite:///`` URI (None for other stores)."""
    return Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None


def experiment_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifact root for a new experiment: next to a SQLite database; the store's default otherwise."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-") or "default"
    return (db.resolve().parent / ARTIFACTS_DIR / slug).as_uri()


def ensure_experiment(tracking_uri: str, experiment: str) -> str:
    """Create the store (for SQLite, its folder) and the experiment if needed; return its id."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    return client.create_experiment(
        experiment, artifact_location=experiment_artifact_location(tracking_uri, experiment)
    )


REGISTRY_LOCK_WAIT_S = 1800.0
"""How long a registry change waits for another process's (:func:`registry_lock`) before giving up."""


def registry_lock_path(tracking_uri: str) -> Path:
    """The lock file of a store's registry: beside a SQLite database or inside a file store; for a
    server or database elsewhere, in the temporary folder of this machine (processes of one machine
    are serialised; across machines, run promotions from one place, e.g. a Prefect deployment with a
    concurrency limit of one)."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        return db.parent / f".{db.name}.registry.lock"
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        folder = Path(tracking_uri.removeprefix("file://").removeprefix("file:"))
        return folder / ".registry.lock"
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    import tempfile

    return Path(tempfile.gettempdir()) / "tumorseg-locks" / f"registry-{digest}.lock"


@contextmanager
def registry_lock(tracking_uri: str, wait_s: float = REGISTRY_LOCK_WAIT_S) -> Iterator[None]:
    """Hold the registry of ``tracking_uri`` for one read-decide-write (promote, a new challenger, a
    new edge version): two such changes at once would both read the same aliases and history, and the
    last write would silently undo the first. An OS file lock, so a killed holder releases it."""
    import logging

    from filelock import FileLock, Timeout

    from tumorseg.errors import DataError

    path = registry_lock_path(tracking_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logging.getLogger(__name__).info(
            "waiting for %s: another process is changing the model registry", path
        )
        try:
            lock.acquire(timeout=wait_s)
        except Timeout:
            raise DataError(
                f"{path}: another process has held the model registry for {wait_s:.0f} s; "
                "let it finish, or stop it and run again"
            ) from None
    try:
        yield
    finally:
        lock.release()


PROCESS_TAGS = ("tumorseg.host", "tumorseg.pid", "tumorseg.process_started")
"""Run tags naming the process that logs to a run (:func:`tag_process`), read by :func:`fail_orphaned_runs`."""
ORPHAN_TAG = "tumorseg.end_reason"


def _this_process() -> dict[str, str]:
    import psutil

    me = psutil.Process()
    return dict(zip(PROCESS_TAGS, (platform.node(), str(me.pid), f"{me.create_time():.3f}"), strict=True))


def tag_process(client: Any, run_id: str) -> None:
    """Record this process (host, pid, start time) on ``run_id``: if it dies without ending the run (a
    SIGKILL, an OOM kill, a pre-empted node), :func:`fail_orphaned_runs` can tell the run is orphaned."""
    for key, value in _this_process().items():
        client.set_tag(run_id, key, value)


def _alive(pid: str, started: str) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``started`` (pids are reused)."""
    import psutil

    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 1.0
    except (psutil.Error, ValueError):
        return False


def fail_orphaned_runs(tracking_uri: str, experiment: str) -> list[str]:
    """Mark FAILED the RUNNING runs of ``experiment`` whose process (:func:`tag_process`) ran on this
    host and no longer exists, with tag ``tumorseg.end_reason``; returns their ids. Runs from other
    hosts, or without the tags, are left alone: nothing here can tell whether they still run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host = platform.node()
    failed = []
    for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get(PROCESS_TAGS[0]) != host or PROCESS_TAGS[1] not in tags:
            continue
        if _alive(tags[PROCESS_TAGS[1]], tags.get(PROCESS_TAGS[2], "0")):
            continue
        client.set_tag(
            run.info.run_id,
            ORPHAN_TAG,
            f"process {tags[PROCESS_TAGS[1]]} on {host} ended without ending the run",
        )
        client.set_terminated(run.info.run_id, status="FAILED")
        failed.append(run.info.run_id)
    return failed


def reap_orphaned_runs(tracking_uri: str, experiment: str) -> list[str]:
    """:func:`fail_orphaned_runs`, saying so for each run: what every command that logs to
    ``experiment`` does first, so a killed process's run is FAILED by the next start at the latest."""
    import logging

    failed = fail_orphaned_runs(tracking_uri, experiment)
    for run_id in failed:
        logging.getLogger(__name__).warning(
            "MLflow run %s was left running by a process that no longer exists: marked FAILED", run_id
        )
    return failed


def create_run(client: Any, experiment_id: str, **kwargs: Any) -> str:
    """``client.create_run`` (RUNNING) tagged with this process (:func:`tag_process`); returns its id."""
    run_id = str(client.create_run(experiment_id, **kwargs).info.run_id)
    tag_process(client, run_id)
    return run_id


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def system_info() -> dict[str, str]:
    """Platform, library versions, CPU count and GPU name of this process's machine."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    for package in ("torch", "monai", "lightning", "mlflow", "numpy"):
        info[f"{package}_version"] = _version(package) or "not installed"
    return info


def git_commit(cwd: str | Path = ".") -> str | None:
    """HEAD commit of the repository holding ``cwd`` (``+dirty`` with uncommitted changes); None outside git."""

    def git(*args: str, timeout: int) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD", timeout=10)
        status = git("status", "--porcelain", "--untracked-files=no", timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if status else head


def data_version(preprocessed_dir: str | Path, dvc_lock: str | Path = "dvc.lock") -> dict[str, str]:
    """``{"data_md5": ..., "data_md5_source": "dvc.lock" | "content"}``: the training data's ``md5`` in
    ``dvc.lock`` (``3f2a...e1.dir``), else (data built by hand) an md5 over ``index.csv`` and every
    case ``.npz`` (relative path and bytes, sorted)."""
    target = Path(preprocessed_dir)
    lock = Path(dvc_lock)
    if lock.is_file():
        md5 = _md5_from_lock(lock, target)
        if md5:
            return {"data_md5": md5, "data_md5_source": "dvc.lock"}
    files = [target / "index.csv", *sorted((target / "cases").glob("*.npz"))]
    digest = hashlib.md5()
    for path in files:
        if not path.is_file():
            continue
        digest.update(path.relative_to(target).as_posix().encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return {"data_md5": digest.hexdigest(), "data_md5_source": "content"}


def _md5_from_lock(lock: Path, target: Path) -> str | None:
    try:
        data = yamlio.safe_load(lock.read_text()) or {}
    except yaml.YAMLError:
        return None
    root = lock.resolve().parent
    wanted = target.resolve()  # our paths are relative to the cwd; dvc.lock's to its own folder
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if isinstance(out, dict) and (root / str(out.get("path", ""))).resolve() == wanted:
                return str(out.get("md5", "")) or None
    return None


def model_pip_requirements(packages: Iterable[str] = MODEL_REQUIREMENTS) -> list[str]:
    """``name==version`` of the installed packages (the constraints.txt pins); no resolver, no network."""
    return [f"{name}=={version}" for name in packages if (version := _version(name))]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
