"""The 2-D Prefect flow: cache keys mirror dvc.yaml, and the whole branch runs on Prefect's test server."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # nothing leaves the machine

ROOT = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location(
    "planar_fixtures", Path(__file__).parents[1] / "planar_fixtures.py"
)
fixtures = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fixtures)
PLANAR_STAGES = fixtures.PLANAR_STAGES


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _flow_params(tmp: Path) -> Path:
    from tumorseg.config import apply_overrides, read_params

    overrides: dict[str, Any] = {
        **{f"paths.{k}_2d": str(tmp / f"{k}_2d") for k in ("ingested", "validated", "preprocessed")},
        "paths.split_2d": str(tmp / "split_2d.json"),
        "paths.reports": str(tmp / "reports"),
        "paths.reports_2d": str(tmp / "reports" / "2d"),
        "paths.mlruns": str(tmp / "mlruns"),
        "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
        "flow.cache_dir": str(tmp / ".prefect-cache"),
        **fixtures.TINY_2D_DATA_OVERRIDES,
        **fixtures.TINY_2D_OVERRIDES,
        "train_2d.out_dir": str(tmp / "models" / "planar"),
        "trainer.accelerator": "cpu",
        # compress@2d: two variants, the gate open (the gate itself: test_compress_planar.py)
        "compress.out_dir_2d": str(tmp / "models" / "planar" / "compressed"),
        "compress.variants_2d": ["fp32", "onnx_fp32"],
        "compress.dice_tolerance": 1.0,
        "compress.detection_tolerance": 1.0,
        "compress.latency.warmup": 0,
        "compress.latency.repeats": 1,
    }
    path = tmp / "params.yaml"
    path.write_text(
        yaml.safe_dump(apply_overrides(read_params(ROOT / "params.yaml"), overrides), sort_keys=False)
    )
    return path


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_planar_flow_end_to_end_then_cached(prefect_server: None, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from pipelines.planar_flow import planar_flow

    params_file = _flow_params(tmp_path)
    first = planar_flow(params_path=str(params_file))
    assert first["split"]["test"] > 0
    assert (tmp_path / "data" / "synth_2d" / "figshare").is_dir()  # data.source_2d: synth_2d, beside params
    assert {d["action"] for d in first["promote"].values()} == {"promoted"}
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    for name in ("tumorseg-2d", "tumorseg-detect"):
        assert client.get_model_version_by_alias(name, "champion").version is not None
    assert (tmp_path / "reports" / "2d" / "metrics.json").is_file()
    per_case = pd.read_csv(tmp_path / "reports" / "2d" / "test_per_case.csv")
    # masks are scored on the original images (restored from the preprocessing geometry)
    assert set(per_case.loc[per_case["has_mask"], "scored_on"]) == {"source"}
    # the new champion was compressed and its edge model registered (a new tumorseg-2d version)
    assert first["compress"]["registered"]["alias"] == "edge"
    edge = client.get_model_version_by_alias("tumorseg-2d", "edge")
    assert edge.version != client.get_model_version_by_alias("tumorseg-2d", "champion").version
    assert json.loads((tmp_path / "reports" / "2d" / "compression.json").read_text())["edge"]
    promotion = json.loads((tmp_path / "reports" / "2d" / "promotion.json").read_text())
    assert (
        promotion["model_name"] == "tumorseg-2d" and promotion["also"][0]["model_name"] == "tumorseg-detect"
    )

    # unchanged data, params and code: every stage is a cache hit, no new version, champion kept
    second = planar_flow(params_path=str(params_file))
    assert second["evaluate"]["registered"] == first["evaluate"]["registered"]
    assert {d["action"] for d in second["promote"].values()} == {"kept"}
    assert second["compress"] == "skipped: the 2-D champion (version 1) is compressed already"
    assert len(client.search_model_versions("name = 'tumorseg-2d'")) == 2  # the champion and its edge model
    assert client.get_model_version_by_alias("tumorseg-2d", "edge").version == edge.version
    # a compression that never finished (no report) is redone on the next run, for the same champion
    (tmp_path / "reports" / "2d" / "compression.json").unlink()
    third = planar_flow(params_path=str(params_file))
    assert third["compress"]["registered"]["alias"] == "edge"
    assert int(client.get_model_version_by_alias("tumorseg-2d", "edge").version) > int(edge.version)

    # the 2-D champion carries its training images' profile; predict checks each image against it
    from tumorseg.cli import main
    from tumorseg.registry.loading import load_planar_model

    model = load_planar_model("models:/tumorseg-2d@champion", tracking_uri=uri)
    assert model.drift_profile is not None and model.drift_profile.kind == "2d"
    drift = json.loads((tmp_path / "reports" / "2d" / "metrics.json").read_text())["drift"]
    assert drift["drift_cases"] == len(per_case)
    assert drift["drift_detected_intensity_scale"] == 1.0
    # a resampled .mat slice is always caught; 8-bit images come in any size (measured, not asserted)
    assert (
        drift["drift_detected_resolution_mat"] == 1.0 and 0 <= drift["drift_detected_resolution_image"] <= 1
    )
    from tumorseg.data.planar import default_case_id
    from tumorseg.data.readers import image_inputs

    tested = set(per_case["case_id"])
    test_images = [p for p in image_inputs(tmp_path / "data" / "synth_2d") if default_case_id(p) in tested]
    assert test_images
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for path in test_images[:3]:
        (incoming / path.name).write_bytes(path.read_bytes())  # .mat, or an image named for its case
    out = tmp_path / "predicted_2d"
    assert main(["predict", str(incoming), "--out", str(out), "--params", str(params_file)]) == 0
    record = json.loads((out / "drift.json").read_text())
    assert record["reference"]["kind"] == "2d" and len(record["cases"]) == len(list(incoming.iterdir()))
    assert main(["monitor", str(out), "--no-mlflow", "--params", str(params_file)]) == 0
