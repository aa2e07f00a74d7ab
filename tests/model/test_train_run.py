"""``train()`` end to end on a tiny dataset: outputs, MLflow run, scoring, 2-D and softmax modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_data import tiny_overrides

from tumorseg.models.checkpoint import load_trained_network
from tumorseg.training.scoring import score_split
from tumorseg.training.train import train


def test_train_writes_checkpoints_reports_and_a_complete_mlflow_run(
    tiny_dataset: Path, real_params: dict
) -> None:
    import mlflow

    uri = f"sqlite:///{tiny_dataset}/store/mlflow.db"
    overrides = tiny_overrides(tiny_dataset, **{"mlflow.enabled": True, "train.max_epochs": 2})
    result = train(real_params, overrides=overrides, tracking_uri=uri)

    assert result.epochs == 2 and result.global_step == 8
    assert result.best_checkpoint == tiny_dataset / "models" / "checkpoints" / "best.ckpt"
    assert result.last_checkpoint.is_file()
    assert set(result.best_val_dice) == {"WT", "TC", "ET", "mean"}
    assert result.patches_per_s > 0

    train_metrics = json.loads((tiny_dataset / "reports" / "train_metrics.json").read_text())
    assert train_metrics["epochs"] == 2
    assert train_metrics["best_val_dice"]["mean"] == pytest.approx(result.best_val_dice["mean"], abs=1e-6)
    test_metrics = json.loads((tiny_dataset / "reports" / "metrics.json").read_text())["test"]
    assert set(test_metrics) >= {"dice_WT", "dice_TC", "dice_ET"}
    assert test_metrics["n_cases"] == 2
    for name in ("config.yaml", "learning_curves.png", "logs/metrics.csv", "overlays/Tiny_006.png"):
        assert (tiny_dataset / "models" / name).is_file(), name

    client = mlflow.MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(real_params["train"]["lr"])
    assert run.data.params["model.name"] == "unet"
    assert run.data.tags["data.data_md5_source"] == "content"
    assert run.data.tags["system.torch_version"] == torch.__version__
    assert len(client.get_metric_history(run.info.run_id, "val_dice_mean")) == 2  # one per epoch
    assert {"train_loss", "val_loss", "val_dice_WT", "val_dice_TC", "val_dice_ET"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "config.yaml",
        "learning_curves.png",
        "metrics.csv",
        "train_metrics.json",
        "overlays",
    } <= artifacts
    artifact_root = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifact_root.is_relative_to(tiny_dataset / "store" / "artifacts")

    mlflow.set_tracking_uri(uri)
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    trained = load_trained_network(result.best_checkpoint)
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(logged.eval()(x), trained.network(x), atol=1e-5)


def test_score_split_of_the_best_checkpoint_matches_the_run(tiny_dataset: Path, real_params: dict) -> None:
    from tumorseg.config import apply_overrides

    overrides = tiny_overrides(tiny_dataset)
    result = train(real_params, overrides=overrides)
    params = apply_overrides(real_params, overrides)
    scores = score_split(result.best_checkpoint, "test", params=params)
    assert scores["dice_WT"] == pytest.approx(result.test_dice["dice_WT"])
    assert set(scores["cases"]) == {"Tiny_008", "Tiny_009"}
    val = score_split(result.best_checkpoint, "val", params=params)
    assert val["dice_mean"] == pytest.approx(result.best_val_dice["mean"], abs=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        {"data_loader.mode": "2d", "data_loader.batch_size": 4, "sliding_window.sw_batch_size": 32},
        {"model.output": "labels", "loss.name": "dice_ce"},
        {
            "model.name": "dynunet",
            "model.dynunet.base_filters": 4,
            "model.dynunet.max_filters": 16,
            "model.dynunet.deep_supervision": True,
            "train.optimizer": "sgd",
            "train.scheduler": "poly",
        },
    ],
    ids=["2d-slices", "softmax-labels", "dynunet-deep-supervision"],
)
def test_other_modes_train_and_score(tiny_dataset: Path, real_params: dict, extra: dict) -> None:
    result = train(real_params, overrides=tiny_overrides(tiny_dataset, **extra))
    assert result.best_checkpoint is not None and result.global_step == 4
    trained = load_trained_network(result.best_checkpoint)
    assert trained.data_loader.mode == extra.get("data_loader.mode", "3d")
    assert 0.0 <= result.test_dice["dice_WT"] <= 1.0


def test_progress_lines_report_and_do_not_change_training(
    tiny_dataset: Path, real_params: dict, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from tumorseg.training import callbacks

    overrides = tiny_overrides(tiny_dataset, **{"train.max_epochs": 2, "mlflow.enabled": False})
    monkeypatch.setattr(callbacks, "PROGRESS_EVERY_S", 0.0)  # a line after every step: the run lasts seconds
    with caplog.at_level(logging.INFO, logger="tumorseg.training.callbacks"):
        with_lines = train(real_params, overrides=overrides)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: step")]
    assert lines and "epoch 2/2" in lines[-1] and "val Dice" in lines[-1] and "min left" in lines[-1]
    assert lines[0].startswith("train: step 1/") and "loss" in lines[0]
    first = torch.load(with_lines.best_checkpoint, map_location="cpu", weights_only=False)["state_dict"]

    build = callbacks.build_callbacks  # train() imports it from the module when it runs
    monkeypatch.setattr(
        callbacks, "build_callbacks", lambda *a, **k: build(*a, **{**k, "progress_lines": False})
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tumorseg.training.callbacks"):
        without = train(real_params, overrides=overrides)
    assert not [r for r in caplog.records if r.getMessage().startswith("train: step")]
    again = torch.load(without.best_checkpoint, map_location="cpu", weights_only=False)
    assert all(torch.equal(first[k], again["state_dict"][k]) for k in first)  # logging only: same weights
