"""``tumorseg compare``: the seed-003 systems beside the default U-Net, trained and scored in one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sites import generate_site

from tumorseg.cli import main

SMALL_EFFICIENTNET = {
    "model.efficientnet_attention_unet.decoder_channels": [16, 8, 8, 4, 4],
    "loss.name": "dice_focal",
}
SYSTEMS = {
    "unet": {},
    "attention": {"model.name": "efficientnet_attention_unet", **SMALL_EFFICIENTNET},
    "seed003": {
        "model.name": "efficientnet_attention_unet",
        "model.slice_lstm.enabled": True,
        "model.slice_lstm.hidden_channels": 4,
        **SMALL_EFFICIENTNET,
    },
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compare_trains_and_scores_every_system_on_the_test_split(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    params = generate_site(tmp_path / "site", uri, "brats2021", seed=5)
    compare = [
        "-S", f"compare.systems={json.dumps(SYSTEMS)}",
        "-S", "compare.budget=steps",
        "-S", f"compare.out_dir={tmp_path / 'runs'}",
        "-S", f"compare.reports={tmp_path / 'reports' / 'compare'}",
        "-S", "data_loader.patch_size=[32,32,32]",
        "-S", "train.max_epochs=1",
        "-S", "train.steps_per_epoch=3",
        "-S", "train.score_test=false",
    ]  # fmt: skip
    capsys.readouterr()
    assert main(["compare", "--params", str(params), *compare]) == 0
    assert "compared 3 systems" in capsys.readouterr().out

    report = json.loads((tmp_path / "reports" / "compare" / "compare.json").read_text())
    rows = {row["name"]: row for row in report["systems"]}
    assert list(rows) == list(SYSTEMS)
    split = json.loads((tmp_path / "site" / "split.json").read_text())
    n_test = len(split["test"]) if isinstance(split["test"], list) else len(split["test"]["cases"])
    for name, row in rows.items():
        assert row["test"]["n_cases"] == n_test, name
        assert 0.0 <= row["test"]["dice_mean"] <= 1.0
        assert row["test"]["dice_mean_ci_low"] <= row["test"]["dice_mean"] <= row["test"]["dice_mean_ci_high"]
        assert row["max_epochs"] * row["steps_per_epoch"] == 3  # budget: steps, the reference's
        assert row["step_ratio"] == 1.0 and row["probe_step_s"] is None  # nothing probed with budget: steps
        assert (tmp_path / "runs" / name / "checkpoints" / "best.ckpt").is_file()
        assert (tmp_path / "reports" / "compare" / name / "metrics.json").is_file()
    assert rows["seed003"]["network"] == "efficientnet_attention_unet + slice ConvLSTM"
    assert rows["seed003"]["parameters"] > rows["attention"]["parameters"] > rows["unet"]["parameters"]
    table = (tmp_path / "reports" / "compare" / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in SYSTEMS) and "Dice WT (95 % CI)" in table

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tumorseg-compare").experiment_id])
    assert {r.info.run_id for r in runs} >= {row["mlflow_run_id"] for row in rows.values()}
    assert all(
        "test_eval/dice_mean" in r.data.metrics
        for r in runs
        if r.info.run_id in {row["mlflow_run_id"] for row in rows.values()}
    )
    assert not client.search_registered_models()  # a comparison registers nothing


def test_a_bad_system_is_one_line_before_anything_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    systems = json.dumps({"unet": {}, "broken": {"model.name": "no_such_network"}})
    out = tmp_path / "runs"
    rc = main(["compare", "-S", f"compare.systems={systems}", "-S", f"compare.out_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "compare.systems.broken" in err and "model.name" in err
    assert not out.exists()


def test_a_time_budget_gives_a_slower_system_fewer_epochs() -> None:
    from tumorseg.comparison.compare import budgets, system_params
    from tumorseg.params import load_params

    systems = {
        "unet": {},
        "seed003": {"model.name": "efficientnet_attention_unet", "model.slice_lstm.enabled": True},
    }
    params = load_params(
        overrides={
            "compare.systems": systems,
            "compare.probe_steps": 1,
            "data_loader.patch_size": [32, 32, 32],
            "model.unet.channels": [4, 8, 16],
            "model.unet.strides": [2, 2],
            "train.max_epochs": 20,
        }
    )
    plan = budgets(params, {name: system_params(params, name) for name in systems})
    assert (plan["unet"].max_epochs, plan["unet"].step_ratio) == (20, 1.0)
    seed003 = plan["seed003"]
    assert seed003.step_ratio > 1.5 and seed003.max_epochs == max(1, round(20 / seed003.step_ratio))
    # the probe's own seconds per step are kept (compare.json), and the ratio is theirs
    assert plan["unet"].probe_step_s and seed003.probe_step_s
    unet_s, seed003_s = plan["unet"].probe_step_s, seed003.probe_step_s  # each rounded to 0.1 ms
    rounding = 5e-5 / unet_s + 5e-5 / seed003_s
    assert seed003_s / unet_s == pytest.approx(seed003.step_ratio, rel=1.01 * rounding + 1e-6)
