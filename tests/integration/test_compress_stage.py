"""``tumorseg compress`` end to end on a tiny synthetic dataset, with a temporary MLflow store.

The data go through the real chain (synth -> ingest -> validate -> preprocess -> split), a 4-8-16
U-Net is trained for a few steps and registered as the fp32 champion; compression then builds,
measures and gates the variants, registers ``@edge``, and ``tumorseg predict --model
models:/tumorseg@edge`` runs it (ONNX Runtime or a torch.export program). A failing compression leaves the registry
as it was.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from tumorseg.cli import main
from tumorseg.config import apply_overrides, read_params

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

VARIANTS = (
    "fp32",
    "onnx_fp32",
    "pruned_structured",
    "int8",
    "pruned_structured_wint8",
    "pruned_structured_bf16",
)
"""Built by the tiny project's compress run, in this order."""


def _overrides(root: Path) -> dict[str, Any]:
    return {
        **{f"paths.{key}": str(root / key) for key in ("ingested", "validated", "preprocessed", "reports")},
        "data.source": str(root / "raw"),
        "paths.split": str(root / "split.json"),
        "paths.mlruns": str(root / "mlruns"),
        "synth.cases": 8,
        "synth.spacing_mm": 4.0,
        "synth.tumour_free_fraction": 0.0,
        "preprocess.target_spacing_mm": [4.0, 4.0, 4.0],
        "train.out_dir": str(root / "models"),
        "train.max_epochs": 8,  # enough for a model that segments (the Dice gate needs Dice to lose)
        "train.steps_per_epoch": 25,
        "train.lr": 0.01,
        "train.warmup_epochs": 0,
        "train.score_test": False,
        "data_loader.patch_size": [16, 16, 16],
        "model.unet.channels": [4, 8, 16],
        "model.unet.strides": [2, 2],
        "model.unet.num_res_units": 1,
        "sliding_window.sw_batch_size": 2,
        "trainer.accelerator": "cpu",
        "mlflow.enabled": False,
        "mlflow.overlays": 0,
        "evaluate.bootstrap_resamples": 100,
        "evaluate.plots": False,
        "compress.out_dir": str(root / "models" / "compressed"),
        "compress.variants": list(VARIANTS),
        "compress.exporter": "torchscript",
        "compress.emulated_bf16": "measure",  # the bfloat16 rows are measured on any CPU here
        "compress.pruning.fine_tune_steps": 2,
        "compress.pruning.val_every": 1,
        "compress.quantization.calibration_cases": 1,
        "compress.latency.case_dir": str(root / "latency"),
        "compress.latency.warmup": 0,
        "compress.latency.repeats": 1,
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny data, a trained checkpoint, and an fp32 champion registered in a temporary store."""
    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.registry.pyfunc import log_segmentation_model

    root = tmp_path_factory.mktemp("compress")
    params = apply_overrides(read_params(ROOT / "params.yaml"), _overrides(root))
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    p = ["--params", str(params_file)]
    validate = ["validate", str(root / "ingested"), "--out", str(root / "validated")]
    synth = ["synth", "--out", str(root / "raw")]
    for command in (synth, ["ingest"], validate, ["preprocess"], ["split"], ["train"]):
        assert main([*command, *p]) == 0, command
    (root / "latency").mkdir()
    first = sorted((root / "raw").glob("BraTS2021_*"))[0]
    (root / "latency" / first.name).symlink_to(first)  # one case to time
    uri = f"sqlite:///{root / 'mlflow.db'}"
    from tumorseg.tracking import ensure_experiment

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = ensure_experiment(uri, "tumorseg-segmentation")
    trained = load_trained_network(root / "models" / "checkpoints" / "best.ckpt")
    with mlflow.start_run(experiment_id=experiment):
        info = log_segmentation_model(trained, {"tta": False})
    version = mlflow.register_model(info.model_uri, "tumorseg")
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.set_registered_model_alias("tumorseg", "champion", version.version)
    return {
        "root": root,
        "params": params,
        "params_file": params_file,
        "uri": uri,
        "champion": version.version,
    }


def _registry_state(uri: str) -> dict[str, Any]:
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions("name='tumorseg'")
    model = client.get_registered_model("tumorseg")
    return {
        "versions": sorted((v.version, v.source, tuple(sorted(v.tags.items()))) for v in versions),
        "aliases": dict(model.aliases),
    }


def test_missing_calibration_set_is_one_line_and_leaves_the_registry_untouched(
    project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root = project["root"]
    split = json.loads((root / "split.json").read_text())
    no_val = root / "split_no_val.json"
    no_val.write_text(json.dumps({**split, "val": []}))
    before = _registry_state(project["uri"])
    code = main(
        [
            "compress",
            "--params",
            str(project["params_file"]),
            "-S",
            f"paths.split={no_val}",
            "-S",
            f"mlflow.tracking_uri={project['uri']}",
            "-S",
            f"paths.reports={root / 'reports_failed'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("tumorseg compress: error: ") and "no 'val' cases to calibrate INT8" in err
    assert len(err.splitlines()) == 1
    assert _registry_state(project["uri"]) == before
    assert not (root / "reports_failed" / "compression.json").exists()


def test_compress_gates_registers_edge_and_predict_runs_it_in_its_runtime(
    project: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tumorseg.compression.stage import run_compress_stage
    from tumorseg.models.onnx_network import OnnxRuntimeNetwork
    from tumorseg.models.program_network import ExportedProgramNetwork
    from tumorseg.registry.loading import load_model

    root, uri = project["root"], project["uri"]
    before = _registry_state(uri)
    params = apply_overrides(
        project["params"],
        {
            "compress.dice_tolerance": 1.0,
            "compress.model": "models:/tumorseg@champion",
            "mlflow.enabled": True,
        },
    )
    with caplog.at_level(logging.INFO):
        result = run_compress_stage(params, tracking_uri=uri)
    progress = [
        r.getMessage()
        for r in caplog.records
        if r.name == "tumorseg.training.callbacks" and r.getMessage().startswith("fine-tune: step ")
    ]
    assert progress and all("min left" in line for line in progress)  # fine-tuning shows its progress
    # each variant's Dice is one line, not a line of volumes per test case and variant
    assert not [r for r in caplog.records if r.name == "tumorseg.evaluation.pipeline_stage"]

    names = [r.name for r in result.variants]
    assert names == list(VARIANTS)  # fp32 first, then in the order asked for
    by_name = {r.name: r for r in result.variants}
    assert by_name["onnx_fp32"].onnx_max_abs_diff < 1e-4
    assert by_name["onnx_fp32"].dice_drop == pytest.approx(0.0, abs=1e-6)  # same network, same cases
    assert by_name["pruned_structured"].parameters < by_name["fp32"].parameters
    tune = by_name["pruned_structured"].details["pruning"]["fine_tune"][0]
    assert [step for step, _ in tune["curve"]] == [0, 1, 2]  # validated before the fine-tune and every step
    assert tune["best_val_dice"] == pytest.approx(max(dice for _, dice in tune["curve"]), abs=1e-6)
    assert by_name["int8"].details["quantization"]["quantized_nodes"]["Conv"] > 0
    wint8 = by_name["pruned_structured_wint8"]
    assert wint8.details["weight_only_int8"]["quantized_nodes"]["Conv"] > 0
    assert wint8.parameters == by_name["pruned_structured"].parameters
    assert wint8.file_mb < by_name["pruned_structured"].file_mb
    bf16 = by_name["pruned_structured_bf16"]
    assert bf16.runtime == "torch.export" and bf16.parameters == by_name["pruned_structured"].parameters
    assert bf16.details["converted_from"] == "pruned_structured" and 0 < bf16.onnx_max_abs_diff < 1.0
    assert all(r.latency_s > 0 and set(r.dice) == {"WT", "TC", "ET", "mean"} for r in result.variants)
    assert result.edge is not None and result.edge.accepted

    report = json.loads((root / "reports" / "compression.json").read_text())
    assert report["edge"] == result.edge.name and len(report["variants"]) == 6
    markdown = (root / "reports" / "compression.md").read_text()
    assert markdown.count("| onnxruntime |") == 4 and markdown.count("| torch.export |") == 1
    assert sorted(p.name for p in (root / "models" / "compressed").iterdir()) == [
        "int8.onnx",
        "onnx_fp32.onnx",
        "pruned_structured.onnx",
        "pruned_structured_bf16.pt2",
        "pruned_structured_wint8.onnx",
    ]

    after = _registry_state(uri)
    assert set(before["versions"]) < set(after["versions"])  # the fp32 versions are all still there
    assert after["aliases"]["champion"] == before["aliases"]["champion"]
    edge_version = after["aliases"]["edge"]
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert client.get_model_version("tumorseg", edge_version).tags["compression.variant"] == result.edge.name

    loaded = load_model("models:/tumorseg@edge", tracking_uri=uri)
    runtime = {"onnxruntime": OnnxRuntimeNetwork, "torch.export": ExportedProgramNetwork}[result.edge.runtime]
    assert isinstance(loaded.trained.network, runtime)
    assert client.get_model_version("tumorseg", edge_version).tags["runtime"] == result.edge.runtime

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = root / "pred_edge"
    code = main(
        [
            "predict",
            str(root / "raw"),
            "--out",
            str(out),
            "--model",
            "models:/tumorseg@edge",
            "--params",
            str(project["params_file"]),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert len(list(out.glob("*.nii.gz"))) == len(list((root / "raw").glob("BraTS2021_*")))


def test_a_bfloat16_edge_is_registered_as_a_program_and_served_by_the_pyfunc(
    project: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pandas as pd

    from tumorseg.compression.stage import run_compress_stage
    from tumorseg.models.program_network import ExportedProgramNetwork
    from tumorseg.registry.loading import load_model

    root, uri = project["root"], project["uri"]
    params = apply_overrides(
        project["params"],
        {
            "compress.variants": ["fp32", "bf16"],
            "compress.dice_tolerance": 1.0,
            "compress.model": "models:/tumorseg@champion",
            "compress.out_dir": str(root / "models" / "compressed_bf16"),
            "paths.reports": str(root / "reports_bf16"),
            "mlflow.enabled": True,
        },
    )
    result = run_compress_stage(params, tracking_uri=uri)
    assert result.edge is not None and result.edge.name == "bf16" and result.registered is not None
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version("tumorseg", result.registered["version"])
    assert version.tags["compression.variant"] == "bf16" and version.tags["runtime"] == "torch.export"
    assert "(PyTorch, torch.export program)" in version.description
    assert isinstance(
        load_model("models:/tumorseg@edge", tracking_uri=uri).trained.network, ExportedProgramNetwork
    )

    # The MLflow pyfunc (what `mlflow models serve` runs) loads the program and segments a case.
    model = mlflow.pyfunc.load_model(f"models:/tumorseg/{result.registered['version']}")
    case = sorted((root / "raw").glob("BraTS2021_*"))[0]
    out = model.predict(pd.DataFrame({"case_dir": [str(case)]}))
    assert list(out["case_id"]) == [case.name]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(
        [
            "predict",
            str(case),
            "--out",
            str(root / "pred_bf16"),
            "--model",
            "models:/tumorseg@edge",
            "--params",
            str(project["params_file"]),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (root / "pred_bf16" / f"{case.name}.nii.gz").is_file()


def test_emulated_bfloat16_variants_are_built_but_not_measured_by_default(
    project: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """compress.emulated_bf16: skip on a CPU without native bfloat16: the program is built, never
    scored or timed, the report says why, and the edge is chosen among the others."""
    from tumorseg.compression import stage

    monkeypatch.setattr(stage, "native_bf16_cpu", lambda: False)
    root = project["root"]
    params = apply_overrides(
        project["params"],
        {
            "compress.variants": ["fp32", "onnx_fp32", "bf16"],
            "compress.emulated_bf16": "skip",
            "compress.dice_tolerance": 1.0,
            "compress.register_edge": False,
            "compress.out_dir": str(root / "models" / "compressed_skip"),
            "paths.reports": str(root / "reports_skip"),
        },
    )
    result = stage.run_compress_stage(params, tracking_uri=project["uri"])
    by_name = {r.name: r for r in result.variants}
    skipped = by_name["bf16"]
    assert skipped.reason == stage.BF16_NOT_MEASURED and skipped.latency_s is None and not skipped.dice
    assert not skipped.accepted and (root / "models" / "compressed_skip" / "bf16.pt2").is_file()
    assert by_name["onnx_fp32"].latency_s and result.edge is not None and result.edge.name == "onnx_fp32"
    markdown = (root / "reports_skip" / "compression.md").read_text()
    assert "not measured: " + stage.BF16_NOT_MEASURED in markdown
    assert "PyTorch emulated" not in markdown


def test_the_dice_gate_rejects_a_damaged_variant_on_the_trained_model(
    project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The real gate (tolerance 0.01, not 1.0): 95 % of the weights zeroed without a fine-tune costs
    the trained model far more Dice than that, so the variant is rejected, no edge is registered and
    the fp32 champion stays where it was."""
    root, uri = project["root"], project["uri"]
    before = _registry_state(uri)
    code = main(
        [
            "compress",
            "--params",
            str(project["params_file"]),
            "-S",
            f"mlflow.tracking_uri={uri}",
            "-S",
            "mlflow.enabled=true",
            "-S",
            "compress.variants=[fp32, pruned_unstructured]",
            "-S",
            "compress.pruning.unstructured_amount=0.95",
            "-S",
            "compress.pruning.unstructured_fine_tune_steps=0",
            "-S",
            "compress.dice_tolerance=0.01",
            "-S",
            f"compress.out_dir={root / 'models' / 'compressed_gate'}",
            "-S",
            f"paths.reports={root / 'reports_gate'}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((root / "reports_gate" / "compression.json").read_text())
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["fp32"]["dice"]["mean"] > 0.2  # a model that segments: there is Dice to lose
    damaged = by_name["pruned_unstructured"]
    assert damaged["dice_drop"] > 0.01 and damaged["accepted"] is False
    assert report["edge"] is None
    after = _registry_state(uri)
    assert after["aliases"] == before["aliases"]  # champion unchanged, no edge moved or added
    assert "No variant passed the gate" in (root / "reports_gate" / "compression.md").read_text()
