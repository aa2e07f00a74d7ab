"""``tumorseg compress --dims 2`` end to end: a tiny 2-D model trained, evaluated and promoted to
``tumorseg-2d@champion`` in a temporary MLflow store, then compressed with the 3-D path's variants,
gate and edge rules: Dice on the held-out 2-D test images (as ``evaluate-model --dims 2`` scores
them), ``tumorseg-2d@edge`` registered, and a gate that rejects a damaged variant.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from tumorseg.cli import main

_SPEC = importlib.util.spec_from_file_location(
    "planar_fixtures", Path(__file__).parents[1] / "planar_fixtures.py"
)
fixtures = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fixtures)

pytestmark = pytest.mark.slow

NAME = "tumorseg-2d"
VARIANTS = ("fp32", "onnx_fp32", "pruned_structured", "int8", "int8_dynamic", "onnx_fp32_wint8")
"""Built by the tiny project's compress run, in this order."""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-D model that segments (60 steps), evaluated (registers the challengers) and promoted."""
    from tumorseg.config import apply_overrides
    from tumorseg.registry.evaluate_stage import evaluate_planar
    from tumorseg.registry.promote import promote
    from tumorseg.training.train import train

    tmp = tmp_path_factory.mktemp("compress2d")
    preprocessed, split = fixtures.write_preprocessed(tmp / "preprocessed_2d", unmasked_in_test=True)
    latency = tmp / "latency"
    latency.mkdir()
    head, _ = fixtures.head_image(np.random.default_rng(5), (96, 80), "glioma")
    Image.fromarray(np.clip(head * 120, 0, 255).astype(np.uint8)).save(
        latency / "Y1.png"
    )  # one image to time
    params = fixtures.tiny_params(
        tmp,
        preprocessed,
        split,
        **{
            "train_2d.max_epochs": 6,  # a model that segments: the gate needs Dice to lose
            "train_2d.steps_per_epoch": 10,
            "train_2d.lr": 0.01,
            "train_2d.warmup_epochs": 0,
            "monitor.enabled": False,
            "compress.out_dir": str(tmp / "models" / "compressed"),
            "compress.out_dir_2d": str(tmp / "models" / "2d" / "compressed"),
            "compress.variants_2d": list(VARIANTS),
            "compress.exporter": "torchscript",
            "compress.pruning.fine_tune_steps": 2,
            "compress.pruning.val_every": 1,
            "compress.quantization.calibration_cases": 2,
            "compress.latency.case_dir_2d": str(latency),
            "compress.latency.warmup": 0,
            "compress.latency.repeats": 1,
        },
    )
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    train(params, dims=2)
    evaluate_planar(params)
    promote(apply_overrides(params, {"registry.model_name": NAME}), report_file=tmp / "promotion.json")
    return {"tmp": tmp, "params": params, "params_file": params_file, "split": json.loads(split.read_text())}


def _registry(uri: str) -> dict[str, Any]:
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{NAME}'")
    return {
        "versions": sorted((v.version, tuple(sorted(v.tags.items()))) for v in versions),
        "aliases": dict(client.get_registered_model(NAME).aliases),
    }


def _compress(project: dict[str, Any], *options: str) -> int:
    pairs = [item for option in options for item in ("-S", option)]
    return main(["compress", "--dims", "2", "--params", str(project["params_file"]), *pairs])


