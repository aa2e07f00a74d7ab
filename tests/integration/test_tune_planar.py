"""``tumorseg tune --dims 2``: an Optuna study over the 2-D models' keys (``tune.space_2d``), each trial
a real tiny 2-D training scored on validation Dice, nested in MLflow like the 3-D study, with its own
study name and best-params file (the 3-D ones untouched)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from tumorseg.cli import main

_SPEC = importlib.util.spec_from_file_location(
    "planar_fixtures", Path(__file__).parents[1] / "planar_fixtures.py"
)
fixtures = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fixtures)

pytestmark = pytest.mark.slow

CHANNELS = [[4, 8, 16], [8, 16, 32]]


def _params(tmp: Path) -> dict[str, Any]:
    preprocessed, split = fixtures.write_preprocessed(tmp / "preprocessed_2d")
    params = fixtures.tiny_params(
        tmp,
        preprocessed,
        split,
        **{
            "tune.storage": f"sqlite:///{tmp / 'optuna.db'}",
            "tune.best_params_file": str(tmp / "reports" / "best_params.yaml"),
            "tune.best_params_file_2d": str(tmp / "reports" / "2d" / "best_params.yaml"),
            "tune.study_name_2d": "planar-test",
            "tune.sampler": {"seed": 0, "n_startup_trials": 2},
            "tune.pruner": {"enabled": True, "n_startup_trials": 1, "n_warmup_steps": 0},
        },
    )
    params["tune"]["trial_overrides_2d"] = {"train_2d.max_epochs": 2, "train_2d.steps_per_epoch": 2}
    params["tune"]["space_2d"] = {
        "train_2d.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "model_2d.unet.channels": {"type": "categorical", "choices": CHANNELS},
    }
    return params


def test_tune_dims_2_searches_the_2d_keys_on_validation_dice_and_writes_its_own_best_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    from tumorseg.tuning.best import with_best_params

    params = _params(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    code = main(["tune", "--dims", "2", "--params", str(params_file), "--n-trials", "2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.startswith("study planar-test: best val Dice ")

    storage = params["tune"]["storage"]
    assert optuna.get_all_study_names(storage) == ["planar-test"]  # the 3-D study is not touched
    study = optuna.load_study(study_name="planar-test", storage=storage)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1] and all(t.state.is_finished() for t in trials)
    for trial in trials:  # the 2-D keys were searched, each epoch's 2-D validation Dice reported
        assert set(trial.params) == {"train_2d.lr", "model_2d.unet.channels"}
        assert trial.intermediate_values and all(0.0 <= v <= 1.0 for v in trial.intermediate_values.values())

    client = MlflowClient(params["mlflow"]["tracking_uri"])
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    experiment = client.get_experiment(parent.info.experiment_id).name
    assert experiment == f"{params['train_2d']['experiment']}-tune"
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["tumorseg.branch"] == "2d"  # a 2-D training, with the sampled network
        assert (
            yaml.safe_load(run.data.params["model_2d.unet.channels"])
            == trial.user_attrs["overrides"]["model_2d.unet.channels"]
        )
        assert run.data.params["train_2d.max_epochs"] == "2"  # trial_overrides_2d applied

    best = yaml.safe_load((tmp_path / "reports" / "2d" / "best_params.yaml").read_text())
    assert best["train_2d"]["lr"] == pytest.approx(
        study.best_params["train_2d.lr"]
    )  # trial 0 always completes
    assert best["model_2d"]["unet"]["channels"] in CHANNELS
    assert not (tmp_path / "reports" / "best_params.yaml").exists()  # the 3-D file is not written
    merged = with_best_params(params, source=str(params_file), dims=2)
    assert merged.train_2d.lr == pytest.approx(best["train_2d"]["lr"])
    assert with_best_params(params, source=str(params_file)).train_2d.lr == params["train_2d"]["lr"]
