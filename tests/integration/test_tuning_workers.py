"""Optuna search end to end: real tiny trainings, worker processes sharing one storage.

SQLite (the default storage) and a real PostgreSQL server (a throwaway cluster on loopback,
started here from Debian's ``postgresql`` binaries; .ci/run installs them).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from tumorseg.cli import main
from tumorseg.config import read_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic cases at 4 mm, preprocessed and split; params for 2-epoch, 2-step trials."""
    from pipelines.training_flow import smoke_params

    workspace = tmp_path_factory.mktemp("tune")
    path = smoke_params(workspace, ROOT / "params.yaml")
    params = yaml.safe_load(path.read_text())
    params["tune"].update(
        {
            "study_name": "test",
            "trial_overrides": {"train.max_epochs": 2, "train.steps_per_epoch": 2},
            "sampler": {"seed": 0, "n_startup_trials": 2},
            "pruner": {"enabled": True, "n_startup_trials": 1, "n_warmup_steps": 0},
            "space": {
                "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                "loss.name": {"type": "categorical", "choices": ["dice", "dice_ce"]},
                "model.unet.channels": {"type": "categorical", "choices": [[8, 16, 32], [12, 24, 48]]},
            },
        }
    )
    path.write_text(yaml.safe_dump(params))
    p = ["--params", str(path)]
    for command in ("synth", "ingest", "validate", "preprocess", "split"):
        extra = ["--out", params["paths"]["validated"]] if command == "validate" else []
        assert main([command, *extra, *p]) == 0
    return path


def _check_study(storage: str, name: str, expected: int, tracking_uri: str) -> optuna.Study:
    """Exactly ``expected`` finished trials numbered 0..n-1, each with one MLflow run nested under one parent."""
    from mlflow import MlflowClient

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    finished = [t for t in trials if t.state.is_finished()]
    assert len(finished) == len(trials) == expected, [t.state for t in trials]
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == expected, "one MLflow run per trial, none shared"
    client = MlflowClient(tracking_uri)
    parents = {client.get_run(r).data.tags["mlflow.parentRunId"] for r in run_ids}
    assert parents == {study.user_attrs["mlflow_parent_run_id"]}
    for trial in trials:  # the pruning callback reported the validation Dice of every epoch it ran
        assert trial.intermediate_values and all(0.0 <= v <= 1.0 for v in trial.intermediate_values.values())
    return study


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_worker_processes_share_a_sqlite_study_and_resume(tiny_project: Path) -> None:
    from mlflow import MlflowClient

    from tumorseg.tuning.study import run_study

    params = read_params(tiny_project)
    storage = params["tune"]["storage"]
    tracking = params["mlflow"]["tracking_uri"]
    result = run_study(params, source=str(tiny_project), n_trials=4, n_jobs=2)
    assert result.trials_run == 4
    study = _check_study(storage, "test", 4, tracking)
    assert result.best_value == pytest.approx(study.best_value)
    best = yaml.safe_load(Path(params["tune"]["best_params_file"]).read_text())
    assert best["train"]["lr"] == pytest.approx(study.best_params["train.lr"])
    artifacts = {a.path for a in MlflowClient(tracking).list_artifacts(result.parent_run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png"} <= artifacts

    # An interrupted study resumes: asking for 5 runs only the missing trial, under the same parent.
    again = run_study(params, source=str(tiny_project), n_trials=5, n_jobs=2)
    assert again.trials_run == 1 and again.parent_run_id == result.parent_run_id
    _check_study(storage, "test", 5, tracking)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_workers_trial_is_failed_and_retried_once(tiny_project: Path, tmp_path: Path) -> None:
    """A worker SIGKILLed mid-trial stops sending heartbeats; the next worker fails that trial after
    ``tune.grace_s`` and runs it again once (the same parameters), and the dead trial's MLflow run
    does not stay RUNNING."""
    import signal
    import sys
    import time

    from mlflow import MlflowClient
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from polling import wait_until
    from tumorseg.tuning.study import run_study

    params = yaml.safe_load(tiny_project.read_text())
    storage = f"sqlite:///{tmp_path / 'killed.db'}"
    params["tune"].update(
        {
            "study_name": "killed",
            "storage": storage,
            "heartbeat_s": 1,
            "grace_s": 3,
            # long enough to be killed mid-trial
            "trial_overrides": {"train.max_epochs": 2, "train.steps_per_epoch": 60},
        }
    )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "tumorseg.cli", "tune", "--params", str(path), "--n-trials", "1"]
    worker = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )

    def running() -> list[optuna.trial.FrozenTrial]:
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
        except KeyError:  # the study is not created yet
            return []
        return [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]

    wait_until(lambda: bool(running()), "a running trial with its MLflow run", 300)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and anything it started: no heartbeat, no cleanup
    worker.wait(timeout=60)
    killed = optuna.load_study(study_name="killed", storage=storage).get_trials()
    assert [t.state for t in killed] == [TrialState.RUNNING]
    time.sleep(params["tune"]["grace_s"] + 1)  # the heartbeat is now stale

    resumed = run_study(read_params(path), source=str(path), n_trials=1)
    assert resumed.trials_run == 1
    trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = trials[1]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert retry.params == trials[0].params
    client = MlflowClient(params["mlflow"]["tracking_uri"])
    assert client.get_run(trials[0].user_attrs["mlflow_run_id"]).info.status != "RUNNING"
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).info.status == "FINISHED"


# ---------------------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, socket in its own folder), stopped after."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql; .ci/run does)")
    bindir = Path(bins[-1]).parent
    folder = Path(tempfile.mkdtemp(prefix="tumorseg-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            shutil.chown(folder, "postgres")
        except LookupError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "tumorseg", "-A", "trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-h 127.0.0.1 -p {port} -k {folder} -F"
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(folder / "log"),
            "-w",
            "-o",
            options,
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="tumorseg", dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE optuna")
        connection.close()
        yield f"postgresql+psycopg2://tumorseg@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.postgres
def test_two_worker_processes_share_a_postgresql_study(tiny_project: Path, postgres_url: str) -> None:
    from tumorseg.tuning.study import run_study

    params = read_params(tiny_project)
    params["tune"]["study_name"] = "test-pg"
    result = run_study(params, source=str(tiny_project), n_trials=4, n_jobs=2, storage=postgres_url)
    assert result.trials_run == 4 and result.storage.startswith("postgresql")
    _check_study(postgres_url, "test-pg", 4, params["mlflow"]["tracking_uri"])


def test_unreachable_storage_is_one_line(tiny_project: Path, capsys: pytest.CaptureFixture) -> None:
    port = _free_port()  # nothing listens there
    code = main(
        [
            "tune",
            "--params",
            str(tiny_project),
            "--n-trials",
            "1",
            "--storage",
            f"postgresql://u:pw@127.0.0.1:{port}/x",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "tune.storage" in err and "pw" not in err