def test_compress_dims_2_scores_the_test_images_gates_and_registers_tumorseg_2d_edge(
    project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from tumorseg.compression.onnx_export import OnnxRuntimeOutputs
    from tumorseg.models.package import planar_edge_model
    from tumorseg.models.predictor import predict_planar
    from tumorseg.registry.loading import load_planar_model

    tmp, uri = project["tmp"], project["params"]["mlflow"]["tracking_uri"]
    before = _registry(uri)
    assert _compress(project) == 0, capsys.readouterr().err  # the real gate: compress.dice_tolerance 0.01
    assert "registered models:/tumorseg-2d/" in capsys.readouterr().out

    reports = tmp / "reports" / "2d"
    report = json.loads((reports / "compression.json").read_text())
    assert not (tmp / "reports" / "compression.json").exists()  # the 3-D report is not touched
    assert report["source_model"].startswith(
        f"models:/{NAME}@champion (version {before['aliases']['champion']}"
    )
    by_name = {v["name"]: v for v in report["variants"]}
    assert list(by_name) == list(VARIANTS)
    # Dice on the held-out test images with a reference mask, as the 2-D evaluation scored them
    per_case = pd.read_csv(reports / "test_per_case.csv")
    assert set(per_case["case_id"]) == set(project["split"]["test"])
    masked = per_case[per_case["has_mask"]].set_index("case_id")["dice"]
    # the split holds yes/no images without a mask: Dice leaves them out, detection counts them
    assert 0 < len(masked) < len(per_case)
    assert report["test_cases"] == len(masked) and report["detection_cases"] == len(per_case)
    for variant in by_name.values():
        assert set(variant["case_dice_mean"]) == set(masked.index), variant["name"]
        assert variant["dice"]["mean"] == pytest.approx(np.mean(list(variant["case_dice_mean"].values())))
        assert variant["latency_s"] > 0
    fp32 = by_name["fp32"]
    assert fp32["case_dice_mean"] == pytest.approx(masked.to_dict(), abs=1e-6)  # the CSV rounds
    assert fp32["dice"]["mean"] > 0.3  # a model that segments
    assert by_name["onnx_fp32"]["dice_drop"] == pytest.approx(0.0, abs=1e-6)
    assert by_name["int8"]["details"]["quantization"]["quantized_nodes"]["Conv"] > 0
    assert by_name["int8_dynamic"]["details"]["dynamic_int8"]["quantized_nodes"]["Conv"] > 0
    assert by_name["pruned_structured"]["parameters"] < fp32["parameters"]
    # the same gate and edge rules: accepted iff the Dice drop is within compress.dice_tolerance and
    # the test images' detection accuracy is fp32's or better (compress.detection_tolerance 0)
    assert report["dice_tolerance"] == 0.01
    tested = pd.read_csv(reports / "test_per_case.csv")
    assert fp32["detection_accuracy"] == pytest.approx(tested["correct"].mean())
    assert by_name["onnx_fp32"]["detection_accuracy"] == pytest.approx(fp32["detection_accuracy"])
    for variant in list(by_name.values())[1:]:
        detects = variant["detection_accuracy"] >= fp32["detection_accuracy"] - 1e-9
        assert variant["accepted"] == (variant["dice_drop"] <= 0.01 + 1e-9 and detects), variant["name"]
    accepted = [v for v in by_name.values() if v["accepted"]]  # onnx_fp32 at least
    assert accepted and all(fp32["file_mb"] / v["file_mb"] < 3 for v in accepted)  # no tiny file meets
    edge = by_name[report["edge"]]  # the size target, so the edge is the fastest accepted variant,
    # where compress.speed_tie of the largest speed-up is as fast, and then the smallest file:
    speedup = {v["name"]: v["baseline_latency_s"] / v["latency_s"] for v in accepted}  # vs fp32 alongside
    tie = 1.0 - report["targets"]["speed_tie"]
    assert tie == pytest.approx(0.9)  # the default
    tied = [v for v in accepted if speedup[v["name"]] >= tie * max(speedup.values()) - 1e-3]  # JSON rounds
    assert edge["accepted"] and edge in tied
    assert edge["file_mb"] == min(v["file_mb"] for v in tied)
    assert report["edge_vs_fp32"]["speedup"] == pytest.approx(speedup[edge["name"]], abs=1e-3)
    assert sorted(p.name for p in (tmp / "models" / "2d" / "compressed").iterdir()) == sorted(
        f"{name}.onnx" for name in VARIANTS[1:]
    )

    # pruning touched the segmenter only: the detector's classifier scores are the fp32 model's
    champion = load_planar_model(f"models:/{NAME}@champion", tracking_uri=uri)
    x = torch.randn((2, 1, fixtures.SIZE, fixtures.SIZE), generator=torch.Generator().manual_seed(0))
    pruned = OnnxRuntimeOutputs(by_name["pruned_structured"]["file"])(x)
    with torch.no_grad():
        reference = champion.network(x)
    torch.testing.assert_close(pruned[1], reference[1], atol=1e-4, rtol=1e-4)
    assert float((pruned[0] - reference[0]).abs().max()) > 1e-3  # the segmenter did change

    after = _registry(uri)
    assert (
        set(before["versions"]) < set(after["versions"])
        and after["aliases"]["champion"] == before["aliases"]["champion"]
    )
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias(NAME, "edge")
    assert version.tags["compression.variant"] == report["edge"] and version.tags["runtime"] == "onnxruntime"
    assert not client.search_model_versions("name='tumorseg'")  # the 3-D model is not involved
    run = client.get_run(version.run_id)
    assert run.data.tags["tumorseg.branch"] == "2d"
    for variant in by_name.values():  # each variant's detection accuracy is logged with its Dice
        assert run.data.metrics[f"{variant['name']}.detection_accuracy"] == pytest.approx(
            variant["detection_accuracy"]
        )
    assert client.get_experiment(run.info.experiment_id).name == project["params"]["train_2d"]["experiment"]

    # the registered edge version holds what a 2-D deployment needs, and segments an image
    folder = Path(
        mlflow.artifacts.download_artifacts(
            client.get_model_version_download_uri(NAME, version.version),
            dst_path=str(tmp / "edge"),
            tracking_uri=uri,
        )
    )
    pyfunc = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    artifacts = {key: folder / entry["path"] for key, entry in pyfunc["artifacts"].items()}
    assert {"onnx", "config", "detector", "compression"} <= set(artifacts)
    edge_model = planar_edge_model(artifacts)
    assert edge_model.detector == champion.detector
    image = next((tmp / "latency").iterdir())
    prediction = predict_planar(image, edge_model)
    assert prediction.mask.shape == (96, 80)

    # `tumorseg predict --model models:/tumorseg-2d@edge` runs it, and writes the same mask
    out = tmp / "edge_predict"
    model = ["--model", f"models:/{NAME}@edge", "--params", str(project["params_file"])]
    assert main(["predict", str(image), "--out", str(out), *model]) == 0
    written = np.asarray(Image.open(next(out.glob("*_mask.png")))) > 0
    assert np.array_equal(written, prediction.mask > 0)


def test_the_gate_rejects_a_damaged_2d_variant_and_moves_no_alias(
    project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """95 % of the segmenter's weights zeroed without a fine-tune cost the 2-D model far more than
    the tolerance: rejected, no edge registered, every alias where it was."""
    tmp, uri = project["tmp"], project["params"]["mlflow"]["tracking_uri"]
    before = _registry(uri)
    code = _compress(
        project,
        "compress.variants_2d=[fp32, pruned_unstructured]",
        "compress.pruning.unstructured_amount=0.95",
        "compress.pruning.unstructured_fine_tune_steps=0",
        f"compress.out_dir_2d={tmp / 'compressed_gate'}",
        f"paths.reports_2d={tmp / 'reports_gate'}",
    )
    assert code == 0, capsys.readouterr().err
    assert "no variant passed the Dice gate" in capsys.readouterr().out
    report = json.loads((tmp / "reports_gate" / "compression.json").read_text())
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["fp32"]["dice"]["mean"] > 0.3
    damaged = by_name["pruned_unstructured"]
    assert damaged["details"]["pruning"]["conv_sparsity"] > 0.5 and damaged["accepted"] is False
    assert damaged["dice_drop"] > 0.01 and report["edge"] is None
    assert _registry(uri) == before
    assert "No variant passed the gate" in (tmp / "reports_gate" / "compression.md").read_text()


def test_a_2d_split_without_masked_test_images_is_one_line_and_changes_nothing(
    project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, uri = project["tmp"], project["params"]["mlflow"]["tracking_uri"]
    no_test = tmp / "split_no_test.json"
    no_test.write_text(json.dumps({**project["split"], "test": []}))
    before = _registry(uri)
    code = _compress(project, f"paths.split_2d={no_test}", f"paths.reports_2d={tmp / 'reports_failed'}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("tumorseg compress: error: ") and "no 'test' images with a reference mask" in err
    assert _registry(uri) == before and not (tmp / "reports_failed").exists()
