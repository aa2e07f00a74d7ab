"""Evaluate stage, model registry, promotion gate, rollback, and loading the champion everywhere.

One real pipeline per module: ``tumorseg synth --spacing 4`` -> ingest -> validate -> preprocess ->
split -> ``train()`` (1 tiny epoch, MLflow on) -> the evaluate stage (source-geometry test metrics,
logged to the training run, registered as ``tumorseg`` version 1, alias ``challenger``), all in
``tmp_path`` with a SQLite MLflow store there. Promotion tests register further versions with
their evaluation shifted, on their own registered model names, so each test stands alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tumorseg.cli import main
from tumorseg.config import apply_overrides, read_params

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Project:
    root: Path
    params: dict[str, Any]
    params_file: Path
    uri: str
    train: Any
    stage: Any

    def with_model_name(self, name: str) -> tuple[dict[str, Any], Path]:
        params = apply_overrides(self.params, {"registry.model_name": name})
        path = self.root / f"params-{name}.yaml"
        path.write_text(yaml.safe_dump(params))
        return params, path

    def client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(self.uri, registry_uri=self.uri)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    from tumorseg.registry.evaluate_stage import run_evaluate_stage
    from tumorseg.training.train import train

    root = tmp_path_factory.mktemp("project")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    overrides: dict[str, Any] = {
        **{f"paths.{key}": str(root / key) for key in ("ingested", "validated", "preprocessed", "reports")},
        "data.source": str(root / "raw"),
        "paths.mlruns": str(root / "mlruns"),
        "paths.split": str(root / "split.json"),
        "synth.cases": 10,
        "synth.spacing_mm": 4.0,
        "synth.reoriented_fraction": 0.3,
        "preprocess.target_spacing_mm": [4.0, 4.0, 4.0],
        "train.out_dir": str(root / "models"),
        "train.max_epochs": 1,
        "train.steps_per_epoch": 3,
        "train.checkpoint_every_n_steps": 3,
        "train.warmup_epochs": 0,
        "train.score_test": True,  # the test compares the evaluate stage with training's own test scores
        "data_loader.patch_size": [16, 16, 16],
        "model.unet.channels": [4, 8, 16],
        "model.unet.strides": [2, 2],
        "model.unet.num_res_units": 1,
        "sliding_window.sw_batch_size": 2,
        "sliding_window.overlap": 0.25,
        "trainer.accelerator": "cpu",
        "mlflow.tracking_uri": uri,
        "mlflow.overlays": 0,
        "evaluate.bootstrap_resamples": 200,
        "evaluate.plots": False,
        "registry.bootstrap_resamples": 200,
        # every component kept, so the evaluate stage's Dice can be compared with training's own
        "predict.min_component_confidence": 0.0,
    }
    params = apply_overrides(read_params(ROOT / "params.yaml"), overrides)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    p = ["--params", str(params_file)]
    assert main(["synth", "--out", str(root / "raw"), *p]) == 0
    assert main(["ingest", *p]) == 0
    assert main(["validate", str(root / "ingested"), "--out", str(root / "validated"), *p]) == 0
    assert main(["preprocess", *p]) == 0
    assert main(["split", *p]) == 0
    trained = train(params, source=str(params_file))
    stage = run_evaluate_stage(params, source=str(params_file))
    return Project(root, params, params_file, uri, trained, stage)


def shifted(evaluation: Any, delta: float, **changes: Any) -> Any:
    """The evaluation with every per-case Dice moved by ``delta`` (clipped to [0, 1])."""
    case_dice = {
        c: {r: float(np.clip(v + delta, 0, 1)) for r, v in d.items()} for c, d in evaluation.case_dice.items()
    }
    metrics = dict(evaluation.metrics)
    for region in ("WT", "TC", "ET"):
        metrics[f"dice_{region}"] = float(np.mean([d[region] for d in case_dice.values()]))
    metrics["dice_mean"] = float(np.mean([np.mean(list(d.values())) for d in case_dice.values()]))
    return dataclasses.replace(evaluation, case_dice=case_dice, metrics=metrics, **changes)


def register(project: Project, evaluation: Any, model_name: str, drift_profile: Any = None) -> str:
    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.registry.config import RegistryConfig
    from tumorseg.registry.register import register_model

    version = register_model(
        load_trained_network(project.train.best_checkpoint),
        evaluation,
        run_id=project.train.mlflow_run_id,
        tracking_uri=project.uri,
        cfg=RegistryConfig(model_name=model_name),
        predict_settings={"tta": False, "min_component_mm3": 0.0},
        params=project.params,
        drift_profile=drift_profile,
    )
    return version.version


def promote_cli(params_file: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str, dict]:
    rc = main(["promote", "--params", str(params_file), *extra])
    out = capsys.readouterr().out
    decision_file = yaml.safe_load(params_file.read_text())["paths"]["reports"] + "/promotion.json"
    return rc, out, json.loads(Path(decision_file).read_text()) if rc == 0 else {}


def aliases(project: Project, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in project.client().get_registered_model(name).aliases.items()}


# ---------------------------------------------------------------------------- evaluate stage
def test_evaluate_stage_writes_metrics_logs_them_and_registers_a_challenger(project: Project) -> None:
    reports = project.root / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())["test"]
    split = json.loads((project.root / "split.json").read_text())
    assert metrics["n_cases"] == len(split["test"]) >= 2
    for region in ("WT", "TC", "ET"):
        for metric in ("dice", "hd95", "lesion_dice"):
            assert (
                metrics[f"{metric}_{region}_ci_low"]
                <= metrics[f"{metric}_{region}"]
                <= metrics[f"{metric}_{region}_ci_high"]
            )
    per_case = pd.read_csv(reports / "test_per_case.csv")
    assert metrics["dice_WT"] == pytest.approx(per_case[per_case.region == "WT"].dice.mean(), abs=1e-6)
    plot = pd.read_csv(reports / "plots" / "test_dice.csv")
    assert list(plot.columns) == [
        "case_id",
        "dice_WT",
        "dice_TC",
        "dice_ET",
        "hd95_WT",
        "hd95_TC",
        "hd95_ET",
        "dice_mean",
    ]
    assert sorted(plot.case_id) == sorted(split["test"])
    volumes = pd.read_csv(reports / "plots" / "test_volumes.csv")
    assert {"ref_ml_WT", "pred_ml_WT"} <= set(volumes.columns)

    # Same network, same preprocessing: the source-geometry Dice equals training's on its own grid.
    for case_id, dice in project.train.test_dice["cases"].items():
        for region, value in dice.items():
            assert project.stage.evaluation.case_dice[case_id][region] == pytest.approx(value, abs=1e-4)

    client = project.client()
    run = client.get_run(project.train.mlflow_run_id)
    assert run.data.metrics["test_eval/dice_WT"] == pytest.approx(metrics["dice_WT"])
    assert run.data.metrics["test_eval/dice_mean_ci_high"] == pytest.approx(metrics["dice_mean_ci_high"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} >= {
        "evaluation/test_per_case.csv",
        "evaluation/test_summary.json",
        "evaluation/metrics.json",
    }
    assert "model_card.md" in {a.path for a in client.list_artifacts(run.info.run_id)}

    version_file = json.loads((reports / "model_version.json").read_text())
    assert version_file == {
        "name": "tumorseg",
        "version": "1",
        "run_id": run.info.run_id,
        "model_uri": "models:/tumorseg/1",
        "alias": "challenger",
    }
    assert aliases(project, "tumorseg") == {"challenger": "1"}
    version = client.get_model_version("tumorseg", "1")
    assert version.run_id == run.info.run_id
    assert version.tags["data_md5"] == run.data.tags["data.data_md5"]
    assert len(version.tags["params_md5"]) == 32 and version.tags["git_commit"] not in ("", "unknown")
    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.registry.register import params_md5

    assert version.tags["params_md5"] == params_md5(
        load_trained_network(project.train.best_checkpoint).config
    )
    assert float(version.tags["test_dice_mean"]) == pytest.approx(metrics["dice_mean"], abs=1e-6)
    # the threshold it was evaluated with (set in params here) travels with the registered model
    from tumorseg.registry.loading import load_model

    stored = {"min_component_confidence": 0.0, "chosen_on": "predict.min_component_confidence"}
    assert json.loads((reports / "metrics.json").read_text())["postprocess"] == stored
    assert load_model("models:/tumorseg/1", tracking_uri=project.uri).trained.config["postprocess"] == stored
    card = version.description
    assert card.startswith("# Model card: tumorseg version 1")
    for text in (
        "Not for clinical use",
        "synthetic",
        "| Dice |",
        version.tags["data_md5"],
        version.tags["params_md5"],
    ):
        assert text in card


def test_evaluate_model_cli_without_registering(project: Project, capsys: pytest.CaptureFixture) -> None:
    params = apply_overrides(project.params, {"paths.reports": str(project.root / "reports-no-register")})
    params_file = project.root / "params-no-register.yaml"
    params_file.write_text(yaml.safe_dump(params))
    assert main(["evaluate-model", "--params", str(params_file), "--no-register"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test (") and "registered" not in out
    reports = project.root / "reports-no-register"
    record = json.loads((reports / "model_version.json").read_text())
    assert record["version"] is None and record["reason"] == "registration turned off (--no-register)"
    assert json.loads((reports / "metrics.json").read_text())["test"] == project.stage.evaluation.metrics
    assert [str(v.version) for v in project.client().search_model_versions("name='tumorseg'")] == ["1"]


def test_the_evaluate_stage_chooses_the_confidence_threshold_on_validation(project: Project) -> None:
    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.models.config import PredictConfig
    from tumorseg.models.predictor import SegmentationPredictor
    from tumorseg.registry.evaluate_stage import run_evaluate_stage

    reports = project.root / "reports-choice"
    params = apply_overrides(
        project.params, {"paths.reports": str(reports), "predict.min_component_confidence": None}
    )
    params_file = project.root / "params-choice.yaml"
    params_file.write_text(yaml.safe_dump(params))
    stage = run_evaluate_stage(params, source=str(params_file), register=False)
    chosen = json.loads((reports / "metrics.json").read_text())["postprocess"]
    split = json.loads((project.root / "split.json").read_text())
    assert chosen["chosen_on"] == f"validation split ({len(split['val'])} cases)"
    assert chosen["val_dice_mean_with"] >= chosen["val_dice_mean_without"]
    low, high = chosen["best_interval"]
    threshold = chosen["min_component_confidence"]
    assert threshold == 0.0 or low < threshold <= high
    # the test split was scored with it: scoring again with the threshold given explicitly agrees
    from tumorseg.evaluation.pipeline_stage import evaluate_test_split

    again = evaluate_test_split(
        SegmentationPredictor(
            load_trained_network(project.train.best_checkpoint),
            PredictConfig.model_validate({**params["predict"], "min_component_confidence": threshold}),
        ),
        apply_overrides(params, {"paths.reports": str(project.root / "reports-again")}),
        source=str(params_file),
    )
    for case_id, dice in stage.evaluation.case_dice.items():
        assert again.case_dice[case_id] == pytest.approx(dice)


def test_the_registered_artifact_is_small_declared_and_pickle_free(project: Project, tmp_path: Path) -> None:
    import mlflow
    from mlflow.models import Model

    client = project.client()
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri("tumorseg", "1"),
            dst_path=str(tmp_path),
            tracking_uri=project.uri,
        )
    )
    files = {p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "model_code.py", "artifacts/weights.pt", "artifacts/config.json", "artifacts/predict.json",
            "artifacts/evaluation.json", "artifacts/model_card.md", "artifacts/network.onnx",
            "requirements.txt"} <= set(files)  # fmt: skip
    assert not [name for name in files if name.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert sum(files.values()) < 2_000_000
    meta = Model.load(str(local / "MLmodel"))
    assert meta.signature.inputs.input_names() == ["case_dir", "out_dir"]
    assert "segmentation" in meta.signature.outputs.input_names()
    assert {p.name for p in meta.signature.params} == {"tta", "min_component_mm3", "return_segmentation"}
    evaluation = json.loads((local / "artifacts" / "evaluation.json").read_text())
    assert sorted(evaluation["case_dice"]) == sorted(project.stage.evaluation.case_dice)
    assert len(evaluation["reference_sha256"]) == len(evaluation["case_dice"])


# ---------------------------------------------------------------------------- promotion
def test_first_model_becomes_champion_a_worse_one_does_not_a_better_one_does_and_rollback(
    project: Project, capsys: pytest.CaptureFixture
) -> None:
    name = "tumorseg-gate"
    _, params_file = project.with_model_name(name)
    evaluation = project.stage.evaluation
    assert register(project, evaluation, name) == "1"
    assert aliases(project, name) == {"challenger": "1"}

    rc, out, decision = promote_cli(params_file, capsys)
    assert rc == 0 and out.startswith(f"promoted {name} version 1 to champion")
    assert decision["action"] == "promoted" and decision["previous_champion"] is None
    assert aliases(project, name) == {"champion": "1"}

    assert register(project, shifted(evaluation, -0.2), name) == "2"
    rc, out, decision = promote_cli(params_file, capsys)
    assert rc == 0 and out.startswith("kept champion version 1; challenger version 2 rejected")
    assert decision["action"] == "rejected" and decision["champion"] == "1"
    comparison = decision["comparison"]
    assert comparison["n_cases"] == len(evaluation.case_dice)
    assert comparison["mean_improvement"] < 0 and comparison["ci_high"] <= 0
    assert set(comparison["paired_differences"]) == set(evaluation.case_dice)
    assert "less than the margin" in " ".join(decision["reasons"])
    assert aliases(project, name) == {"champion": "1", "challenger": "2"}
    client = project.client()
    assert client.get_model_version(name, "2").tags["promotion_decision"] == "rejected"
    logged = client.get_run(decision["mlflow_run_id"])
    assert logged.data.tags["decision"] == "rejected" and logged.data.metrics["mean_improvement"] < 0

    assert register(project, shifted(evaluation, +0.1), name) == "3"
    rc, out, decision = promote_cli(params_file, capsys)
    assert rc == 0 and out.startswith(f"promoted {name} version 3 to champion")
    assert decision["comparison"]["mean_improvement"] >= 0.005
    assert decision["evidence_source"] == "stored evaluations"
    assert aliases(project, name) == {"champion": "3"}
    assert json.loads(client.get_registered_model(name).tags["champion_history"]) == ["1", "3"]
    assert client.get_model_version(name, "3").tags["previous_champion"] == "1"

    rc, out, decision = promote_cli(params_file, capsys, "--rollback")
    assert rc == 0 and out.startswith("rolled back champion from version 3 to version 1")
    assert decision["action"] == "rolled_back" and decision["champion"] == "1"
    assert aliases(project, name) == {"champion": "1"}
    assert client.get_model_version(name, "3").tags["rolled_back"] == "true"

    rc = main(["promote", "--params", str(params_file), "--rollback"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no previous champion" in err and "\n" not in err
    rc, out, _ = promote_cli(params_file, capsys)
    assert rc == 0 and "no challenger" in out and aliases(project, name) == {"champion": "1"}


def test_a_challenger_without_an_evaluation_never_becomes_champion(
    project: Project, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    name = "tumorseg-failed"
    _, params_file = project.with_model_name(name)
    from tumorseg.tracking import fluent_store

    with fluent_store(project.uri):  # training's PyTorch model
        version = mlflow.register_model(f"runs:/{project.train.mlflow_run_id}/model", name)
    project.client().set_registered_model_alias(name, "challenger", version.version)
    rc, out, decision = promote_cli(params_file, capsys)
    assert rc == 0 and decision["action"] == "rejected"
    assert "evaluation.json" in out and "champion" not in aliases(project, name)


def test_the_champion_is_re_evaluated_when_it_was_scored_on_other_data(
    project: Project, capsys: pytest.CaptureFixture
) -> None:
    name = "tumorseg-rescore"
    _, params_file = project.with_model_name(name)
    evaluation = project.stage.evaluation
    stale = {case_id: "0" * 64 for case_id in evaluation.reference_sha256}  # "scored on other references"
    register(project, dataclasses.replace(evaluation, reference_sha256=stale), name)
    assert promote_cli(params_file, capsys)[2]["action"] == "promoted"
    register(project, shifted(evaluation, +0.05), name)
    rc, _, decision = promote_cli(params_file, capsys)
    assert rc == 0 and decision["evidence_source"] == "champion re-evaluated on the challenger's test cases"
    assert decision["action"] == "promoted" and decision["champion"] == "2"
    # The re-evaluated champion (same weights) scores what the evaluate stage measured.
    expected = np.mean(
        [np.clip(v + 0.05, 0, 1) - v for d in evaluation.case_dice.values() for v in d.values()]
    )
    assert decision["comparison"]["mean_improvement"] == pytest.approx(expected, abs=1e-5)


def _promote_process(
    params_file: Path, out: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``tumorseg promote`` in its own process (stderr readable line by line, for the lock messages)."""
    command = [
        sys.executable,
        "-m",
        "tumorseg.cli",
        "promote",
        "--params",
        str(params_file),
        "--out",
        str(out),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _waiting_for_the_lock(process: subprocess.Popen[str], log: list[str]) -> bool:
    """True once ``process`` says it waits for the registry lock (its stderr is read line by line)."""
    line = process.stderr.readline()
    log.append(line)
    return "another process is changing the model registry" in line


def test_two_promotes_at_once_end_with_one_decision_and_the_history_intact(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from polling import wait_until
    from tumorseg.tracking import registry_lock

    name = "tumorseg-race"
    _, params_file = project.with_model_name(name)
    evaluation = project.stage.evaluation
    register(project, evaluation, name)
    assert promote_cli(params_file, capsys)[2]["action"] == "promoted"
    register(project, shifted(evaluation, +0.1), name)
    client = project.client()
    # Both start while the registry is held, so both are inside `promote` when it is let go: they read,
    # decide and move the aliases one after the other, never both on what the other has not yet written.
    with registry_lock(project.uri):
        racers = [_promote_process(params_file, tmp_path / f"promotion-{i}.json") for i in range(2)]
        for racer in racers:
            said: list[str] = []
            wait_until(
                lambda r=racer, s=said: _waiting_for_the_lock(r, s), "promote waiting for the lock", 120
            )
        assert aliases(project, name) == {"champion": "1", "challenger": "2"}  # nothing moved meanwhile
    for racer in racers:
        _, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err
    decisions = sorted(json.loads((tmp_path / f"promotion-{i}.json").read_text())["action"] for i in range(2))
    assert decisions == ["kept", "promoted"]  # one promoted version 2; the other found no challenger
    assert aliases(project, name) == {"champion": "2"}
    assert json.loads(client.get_registered_model(name).tags["champion_history"]) == ["1", "2"]
    assert client.get_model_version(name, "2").tags["previous_champion"] == "1"
    rc, out, decision = promote_cli(params_file, capsys, "--rollback")  # the history still rolls back right
    assert rc == 0 and decision["champion"] == "1" and aliases(project, name) == {"champion": "1"}


def test_a_promotion_killed_between_its_writes_is_finished_by_the_next_run(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """SIGKILLed just before each of its registry writes in turn (``tumorseg.faults``), ``promote`` leaves
    the champion where it was or on the challenger, never a second history entry, and the next run ends
    where an uninterrupted one does."""
    from polling import wait_until
    from tumorseg.faults import LOG_ENV, PAUSE_ENV, PAUSED

    name = "tumorseg-killed"
    _, params_file = project.with_model_name(name)
    evaluation = project.stage.evaluation
    register(project, evaluation, name)
    assert promote_cli(params_file, capsys)[2]["action"] == "promoted"
    register(project, shifted(evaluation, +0.1), name)
    client = project.client()
    # before the promotion's tags and history, before the champion alias moves, before the challenger
    # alias is dropped: the champion is the old one, the old one, then the new one
    for point, champion in ((1, "1"), (2, "1"), (3, "2")):
        log = tmp_path / f"points-{point}.log"
        env = {**os.environ, LOG_ENV: str(log), PAUSE_ENV: str(point)}
        process = _promote_process(params_file, tmp_path / f"promotion-{point}.json", env)
        wait_until(lambda lg=log: lg.is_file() and PAUSED in lg.read_text(), f"write point {point}", 120)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert aliases(project, name)["champion"] == champion
        history = json.loads(client.get_registered_model(name).tags["champion_history"])
        assert history == (["1"] if point == 1 else ["1", "2"])  # never "2" twice
    rc, out, decision = promote_cli(params_file, capsys)
    assert rc == 0 and aliases(project, name) == {"champion": "2"}  # the challenger alias is dropped
    assert json.loads(client.get_registered_model(name).tags["champion_history"]) == ["1", "2"]
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, "attributes.status = 'RUNNING'")


@pytest.mark.timeout(1200)
def test_compress_and_promote_at_once_leave_both_aliases_right(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """compress compresses @champion while promote moves it: @champion ends on the promoted version, and
    @edge never names a compression of a model that is no longer champion. A compress run after that
    registers the new champion's edge."""
    from polling import wait_until

    name = "tumorseg-edge"
    params, _ = project.with_model_name(name)
    params = apply_overrides(
        params,
        {
            "compress.model": f"models:/{name}@champion",
            "compress.variants": ["fp32", "onnx_fp32"],
            "compress.exporter": "torchscript",
            "compress.dice_tolerance": 1.0,  # the gate itself: test_compress_stage.py
            "compress.out_dir": str(tmp_path / "compressed"),
            "compress.latency.warmup": 0,
            "compress.latency.repeats": 1,
            "compress.latency.synth_spacing_mm": 4.0,
            "paths.reports": str(tmp_path / "reports"),
        },
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    evaluation = project.stage.evaluation
    register(project, evaluation, name)
    assert promote_cli(params_file, capsys)[2]["action"] == "promoted"
    register(project, shifted(evaluation, +0.1), name)
    client = project.client()
    compress = [sys.executable, "-m", "tumorseg.cli", "compress", "--params", str(params_file)]
    compressed: list[str] = []

    def compressing_it() -> bool:  # compress has loaded the champion, version 1, and builds variants
        compressed.append(compressing.stdout.readline())
        return "compress: building fp32" in compressed[-1]

    compressing = subprocess.Popen(compress, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(compressing_it, "compress building its variants", 300)
    # compress is held mid-build while promote runs to its end: whatever the machine's speed, the
    # champion moves after compress loaded it and before compress registers its edge
    compressing.send_signal(signal.SIGSTOP)
    try:
        promoting = _promote_process(params_file, tmp_path / "promotion.json")
        _, err = promoting.communicate(timeout=300)
    finally:
        compressing.send_signal(signal.SIGCONT)
    assert promoting.returncode == 0, err
    out = "".join(compressed) + compressing.communicate(timeout=900)[0]
    assert compressing.returncode == 0, out
    assert "champion moved from version 1 to 2 while compressing" in out
    assert aliases(project, name) == {"champion": "2"}  # no @edge on a compression of version 1
    assert json.loads(client.get_registered_model(name).tags["champion_history"]) == ["1", "2"]
    stale = client.get_model_version(name, "3")
    assert "moved from version 1 to 2" in stale.tags["compression.superseded"]

    again = subprocess.run(compress, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert aliases(project, name) == {"champion": "2", "edge": "4"}
    assert "(version 2," in client.get_model_version(name, "4").tags["compression.source"]


# ---------------------------------------------------------------------------- loading the champion
def test_predict_loads_the_champion_by_default_and_any_other_uri(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    project.client().set_registered_model_alias("tumorseg", "champion", "1")
    case_id = sorted(project.stage.evaluation.case_dice)[0]
    case_dir = project.root / "raw" / case_id
    base = ["predict", str(case_dir), "--params", str(project.params_file)]
    models = {
        "default": [],
        "version": ["--model", "models:/tumorseg/1"],
        "run": ["--model", f"runs:/{project.train.mlflow_run_id}/model"],
        "checkpoint": ["--model", str(project.train.best_checkpoint)],
    }
    labels = {}
    for key, extra in models.items():
        assert main([*base, "--out", str(tmp_path / key), *extra]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{case_id}: WT ")
        if key == "default":
            assert "with models:/tumorseg@champion (version 1" in out
        # a registered version carries network.onnx and runs without torch; a checkpoint cannot
        assert (" on onnxruntime; drift: " if key in ("default", "version") else " on torch;") in out, out
        labels[key] = np.asarray(nib.load(tmp_path / key / f"{case_id}.nii.gz").dataobj)
    source = nib.load(case_dir / f"{case_id}_t1.nii.gz")
    assert labels["default"].shape == source.shape
    for key in models:
        assert np.array_equal(labels[key], labels["default"]), key


def test_a_resolved_version_is_cached_and_the_alias_is_still_resolved_each_time(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``models:/`` URIs are resolved in the registry on every load, then read from the local cache
    of that version (versions never change); an alias moved to another version is followed."""
    import shutil

    from tumorseg.errors import DataError
    from tumorseg.registry.loading import MODEL_CACHE_ENV, load_model

    cache = tmp_path / "cache"
    monkeypatch.setenv(MODEL_CACHE_ENV, str(cache))
    name = "tumorseg-cache-test"
    first = register(project, project.stage.evaluation, name)
    second = register(project, project.stage.evaluation, name)
    client = project.client()
    client.set_registered_model_alias(name, "champion", first)
    loaded = load_model(f"models:/{name}@champion", tracking_uri=project.uri)
    assert loaded.version == first
    cached = [p.parent for p in cache.rglob("MLmodel")]  # <store>/<name>/<version>-<run id>
    run_id = client.get_model_version(name, first).run_id
    assert [(p.parent.name, p.name) for p in cached] == [(name, f"{first}-{run_id}")]
    # the store's copy of the artifacts is gone: the cached version still loads
    source = Path(client.get_model_version_download_uri(name, first).removeprefix("file://"))
    shutil.rmtree(source)
    again = load_model(f"models:/{name}@champion", tracking_uri=project.uri)
    assert again.version == first and again.trained.roi_size == loaded.trained.roi_size
    client.set_registered_model_alias(name, "champion", second)
    assert load_model(f"models:/{name}@champion", tracking_uri=project.uri).version == second
    assert sorted(p.parent.name.split("-")[0] for p in cache.rglob("MLmodel")) == sorted([first, second])
    monkeypatch.setenv(MODEL_CACHE_ENV, "")  # off: the store is read again, and the lost copy is missed
    with pytest.raises(DataError, match=f"models:/{name}/{first}: "):
        load_model(f"models:/{name}/{first}", tracking_uri=project.uri)


def test_the_pyfunc_loads_and_predicts_in_a_fresh_process(project: Project, tmp_path: Path) -> None:
    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.models.predictor import SegmentationPredictor, predict_dataset

    project.client().set_registered_model_alias("tumorseg", "champion", "1")
    case_id = sorted(project.stage.evaluation.case_dice)[-1]
    case_dir = project.root / "raw" / case_id
    code = f"""
import json, mlflow, pandas as pd
from tumorseg.registry.pyfunc import decode_segmentation
model = mlflow.pyfunc.load_model("models:/tumorseg@champion")
frame = model.predict(pd.DataFrame({{"case_dir": [{str(case_dir)!r}], "out_dir": [{str(tmp_path / "served")!r}]}}))
decode_segmentation(frame.segmentation[0]).to_filename({str(tmp_path / "decoded.nii.gz")!r})
print(json.dumps(frame.drop(columns="segmentation").to_dict(orient="records")))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": project.uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 1 and rows[0]["case_id"] == case_id and rows[0]["label_convention"] == "brats2021"

    predictor = SegmentationPredictor(load_trained_network(project.train.best_checkpoint))
    summary = predict_dataset(case_dir, tmp_path / "local", predictor)
    expected = np.asarray(nib.load(tmp_path / "local" / f"{case_id}.nii.gz").dataobj)
    for path in (tmp_path / "decoded.nii.gz", Path(rows[0]["output_path"])):
        served = nib.load(path)
        got = np.asarray(served.dataobj)
        # The same weights and code in two processes; a voxel whose sigmoid sits on the threshold can
        # still flip (seen: 1 of 93,600 with the tiny random network), so allow 1 in 10,000.
        assert got.shape == expected.shape and int((got != expected).sum()) <= max(1, got.size // 10_000)
        assert np.array_equal(served.affine, nib.load(case_dir / f"{case_id}_t1.nii.gz").affine)
    assert rows[0]["volume_wt_ml"] == pytest.approx(summary.cases[case_id]["WT"], rel=1e-3)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow  # starts `mlflow models serve` (a uvicorn server) in a subprocess
def test_mlflow_models_serve_answers_with_segmentations(project: Project, tmp_path: Path) -> None:
    from tumorseg.registry.pyfunc import decode_segmentation

    project.client().set_registered_model_alias("tumorseg", "champion", "1")
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # mlflow execs `uvicorn` from PATH
        "MLFLOW_TRACKING_URI": project.uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    command = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", "models:/tumorseg@champion",
               "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]  # fmt: skip
    log_file = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240  # a crash ends the wait at once (server.poll below)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start in 240 s"
            time.sleep(0.5)
        case_id = sorted(project.stage.evaluation.case_dice)[0]
        case_dir = project.root / "raw" / case_id
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_records": [{"case_dir": str(case_dir)}], "params": {"tta": False}},
        )
        assert status == 200, body
        row = body["predictions"][0]
        assert row["case_id"] == case_id and row["output_path"] == ""
        segmentation = decode_segmentation(row["segmentation"])
        source = nib.load(case_dir / f"{case_id}_t1.nii.gz")
        assert segmentation.shape == source.shape and np.array_equal(segmentation.affine, source.affine)
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"case_dir": "/no/such"}]}
        )
        assert status == 400 and "/no/such" in body["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        log_file.close()


# ---------------------------------------------------------------------------- drift and shadow
def _write_changed_cases(project: Project, folder: Path) -> dict[str, str]:
    """The test split's cases as they are and as other scanners would deliver them (BraTS 2021 layout);
    returns case id -> change ("" for unchanged)."""
    from tumorseg.data.layouts import read_case
    from tumorseg.evaluation.pipeline_stage import split_cases
    from tumorseg.monitoring.scanner_changes import CHANGES

    written = {}
    for case in split_cases(project.params, "test", source=str(project.params_file)):
        volumes = read_case(case)
        for change, apply in {"": None, **CHANGES}.items():
            image, affine = (
                (volumes.image, volumes.affine) if apply is None else apply(volumes.image, volumes.affine)
            )
            case_id = f"{case.case_id}{'x' + change if change else ''}".replace("_", "-")
            case_id = "BraTS2021_" + case_id.removeprefix("BraTS2021-")
            (folder / case_id).mkdir(parents=True)
            for channel, modality in enumerate(("t1", "t1ce", "t2", "flair")):
                data = np.asarray(image[channel], dtype=np.float32)
                nib.save(nib.Nifti1Image(data, affine), folder / case_id / f"{case_id}_{modality}.nii.gz")
            written[case_id] = change
    return written


def test_a_registered_model_carries_its_training_profile_and_flags_changed_scanners(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tumorseg.monitoring.drift import PROFILE_ARTIFACT
    from tumorseg.registry.loading import load_model, model_files

    split = json.loads((project.root / "split.json").read_text())
    files = model_files("models:/tumorseg/1", tracking_uri=project.uri)
    assert files is not None and PROFILE_ARTIFACT in files.artifacts
    profile = load_model("models:/tumorseg/1", tracking_uri=project.uri).drift_profile
    assert sorted(c.case_id for c in profile.cases) == sorted(split["train"])
    assert sorted(profile.predicted_volumes_ml) == ["ET", "TC", "WT"]
    assert len(profile.predicted_volumes_ml["WT"]) == len(split["test"])

    # the evaluate stage measured the check on the test split and on changed copies of it
    drift = json.loads((project.root / "reports" / "metrics.json").read_text())["drift"]
    assert drift["drift_cases"] == len(split["test"])
    assert {k: v for k, v in drift.items() if k.startswith("drift_detected_")} == {
        "drift_detected_intensity_scale": 1.0,
        "drift_detected_coarser": 1.0,
        "drift_detected_not_skull_stripped": 1.0,
        "drift_detected_orientation": 1.0,
    }
    run = project.client().get_run(project.train.mlflow_run_id)
    assert run.data.metrics["drift_false_alarm_rate"] == drift["drift_false_alarm_rate"]

    cases = _write_changed_cases(project, tmp_path / "incoming")
    out = tmp_path / "predictions"
    p = ["--params", str(project.params_file)]
    assert (
        main(["predict", str(tmp_path / "incoming"), "--out", str(out), "--model", "models:/tumorseg/1", *p])
        == 0
    )
    printed = capsys.readouterr().out
    record = json.loads((out / "drift.json").read_text())
    flags = {c["case_id"]: c["flagged"] for c in record["cases"]}
    assert sorted(flags) == sorted(cases)
    for case_id, change in cases.items():
        if change:  # every changed scanner is caught, and the line says what is off
            assert flags[case_id], case_id
            assert f"drift: {case_id}: " in printed
    unchanged = [c for c, change in cases.items() if not change]
    assert sum(flags[c] for c in unchanged) == round(drift["drift_false_alarm_rate"] * len(unchanged))
    n_flagged = sum(flags.values())
    assert f"drift: {n_flagged} of {len(cases)} cases outside the model's training profile" in printed
    for entry in record["cases"]:  # predicted volumes kept for the folder-level test; no image data
        assert set(entry["volumes_ml"]) == {"WT", "TC", "ET"}
    assert record["reference"]["cases"][0]["case_id"] in split["train"]

    # with a component-confidence threshold no component reaches, the cases flagged by more than their
    # grid keep all they had (the threshold is not applied out of profile) and the others lose every one
    strict = tmp_path / "strict"
    threshold = ["-S", "predict.min_component_confidence=0.9999"]
    argv = ["predict", str(tmp_path / "incoming"), "--out", str(strict), "--model", "models:/tumorseg/1"]
    assert main([*argv, *threshold, *p]) == 0
    gated = {c["case_id"]: c["flagged_after_preprocessing"] for c in record["cases"]}
    n_gated = sum(gated.values())
    assert f"no component dropped for low confidence in {n_gated} of them" in capsys.readouterr().out
    before = {c["case_id"]: c["volumes_ml"] for c in record["cases"]}
    after = {c["case_id"]: c["volumes_ml"] for c in json.loads((strict / "drift.json").read_text())["cases"]}
    for case_id, kept in gated.items():
        if kept:
            assert after[case_id] == before[case_id], case_id
        else:
            assert after[case_id]["WT"] == 0.0, case_id
    assert any(before[c]["WT"] > 0 for c in gated if gated[c])  # the gate kept tumour ...
    assert any(before[c]["WT"] > 0 for c in gated if not gated[c])  # ... and the rule dropped some

    # the folder has drifted (4 of 5 cases per patient are changed): exit 3 with --fail-on-drift
    assert main(["monitor", str(out), "--fail-on-drift", *p]) == 3
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].startswith(f"DRIFTED: {n_flagged} of {len(cases)} cases")
    report = json.loads((out / "monitor.json").read_text())
    assert report["drifted"] and report["flagged"] == n_flagged
    names = {f["name"] for f in report["features"]}
    assert {"t1ce_p50", "brain_fraction", "spacing_min_mm", "predicted_WT_ml"} <= names
    client = project.client()
    experiment = client.get_experiment_by_name("tumorseg-monitoring")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.run_id == report["mlflow_run_id"] and logged.info.status == "FINISHED"
    assert logged.data.metrics["flagged"] == n_flagged and logged.data.metrics["drifted"] == 1.0
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {"monitor.json", "monitor.md"}

    # the unchanged cases alone: as many flags as the evaluate stage's false alarms, no KS test (too few)
    same = tmp_path / "same"
    for case_id in unchanged:
        (same / case_id).mkdir(parents=True)
        for path in (tmp_path / "incoming" / case_id).iterdir():
            (same / case_id / path.name).write_bytes(path.read_bytes())
    assert (
        main(["predict", str(same), "--out", str(tmp_path / "same-out"), "--model", "models:/tumorseg/1", *p])
        == 0
    )
    capsys.readouterr()
    assert main(["monitor", str(tmp_path / "same-out"), "--no-mlflow", *p]) == 0
    printed = capsys.readouterr().out
    assert "KS tests need 8 cases" in printed
    assert main(["monitor", str(tmp_path / "nothing-here"), *p]) == 2
    assert "no such folder" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "drift.json").write_text('{"reference": {}, "cases": [{"case_id": "x"}]}')
    assert main(["monitor", str(broken), *p]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "drift.json: not a drift record" in err


def test_the_pyfunc_keeps_the_unconfident_components_of_a_case_outside_the_training_profile(
    project: Project, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tumorseg.models.config import PredictConfig
    from tumorseg.registry.loading import model_files
    from tumorseg.registry.pyfunc import VolumeStrategy

    files = model_files("models:/tumorseg/1", tracking_uri=project.uri)
    registered = VolumeStrategy.from_artifacts({key: str(path) for key, path in files.artifacts.items()})
    assert registered._monitor is not None  # the profile came with the model's artifacts
    profile = registered._monitor.profile
    cases = _write_changed_cases(project, tmp_path / "incoming")
    changed = next(c for c, change in cases.items() if change == "intensity_scale")
    frame = pd.DataFrame({"case_dir": [str(tmp_path / "incoming" / changed)]})

    def wt_ml(threshold: float, drift_profile: Any) -> float:
        settings = PredictConfig(device="cpu", min_component_confidence=threshold)
        rows = VolumeStrategy(registered._trained, settings, drift_profile).rows(frame, {})
        return rows[0]["volume_wt_ml"]

    everything = wt_ml(0.0, profile)
    assert everything > 0
    # a threshold no component reaches: not applied to the case its intensities flag, as in predict
    with caplog.at_level(logging.WARNING, logger="tumorseg.registry.pyfunc"):
        assert wt_ml(0.9999, profile) == everything
    assert f"drift: {changed} outside the model's training profile" in caplog.text  # and it says so
    assert wt_ml(0.9999, None) == 0.0  # without a profile the rule applies to every case


def test_the_api_flags_drift_and_a_shadow_model_never_changes_the_answer(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fastapi.testclient import TestClient

    from polling import wait_until
    from tumorseg.registry.loading import load_model
    from tumorseg.serving.app import ServeSettings, create_app, fastapi_app

    name = "tumorseg-shadowed"
    params, params_file = project.with_model_name(name)
    evaluation = project.stage.evaluation
    profile = load_model("models:/tumorseg/1", tracking_uri=project.uri).drift_profile
    register(project, evaluation, name, profile)  # version 1: the champion
    assert main(["promote", "--params", str(params_file)]) == 0
    register(project, shifted(evaluation, 0.05), name, profile)  # version 2: the challenger, same weights
    capsys.readouterr()
    cases = _write_changed_cases(project, tmp_path / "incoming")
    plain = next(c for c, change in cases.items() if not change)
    changed = next(c for c, change in cases.items() if change == "intensity_scale")

    def upload(case_id: str) -> list[tuple[str, tuple[str, bytes, str]]]:
        folder = tmp_path / "incoming" / case_id
        return [("files", (p.name, p.read_bytes(), "application/gzip")) for p in sorted(folder.iterdir())]

    def serve(predict: dict[str, Any] | None = None, **serve: Any) -> Any:
        overrides = {f"serve.{k}": v for k, v in {"demo_cases": 0, "model_2d": None, **serve}.items()}
        overrides.update({f"predict.{k}": v for k, v in (predict or {}).items()})
        overrides.update(
            {
                "serve.tokens_file": str(tmp_path / "tokens.json"),
                "serve.audit_log": str(tmp_path / "audit.jsonl"),
            }
        )
        settings = ServeSettings.from_params(
            apply_overrides(params, overrides), model_uri=f"models:/{name}@champion"
        )
        return TestClient(create_app(settings), raise_server_exceptions=False)

    with serve() as client:
        plain_answer = client.post("/predict?format=json", files=upload(plain)).json()
        answer = client.post("/predict?format=json", files=upload(changed)).json()
        nifti = client.post("/predict", files=upload(changed))
        health = client.get("/health").json()
    assert answer["drift"]["flagged"] and any("t1ce_p50" in line for line in answer["drift"]["outside"])
    assert nifti.status_code == 200 and int(nifti.headers["X-Tumorseg-Drift"]) >= 1
    assert health["drift"] == {"checked": 3, "flagged": 2 + int(plain_answer["drift"]["flagged"])}
    assert health["shadow"] is None
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [line["drift"] for line in audit] == [plain_answer["drift"]["flagged"], True, True]

    # a component-confidence threshold no component reaches: the case flagged for its intensities keeps
    # its answer (the threshold is not applied there), an unflagged one loses its tumour
    with serve(predict={"min_component_confidence": 0.9999}) as client:
        strict_plain = client.post("/predict?format=json", files=upload(plain)).json()
        strict_changed = client.post("/predict?format=json", files=upload(changed)).json()
    assert answer["drift"]["flagged_after_preprocessing"] and answer["volumes_ml"]["WT"] > 0
    assert strict_changed["component_confidence"] == {"threshold": 0.9999, "applied": False}
    assert strict_changed["volumes_ml"] == answer["volumes_ml"]
    applied = not plain_answer["drift"]["flagged_after_preprocessing"]
    assert strict_plain["component_confidence"] == {"threshold": 0.9999, "applied": applied}
    if applied:
        assert strict_plain["volumes_ml"]["WT"] == 0.0

    # shadow: the challenger segments every request after the answer; the answers stay the same
    with serve(shadow=f"models:/{name}@challenger", shadow_priority="normal") as client:
        shadowed = [
            client.post("/predict?format=json", files=upload(c)).json() for c in (plain, changed, plain)
        ]
        service = fastapi_app(client.app).state.service
        # the worker is a process of its own, stopped while a request is served
        worker = Path(f"/proc/{service.shadow.process.pid}/stat")
        wait_until(lambda: service.shadow.info()["pending"] == 0, "the shadow model's 3 jobs", 300)
        state = lambda: worker.read_text().split(") ")[1][0]  # noqa: E731
        service.shadow.serving(True)
        wait_until(lambda: state() == "T", "the shadow worker is stopped", 10)
        service.shadow.serving(False)
        wait_until(lambda: state() != "T", "the shadow worker runs again", 10)
    # leaving the block closed the service: the shadow jobs were finished and the run ended
    info = service.shadow.info()
    assert info["model"]["version"] == "2" and info["cases"] == 3 and info["errors"] == 0, info
    for before, after in zip([plain_answer, answer, plain_answer], shadowed, strict=True):
        assert after["volumes_ml"] == before["volumes_ml"] and after["drift"] == before["drift"]
    client_ = project.client()
    experiment = client_.get_experiment_by_name("tumorseg-shadow")
    (run,) = client_.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`tumorseg.shadow.model` = '{name}'"
    )
    assert run.info.status == "FINISHED"
    assert (
        run.data.tags["tumorseg.shadow.version"] == "2"
        and run.data.tags["tumorseg.shadow.served"] == f"{name}/1"
    )
    assert run.data.metrics["cases"] == 3.0
    for region in ("WT", "TC", "ET"):  # the same weights: full agreement
        assert run.data.metrics[f"mean_dice_{region}"] == pytest.approx(1.0)
    history = client_.get_metric_history(run.info.run_id, "case_dice_WT")
    assert [m.step for m in history] == [1, 2, 3]

    # promote reads the shadow evidence: 3 production cases are too few for a gate of 5 ...
    rc, out, decision = promote_cli(params_file, capsys, "-S", "registry.shadow_min_cases=5")
    assert rc == 0 and decision["action"] == "rejected", out
    assert "shadow: 3 production cases, agreement with the served model (mean Dice) WT 1.000" in out
    assert "fewer shadow cases than registry.shadow_min_cases 5" in out
    assert decision["shadow"]["cases"] == 3 and decision["shadow"]["agreement"] == pytest.approx(1.0)
    # ... and enough for a gate of 3 (a rejected challenger keeps its alias)
    rc, out, decision = promote_cli(params_file, capsys, "-S", "registry.shadow_min_cases=3")
    assert rc == 0 and decision["action"] == "promoted" and decision["shadow"]["cases"] == 3, out
    # a new challenger has no shadow runs yet
    register(project, shifted(evaluation, 0.1), name)
    rc, out, decision = promote_cli(params_file, capsys, "-S", "registry.shadow_min_cases=3")
    assert rc == 0 and decision["action"] == "rejected" and "no shadow runs of version 3" in out
