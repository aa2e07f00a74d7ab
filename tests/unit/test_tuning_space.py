"""The search space, the best-params file and the worker budget (no training)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from tumorseg.config import read_params, section
from tumorseg.errors import ConfigError
from tumorseg.tuning.best import read_best_params, with_best_params, write_best_params
from tumorseg.tuning.config import TuneConfig
from tumorseg.tuning.space import decode_trial_params, sample_overrides, to_overrides
from tumorseg.tuning.study import hide_password, split_budget, storage_url

ROOT = Path(__file__).resolve().parents[2]


def _tune(space: dict) -> TuneConfig:
    return section("tune", {"tune": {"space": space}})


def test_project_search_space_samples_valid_training_params() -> None:
    import tumorseg.training.config  # noqa: F401
    from tumorseg.config import apply_overrides
    from tumorseg.training.config import load_training_config

    params = read_params(ROOT / "params.yaml")
    cfg = section("tune", params)
    assert {"train.lr", "loss.name", "model.unet.channels", "augment_strength"} <= set(cfg.space)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        overrides = sample_overrides(trial, cfg.space, params)
        load_training_config(apply_overrides(params, overrides))  # every sample is a valid config
        assert isinstance(overrides["model.unet.channels"], list)
        assert 1e-4 <= overrides["train.lr"] <= 1e-2
        study.tell(trial, 0.5)


def test_strength_knob_scales_and_clips_probabilities() -> None:
    space = _tune(
        {
            "strength": {
                "type": "float",
                "low": 0,
                "high": 3,
                "scales": ["augment.affine_prob", "augment.rotate_deg"],
            }
        }
    ).space
    params = {"augment": {"affine_prob": 0.4, "rotate_deg": 10}}
    assert to_overrides({"strength": 2.0}, space, params, "p.yaml") == {
        "augment.affine_prob": 0.8,
        "augment.rotate_deg": 20.0,
    }
    assert to_overrides({"strength": 3.0}, space, params, "p.yaml")["augment.affine_prob"] == 1.0
    with pytest.raises(ConfigError, match="augment.missing"):
        to_overrides(
            {"strength": 1.0},
            _tune({"strength": {"type": "float", "low": 0, "high": 1, "scales": ["augment.missing"]}}).space,
            params,
            "p.yaml",
        )


def test_list_choices_round_trip_through_optuna() -> None:
    space = _tune(
        {"data_loader.patch_size": {"type": "categorical", "choices": [[32, 32, 32], [48, 48, 48]]}}
    ).space
    trial = optuna.trial.FixedTrial({"data_loader.patch_size": "[48, 48, 48]"})
    assert sample_overrides(trial, space, {}) == {"data_loader.patch_size": [48, 48, 48]}
    assert decode_trial_params({"data_loader.patch_size": "[32, 32, 32]"}, space) == {
        "data_loader.patch_size": [32, 32, 32]
    }


@pytest.mark.parametrize(
    ("dimension", "message"),
    [
        ({"type": "float", "low": 1e-2, "high": 1e-4}, "low must not exceed high"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log: true needs low > 0"),
        ({"type": "categorical"}, "non-empty choices"),
        ({"type": "int", "low": 1}, "needs low and high"),
    ],
)
def test_bad_dimension_is_one_line_naming_the_key(dimension: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"tune\.space\.train\.lr.*{message}"):
        _tune({"train.lr": dimension})


def test_best_params_precedence(tmp_path: Path) -> None:
    best = tmp_path / "best.yaml"
    write_best_params(best, {"train.lr": 0.003, "model.unet.channels": [8, 16]}, "test header")
    assert best.read_text().startswith("# test header\n")
    assert read_best_params(best) == {"train.lr": 0.003, "model.unet.channels": [8, 16]}
    params = {
        "tune": {"best_params_file": str(best)},
        "train": {"lr": 0.1, "max_epochs": 3},
        "model": {"unet": {"channels": [4, 8], "strides": [2]}},  # two levels, as the best file has
    }
    merged = with_best_params(params, explicit={"train.lr": 0.5})
    assert merged.raw["train"] == {"lr": 0.5, "max_epochs": 3}  # -S beats the best file
    assert merged.raw["model"]["unet"]["channels"] == [8, 16]  # the best file beats params.yaml
    assert (merged.train.lr, merged.model.unet.channels) == (0.5, (8, 16))  # and the result is validated
    params["tune"]["apply_best"] = False
    assert with_best_params(params).train.lr == 0.1
    best.write_text("[1, 2")
    with pytest.raises(ConfigError, match="best.yaml"):
        read_best_params(best)


def test_budget_split_and_storage_defaults(tmp_path: Path) -> None:
    assert split_budget(5, 2) == [3, 2] and split_budget(1, 3) == [1] and split_budget(0, 2) == []
    params = {"paths": {"mlruns": str(tmp_path / "mlruns")}}
    assert storage_url(params, section("tune", params)) == f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    assert (
        hide_password("postgresql://tumor:s3cret@db:5432/optuna") == "postgresql://tumor:***@db:5432/optuna"
    )


def test_params_yaml_documents_the_tune_and_flow_sections() -> None:
    import tumorseg.pipeline_config  # noqa: F401

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    flow = section("flow", params)
    assert flow.schedule.cron and flow.smoke.overrides["train.max_epochs"] == 1
    with pytest.raises(ConfigError, match="flow.schedule"):
        section("flow", {"flow": {"schedule": {"cron": "every monday"}}})
