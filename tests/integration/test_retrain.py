"""Data-triggered retraining: the raw data's hash against the one recorded on the champion."""

from __future__ import annotations

from pathlib import Path

import yaml

from tumorseg.cli import main
from tumorseg.retrain import RAW_DATA_TAG, decide_retrain, raw_data_hash, record_raw_data_hash

ROOT = Path(__file__).resolve().parents[2]


def _ingested(tmp_path: Path) -> tuple[Path, dict]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in ("ingested", "mlruns"):
        params["paths"][key] = str(tmp_path / key)
    params["data"]["source"] = str(tmp_path / "raw")
    params["synth"].update({"cases": 3, "spacing_mm": 4.0})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["synth", "--out", str(tmp_path / "raw"), "--params", str(path)]) == 0
    assert main(["ingest", "--params", str(path)]) == 0
    return path, params


def _register_champion(params: dict, uri: str) -> str:
    """A registered version with alias champion (an empty logged model: the registry only needs the alias)."""
    import mlflow

    from tumorseg.tracking import ensure_experiment

    mlflow.set_tracking_uri(uri)
    # An experiment whose artifacts live beside the test's database: the default experiment of a
    # new SQLite store would put them under ./mlruns of the working directory (the checkout).
    with mlflow.start_run(experiment_id=ensure_experiment(uri, "retrain-test")) as run:
        mlflow.log_text("weights", "model/weights.txt")
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("tumorseg")
    version = client.create_model_version(
        "tumorseg", f"runs:/{run.info.run_id}/model", run.info.run_id
    ).version
    client.set_registered_model_alias("tumorseg", "champion", version)
    return str(version)


def test_retrain_only_when_raw_data_changed(tmp_path: Path) -> None:
    path, params = _ingested(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    first = raw_data_hash(tmp_path / "ingested")

    decision = decide_retrain(params, tracking_uri=uri)
    assert decision.retrain and "no champion" in decision.reason

    version = _register_champion(params, uri)
    assert decide_retrain(params, tracking_uri=uri).retrain  # champion without a recorded hash
    record_raw_data_hash(params, version, first, tracking_uri=uri)

    decision = decide_retrain(params, tracking_uri=uri)
    assert not decision.retrain and decision.reason.startswith("no new data")
    assert decision.champion_version == version and decision.champion_raw_data_md5 == first

    # touching files (mtime) is not new data; changed bytes are
    case = sorted((tmp_path / "raw").glob("BraTS2021_*"))[0]
    flair = next(case.glob("*_flair.nii.gz"))
    flair.touch()
    assert main(["ingest", "--params", str(path)]) == 0
    assert raw_data_hash(tmp_path / "ingested") == first
    assert (
        main(["synth", "--out", str(tmp_path / "raw"), "--params", str(path), "--seed", "3", "--cases", "4"])
        == 0
    )
    assert main(["ingest", "--params", str(path)]) == 0
    decision = decide_retrain(params, tracking_uri=uri)
    assert decision.retrain and decision.reason.startswith("new data") and decision.raw_data_md5 != first

    import mlflow

    tags = mlflow.MlflowClient(uri, registry_uri=uri).get_model_version("tumorseg", version).tags
    assert tags[RAW_DATA_TAG] == first
