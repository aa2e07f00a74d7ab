"""Training sections of params.yaml, optimisers/schedulers, and MLflow tracking set-up."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import yaml

from tumorseg import tracking
from tumorseg.config import apply_overrides, read_params, section
from tumorseg.errors import ConfigError
from tumorseg.training.config import TRAINING_SECTIONS, TrainConfig, load_training_config
from tumorseg.training.optim import make_optimizer, make_scheduler

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def params() -> dict:
    return read_params(REPO_ROOT / "params.yaml")


def test_project_params_yaml_has_valid_training_sections(params: dict) -> None:
    cfg = load_training_config(params)
    for name in TRAINING_SECTIONS:
        assert name in params, f"params.yaml lacks the {name}: section"
    assert cfg.model.output in ("regions", "labels")
    assert cfg.trainer.precision == "auto"  # bfloat16 only where the hardware computes it natively
    # every resolved section round-trips through its model (what checkpoints store)
    for name, values in cfg.to_dict().items():
        assert section(name, {name: values}) == getattr(cfg, name)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("model.name", "vnet", r"^params\.yaml: model\.name: Input should be 'unet'"),
        ("loss.name", "tversky", r"^params\.yaml: loss\.name: Input should be 'dice'"),
        ("train.optimizer", "lion", r"^params\.yaml: train\.optimizer: Input should be 'adam'"),
        ("train.scheduler", "step", r"^params\.yaml: train\.scheduler: Input should be 'none'"),
        ("train.lr", -1, r"^params\.yaml: train\.lr: Input should be greater than 0"),
        ("train.learning_rate", 0.1, r"^params\.yaml: train\.learning_rate: Extra inputs are not permitted"),
        ("data_loader.patch_size", [64, 64], r"^params\.yaml: data_loader\.patch_size"),
        ("data_loader.foreground_fraction", 1.5, r"^params\.yaml: data_loader\.foreground_fraction"),
        ("data_loader.class_ratios", [0, 1, 1, 1], r"^params\.yaml: data_loader: .*positive background"),
        ("augment.gamma_range", [1.5, 0.7], r"^params\.yaml: augment: .*gamma_range"),
        ("trainer.precision", "8-bit", r"^params\.yaml: trainer\.precision"),
        (
            "data_loader.patch_size",
            [60, 64, 64],
            r"^params\.yaml: data_loader\.patch_size: \[60, 64, 64\] is not div",
        ),
        ("loss.name", "ce", r"^params\.yaml: loss\.name: ce needs model\.output: labels"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(
    params: dict, key: str, value: object, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected) as exc:
        load_training_config(apply_overrides(params, {key: value}))
    assert "\n" not in str(exc.value)


def test_two_d_mode_checks_the_2d_patch_key(params: dict) -> None:
    bad = apply_overrides(params, {"data_loader.mode": "2d", "data_loader.patch_size_2d": [62, 64]})
    with pytest.raises(ConfigError, match=r"data_loader\.patch_size_2d: \[62, 64\]"):
        load_training_config(bad)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "novograd"])
def test_optimisers_by_name(name: str) -> None:
    weights = [torch.nn.Parameter(torch.ones(3))]
    optimizer = make_optimizer(weights, TrainConfig(optimizer=name, lr=0.01))
    weights[0].sum().backward()
    optimizer.step()
    assert weights[0].detach().lt(1).all()
    assert type(optimizer).__name__.lower() == name


@pytest.mark.parametrize("name", ["cosine", "poly"])
def test_step_schedules_warm_up_then_decay(name: str) -> None:
    cfg = TrainConfig(scheduler=name, lr=1.0, max_epochs=10, warmup_epochs=1, min_lr=0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=cfg.lr)
    schedule = make_scheduler(optimizer, 100, cfg)
    assert schedule["interval"] == "step"
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule["scheduler"].step()
    assert lrs[0] < 0.05  # warm-up starts low
    assert max(lrs) == pytest.approx(1.0, rel=0.05)  # reaches train.lr after 10 steps
    assert lrs[-1] < 0.05  # and decays towards 0


def test_plateau_schedule_watches_validation_dice() -> None:
    cfg = TrainConfig(scheduler="plateau", val_every_n_epochs=2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    schedule = make_scheduler(optimizer, 100, cfg)
    assert schedule["monitor"] == "val_dice_mean" and schedule["scheduler"].mode == "max"
    assert schedule["frequency"] == 2
    assert make_scheduler(optimizer, 100, TrainConfig(scheduler="none")) is None


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking.resolve_tracking_uri(None, tmp_path / "mlruns")
    assert default == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.resolve_tracking_uri(None, tmp_path / "mlruns") == "sqlite:////elsewhere/x.db"
    assert tracking.resolve_tracking_uri("http://server:5000", tmp_path) == "http://server:5000"


def test_fluent_store_gives_the_callers_mlflow_settings_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Library code points mlflow.start_run/log_model at its store; nothing leaks to the caller."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////caller/x.db")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    inner = f"sqlite:///{tmp_path}/store.db"
    with pytest.raises(RuntimeError, match="inside"), tracking.fluent_store(inner):
        assert mlflow.get_tracking_uri() == inner and mlflow.get_registry_uri() == inner
        assert os.environ["MLFLOW_TRACKING_URI"] == inner
        raise RuntimeError("inside")
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////caller/x.db"
    assert "MLFLOW_REGISTRY_URI" not in os.environ


def test_sqlite_experiments_keep_artifacts_next_to_the_database(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "my exp")
    assert tracking.ensure_experiment(uri, "my exp") == experiment_id  # idempotent
    location = mlflow.MlflowClient(uri).get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "store" / "artifacts" / "my-exp").as_uri()
    assert tracking.experiment_artifact_location("http://server", "x") is None


def test_flatten_joins_nested_keys_with_dots() -> None:
    assert tracking.flatten({"train": {"lr": 0.1, "x": {"y": [1, 2]}}, "seed": 1}) == {
        "train.lr": 0.1,
        "train.x.y": [1, 2],
        "seed": 1,
    }


def test_data_version_prefers_dvc_lock_then_hashes_content(tmp_path: Path) -> None:
    pre = tmp_path / "data" / "preprocessed"
    (pre / "cases").mkdir(parents=True)
    (pre / "index.csv").write_text("case_id\nA\n")
    (pre / "cases" / "A.npz").write_bytes(b"abc")
    content = tracking.data_version(pre, tmp_path / "dvc.lock")
    assert content["data_md5_source"] == "content"
    (pre / "cases" / "A.npz").write_bytes(b"abd")
    assert tracking.data_version(pre, tmp_path / "dvc.lock")["data_md5"] != content["data_md5"]

    lock = {
        "schema": "2.0",
        "stages": {"preprocess": {"outs": [{"path": "data/preprocessed", "md5": "f00.dir"}]}},
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert tracking.data_version(Path("data/preprocessed"), tmp_path / "dvc.lock") != {
        "data_md5": "f00.dir",
        "data_md5_source": "dvc.lock",
    }  # our relative paths mean the cwd; dvc.lock's paths mean the lock file's folder
    assert tracking.data_version(pre, tmp_path / "dvc.lock") == {
        "data_md5": "f00.dir",
        "data_md5_source": "dvc.lock",
    }
    assert len(hashlib.md5().hexdigest()) == len(content["data_md5"])


def test_system_info_and_model_requirements_are_local() -> None:
    info = tracking.system_info()
    assert info["torch_version"] == torch.__version__
    assert info["cpu_count"].isdigit()
    requirements = tracking.model_pip_requirements()
    assert f"torch=={torch.__version__}" in requirements
    assert any(r.startswith("monai==") for r in requirements)
